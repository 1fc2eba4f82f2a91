"""The diagnostics table file ``OUT/diagnostics/tables.jsonl``: one JSON object per recorded epoch.

Each row is ``{"epoch": <1-based>, "<key>_reliability": {...}, "<key>_class_acc": [...]}`` (see
:mod:`robustbench_kd.analysis.diagnostics.collect`). The observer rewrites the file atomically at every
recorded epoch, and the report reads its last row. Both read it through :func:`read_rows`: bounded, and
a damaged line (not JSON, not an object, ``NaN``, no integer epoch) is returned as a problem instead of
raising, so a resumed run keeps its good rows and a report uses the last good one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from robustbench_kd.errors import UserError
from robustbench_kd.storage.bounded import MiB, parse_json_object_line, read_bytes_bounded

__all__ = ["FILE", "LIMIT", "earlier_rows", "last_row", "parse_row", "read_rows"]

log = logging.getLogger(__name__)

FILE = Path("diagnostics") / "tables.jsonl"

#: Largest table file read: a 300-epoch ImageNet run (1000-class tables for several models) writes ~20 MiB.
LIMIT = 64 * MiB
#: The deepest nesting of a row this library writes is 3 (row -> reliability table -> column).
MAX_DEPTH = 8
#: Rows read (recorded epochs); damaged lines listed one by one (the rest are counted), and read at most.
MAX_ROWS = 100_000
MAX_PROBLEMS = 5
MAX_BAD_LINES = 1_000

NEWLINE = b"\n"


def parse_row(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """``(row, "")`` for a good line, else ``(None, what is wrong with it)``.

    The observer writes empty bins as null, so a NaN in a row was put there by something else: damaged.
    """
    row, problem = parse_json_object_line(raw, max_depth=MAX_DEPTH, allow_nan=False)
    if row is None:
        return None, problem
    if "epoch" not in row:
        return None, "has no 'epoch'"
    epoch = row["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        shown = repr(epoch)
        return None, f"has epoch {shown if len(shown) <= 40 else shown[:37] + '...'}, not an epoch number (1, 2, ...)"
    return row, ""


def _data(path: str | os.PathLike[str]) -> tuple[bytes, list[str]]:
    """The file's bytes, or a problem when it cannot be read at all; ``b""`` without a file."""
    if not os.path.lexists(path):
        return b"", []
    try:
        return read_bytes_bounded(path, limit=LIMIT, what="diagnostics table file"), []
    except UserError as exc:
        return b"", [str(exc)]


def last_row(path: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """``(the last good row or None, [problems of the lines after it])``; ``(None, [])`` without a file.

    Lines are parsed from the end back to the first good one only: a report needs the last epoch.
    """
    data, problems = _data(path)
    bad, end = 0, len(data)
    while end >= 0 and bad <= MAX_BAD_LINES:
        start = data.rfind(b"\n", 0, end) + 1  # the line data[start:end], without its newline
        raw, end = data[start:end], start - 1
        if not raw.strip():
            continue
        row, problem = parse_row(raw)
        if row is not None:
            problems.reverse()
            return row, _counted(problems, bad)
        bad += 1
        if len(problems) < MAX_PROBLEMS:  # counting the line number costs a pass over the bytes before it
            problems.append(f"line {data.count(NEWLINE, 0, start) + 1} {problem}")
    problems.reverse()
    return None, _counted(problems, bad)


def _counted(problems: list[str], bad: int) -> list[str]:
    """``problems`` plus one entry counting the damaged lines not listed: a million bad lines are one warning."""
    listed = sum(p.startswith("line ") for p in problems)
    if bad > MAX_BAD_LINES:
        return [*problems, f"more than {MAX_BAD_LINES} damaged lines: the rest of the file is not read"]
    return [*problems, f"{bad - listed} more damaged lines"] if bad > listed else problems


def read_rows(path: str | os.PathLike[str]) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """``([(line number, row), ...], [problems])`` of a table file; ``([], [])`` when there is none.

    A file that cannot be read at all (a directory or FIFO in its place, larger than :data:`LIMIT`) is
    one problem and no rows; a damaged line is a problem (``"line 7 is not JSON (...)"``), the other
    lines are still read, up to :data:`MAX_ROWS` rows and :data:`MAX_BAD_LINES` damaged lines.
    """
    data, problems = _data(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    bad = 0
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(rows) == MAX_ROWS:
            problems.append(f"holds more than {MAX_ROWS} rows; those from line {number} on are not read")
            break
        row, problem = parse_row(raw)
        if row is not None:
            rows.append((number, row))
            continue
        bad += 1
        if bad > MAX_BAD_LINES:
            break
        if len(problems) < MAX_PROBLEMS:
            problems.append(f"line {number} {problem}")
    return rows, _counted(problems, bad)


def earlier_rows(path: str | os.PathLike[str], epoch: int) -> list[dict[str, Any]]:
    """The good rows of epochs before ``epoch``, for the observer to rewrite the file with (resume-safe).

    Damaged lines are dropped with one warning: the epoch being recorded must not fail on an old line.
    """
    rows, problems = read_rows(path)
    if problems:
        log.warning(
            "%s; those lines are dropped", "; ".join([f"diagnostics table file {path} {problems[0]}", *problems[1:]])
        )
    return [row for _, row in rows if row["epoch"] < epoch]
