"""Files on disk: crash-safe writes and checkpoints that load without executing code.

* :mod:`.atomic`: write-to-temp, fsync, rename; a file is the old version or the new one, never a mix;
* :mod:`.checkpoint`: save and safely load training checkpoints (``weights_only``), detect HTML pages
  and truncated downloads, read a checkpoint's stored architecture.

May import: :mod:`robustbench_kd.errors` and the model builders (``students``) only.
"""
