"""Per-epoch numeric series from ``metrics.jsonl``: every numeric key present, none required."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from robustbench_kd.errors import UserError


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


def read_metric_series(path: Path) -> tuple[list[float], dict[str, list[float | None]]]:
    """``(epochs, {key: values})`` from a metrics.jsonl; nested tables become ``a.b`` keys.

    A key enters when any row holds a finite number for it (rows without it give None); ``epoch``
    (or the row index + 1 when absent) is the x axis, not a series. A missing file gives no series.
    """
    if not path.is_file():
        return [], {}
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {number} is not JSON ({exc.msg})") from None
        if isinstance(row, dict):
            rows.append(_flatten(row))
    epochs = [_number(row.get("epoch")) or float(i + 1) for i, row in enumerate(rows)]
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k != "epoch" and k not in keys and _number(v) is not None]
    return epochs, {k: [_number(row.get(k)) for row in rows] for k in keys}
