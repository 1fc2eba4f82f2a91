"""The bundle's ``autoattack.log``: AutoAttack's full log of the evaluation that produced the robust accuracy.

The evaluation writes the log to a hidden file in the bundle directory while it runs
(:func:`autoattack_log_partial`); the bundle moves it into place (:func:`bundle_log`) once the whole
evaluation has succeeded, or concatenates the logs of several shards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_text
from robustbench_kd.submission.layout import AUTOATTACK_LOG, bundle_dir

__all__ = ["autoattack_log_partial", "bundle_log"]


def autoattack_log_partial(out_dir: str | os.PathLike[str], model_id: str) -> Path:
    """Where the evaluation writes AutoAttack's log while it runs; the bundle moves it into place.

    A stale file from an interrupted run is removed, so the log holds this run only.
    """
    path = bundle_dir(out_dir, model_id) / f".{AUTOATTACK_LOG}.partial"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return path


def bundle_log(
    directory: Path,
    logs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    *,
    keep_sources: bool = False,
) -> Path | None:
    """Move (or concatenate) this run's AutoAttack log(s) to ``directory/autoattack.log``.

    With ``keep_sources`` the logs are copied, not moved (the shards keep theirs, so a merge can be repeated).
    """
    target = directory / AUTOATTACK_LOG
    if logs is None:
        target.unlink(missing_ok=True)  # a log from an earlier run would not describe these numbers
        return None
    paths = [Path(logs)] if isinstance(logs, (str, os.PathLike)) else [Path(p) for p in logs]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise UserError(f"AutoAttack log {absent[0]} does not exist; was AutoAttack run with log_path?")
    if len(paths) == 1 and paths[0].resolve().parent == directory.resolve() and not keep_sources:
        os.replace(paths[0], target)  # same directory: a rename is atomic
        return target
    parts = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text if len(paths) == 1 else f"===== {path.name} =====\n{text}")
    atomic_write_text(target, "".join(parts))
    if keep_sources:
        return target
    for path in paths:
        if path.resolve() != target.resolve():
            path.unlink(missing_ok=True)
    return target
