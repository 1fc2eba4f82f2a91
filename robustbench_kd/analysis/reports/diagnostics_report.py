"""The report's diagnostics part: figures and numbers from what ``[diagnostics]`` recorded during training.

Nothing is recomputed: everything comes from the run directory (``metrics.jsonl``'s ``diag_*`` keys, the
last recorded epoch of ``diagnostics/tables.jsonl``, ``diagnostics/trajectories.npz``). A run trained
without diagnostics simply has no such figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from robustbench_kd.analysis.diagnostics import trajectories
from robustbench_kd.analysis.reports import diagnostic_figures as figures
from robustbench_kd.analysis.reports.metrics import read_metric_series
from robustbench_kd.errors import UserError

#: figure key -> file name (under report/)
FIGURES = {
    "diagnostics": "diagnostics_over_epochs.png",
    "reliability": "reliability_diagrams.png",
    "class_accuracy": "per_class_accuracy.png",
    "trajectories": "trajectories.png",
}

TITLES = {
    "diagnostics": "Diagnostics over the epochs (entropy, calibration, agreement, accuracy, trajectories)",
    "reliability": "Reliability diagrams (last recorded epoch)",
    "class_accuracy": "Per-class accuracy of the student (last recorded epoch)",
    "trajectories": "Correct-class probability trajectories by sample difficulty",
}


def last_tables(path: Path) -> tuple[int | None, dict[str, Any]]:
    """The last row of ``tables.jsonl``: (epoch, tables); (None, {}) without the file."""
    if not path.is_file():
        return None, {}
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        return None, {}
    try:
        row = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} last line is not JSON ({exc.msg})") from None
    return row.pop("epoch", None), row


def write_diagnostics_figures(run_dir: Path, out: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Draw whichever diagnostics figures the run's files allow; (figure key -> path, numbers)."""
    written: dict[str, Path] = {}
    numbers: dict[str, Any] = {}
    epochs, series = read_metric_series(run_dir / "metrics.jsonl")
    diag = {
        k: v
        for k, v in series.items()
        if k.startswith("diag_") and k != "diag_seconds" and not k.endswith("_worst_class")
    }
    if diag:
        written["diagnostics"] = figures.diagnostics_over_epochs_figure(out / FIGURES["diagnostics"], epochs, diag)
        numbers["last"] = {k: next((v for v in reversed(values) if v is not None), None) for k, values in diag.items()}
    epoch, tables = last_tables(run_dir / "diagnostics" / "tables.jsonl")
    reliability = {
        k.removeprefix("diag_").removesuffix("_reliability"): v for k, v in tables.items() if k.endswith("_reliability")
    }
    if reliability:
        written["reliability"] = figures.reliability_figure(out / FIGURES["reliability"], reliability)
        numbers["tables_epoch"] = epoch
    class_acc = {
        k.removeprefix("diag_").removesuffix("_class_acc"): v for k, v in tables.items() if k.endswith("_class_acc")
    }
    if class_acc:
        written["class_accuracy"] = figures.class_accuracy_figure(out / FIGURES["class_accuracy"], class_acc)
        numbers["class_accuracy"] = class_acc
    arrays = trajectories.load(run_dir / trajectories.FILE)
    if any(k.startswith("difficulty_") for k in arrays):
        written["trajectories"] = figures.trajectory_figure(out / FIGURES["trajectories"], arrays)
        numbers["trajectory_epochs"] = [int(e) for e in arrays["epochs"]]
    return written, numbers
