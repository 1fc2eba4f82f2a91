"""Comparison report across run directories: clean vs robust accuracy of every model they evaluated.

Each run directory's ``results/*.json`` (written by the final evaluation) gives one point per model:
clean accuracy against the strongest robust accuracy it holds (AutoAttack, else AA-quick, CW, PGD,
FGSM), as in AKD's trade-off figures.
"""

from __future__ import annotations

import json
from pathlib import Path

from robustbench_kd.analysis.reports.figures import tradeoff_figure
from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_text

#: Robust accuracies in order of preference (strongest attack first); PGD keys are ``pgd-<steps>``.
ROBUST_ORDER = ("autoattack", "autoattack-quick", "cw", "pgd", "fgsm")


def robust_key(accuracy: dict[str, float]) -> str | None:
    """The key of the strongest attack in a results ``accuracy`` table, None when only clean is there."""
    for name in ROBUST_ORDER:
        for key in accuracy:
            if key == name or key.startswith(f"{name}-"):
                return key
    return None


def collect_points(run_dirs: list[Path]) -> list[tuple[str, float, float, str]]:
    """``(label, clean, robust, robust key)`` for every results file of every run directory."""
    points = []
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise UserError(f"{run_dir} is not a directory")
        files = sorted((run_dir / "results").glob("*.json"))
        if not files:
            raise UserError(
                f"{run_dir} has no results/*.json: run its final evaluation first (distill without --no-eval)"
            )
        for path in files:
            try:
                accuracy = json.loads(path.read_text())["accuracy"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path} is not a results file (no 'accuracy' table)") from None
            key = robust_key(accuracy)
            if "clean" in accuracy and key is not None:
                points.append((f"{run_dir.name}/{path.stem}", float(accuracy["clean"]), float(accuracy[key]), key))
    if not points:
        raise UserError("no results file holds both a clean and a robust accuracy")
    return points


def write_comparison_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Write ``tradeoff.png`` and ``comparison.md`` under ``out_dir``; returns the Markdown path."""
    points = collect_points([Path(d) for d in run_dirs])
    keys = sorted({p[3] for p in points})
    tradeoff_figure(out_dir / "tradeoff.png", [p[:3] for p in points], robust_name=", ".join(keys))
    lines = [
        "# Comparison: clean vs robust accuracy",
        "",
        "| model | clean (%) | robust (%) | attack |",
        "|---|---|---|---|",
    ]
    lines += [f"| {label} | {100 * clean:.2f} | {100 * robust:.2f} | {key} |" for label, clean, robust, key in points]
    lines += ["", "![clean vs robust accuracy](tradeoff.png)"]
    return atomic_write_text(out_dir / "comparison.md", "\n".join(lines) + "\n")
