"""Figures drawn from the per-epoch diagnostics a run recorded (``[diagnostics]``).

Inputs are the files the diagnostics observer writes: the ``diag_*`` keys of ``metrics.jsonl``, the
last epoch's tables in ``diagnostics/tables.jsonl`` (reliability bins, per-class accuracy) and the
trajectories in ``diagnostics/trajectories.npz`` (see :mod:`robustbench_kd.analysis.diagnostics.trajectories`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from robustbench_kd.analysis.reports.figures import _new_figure, _panel_grid, _save

#: Panels of the diagnostics-over-epochs figure: title -> how the metric key ends (or contains).
OVER_EPOCHS = {
    "mean prediction entropy (nats)": "_entropy",
    "expected calibration error": "_ece",
    "student-teacher top-1 agreement": "_agree_",
    "student accuracy: all / worst class": "_acc",
    "trajectory cosine, student vs teacher": "_traj_cos_",
}


def _panel_keys(names: Sequence[str], pattern: str) -> list[str]:
    if pattern.endswith("_") and pattern.startswith("_"):
        return [n for n in names if pattern in n]
    return [n for n in names if n.endswith(pattern)]


def diagnostics_over_epochs_figure(
    path: Path, epochs: Sequence[float], series: Mapping[str, Sequence[float | None]]
) -> Path:
    """One panel per kind of diagnostic, every recorded ``diag_*`` series of that kind against the epoch."""
    panels = [(title, _panel_keys(list(series), pattern)) for title, pattern in OVER_EPOCHS.items()]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, flat = _panel_grid(len(panels), 3, 5.2, 3.6)
    for ax, (title, keys) in zip(flat, panels, strict=False):
        for key in keys:
            pairs = [(e, v) for e, v in zip(epochs, series[key], strict=False) if v is not None]
            ax.plot([e for e, _ in pairs], [v for _, v in pairs], marker=".", label=key.removeprefix("diag_"))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _save(fig, path)


def reliability_figure(path: Path, tables: dict[str, dict[str, list]]) -> Path:
    """Reliability diagrams: per confidence bin, accuracy (bars) against the diagonal; ECE in the title."""
    names = list(tables)
    fig, flat = _panel_grid(len(names), 4, 3.3, 3.3)
    for ax, name in zip(flat, names, strict=False):
        table = tables[name]
        lower, upper = np.asarray(table["lower"]), np.asarray(table["upper"])
        count = np.asarray(table["count"], dtype=float)
        acc = np.array([np.nan if a is None else a for a in table["accuracy"]], dtype=float)
        conf = np.array([np.nan if c is None else c for c in table["confidence"]], dtype=float)
        filled = count > 0
        ax.bar(
            lower[filled],
            acc[filled],
            width=(upper - lower)[filled],
            align="edge",
            edgecolor="black",
            linewidth=0.5,
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="perfect calibration")
        ax.scatter(conf[filled], acc[filled], s=8, color="red", zorder=3, label="mean confidence")
        gaps = count[filled] / count.sum() * np.abs(acc[filled] - conf[filled]) if count.sum() else None
        ece = float(np.sum(gaps)) if gaps is not None else math.nan
        ax.set_title(f"{name}\nECE = {ece:.3f}", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence", fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
        ax.tick_params(labelsize=7)
    flat[0].legend(fontsize=6, loc="upper left")
    return _save(fig, path)


def class_accuracy_figure(path: Path, tables: dict[str, list]) -> Path:
    """Per-class accuracy of the student (one bar group per class; absent classes left empty)."""
    fig, axes = _new_figure(max(5.0, 0.6 * len(next(iter(tables.values()))) + 2), 3.4)
    ax = axes[0][0]
    width = 0.8 / len(tables)
    for i, (name, acc) in enumerate(tables.items()):
        values = np.array([np.nan if a is None else 100 * a for a in acc], dtype=float)
        ax.bar(np.arange(len(values)) + i * width, values, width=width, label=name)
    ax.set_xticks(np.arange(len(values)) + 0.4 - width / 2)
    ax.set_xticklabels([str(c) for c in range(len(values))], fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def trajectory_figure(path: Path, arrays: dict[str, np.ndarray], *, n_examples: int = 3) -> Path:
    """The sample-difficulty analysis of the AKD paper from ``trajectories.npz``, one row per input kind (clean, adv):

    1. mean correct-class probability over the epochs, easier and harder half of the subset (by the
       difficulty score), student (solid), its EMA when recorded (dotted) and each teacher (dashed);
    2. per-sample cosine similarity of the student's and each teacher's trajectory, samples ordered
       from easiest to hardest;
    3. the trajectories of the ``n_examples`` easiest and hardest samples, student and first teacher.
    """
    epochs = arrays["epochs"]
    kinds = [k.removeprefix("difficulty_") for k in arrays if k.startswith("difficulty_")]
    fig, axes = _new_figure(15, 3.4 * len(kinds), len(kinds), 3)
    for row, kind in zip(axes, kinds, strict=False):
        score = arrays[f"difficulty_{kind}"]
        order = np.argsort(score, kind="stable")
        easy, hard = order[: (len(order) + 1) // 2], order[(len(order) + 1) // 2 :]
        teachers = [
            k.removesuffix(f"_{kind}_p") for k in arrays if k.startswith("teacher_") and k.endswith(f"_{kind}_p")
        ]
        ax = row[0]
        ema = [("student_ema", ":")] if f"student_ema_{kind}_p" in arrays else []
        for model, style in [("student", "-"), *ema] + [(t, "--") for t in teachers]:
            p = arrays[f"{model}_{kind}_p"]
            for half, idx, color in (("easy", easy, "tab:blue"), ("hard", hard, "tab:red")):
                if len(idx):
                    ax.plot(epochs, p[idx].mean(axis=0), style, color=color, marker=".", label=f"{model} {half}")
        ax.set_title(f"{kind}: mean p(correct class)", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
        ax = row[1]
        for role in [t.removeprefix("teacher_") for t in teachers]:
            cos = arrays.get(f"cosine_{role}_{kind}")
            if cos is not None:
                ax.plot(np.arange(len(order)), cos[order], ".", markersize=3, label=f"teacher {role}")
        ax.set_title(f"{kind}: trajectory cosine, easiest -> hardest", fontsize=9)
        ax.set_xlabel("samples by difficulty (mean student CE)", fontsize=8)
        ax.set_ylim(-0.05, 1.05)
        if ax.get_legend_handles_labels()[0]:  # no teacher: an empty panel, and an empty legend is a warning
            ax.legend(fontsize=6)
        ax = row[2]
        picks = list(order[:n_examples]) + list(order[::-1][:n_examples])
        for j, i in enumerate(picks):
            color = "tab:blue" if j < n_examples else "tab:red"
            ax.plot(epochs, arrays[f"student_{kind}_p"][i], "-", color=color, alpha=0.8)
            if teachers:
                ax.plot(epochs, arrays[f"{teachers[0]}_{kind}_p"][i], "--", color=color, alpha=0.5)
        ax.set_title(f"{kind}: {n_examples} easiest (blue) / hardest (red); teacher dashed", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylim(0, 1)
        for ax in row:
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    return _save(fig, path)
