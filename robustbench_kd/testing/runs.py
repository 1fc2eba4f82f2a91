"""Tiny run configurations on the embedded digits: a whole `distill` in seconds on a CPU.

For tests and plugin authors: :func:`tiny_digits_raw` gives the raw mapping (``config_from_mapping``
or a YAML run file) of a 2-epoch PGD-AT run of a half-width small CNN on 200 digits; callers adjust
it. :func:`tiny_digits_config` is the same as a ``RunConfig``. :func:`random_teacher_spec` saves a
randomly initialised small CNN as a ``file:`` teacher; :func:`digits_load_context` is the context teacher
sources load digits-shaped teachers in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustbench_kd.config import RunConfig, config_from_mapping

if TYPE_CHECKING:
    from robustbench_kd.plugin_host import PluginHost
    from robustbench_kd.teachers import TeacherLoadContext

__all__ = ["digits_load_context", "random_teacher_spec", "tiny_digits_config", "tiny_digits_raw"]

_TINY_DIGITS: dict[str, dict[str, Any]] = {
    "run": {"progress": False, "deterministic": True, "seed": 3},
    "data": {"dataset": "digits", "batch_size": 100, "n_train": 200},
    "threat": {"eps": 0.2, "alpha": 0.1, "steps": 2},
    "student": {"arch": "small-cnn", "options": {"width": 0.5}},
    "method": {"name": "pgd-at"},
    "optim": {"epochs": 2, "lr": 0.05},
}


def tiny_digits_raw(
    out_dir: str | Path, *, merge: Mapping[str, Mapping[str, Any]] | None = None, **sections: Any
) -> dict[str, Any]:
    """The raw run mapping: the tiny defaults, ``merge``'s keys merged into their sections, then
    ``sections`` replacing whole sections (``method={"name": "kd"}`` drops the default method keys)."""
    raw = copy.deepcopy(_TINY_DIGITS)
    raw["run"] = {"out_dir": str(out_dir), **raw["run"]}
    for key, value in (merge or {}).items():
        raw[key] = {**raw.get(key, {}), **value}
    raw.update(sections)
    return raw


def tiny_digits_config(
    out_dir: str | Path, *, merge: Mapping[str, Mapping[str, Any]] | None = None, **sections: Any
) -> RunConfig:
    """:func:`tiny_digits_raw` (same arguments) as a validated ``RunConfig``."""
    return config_from_mapping(tiny_digits_raw(out_dir, merge=merge, **sections))


def random_teacher_spec(path: str | Path, *, width: float = 2.0, seed: int = 0) -> str:
    """Save a seeded random small CNN (digits shape) at ``path``; return its ``file:`` teacher spec."""
    import torch

    from robustbench_kd.students import build_student

    torch.manual_seed(seed)
    net = build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=width)
    torch.save({"state_dict": net.state_dict()}, path)
    return f"file:{path}?arch=small-cnn&width={width}"


def digits_load_context(host: PluginHost | None = None, *, model_dir: str | Path = "models") -> TeacherLoadContext:
    """The ``TeacherLoadContext`` of the embedded digits (10 classes, 1x8x8 images), on the CPU.

    With ``host`` its student registry rebuilds ``file:`` checkpoints; without, the context has none.
    """
    from robustbench_kd.teachers import TeacherLoadContext  # imports torch, so only here

    return TeacherLoadContext(
        dataset="digits",
        num_classes=10,
        in_channels=1,
        image_size=8,
        model_dir=Path(model_dir),
        students=None if host is None else host.students,
    )
