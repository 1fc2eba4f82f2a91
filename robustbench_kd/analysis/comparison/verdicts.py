"""Models to compare, their accuracy intervals, and the paired verdict of every pair.

A :class:`ComparedModel` is one label with the per-point files of its runs: one file for a single run, one
per training seed for a sweep. Every file of every model must have been evaluated on the same points with
the same threat model and attacks (:func:`robustbench_kd.evaluation.points.pairing_problem`); otherwise the
comparison is refused before anything is computed, in one line naming the two models and what differs.

The verdict of a pair on one outcome (AutoAttack by default):

* both single runs: the exact McNemar test on the points where exactly one model is right (a p-value, the
  verdict), with the paired bootstrap over points for the interval of the difference;
* otherwise: the two-level paired bootstrap (seeds drawn within each model, points drawn once and shared),
  whose 95% interval of the difference is the verdict: distinguishable when it excludes zero. When both
  models ran the same seeds the sign test over seeds paired by seed is reported beside it, with the smallest
  p-value it could reach (with 3 seeds it can never reach 0.05: that is why it is not the verdict).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from robustbench_kd.analysis.comparison.statistics import (
    BootstrapResult,
    Interval,
    McNemarResult,
    SignTestResult,
    accuracy_interval,
    distinguishable,
    mcnemar_exact,
    paired_bootstrap,
    sign_test,
)
from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.points import PointResults, pairing_problem

__all__ = ["ComparedModel", "PairVerdict", "check_pairable", "compare_pairs", "model_interval", "shared_keys"]

#: Level of every interval and test of the comparison.
CONFIDENCE = 0.95


@dataclass
class ComparedModel:
    """One model of a comparison: a label and the per-point files of its seeds (one file for a single run)."""

    label: str
    points: list[PointResults]
    seeds: list[int | None] = field(default_factory=list)
    source: str = ""

    def correct(self, key: str) -> NDArray[np.bool_]:
        """``[n_seeds, n_points]``: True where that seed's model is correct under ``key``."""
        return np.stack([p.outcomes[key].numpy().astype(bool) for p in self.points])

    def seed_accuracies(self, key: str) -> list[float]:
        return [float(row.mean()) for row in self.correct(key)]


@dataclass(frozen=True)
class PairVerdict:
    """The paired comparison of ``first`` and ``second`` (ordered so that ``first`` has the higher mean)."""

    first: str
    second: str
    key: str
    difference: float  #: mean accuracy of first minus second, a fraction
    low: float  #: the 95% interval of the difference (paired bootstrap)
    high: float
    test: str  #: the test the verdict rests on, in words
    p_value: float
    distinguishable: bool
    mcnemar: McNemarResult | None = None
    bootstrap: BootstrapResult | None = None
    sign: SignTestResult | None = None

    def sentence(self) -> str:
        """One sentence a reader can quote, in accuracy points."""
        diff = f"{self.first} - {self.second} = {100 * self.difference:+.2f} points"
        span = f"95% interval {100 * self.low:+.2f} to {100 * self.high:+.2f}"
        if self.distinguishable:
            return f"{diff} ({span}, {self.test} p = {_p(self.p_value)}): distinguishable at 95%."
        return f"{diff} ({span}, {self.test} p = {_p(self.p_value)}): within noise at 95%."


def _p(value: float) -> str:
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}" if value < 0.01 else f"{value:.3f}"


def check_pairable(models: list[ComparedModel], key: str) -> None:
    """Refuse, in one line, a comparison in which two files cannot be paired on ``key``."""
    files = [(model.label, points) for model in models for points in model.points]
    if not files:
        raise UserError("nothing to compare: give at least two runs, sweeps or points files")
    first_label, first = files[0]
    for label, points in files[1:]:
        problem = pairing_problem(first, points, key=key)
        if problem is not None:
            raise UserError(
                f"cannot compare {first_label} with {label} point by point: {problem}; evaluate both on the same "
                "test points with the same eps and attacks"
            )


def shared_keys(models: list[ComparedModel]) -> list[str]:
    """The outcome keys every file holds, in the first file's order (stage outcomes left out)."""
    files = [points for model in models for points in model.points]
    return [key for key in files[0].outcomes if "/" not in key and all(key in p.outcomes for p in files[1:])]


def model_interval(model: ComparedModel, key: str) -> Interval:
    """The accuracy of ``model`` under ``key`` with its 95% interval (see ``accuracy_interval``)."""
    return accuracy_interval(model.correct(key), CONFIDENCE)


def compare_pairs(
    models: list[ComparedModel], key: str, *, n_resamples: int = 10_000, seed: int = 0
) -> list[PairVerdict]:
    """The verdict of every pair of ``models`` on the outcome ``key`` (call :func:`check_pairable` first)."""
    return [_verdict(a, b, key, n_resamples=n_resamples, seed=seed) for a, b in itertools.combinations(models, 2)]


def _verdict(a: ComparedModel, b: ComparedModel, key: str, *, n_resamples: int, seed: int) -> PairVerdict:
    if float(a.correct(key).mean()) < float(b.correct(key).mean()):
        a, b = b, a
    left, right = a.correct(key), b.correct(key)
    bootstrap = paired_bootstrap(left, right, n_resamples=n_resamples, confidence=CONFIDENCE, seed=seed)
    mcnemar = sign = None
    if len(a.points) == 1 and len(b.points) == 1:
        mcnemar = mcnemar_exact(left[0], right[0])
        difference, test, p_value = mcnemar.difference, "exact McNemar", mcnemar.p_value
        verdict = distinguishable(mcnemar, alpha=1 - CONFIDENCE)
    else:
        if a.seeds == b.seeds and None not in a.seeds and len(a.seeds) > 1:
            sign = sign_test([x - y for x, y in zip(a.seed_accuracies(key), b.seed_accuracies(key), strict=True)])
        difference, test, p_value = bootstrap.estimate, "paired bootstrap over seeds and points", bootstrap.p_value
        verdict = distinguishable(bootstrap, alpha=1 - CONFIDENCE)
    return PairVerdict(
        first=a.label,
        second=b.label,
        key=key,
        difference=difference,
        low=bootstrap.low,
        high=bootstrap.high,
        test=test,
        p_value=p_value,
        distinguishable=verdict,
        mcnemar=mcnemar,
        bootstrap=bootstrap,
        sign=sign,
    )


def describe_sign(sign: SignTestResult | None) -> str:
    """The sign test in words, or "-" when the seeds were not paired."""
    if sign is None:
        return "-"
    n = sign.positive + sign.negative
    text = f"better in {sign.positive} of {n + sign.ties} seeds, p = {_p(sign.p_value)}"
    if sign.min_attainable_p > 1 - CONFIDENCE and not math.isnan(sign.min_attainable_p):
        text += f" (cannot go below {sign.min_attainable_p:.3g} with {n} seeds)"
    return text
