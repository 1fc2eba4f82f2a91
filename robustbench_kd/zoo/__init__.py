"""RobustBench integration: zoo teachers by name without surprise downloads, and the import shim.

* :mod:`.models`: ``robustbench:<dataset>/<threat>/<Name>`` teachers, checked before ``load_model`` runs;
* :mod:`.compat`: makes ``import robustbench`` and the original AutoAttack API work with what PyPI serves;
* :mod:`.autoattack_resume`: resumable AutoAttack runs (their state file), which the compat adapter runs;
* :mod:`.names`: RobustBench's rules for model ids and dataset directory names.

May import the layers below it: ``data`` (ImageNet preprocessing), the core plugin API, ``storage`` and
``errors``. Never ``scale`` (an independent sibling) or anything that trains or evaluates; ``evaluation``
and ``students`` import it.
"""
