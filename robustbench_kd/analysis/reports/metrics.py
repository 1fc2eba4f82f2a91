"""Per-epoch numeric series from ``metrics.jsonl``: every numeric key present, none required.

The file may be damaged (a copy cut short, a crash on a filesystem without atomic renames, a hand edit):
a line that is not a JSON object is skipped and the others are used; a file that cannot be read at all
(a directory or a FIFO in its place, larger than :data:`LIMIT`) gives no series. Either way the file is
noted once in the report's :class:`~robustbench_kd.analysis.reports.damage.Damage`, which the caller logs
as one warning line. ``NaN`` is not damage here: the trainer writes a diverged loss as ``NaN``; like any
non-finite or non-numeric value it is a missing point.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from robustbench_kd.analysis.reports.damage import Damage
from robustbench_kd.errors import UserError
from robustbench_kd.storage.bounded import MiB, parse_json_object_line, read_bytes_bounded

#: Largest metrics.jsonl read: ten times what a 300-epoch run with every diagnostic writes.
LIMIT = 16 * MiB
#: Rows (epochs) and distinct numeric keys read: far above any run, and a bound on the series' memory.
MAX_ROWS = 20_000
MAX_KEYS = 500
#: Longest key kept (a figure title), and the deepest nesting of a row.
MAX_KEY_LENGTH = 200
MAX_DEPTH = 8

CONSEQUENCE = "the report leaves out the training-metrics figures"


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _parse_row(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """``(flattened row, "")`` or ``(None, what is wrong with the line)``.

    NaN is kept: the trainer logs a diverged loss as NaN, and the figure shows the gap.
    """
    row, problem = parse_json_object_line(raw, max_depth=MAX_DEPTH, allow_nan=True)
    if row is None:
        return None, problem
    if "epoch" in row and _number(row["epoch"]) is None:
        return None, f"has epoch {_short(row['epoch'])}, not a number"
    return _flatten(row), ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_metric_series(
    path: str | os.PathLike[str], damage: Damage | None = None, *, required: bool = False
) -> tuple[list[float], dict[str, list[float | None]]]:
    """``(epochs, {key: values})`` from a metrics.jsonl; nested tables become ``a.b`` keys.

    A key enters when any row holds a finite number for it (rows without it give None); ``epoch``
    (or the row index + 1 when absent) is the x axis, not a series. A missing file gives no series, and
    is damage only when ``required``. Damage is noted in ``damage``; without one it is logged at once.
    """
    own = damage is None
    damage = Damage() if damage is None else damage
    try:
        return _read(Path(path), damage, required=required)
    finally:
        if own:
            damage.emit()


def _read(path: Path, damage: Damage, *, required: bool) -> tuple[list[float], dict[str, list[float | None]]]:
    if not required and not os.path.lexists(path):
        return [], {}
    try:
        data = read_bytes_bounded(path, limit=LIMIT, what="metrics file")
    except UserError as exc:
        damage.note(path, str(exc), CONSEQUENCE)
        return [], {}
    problems: list[str] = []
    epochs: list[float] = []
    columns: dict[str, list[float | None]] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(epochs) == MAX_ROWS:
            problems.append(f"holds more than {MAX_ROWS} rows; those from line {number} on are not read")
            break
        row, problem = _parse_row(raw)
        if row is None:
            problems.append(f"line {number} {problem}")
            continue
        _add_row(row, len(epochs), columns, problems)
        epochs.append(_number(row.get("epoch")) or float(len(epochs) + 1))
    for values in columns.values():
        values.extend([None] * (len(epochs) - len(values)))
    if problems:
        used = f"the report uses the {len(epochs)} readable rows" if epochs else CONSEQUENCE
        damage.note(path, [f"metrics file {path} {problems[0]}", *problems[1:]], used)
    return epochs, columns


def _add_row(row: dict[str, Any], index: int, columns: dict[str, list[float | None]], problems: list[str]) -> None:
    """Append row ``index``'s numbers to their columns (a new column is padded with None before it)."""
    for key, value in row.items():
        number = _number(value)
        if key == "epoch" or number is None:
            continue
        column = columns.get(key)
        if column is None:
            if len(key) > MAX_KEY_LENGTH or len(columns) == MAX_KEYS:
                if not any(p.startswith("holds keys") for p in problems):
                    problems.append(
                        f"holds keys beyond the first {MAX_KEYS} or longer than {MAX_KEY_LENGTH} characters; "
                        "they are not drawn"
                    )
                continue
            column = columns[key] = []
        column.extend([None] * (index - len(column)))
        column.append(number)
