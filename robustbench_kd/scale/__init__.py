"""Speed and scale: precision and compile, EMA, multi-process training, SyncBN, vectorised ensembles.

* :mod:`.sections`: the ``[speed]`` and ``[ema]`` config sections (no torch import);
* :mod:`.precision`: autocast, GradScaler, channels_last and ``torch.compile`` behind one object;
* :mod:`.ema`: the exponential moving average of the student;
* :mod:`.distributed`: torchrun/DDP: process groups, batch sharding, reductions;
* :mod:`.sync_bn`: BatchNorm over the global batch;
* :mod:`.vectorised_ensemble`: an ensemble of same-architecture teachers as one ``torch.func`` call.

May import: ``errors`` and the plugin API's data classes; never ``training``.
"""
