"""Training a student: the run's set-up, the batch source, the step, the epoch loop, checkpoints and resume.

Read in this order: :mod:`.loop` (``train``: epochs, evaluation, checkpoints), :mod:`.batches` (the epoch's
batch source: order, extra data, sharding, resume skip), :mod:`.step` (one batch: context, prepare, attack,
loss, backward, optimiser, after_step, observers), :mod:`.engine` (precision, the compiled view, DDP and the
EMA copy behind one object), :mod:`.setup` (building the run from a config),
:mod:`.checkpoints` (what a checkpoint holds and exact resume), :mod:`.selection` (best-epoch selection on the
validation split), :mod:`.nan_guard`, :mod:`.metric_sums`.

May import: ``config``, ``evaluation``'s measuring modules (``evaluate_model`` for the validation check; never
``final_report`` or ``shards``), ``methods``, ``students``, ``scale``, ``zoo``, ``data``, the core plugin API,
``storage``, ``errors``; never ``submission``, ``analysis`` or ``jobs`` (import-linter contracts in
``pyproject.toml``).
"""
