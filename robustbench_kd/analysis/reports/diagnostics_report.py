"""The report's diagnostics part: figures and numbers from what ``[diagnostics]`` recorded during training.

Nothing is recomputed: everything comes from the run directory (``metrics.jsonl``'s ``diag_*`` keys, the
last recorded epoch of ``diagnostics/tables.jsonl``, ``diagnostics/trajectories.npz``). A run trained
without diagnostics simply has no such figures.

Damaged files cost their figures only. A table file whose last line was cut is read up to its last good
row; a table of the wrong shape or types is left out and the others drawn; a trajectory file that cannot
be read, or whose arrays do not fit together, gives no trajectory figure; a file the run's
``diagnostics.enabled`` says was recorded but that is missing counts as damaged. Each damaged file is one
note in the report's :class:`~robustbench_kd.analysis.reports.damage.Damage` (one warning line).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from robustbench_kd.analysis.diagnostics import tables as table_file
from robustbench_kd.analysis.diagnostics import trajectories
from robustbench_kd.analysis.reports import diagnostic_figures as figures
from robustbench_kd.analysis.reports.damage import Damage
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

#: Diagnostics whose tables go to tables.jsonl, and the one that writes trajectories.npz.
TABLE_DIAGNOSTICS = ("calibration", "per_class")
TRAJECTORY_DIAGNOSTIC = "trajectories"

#: Panels drawn per table figure (a few models x two input kinds x two splits in a real run).
MAX_TABLES = 32
#: Reliability bins and classes a table may hold (diagnostics.bins, the dataset's classes).
MAX_BINS = 1_000
MAX_CLASSES = 100_000
RELIABILITY_COLUMNS = ("lower", "upper", "count", "accuracy", "confidence")

TABLES_LOST = "the report leaves out the reliability and per-class figures"
TRAJECTORIES_LOST = "the report leaves out the trajectory figure"


def _is_number(value: Any, *, optional: bool = False) -> bool:
    if value is None:
        return optional
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def reliability_problem(table: Any) -> str | None:
    """What is wrong with a reliability table (``{lower, upper, count, accuracy, confidence}`` lists), or None."""
    if not isinstance(table, dict):
        return f"is a {type(table).__name__}, not a table of bins"
    for name in RELIABILITY_COLUMNS:
        column = table.get(name)
        if not isinstance(column, list) or not column:
            return f"has no list {name!r}"
    lengths = {len(table[name]) for name in RELIABILITY_COLUMNS}
    if len(lengths) > 1:
        return "has columns of different lengths"
    if lengths.pop() > MAX_BINS:
        return f"has more than {MAX_BINS} bins"
    for name in RELIABILITY_COLUMNS:
        optional = name in ("accuracy", "confidence")  # an empty bin has neither
        bad = next((v for v in table[name] if not _is_number(v, optional=optional)), _GOOD)
        if bad is not _GOOD:
            return f"holds {_shown(bad)} in {name!r}, not a number"
    return None


def class_accuracy_problem(values: Any, num_classes: int | None) -> str | None:
    """What is wrong with a per-class accuracy list (a number or null per class), or None."""
    if not isinstance(values, list) or not values:
        return f"is a {type(values).__name__}, not a list of accuracies"
    if len(values) > MAX_CLASSES or (num_classes is not None and len(values) != num_classes):
        return f"has {len(values)} entries for {num_classes} classes"
    bad = next((v for v in values if not _is_number(v, optional=True)), _GOOD)
    return None if bad is _GOOD else f"holds {_shown(bad)}, not an accuracy"


_GOOD = object()


def _tables(
    path: Path, damage: Damage, *, required: bool, num_classes: int | None
) -> tuple[int | None, dict[str, Any], dict[str, Any]]:
    """(epoch, reliability tables, class accuracies) of the last good row of ``tables.jsonl``."""
    row, problems = table_file.last_row(path)
    if row is None and not problems and required:
        problems = ["does not exist"]
    epoch = None if row is None else row.pop("epoch")
    consequences = [f"the report shows epoch {epoch}, its last good row"] if row is not None and problems else []
    damaged_lines = len(problems)
    reliability: dict[str, Any] = {}
    class_acc: dict[str, Any] = {}
    for key, value in (row or {}).items():
        if key.endswith("_reliability"):
            found, problem = reliability, reliability_problem(value)
            name = key.removeprefix("diag_").removesuffix("_reliability")
        elif key.endswith("_class_acc"):
            found, problem = class_acc, class_accuracy_problem(value, num_classes)
            name = key.removeprefix("diag_").removesuffix("_class_acc")
        else:  # a key a later version may add: not damage
            continue
        if problem is None and len(found) == MAX_TABLES:
            problem = f"is beyond the first {MAX_TABLES} tables of its kind"
        if problem is not None:
            problems.append(f"{_shown(key)} of epoch {epoch} {problem}")
        else:
            found[name] = value
    if len(problems) > damaged_lines:
        consequences.append("the report leaves out the damaged tables")
    if problems:
        lost = " and ".join(consequences) if reliability or class_acc else TABLES_LOST
        damage.note(path, [f"diagnostics table file {path} {problems[0]}", *problems[1:]], lost)
    return epoch, reliability, class_acc


def trajectory_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What keeps ``arrays`` from being drawn by :func:`diagnostic_figures.trajectory_figure`, or None."""
    epochs = arrays.get("epochs")
    if epochs is None or epochs.ndim != 1 or epochs.dtype.kind not in "iu" or not len(epochs):
        return "has no 1-D integer array 'epochs'"
    kinds = [k.removeprefix("difficulty_") for k in arrays if k.startswith("difficulty_")]
    for kind in kinds:
        n = len(arrays[f"difficulty_{kind}"]) if arrays[f"difficulty_{kind}"].ndim == 1 else 0
        if not n:
            return f"has no 1-D array 'difficulty_{kind}'"
        if f"student_{kind}_p" not in arrays:
            return f"has 'difficulty_{kind}' but no 'student_{kind}_p'"
        for name, value in arrays.items():
            trajectory = name.endswith(f"_{kind}_p")
            cosine = name.startswith("cosine_") and name.endswith(f"_{kind}")
            if (trajectory or cosine or name == f"difficulty_{kind}") and value.dtype.kind not in "fiu":
                return f"holds {value.dtype} in {name!r}, not numbers"
            if trajectory and value.shape != (n, len(epochs)):
                return f"has {name!r} of shape {value.shape}, not ({n}, {len(epochs)}) (samples, epochs)"
            if cosine and value.shape != (n,):
                return f"has {name!r} of shape {value.shape}, not ({n},)"
    return None


def _trajectories(path: Path, damage: Damage, *, required: bool) -> dict[str, np.ndarray]:
    if required and not path.exists() and not path.is_symlink():
        damage.note(path, f"trajectory file {path} does not exist", TRAJECTORIES_LOST)
        return {}
    try:
        arrays = trajectories.load(path)
    except UserError as exc:
        damage.note(path, str(exc), TRAJECTORIES_LOST)
        return {}
    problem = trajectory_problem(arrays) if arrays else None
    if problem is not None:
        damage.note(path, f"trajectory file {path} {problem}", TRAJECTORIES_LOST)
        return {}
    return arrays


def write_diagnostics_figures(
    run_dir: Path,
    out: Path,
    *,
    enabled: Iterable[str] = (),
    num_classes: int | None = None,
    metrics: tuple[list[float], dict[str, list[float | None]]] | None = None,
    damage: Damage | None = None,
) -> tuple[dict[str, Path], dict[str, Any]]:
    """Draw whichever diagnostics figures the run's files allow; (figure key -> path, numbers).

    ``enabled`` (the run's ``diagnostics.enabled``) says which files must exist; ``metrics`` is the
    run's metrics series when the caller has read them already; damage is noted in ``damage``.
    """
    damage = Damage() if damage is None else damage
    enabled = set(enabled)
    written: dict[str, Path] = {}
    numbers: dict[str, Any] = {}
    epochs, series = metrics if metrics is not None else read_metric_series(run_dir / "metrics.jsonl", damage)
    diag = {
        k: v
        for k, v in series.items()
        if k.startswith("diag_") and k != "diag_seconds" and not k.endswith("_worst_class")
    }
    if diag:
        written["diagnostics"] = figures.diagnostics_over_epochs_figure(out / FIGURES["diagnostics"], epochs, diag)
        numbers["last"] = {k: next((v for v in reversed(values) if v is not None), None) for k, values in diag.items()}
    epoch, reliability, class_acc = _tables(
        run_dir / table_file.FILE,
        damage,
        required=bool(enabled & set(TABLE_DIAGNOSTICS)),
        num_classes=num_classes,
    )
    if reliability:
        written["reliability"] = figures.reliability_figure(out / FIGURES["reliability"], reliability)
        numbers["tables_epoch"] = epoch
    if class_acc:
        written["class_accuracy"] = figures.class_accuracy_figure(out / FIGURES["class_accuracy"], class_acc)
        numbers["class_accuracy"] = class_acc
    arrays = _trajectories(run_dir / trajectories.FILE, damage, required=TRAJECTORY_DIAGNOSTIC in enabled)
    if any(k.startswith("difficulty_") for k in arrays):
        written["trajectories"] = figures.trajectory_figure(out / FIGURES["trajectories"], arrays)
        numbers["trajectory_epochs"] = [int(e) for e in arrays["epochs"]]
    return written, numbers
