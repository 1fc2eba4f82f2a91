"""Speed and scale: precision and compile, EMA, multi-process training, SyncBN, vectorised ensembles.

* :mod:`.sections`: the ``[speed]`` and ``[ema]`` config sections (no torch import);
* :mod:`.precision`: autocast, GradScaler, channels_last and ``torch.compile`` behind one object;
* :mod:`.ema`: the exponential moving average of the student;
* :mod:`.distributed`: torchrun/DDP: process groups, batch sharding, reductions;
* :mod:`.sync_bn`: BatchNorm over the global batch.

(The vectorised teacher ensemble is :mod:`robustbench_kd.vectorised_ensemble`, beside the teachers that use it.)

May import the layers below it: ``data``, the core plugin API (e.g. ``TeacherSet``), ``storage`` and
``errors``. Never ``zoo`` (an independent sibling), ``methods``, ``students``, ``evaluation``, ``config``,
``training`` or anything above; ``config`` and ``training`` import it.
"""
