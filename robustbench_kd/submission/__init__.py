"""The RobustBench submission bundle: leaderboard entry, AutoAttack log, hashes, zoo entry, New Model issue.

* :mod:`.bundle`: writes ``submission/<model id>/`` for one evaluated model, from the pieces below;
* :mod:`.layout`: the bundle's directory and file names; :mod:`.autoattack_log`: AutoAttack's log, moved in;
* :mod:`.zoo_entry`: the model-zoo entry (the architecture's constructor as source); :mod:`.issue`: the
  filled-in "New Model(s)" issue;
* :mod:`.section`: the ``[model_info]`` config section (the leaderboard metadata that cannot be measured).

May import the layers below it: ``students`` (the zoo entry's constructor), ``scale``, ``zoo``, ``data``, the
core plugin API, ``storage`` and ``errors``. Never ``evaluation`` (whose final report writes the bundle
through this package), ``analysis``, ``config``, ``training`` or ``jobs``.
"""
