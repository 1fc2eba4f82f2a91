"""The RobustBench submission bundle: leaderboard entry, AutoAttack log, hashes, zoo entry, New Model issue.

* :mod:`.bundle`: writes ``submission/<model id>/`` for one evaluated model;
* :mod:`.section`: the ``[model_info]`` config section (the leaderboard metadata that cannot be measured).

May import the layers below it: ``students`` (the zoo entry's constructor), ``scale``, ``zoo``, ``data``, the
core plugin API, ``storage`` and ``errors``. Never ``evaluation`` (whose final report writes the bundle
through this package), ``analysis``, ``config``, ``training`` or ``jobs``.
"""
