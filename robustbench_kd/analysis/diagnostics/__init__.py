"""Per-epoch training diagnostics: entropy, calibration, agreement, per-class accuracy, trajectories.

:mod:`.metrics` holds the pure formulas, :mod:`.collect` evaluates them on a fixed subset at epoch end,
:mod:`.trajectories` keeps the per-sample trajectory file, :mod:`.tensorboard` the optional event files and
:mod:`.section` the ``[diagnostics]`` config section. The observer plugin is
``robustbench_kd_plugins.diagnostics``. Nothing here is imported unless a run asks for diagnostics.
"""
