"""Files on disk: crash-safe writes and checkpoints that load without executing code.

* :mod:`.bounded`: read untrusted files: regular files only, a size limit, a bound on parsed structure;
* :mod:`.safe_pickle`: unpickle data files (CIFAR batches) without running code: an allow-list of numpy's
  array globals, each argument checked, a bound on size and operations;
* :mod:`.atomic`: write-to-temp, fsync, rename; a file is the old version or the new one, never a mix;
* :mod:`.checkpoint`: save and safely load training checkpoints (``weights_only``), detect HTML pages
  and truncated downloads, check pinned SHA-256 digests, load weights into a network;
* :mod:`.hashing`: the SHA-256 of a file from its raw bytes.
* :mod:`.names`: output directories given by the user (never empty, no control characters);
* :mod:`.run_lock`: one writer per run directory (a lock file ``distill`` holds; a crash releases it);

May import: :mod:`robustbench_kd.errors` only; every other layer may import this package.
"""
