"""robustbench_kd: distil adversarial robustness from RobustBench teachers into students.

Public API (imported lazily so ``robustbench-kd --help`` starts fast)::

    from robustbench_kd import hookimpl, Distiller, MethodConfig, option, AttackSpec, LossOutput, BatchContext
    from robustbench_kd import SetupContext  # what Distiller.on_setup receives

Methods are plugins: see :mod:`robustbench_kd.hookspecs`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
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
