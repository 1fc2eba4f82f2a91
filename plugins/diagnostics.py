"""``diagnostics``: the per-epoch diagnostics observer, driven by the ``[diagnostics]`` section.

Off by default: with ``diagnostics.enabled = []`` both hooks return before touching a model, so the run does
no extra forward pass. When on, every ``diagnostics.every`` epochs (and at the last epoch) it evaluates the
enabled diagnostics on a fixed subset (never the test set; see :mod:`robustbench_kd.analysis.diagnostics.collect` for
the keys), adds the scalars (and ``diag_seconds``, their wall time) to the epoch's metrics row, appends the tables to
``OUT/diagnostics/tables.jsonl``, the trajectories to ``OUT/diagnostics/trajectories.npz`` and, with
``diagnostics.tensorboard = true``, the scalars to ``OUT/diagnostics/tensorboard``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from robustbench_kd.hookspecs import hookimpl

TABLES = "diagnostics/tables.jsonl"


@hookimpl
def rbkd_train_start(run: Any) -> None:
    section = run.config.diagnostics
    if section.on and section.tensorboard:
        from robustbench_kd.analysis.diagnostics.tensorboard import check_available

        check_available()


@hookimpl
def rbkd_epoch_end(run: Any, epoch: int, metrics: dict[str, Any]) -> None:
    section = run.config.diagnostics
    if not section.on:
        return
    if (epoch + 1) % section.every and epoch + 1 != run.config.optim.epochs:
        return
    from robustbench_kd.analysis.diagnostics.collect import collect

    start = time.perf_counter()
    scalars, tables = collect(run, epoch)
    metrics.update(scalars)
    metrics["diag_seconds"] = round(time.perf_counter() - start, 3)  # wall time of the diagnostics themselves
    _append_tables(run, epoch + 1, tables)
    if section.tensorboard:
        from robustbench_kd.analysis.diagnostics.tensorboard import write_scalars

        write_scalars(run.out_dir, epoch + 1, scalars)


def _append_tables(run: Any, epoch: int, tables: dict[str, Any]) -> None:
    """Rewrite tables.jsonl atomically with the rows of earlier epochs plus this one (resume-safe)."""
    from robustbench_kd.analysis.diagnostics.tables import earlier_rows
    from robustbench_kd.storage.atomic import atomic_write_text

    path = run.out_dir / TABLES
    rows = earlier_rows(path, epoch)  # bounded; a damaged line is dropped with a warning
    rows.append({"epoch": epoch, **tables})
    atomic_write_text(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in _no_nan(rows)))


def _no_nan(value: Any) -> Any:
    """JSON has no NaN: empty reliability bins are written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
