"""Figure writers: each draws one figure with matplotlib (Agg backend) and writes it as a PNG, atomically.

matplotlib is imported inside :func:`_new_figure` so importing this module stays cheap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from robustbench_kd.storage.atomic import atomic_write_bytes

__all__ = [
    "cam_figure",
    "correlation_figure",
    "embedding_figure",
    "eps_curve_figure",
    "interval_figure",
    "metrics_figure",
    "tradeoff_figure",
]


def _new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    # Titles and labels come from file names and metrics keys: a "$" pair there must stay text, not become
    # mathematics that fails to parse when the figure is drawn.
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)


def _panel_grid(n: int, max_cols: int, cell_width: float, cell_height: float) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels in rows of at most ``max_cols``: (figure, the n axes); spare cells are blank."""
    cols = max(1, min(max_cols, n))
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = _new_figure(cell_width * cols, cell_height * rows, rows, cols)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _save(fig: Any, path: Path, *, top: float = 1.0) -> Path:
    """Lay out (leaving ``1 - top`` of the height free for a suptitle), write as PNG atomically, close."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout(rect=(0.0, 0.0, 1.0, top))
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _image(t: Tensor) -> Any:
    """(C, H, W) in [0, 1] -> what imshow takes (H, W) grey or (H, W, 3)."""
    t = t.detach().cpu().clamp(0, 1)
    return t[0].numpy() if t.shape[0] == 1 else t.permute(1, 2, 0).numpy()


def cam_figure(path: Path, x: Tensor, x_adv: Tensor, cams: dict[str, Tensor], labels: Tensor) -> Path:
    """One row per example: clean image, adversarial image, then each named CAM (N, H, W) overlaid."""
    n, names = len(x), list(cams)
    fig, axes = _new_figure(1.6 * (2 + len(names)), 1.7 * max(n, 1), max(n, 1), 2 + len(names))
    for i in range(n):
        row = axes[i]
        row[0].imshow(_image(x[i]), cmap="gray")
        row[1].imshow(_image(x_adv[i]), cmap="gray")
        if i == 0:
            row[0].set_title("clean", fontsize=8)
            row[1].set_title("adversarial", fontsize=8)
        for j, name in enumerate(names):
            base = x_adv[i] if "adv" in name else x[i]
            row[2 + j].imshow(_image(base), cmap="gray")
            row[2 + j].imshow(cams[name][i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if i == 0:
                row[2 + j].set_title(name, fontsize=8)
        row[0].set_ylabel(f"y={int(labels[i])}", fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path)


def correlation_figure(path: Path, diffs: dict[str, tuple[Tensor, float]]) -> Path:
    """Heat maps of corr(T) - corr(S), one panel per sample set, titled with the Frobenius norm."""
    fig, axes = _new_figure(4.2 * len(diffs), 3.8, 1, len(diffs))
    for ax, (name, (diff, fro)) in zip(axes[0], diffs.items(), strict=False):
        image = ax.imshow(diff.numpy(), cmap="coolwarm", vmin=-1, vmax=1)
        ax.set_title(f"{name}: ||T - S||_F = {fro:.3f}", fontsize=9)
        ax.set_xlabel("class")
        ax.set_ylabel("class")
        fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def embedding_figure(
    path: Path, coords: Tensor, labels: Tensor, adversarial: Tensor, axis_labels: tuple[str, str]
) -> Path:
    """Scatter of 2-D coordinates coloured by class; circles natural, crosses adversarial."""
    fig, axes = _new_figure(5.5, 4.5)
    ax = axes[0][0]
    top = int(labels.max()) if len(labels) else 0
    for flag, marker, name in ((False, "o", "natural"), (True, "x", "adversarial")):
        keep = adversarial == flag
        points = ax.scatter(
            coords[keep, 0].numpy(),
            coords[keep, 1].numpy(),
            c=labels[keep].numpy(),
            cmap="tab10" if top < 10 else "viridis",
            vmin=0,
            vmax=max(top, 9),
            marker=marker,
            s=14,
            label=name,
        )
    ax.legend(fontsize=8)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    fig.colorbar(points, ax=ax, label="class")
    return _save(fig, path)


def eps_curve_figure(
    path: Path, eps_values: Sequence[float], curves: Mapping[str, Sequence[float]], *, norm: str
) -> Path:
    """Accuracy (%) against the radius, one line per model."""
    fig, axes = _new_figure(5, 3.6)
    ax = axes[0][0]
    for name, acc in curves.items():
        ax.plot(list(eps_values), [100 * a for a in acc], marker="o", label=name)
    ax.set_xlabel(f"eps ({norm})")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def metrics_figure(path: Path, epochs: Sequence[float], series: Mapping[str, Sequence[float | None]]) -> Path:
    """One small panel per per-epoch metric (any numeric key of metrics.jsonl), against the epoch."""
    names = list(series)
    fig, flat = _panel_grid(len(names), 3, 3.6, 2.6)
    for ax, name in zip(flat, names, strict=False):
        pairs = [(e, v) for e, v in zip(epochs, series[name], strict=False) if v is not None]
        ax.plot([e for e, _ in pairs], [v for _, v in pairs], marker=".")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def tradeoff_figure(path: Path, points: Sequence[tuple[str, float, float]], *, robust_name: str) -> Path:
    """Clean vs robust accuracy (%), one labelled point per model (AKD's trade-off figures)."""
    fig, axes = _new_figure(5.5, 4.2)
    ax = axes[0][0]
    for label, clean, robust in points:
        ax.scatter([100 * clean], [100 * robust], s=30)
        ax.annotate(label, (100 * clean, 100 * robust), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"robust accuracy (%): {robust_name}")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def interval_figure(
    path: Path, panels: Mapping[str, Sequence[tuple[str, float, float, float, Sequence[float]]]]
) -> Path:
    """Accuracy (%) per model with its interval, one panel per metric.

    ``panels``: metric name -> ``(model, estimate, low, high, per-seed values)`` per model, fractions. The
    interval is drawn as an error bar around the estimate (none where it is NaN: one seed without points),
    and every seed's value as a small dot, so the spread behind the interval stays visible.
    """
    fig, axes = _panel_grid(len(panels), 3, 4.2, 3.6)
    for ax, (metric, rows) in zip(axes, panels.items(), strict=True):
        for position, (_, estimate, low, high, seeds) in enumerate(rows):
            if math.isfinite(low) and math.isfinite(high):
                ax.errorbar(
                    [position], [100 * estimate], yerr=[[100 * (estimate - low)], [100 * (high - estimate)]],
                    fmt="o", color="C0", capsize=4,
                )  # fmt: skip
            else:
                ax.plot([position], [100 * estimate], "o", color="C0")
            ax.plot([position] * len(seeds), [100 * v for v in seeds], ".", color="C1", alpha=0.7, markersize=5)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([row[0] for row in rows], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"{metric} accuracy (%)")
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
