"""Building a report away from its output directory, and moving it in only when it is complete.

A report is several files (figures, ``analyses.json``, ``report.md``, ``report.html``, ``overview.png``)
computed one after the other. They are written into a private scratch directory first; only when the
last one is written are they copied under the output directory, each atomically, the Markdown index
last. A report that fails half way (a damaged input that leaves nothing to report, an interrupt) leaves
the output directory exactly as it was: nothing created, no previous report half replaced.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_bytes
from robustbench_kd.storage.bounded import read_bytes_bounded
from robustbench_kd.storage.names import check_output_dir

__all__ = ["output_dir", "staged"]

#: A staged file is one this process wrote a moment ago; the bound only guards against a swapped file.
_STAGED_LIMIT = 1 << 30


def output_dir(value: str | os.PathLike[str], *, what: str) -> Path:
    """``value`` as the report's output directory, refused (one line) when no directory can be made there.

    ``what`` names where the value came from (``"--out"``). The directory itself is created only when the
    report is complete.
    """
    out = Path(check_output_dir(value, what=what))
    for folder in (out, *out.parents):
        if folder.is_dir():
            break
        if os.path.lexists(folder):
            kind = "is a file" if folder.is_file() else "exists and is not a directory"
            raise UserError(f"{what} {out} cannot be a report directory: {folder} {kind}; give another directory")
    return out


@contextlib.contextmanager
def staged(out: Path, *, index: str) -> Iterator[Path]:
    """A scratch directory to write a report into; on a clean exit its files are moved under ``out``.

    ``index`` (``"report.md"``) is moved last, so that it never points at figures not yet in place. On an
    exception the scratch directory is removed and ``out`` is untouched.
    """
    with tempfile.TemporaryDirectory(prefix="rbkd-report-") as scratch:
        yield Path(scratch)
        _publish(Path(scratch), out, index=index)


def _publish(scratch: Path, out: Path, *, index: str) -> None:
    names = sorted((p.name for p in scratch.iterdir() if p.is_file()), key=lambda name: (name == index, name))
    for name in names:
        # Checked for every file before any is moved: a directory in the way fails the report, not half of it.
        target = out / name
        if target.is_dir():
            raise UserError(f"{target} is a directory where the report writes a file; remove it or give another --out")
    for name in names:
        data = read_bytes_bounded(scratch / name, limit=_STAGED_LIMIT, what="staged report file")
        atomic_write_bytes(out / name, data)
