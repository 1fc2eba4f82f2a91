"""Parts that distillation methods are built from: pure loss maths a reader can test and reuse.

* :mod:`.losses`: KL, soft cross-entropy, label mixing, the reductions the reference codes use;
* :mod:`.divergence`: the divergence component (KL or IKL, its class prior and options) of ard, rslad, ikl-at;
* :mod:`.introspection`: the teacher-introspection weighting and warm-up shared by iad and adaiad;
* :mod:`.attack_options`: attack options every method declares the same way, turned into an ``AttackSpec``;
* :mod:`.slack_matching`, :mod:`.soft_rank`, :mod:`.attribution`, :mod:`.features`: SmaraAD's rank
  correlation and CAM alignment, and the feature taps they read.

May import: ``scale`` (sums over processes), ``data`` (input conversion), the core plugin API (``distiller``,
``context``, ``attacks``, ``teachers``, ``threat``), ``errors``; never ``training``, ``evaluation``,
``students`` or a plugin (import-linter contracts in ``pyproject.toml``).
"""
