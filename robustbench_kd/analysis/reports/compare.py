"""Comparison report across run directories: clean vs robust accuracy of every model they evaluated.

Each run directory's ``results/*.json`` (written by the final evaluation) gives one point per model:
clean accuracy against the strongest robust accuracy it holds (AutoAttack, else AA-quick, CW, PGD,
FGSM), as in AKD's trade-off figures.

Damaged run directories: a path that is not a directory, or a run directory without any
``results/*.json``, is a one-line UserError (exit 2) - the user named a run that has nothing to compare,
and leaving it out silently would change what the figure compares. A damaged results file (not JSON, cut
short, ``NaN``, wrong types, an accuracy outside [0, 1], a directory or FIFO in its place, too large)
loses that model only: one warning line naming the file, logged once the report is in place. When no
results file is left that holds a clean and a robust accuracy, the command fails with one line naming
the first damaged file. The report is built in a scratch directory and moved into ``out_dir`` only once
complete.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from robustbench_kd.analysis.reports.damage import Damage
from robustbench_kd.analysis.reports.figures import tradeoff_figure
from robustbench_kd.analysis.reports.staging import output_dir, staged
from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_text
from robustbench_kd.storage.bounded import MiB, load_json_bounded

#: Robust accuracies in order of preference (strongest attack first); PGD keys are ``pgd-<steps>``.
ROBUST_ORDER = ("autoattack", "autoattack-quick", "cw", "pgd", "fgsm")

#: Largest results file read: the final evaluation writes ~1 KB.
RESULTS_LIMIT = 4 * MiB
#: Models (results files) compared at most: the figure labels every point.
MAX_POINTS = 500

SKIPPED = "the comparison leaves this model out"


def robust_key(accuracy: dict[str, Any]) -> str | None:
    """The key of the strongest attack in a results ``accuracy`` table, None when only clean is there."""
    for name in ROBUST_ORDER:
        for key in accuracy:
            if key == name or key.startswith(f"{name}-"):
                return key
    return None


def _fraction(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1


def _point(path: Path, damage: Damage) -> tuple[float, float, str] | None:
    """``(clean, robust, robust key)`` of one results file; None when it has no such pair or is damaged."""
    try:
        data = load_json_bounded(path, limit=RESULTS_LIMIT, what="results file")
    except UserError as exc:
        damage.note(path, str(exc), SKIPPED)
        return None
    accuracy = data.get("accuracy") if isinstance(data, dict) else None
    if not isinstance(accuracy, dict):
        damage.note(path, f"results file {path} has no 'accuracy' table", SKIPPED)
        return None
    key = robust_key(accuracy)
    if "clean" not in accuracy or key is None:  # evaluated without an attack (or only under attack): no point
        return None
    for name in ("clean", key):
        if not _fraction(accuracy[name]):
            shown = repr(accuracy[name])[:40]
            damage.note(path, f"results file {path} has accuracy {name!r} = {shown}, not a fraction in [0, 1]", SKIPPED)
            return None
    return float(accuracy["clean"]), float(accuracy[key]), key


def collect_points(run_dirs: list[Path], damage: Damage | None = None) -> list[tuple[str, float, float, str]]:
    """``(label, clean, robust, robust key)`` for every usable results file of every run directory.

    Damaged results files are noted in ``damage`` (logged at once without one); see the module docstring
    for what is fatal.
    """
    own = damage is None
    damage = Damage() if damage is None else damage
    points: list[tuple[str, float, float, str]] = []
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} is not a directory")
        files = sorted((run_dir / "results").glob("*.json"))
        if not files:
            raise UserError(
                f"{run_dir} has no results/*.json: run its final evaluation first (distill without --no-eval)"
            )
        for path in files:
            point = _point(path, damage)
            if point is not None and len(points) < MAX_POINTS:
                points.append((f"{run_dir.name}/{path.stem}", *point))
    if not points:
        cause = f" ({damage.first()}{f'; {len(damage) - 1} more damaged' if len(damage) > 1 else ''})" if damage else ""
        raise UserError(f"no results file holds both a clean and a robust accuracy{cause}")
    if own:
        damage.emit()
    return points


def _cell(text: str) -> str:
    """A Markdown table cell: a '|' in a file name must not open another column."""
    return text.replace("|", "\\|")


def write_comparison_report(run_dirs: list[Path], out_dir: str | Path) -> Path:
    """Write ``tradeoff.png`` and ``comparison.md`` under ``out_dir``; returns the Markdown path."""
    out = output_dir(out_dir, what="--out")
    damage = Damage()
    points = collect_points([Path(d) for d in run_dirs], damage)
    keys = sorted({p[3] for p in points})
    lines = [
        "# Comparison: clean vs robust accuracy",
        "",
        "| model | clean (%) | robust (%) | attack |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {_cell(label)} | {100 * clean:.2f} | {100 * robust:.2f} | {_cell(key)} |"
        for label, clean, robust, key in points
    ]
    lines += ["", "![clean vs robust accuracy](tradeoff.png)"]
    with staged(out, index="comparison.md") as scratch:
        tradeoff_figure(scratch / "tradeoff.png", [p[:3] for p in points], robust_name=", ".join(keys))
        atomic_write_text(scratch / "comparison.md", "\n".join(lines) + "\n")
    damage.emit()
    return out / "comparison.md"
