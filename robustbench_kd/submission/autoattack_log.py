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
from robustbench_kd.storage.bounded import MiB, open_regular, read_bytes_bounded
from robustbench_kd.submission.layout import AUTOATTACK_LOG, bundle_dir

__all__ = [
    "LOG_LIMIT",
    "autoattack_log_partial",
    "bundle_log",
    "check_log_file",
    "check_logs",
    "log_paths",
    "read_log",
]

#: AutoAttack's full log of a leaderboard evaluation (every attack, progress included) is a few MiB; a log,
#: or the concatenated logs of a sharded run, of more than this is not one, and is refused unread.
LOG_LIMIT = 64 * MiB


def check_log_file(path: str | os.PathLike[str]) -> int:
    """Return the size of the AutoAttack log ``path``, or refuse it: not a regular file, or over :data:`LOG_LIMIT`."""
    fd = open_regular(path, what="AutoAttack log")
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > LOG_LIMIT:
        raise UserError(
            f"AutoAttack log {path} holds {size / MiB:.0f} MiB, more than the {LOG_LIMIT // MiB} MiB of any "
            "AutoAttack log (a leaderboard evaluation logs a few MiB); it is not the log of this evaluation"
        )
    return size


def read_log(path: str | os.PathLike[str]) -> str:
    """The text of an AutoAttack log: a regular file of at most :data:`LOG_LIMIT` bytes; bad bytes replaced."""
    return read_bytes_bounded(path, limit=LOG_LIMIT, what="AutoAttack log").decode("utf-8", errors="replace")


def autoattack_log_partial(out_dir: str | os.PathLike[str], model_id: str) -> Path:
    """Where the evaluation writes AutoAttack's log while it runs; the bundle moves it into place.

    A stale file from an interrupted run is removed, so the log holds this run only.
    """
    path = bundle_dir(out_dir, model_id) / f".{AUTOATTACK_LOG}.partial"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return path


def log_paths(logs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """``logs`` (one path or several) as a list of paths."""
    return [Path(logs)] if isinstance(logs, (str, os.PathLike)) else [Path(p) for p in logs]


def check_logs(paths: Sequence[Path]) -> None:
    """Refuse logs that are missing, not regular files, or together larger than :data:`LOG_LIMIT`."""
    absent = [p for p in paths if not p.exists() and not p.is_symlink()]
    if absent:
        raise UserError(f"AutoAttack log {absent[0]} does not exist; was AutoAttack run with log_path?")
    total = sum(check_log_file(path) for path in paths)
    if total > LOG_LIMIT:
        raise UserError(
            f"the AutoAttack logs {paths[0]} ... {paths[-1]} hold {total / MiB:.0f} MiB together, more than the "
            f"{LOG_LIMIT // MiB} MiB a bundle's {AUTOATTACK_LOG} may hold"
        )


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
    paths = log_paths(logs)
    check_logs(paths)
    if len(paths) == 1 and paths[0].resolve().parent == directory.resolve() and not keep_sources:
        os.replace(paths[0], target)  # same directory: a rename is atomic
        return target
    parts = []
    for path in paths:
        text = read_log(path)
        parts.append(text if len(paths) == 1 else f"===== {path.name} =====\n{text}")
    atomic_write_text(target, "".join(parts))
    if keep_sources:
        return target
    for path in paths:
        if path.resolve() != target.resolve():
            path.unlink(missing_ok=True)
    return target
