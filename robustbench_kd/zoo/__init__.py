"""RobustBench integration: zoo teachers by name without surprise downloads, and the import shim.

* :mod:`.models`: ``robustbench:<dataset>/<threat>/<Name>`` teachers, checked before ``load_model`` runs;
* :mod:`.compat`: makes ``import robustbench`` and the original AutoAttack API work with what PyPI serves.

May import: ``errors``, ``storage``; nothing that trains or evaluates.
"""
