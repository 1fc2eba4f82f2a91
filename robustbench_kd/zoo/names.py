"""The names RobustBench uses as file and directory names: model ids and dataset directories.

A model id (``Carmon2019Unlabeled``, ``Wong2020Fast_last``) is the stem of its leaderboard entry
``model_info/<dataset>/<threat_model>/<id>.json`` and of its checkpoint ``models/<dataset>/<threat_model>/<id>.pt``,
so it has to be a safe file stem: letters, digits, ``_`` and ``-`` only.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from robustbench_kd.errors import UserError

__all__ = ["validate_dataset_name", "validate_model_id"]

_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
_MAX_ID_LEN = 200


def _is_name(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and bool(_ID_RE.fullmatch(value)) and len(value) <= _MAX_ID_LEN


def validate_model_id(model_id: object, *, what: str = "model id") -> str:
    """Return ``model_id`` if it is a usable file stem (letters, digits, ``_``, ``-``), else raise UserError.

    ``what`` says where the id came from (``"--name"``, ``"the model id in shard file X"``), so the message
    points at what to fix. Call this before anything is created from the id: ``../x`` or ``/tmp/x`` joined
    to an output directory would write outside it.
    """
    if not _is_name(model_id):
        raise UserError(
            f"{what} must be 1-{_MAX_ID_LEN} characters from letters, digits, '_' and '-' "
            f"(RobustBench style: <Surname><Year><FirstWord>[_suffix], e.g. Carmon2019Unlabeled); "
            f"got {_show(model_id)}"
        )
    return model_id


def _show(value: object) -> str:
    """``repr`` (control characters escaped: the message stays one line), cut to a readable length."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def validate_dataset_name(dataset: object) -> str:
    """Return ``dataset`` if it is a usable directory name (letters, digits, ``_``, ``-``), else raise UserError."""
    if not _is_name(dataset):
        raise UserError(f"dataset must be a name such as 'cifar10' (letters, digits, '_' and '-'), got {dataset!r}")
    return dataset
