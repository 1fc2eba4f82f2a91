"""A comparison as a table of models with intervals, the verdict of every pair, and a figure.

:func:`build_comparison` computes everything from the models' per-point files; :meth:`Comparison.markdown`
is the text the command prints; :func:`write_comparison` writes ``comparison.md``, a self-contained
``comparison.html`` (the figure embedded), ``comparison.png`` and ``comparison.json`` (every number, for
scripts), staged so that a failure leaves the output directory as it was.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustbench_kd.analysis.comparison.statistics import Interval
from robustbench_kd.analysis.comparison.verdicts import (
    CONFIDENCE,
    ComparedModel,
    PairVerdict,
    check_pairable,
    compare_pairs,
    describe_sign,
    model_interval,
    shared_keys,
)
from robustbench_kd.analysis.reports.document import Block, Figure, Heading, Paragraph, Table, to_html, to_markdown
from robustbench_kd.analysis.reports.figures import interval_figure
from robustbench_kd.analysis.reports.staging import staged
from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_text

__all__ = ["Comparison", "build_comparison", "metric_name", "write_comparison"]


def metric_name(key: str) -> str:
    """``pgd-20`` -> ``PGD-20``, ``autoattack`` -> ``AutoAttack``, ``clean`` stays."""
    if key == "clean":
        return "clean"
    if key.startswith("autoattack"):
        return "AutoAttack" + key[len("autoattack") :]
    return key.upper()


@dataclass
class Comparison:
    """Everything a comparison found (see :func:`build_comparison`)."""

    models: list[ComparedModel]
    key: str  #: the outcome the pairs are tested on
    keys: list[str]  #: the outcomes in the table
    intervals: dict[str, dict[str, Interval]]  #: outcome -> model label -> interval
    verdicts: list[PairVerdict]
    settings: dict[str, Any]

    def summary(self) -> str:
        """What was compared, in one sentence."""
        s = self.settings
        return (
            f"{s.get('n_examples')} {s.get('dataset')} test points, {s.get('norm')} eps = {s.get('eps_str')}, "
            f"every model on the same points; intervals and tests at {100 * CONFIDENCE:.0f}%."
        )

    def model_table(self) -> Table:
        header = ["model", "seeds", *(metric_name(k) for k in self.keys)]
        rows = []
        for model in self.models:
            seeds = ",".join("-" if s is None else str(s) for s in model.seeds) or "-"
            cells = [_interval_cell(self.intervals[k][model.label]) for k in self.keys]
            rows.append([model.label, seeds, *cells])
        return Table(header, rows)

    def verdict_table(self) -> Table:
        header = ["pair", "difference", "95% interval", "test", "p", "verdict", "sign test over seeds"]
        rows = [
            [
                f"{v.first} vs {v.second}",
                f"{100 * v.difference:+.2f}",
                f"{100 * v.low:+.2f} to {100 * v.high:+.2f}",
                v.test,
                f"{v.p_value:.3g}",
                "distinguishable" if v.distinguishable else "within noise",
                describe_sign(v.sign),
            ]
            for v in self.verdicts
        ]
        return Table(header, rows)

    def conclusions(self) -> list[str]:
        """The verdicts in words: the distinguishable pairs first, then those within noise."""
        real = [v for v in self.verdicts if v.distinguishable]
        noise = [v for v in self.verdicts if not v.distinguishable]
        lines = []
        name = metric_name(self.key)
        if real:
            lines.append(
                f"Distinguishable at 95% ({name}): "
                + "; ".join(f"{v.first} > {v.second} by {100 * v.difference:.2f} points" for v in real)
                + "."
            )
        if noise:
            lines.append(
                f"Within noise at 95% ({name}): "
                + "; ".join(
                    f"{v.first} vs {v.second} ({100 * v.difference:+.2f}, {100 * v.low:+.2f} to {100 * v.high:+.2f})"
                    for v in noise
                )
                + "."
            )
        return lines

    def intervals_note(self) -> str:
        methods = sorted({self.intervals[k][m.label].method for k in self.keys for m in self.models})
        return (
            "Each cell: mean accuracy (%) and its 95% interval ["
            + "; ".join(methods)
            + "]. One seed: the interval is the test set's sampling error; several seeds: the spread over "
            "training seeds."
        )

    def blocks(self, figure: Path | None = None) -> list[Block]:
        blocks: list[Block] = [
            Heading("Comparison", 1),
            Paragraph(self.summary()),
            self.model_table(),
            Paragraph(self.intervals_note()),
        ]
        if figure is not None:
            blocks.append(Figure("accuracy with 95% intervals (dots: single seeds)", figure))
        if self.verdicts:
            blocks += [
                Heading(f"Paired tests on {metric_name(self.key)}", 2),
                self.verdict_table(),
                *(Paragraph(line) for line in self.conclusions()),
            ]
        return blocks

    def markdown(self) -> str:
        """The comparison as Markdown, without the figure (what the command prints)."""
        return to_markdown([b for b in self.blocks() if not isinstance(b, Figure)], Path("."))

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "key": self.key,
            "confidence": CONFIDENCE,
            "models": [
                {
                    "label": m.label,
                    "source": m.source,
                    "seeds": m.seeds,
                    "accuracy": {k: self.intervals[k][m.label].__dict__ for k in self.keys},
                    "per_seed": {k: m.seed_accuracies(k) for k in self.keys},
                }
                for m in self.models
            ],
            "pairs": [
                {
                    "first": v.first,
                    "second": v.second,
                    "difference": v.difference,
                    "low": v.low,
                    "high": v.high,
                    "test": v.test,
                    "p_value": v.p_value,
                    "distinguishable": v.distinguishable,
                    "sign_test": None if v.sign is None else v.sign.__dict__,
                }
                for v in self.verdicts
            ],
        }


def _interval_cell(interval: Interval) -> str:
    if math.isnan(interval.low):
        return f"{100 * interval.estimate:.2f}"
    return f"{100 * interval.estimate:.2f} [{100 * interval.low:.2f}, {100 * interval.high:.2f}]"


def build_comparison(
    models: list[ComparedModel], *, key: str = "autoattack", n_resamples: int = 10_000, seed: int = 0
) -> Comparison:
    """Check that every file pairs with every other on ``key``, then compute the intervals and verdicts."""
    if len(models) < 2:
        raise UserError(f"compare needs at least two runs or sweeps, got {len(models)}")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise UserError(f"two of the compared runs are both called {twice!r}; compare each once")
    available = shared_keys(models)
    if key not in available:
        raise UserError(
            f"not every compared run has {key!r} outcomes; outcomes all of them have: {', '.join(available) or 'none'}"
        )
    check_pairable(models, key)
    keys = [k for k in available if k != key] + [key]
    for other in keys:
        check_pairable(models, other)
    intervals = {k: {m.label: model_interval(m, k) for m in models} for k in keys}
    verdicts = compare_pairs(models, key, n_resamples=n_resamples, seed=seed)
    return Comparison(models, key, keys, intervals, verdicts, dict(models[0].points[0].settings))


def write_comparison(comparison: Comparison, out: Path) -> dict[str, Path]:
    """Write the comparison's files under ``out`` (staged: all of them or none)."""
    names = {"markdown": "comparison.md", "html": "comparison.html", "figure": "comparison.png"}
    names["json"] = "comparison.json"
    with staged(out, index=names["markdown"]) as scratch:
        panels = {
            metric_name(k): [
                (m.label, *_bounds(comparison.intervals[k][m.label]), m.seed_accuracies(k)) for m in comparison.models
            ]
            for k in comparison.keys
        }
        figure = interval_figure(scratch / names["figure"], panels)
        blocks = comparison.blocks(figure)
        atomic_write_text(scratch / names["html"], to_html(blocks, "Comparison"))
        markdown_blocks = [Figure(b.title, scratch / names["figure"]) if isinstance(b, Figure) else b for b in blocks]
        atomic_write_text(scratch / names["markdown"], to_markdown(markdown_blocks, scratch))
        data = _without_nan(comparison.to_dict())
        atomic_write_text(scratch / names["json"], json.dumps(data, indent=2, allow_nan=False) + "\n")
    return {role: out / name for role, name in names.items()}


def _bounds(interval: Interval) -> tuple[float, float, float]:
    return interval.estimate, interval.low, interval.high


def _without_nan(value: Any) -> Any:
    """``value`` with every NaN (a standard deviation over one seed) as None: strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return value
