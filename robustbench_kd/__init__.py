"""robustbench_kd: distil adversarial robustness from RobustBench teachers into students.

Use it from Python as the commands do (:mod:`robustbench_kd.api`)::

    import robustbench_kd as rbkd

    run = rbkd.distill("run.toml", overrides=["optim.epochs=5"])       # -> RunResult
    result = rbkd.evaluate(run.student, dataset="cifar10", threat_model="Linf", eps=8 / 255)  # -> EvalResult
    student = rbkd.load_student(run.run_dir)                          # -> nn.Module (or a .safetensors file)

    distill(config, *, overrides=None, resume=False, progress=True, evaluate=True) -> RunResult
    evaluate(model, *, dataset, threat_model, eps=None, n_examples=None, attacks=..., data_dir, device,
             batch_size, seed, name=None, out_dir, ...) -> EvalResult
    load_student(path_or_run_dir) -> nn.Module
    distill_seeds(config, seeds, *, overrides=None, progress=True) -> SweepResult   # distill --seeds
    compare(runs_or_sweeps, *, metric="autoattack", out=None) -> Comparison          # robustbench-kd compare
    reproduce(recipe, *, overrides=None, resume=False) -> Reproduction                # robustbench-kd reproduce

Mistakes raise :class:`UserError` with the one line the command prints.

Writing a method (a plugin: see :mod:`robustbench_kd.hookspecs`)::

    from robustbench_kd import hookimpl, Distiller, MethodConfig, option, AttackSpec, LossOutput, BatchContext
    from robustbench_kd import SetupContext  # what Distiller.on_setup receives

Everything is imported lazily, so ``robustbench-kd --help`` starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "distill": "robustbench_kd.api",
    "evaluate": "robustbench_kd.api",
    "load_student": "robustbench_kd.api",
    "distill_seeds": "robustbench_kd.api",
    "compare": "robustbench_kd.api",
    "SweepResult": "robustbench_kd.api",
    "reproduce": "robustbench_kd.api",
    "Reproduction": "robustbench_kd.api",
    "RunResult": "robustbench_kd.api",
    "EvalResult": "robustbench_kd.api",
    "hookimpl": "robustbench_kd.hookspecs",
    "hookspec": "robustbench_kd.hookspecs",
    "Distiller": "robustbench_kd.distiller",
    "AttackSpec": "robustbench_kd.distiller",
    "LossOutput": "robustbench_kd.distiller",
    "MethodConfig": "robustbench_kd.distiller",
    "option": "robustbench_kd.distiller",
    "BatchContext": "robustbench_kd.context",
    "SetupContext": "robustbench_kd.context",
    "Teacher": "robustbench_kd.teachers",
    "EnsembleTeacher": "robustbench_kd.teachers",
    "TeacherSet": "robustbench_kd.teachers",
    "TeacherSpec": "robustbench_kd.teachers",
    "ThreatSpec": "robustbench_kd.threat",
    "UserError": "robustbench_kd.errors",
    "PluginHost": "robustbench_kd.plugin_host",
    "DistillationAttack": "robustbench_kd.attacks",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robustbench_kd' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
