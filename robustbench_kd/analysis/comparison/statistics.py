"""Statistics of model comparisons on the same test points: intervals, exact paired tests, the paired bootstrap.

Every model compared is described by a bool matrix ``correct[n_seeds, n_points]``: one row per training seed
(a single run is one row), one column per test point, ``True`` where that model classifies that point correctly
(clean, or under an attack such as AutoAttack). All models are evaluated on the SAME points, so comparisons
are paired by point, and, where it makes sense, by seed.

What each function answers, and when to use which:

* :func:`accuracy_interval` - "how precisely do we know this model's accuracy?". With one seed it is the exact
  Clopper-Pearson interval over the points (:func:`binomial_interval`): the uncertainty from having a finite
  test set. With several seeds it is the Student-t interval over the per-seed accuracies
  (:func:`seed_interval`): the spread from training, which is what separates two models scored on the same
  points.
* :func:`mcnemar_exact` - single runs (one seed per model): "could the two models be equally accurate, given
  the points on which exactly one of them is right?". Points both get right or both get wrong say nothing
  about the difference; under the null the discordant points split 50/50 between the models. Exact, so it
  is valid for any count.
* :func:`paired_bootstrap` - several seeds per model (it also works with one): an interval and a p-value for
  ``acc(A) - acc(B)`` that accounts for both sources of variation at once, the training seeds (drawn with
  replacement within each model) and the test points (drawn with replacement once per resample and shared by
  both models, which keeps the pairing).
* :func:`sign_test` - several seeds, paired by seed (seed ``i`` of A against seed ``i`` of B): "is A better
  than B in more seeds than chance would give?". It needs no assumption about the size of the differences,
  but with few seeds it cannot reject anything: the smallest p-value it can give with ``m`` non-tied pairs is
  ``2 * 0.5**m`` (0.25 with 3 seeds), which is reported with the result so a reader sees why.
* :func:`distinguishable` - the yes/no verdict at a level ``alpha`` from a McNemar or bootstrap result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from robustbench_kd.errors import UserError

__all__ = [
    "BootstrapResult",
    "Interval",
    "McNemarResult",
    "SignTestResult",
    "accuracy_interval",
    "binomial_interval",
    "distinguishable",
    "mcnemar_exact",
    "paired_bootstrap",
    "seed_interval",
    "sign_test",
]

# At most this many int64 counts (resamples x point patterns) are held at once by the bootstrap.
_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A mean with its confidence interval.

    ``estimate`` is the mean (a fraction in [0, 1] for accuracies), ``[low, high]`` the interval at level
    ``confidence``, ``std`` the standard deviation over seeds (``ddof=1``; ``nan`` with one seed), ``n`` the
    number of seeds (or of points, for :func:`binomial_interval`) and ``method`` a few words for tables.
    """

    estimate: float
    low: float
    high: float
    std: float
    n: int
    confidence: float
    method: str


@dataclass(frozen=True)
class McNemarResult:
    """The exact McNemar test of two models on the same points.

    ``a_only``: points A gets right and B wrong; ``b_only``: the reverse; ``difference`` is
    ``acc(A) - acc(B) = (a_only - b_only) / n_points``; ``p_value`` is two-sided and exact.
    """

    a_only: int
    b_only: int
    n_points: int
    difference: float
    p_value: float


@dataclass(frozen=True)
class SignTestResult:
    """The exact two-sided sign test over paired differences.

    ``positive``/``negative``/``ties`` count the differences above, below and equal to zero; ``p_value`` is
    the binomial test on the non-tied pairs (1.0 if there are none); ``min_attainable_p`` is the smallest
    p-value the test could give with this many non-tied pairs, ``min(1, 2 * 0.5**m)``.
    """

    positive: int
    negative: int
    ties: int
    p_value: float
    min_attainable_p: float


@dataclass(frozen=True)
class BootstrapResult:
    """The paired (two-level) bootstrap of a difference of accuracies.

    ``estimate`` is the observed ``mean(A) - mean(B)`` over all seeds and points (``mean(A)`` when there is no
    B); ``[low, high]`` the percentile interval at level ``confidence`` over ``n_resamples`` resamples;
    ``p_value`` the two-sided bootstrap p-value for "the difference is 0".
    """

    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    p_value: float
    method: str


def _check_confidence(confidence: float) -> float:
    try:
        value = float(confidence)
    except (TypeError, ValueError):
        raise UserError(f"confidence must be a number strictly between 0 and 1, got {confidence!r}") from None
    if not 0.0 < value < 1.0:
        raise UserError(f"confidence must be strictly between 0 and 1 (e.g. 0.95), got {confidence!r}")
    return value


def _as_bool(x: Any, name: str) -> NDArray[np.bool_]:
    """``x`` as a numpy bool array; numbers are accepted only when every one is 0 or 1."""
    try:
        raw = np.asarray(x)
    except Exception as exc:  # whatever the array constructor rejects (ragged lists, odd objects) is a user mistake
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{name} must be a rectangular array of bools (True = correct): {reason}") from None
    if raw.dtype == np.bool_:
        return raw
    if raw.dtype.kind not in "biuf" or not np.isin(raw, (0, 1)).all():
        raise UserError(f"{name} must hold bools (True = correct) or 0/1, got values of type {raw.dtype}")
    return np.asarray(raw, dtype=bool)


def _as_matrix(x: Any, name: str) -> NDArray[np.bool_]:
    """``x`` as ``[n_seeds, n_points]`` bools; a 1-D vector is one seed."""
    arr = _as_bool(x, name)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise UserError(
            f"{name} must be a bool matrix [n_seeds, n_points] with at least one seed and one point, "
            f"got shape {tuple(arr.shape)}"
        )
    return arr


def _as_vector(x: Any, name: str) -> NDArray[np.bool_]:
    arr = _as_bool(x, name)
    if arr.ndim != 1 or arr.shape[0] < 1:
        raise UserError(f"{name} must be a non-empty 1-D bool vector [n_points], got shape {tuple(arr.shape)}")
    return arr


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean over seeds with the Student-t interval.

    With ``n`` values of mean ``m`` and sample standard deviation ``s`` (``ddof=1``) the interval is
    ``m ± t_{(1+c)/2, n-1} * s / sqrt(n)``, ``t`` the Student-t quantile with ``n - 1`` degrees of freedom.
    With one value there is no spread to measure: ``std``, ``low`` and ``high`` are ``nan``.
    """
    c = _check_confidence(confidence)
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise UserError(f"seed values must be numbers, got {values!r}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise UserError(f"seed values must be a non-empty 1-D list of numbers, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise UserError(f"seed values must all be finite, got {arr.tolist()}")
    n = int(arr.size)
    mean = float(arr.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1, c, "1 seed (no interval)")
    std = float(arr.std(ddof=1))
    half = float(stats.t.ppf((1.0 + c) / 2.0, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, std, n, c, f"Student t over {n} seeds")


def binomial_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """``k`` successes out of ``n`` with the exact Clopper-Pearson interval.

    The interval is the set of proportions ``p`` not rejected by either one-sided exact binomial test at level
    ``(1 - c) / 2``: ``low`` is the ``(1-c)/2`` quantile of ``Beta(k, n-k+1)`` (0 when ``k = 0``), ``high``
    the ``(1+c)/2`` quantile of ``Beta(k+1, n-k)`` (1 when ``k = n``). Computed by ``scipy.stats.binomtest``.
    ``std`` is ``nan`` (one run: there is no spread over seeds).
    """
    c = _check_confidence(confidence)
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise UserError(f"binomial counts must be integers, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    if n < 1 or not 0 <= k <= n:
        raise UserError(f"binomial counts need n >= 1 and 0 <= k <= n, got k={k}, n={n}")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=c, method="exact")
    return Interval(k / n, float(ci.low), float(ci.high), math.nan, n, c, f"Clopper-Pearson over {n} points")


def accuracy_interval(correct: Any, confidence: float = 0.95) -> Interval:
    """Accuracy of one model with its interval, from ``correct[n_seeds, n_points]``.

    One seed: :func:`binomial_interval` over the points (the test-set uncertainty). Several seeds:
    :func:`seed_interval` over the per-seed accuracies (the training-seed spread; the points are the same for
    every model compared, so this is the uncertainty that matters between models).
    """
    arr = _as_matrix(correct, "correct")
    if arr.shape[0] == 1:
        return binomial_interval(int(arr.sum()), int(arr.shape[1]), confidence)
    return seed_interval(arr.mean(axis=1).tolist(), confidence)


def mcnemar_exact(a_correct: Any, b_correct: Any) -> McNemarResult:
    """Exact two-sided McNemar test of two models scored on the same points.

    With ``b = a_only`` (A right, B wrong) and ``c = b_only`` (B right, A wrong), under the null of equal
    accuracy each of the ``b + c`` discordant points is equally likely to favour either model, so
    ``X ~ Binomial(b + c, 1/2)`` and ``p = min(1, 2 * P[X <= min(b, c)])``; ``p = 1`` when ``b + c = 0``.
    Computed as ``scipy.stats.binomtest(b, b + c, 0.5).pvalue`` (two-sided), which equals that formula for
    ``p = 1/2``.
    """
    a = _as_vector(a_correct, "a_correct")
    b = _as_vector(b_correct, "b_correct")
    if a.shape != b.shape:
        raise UserError(f"a_correct and b_correct must cover the same points, got {a.shape[0]} and {b.shape[0]} points")
    a_only = int(np.count_nonzero(a & ~b))
    b_only = int(np.count_nonzero(b & ~a))
    n_points = int(a.shape[0])
    discordant = a_only + b_only
    p_value = 1.0 if discordant == 0 else float(stats.binomtest(a_only, discordant, 0.5).pvalue)
    return McNemarResult(a_only, b_only, n_points, (a_only - b_only) / n_points, min(1.0, p_value))


def sign_test(differences: Sequence[float]) -> SignTestResult:
    """Exact two-sided sign test over paired differences (e.g. ``acc(A, seed i) - acc(B, seed i)``).

    Zeros are ties and are dropped; with ``m`` non-tied pairs of which ``k`` are positive,
    ``p = binomtest(k, m, 1/2).pvalue = min(1, 2 * P[X <= min(k, m - k)])``, ``X ~ Binomial(m, 1/2)``
    (1.0 when ``m = 0``). The smallest p it can give is ``min(1, 2 * 0.5**m)``: 0.25 for 3 seeds, so fewer
    than 6 non-tied pairs can never reach p < 0.05.
    """
    try:
        arr = np.asarray(differences, dtype=float)
    except (TypeError, ValueError):
        raise UserError(f"differences must be numbers, got {differences!r}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise UserError(f"differences must be a non-empty 1-D list of numbers, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise UserError(f"differences must all be finite, got {arr.tolist()}")
    positive = int(np.count_nonzero(arr > 0))
    negative = int(np.count_nonzero(arr < 0))
    ties = int(arr.size) - positive - negative
    m = positive + negative
    p_value = 1.0 if m == 0 else min(1.0, float(stats.binomtest(positive, m, 0.5).pvalue))
    min_p = 1.0 if m == 0 else min(1.0, 2.0 * 0.5**m)
    return SignTestResult(positive, negative, ties, p_value, min_p)


def paired_bootstrap(
    a: Any,
    b: Any = None,
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Two-level paired bootstrap of ``acc(A) - acc(B)`` (or of ``acc(A)`` when ``b`` is None).

    ``a`` is ``[seeds_a, points]`` and ``b`` ``[seeds_b, points]``, bools, over the same points. Each resample

    1. draws the ``P`` points with replacement once, as counts ``w_p`` (``sum w_p = P``), and uses that same
       draw for A and B: both models are scored on the same test points, which is the pairing;
    2. draws each model's seeds with replacement, independently, as counts ``u_s`` (``sum u_s = S``);
    3. computes ``d* = sum_s u_s/S_a * acc*_A(s) - sum_s u_s/S_b * acc*_B(s)``, where
       ``acc*(s) = sum_p w_p * correct[s, p] / P`` is seed ``s``'s accuracy on the drawn points.

    With one seed per model step 2 is trivial and this is the ordinary paired bootstrap over points. The
    estimate is the observed ``d`` (all seeds, all points); the interval is the ``(1-c)/2`` and ``(1+c)/2``
    percentiles of ``d*``; the p-value is ``min(1, 2 * min(P*[d* <= 0], P*[d* >= 0]))`` with each
    probability counted as ``(count + 1) / (n_resamples + 1)``, so it is never 0. With ``b`` None the
    p-value is for "the accuracy is 0" and only the interval is of interest.

    Why not ``scipy.stats.bootstrap``: it resamples observations at one level, whereas here two levels vary
    together - the points (shared by both models, drawn once per resample) and the seeds within each model
    (drawn independently per model, and A and B may have different numbers of seeds) - which it cannot
    express.

    Speed: a point enters only through its column of outcomes (its pattern over all seeds of A and B), so
    when there are few distinct patterns (``K <= P / 3``; ``K <= 2**S`` for ``S`` seeds in all, 4 for two
    single runs) the points are grouped by pattern and the point draw is one multinomial over the patterns
    with probabilities ``n_k / P``, which has exactly the distribution of the counts of ``P`` uniform draws
    and costs ``O(K)`` instead of ``O(P)`` per resample. Otherwise the ``P`` indices are drawn uniformly and
    counted (``numpy.bincount``). Either way the resampled accuracies are a ``[R, K] @ [K, S]`` product,
    computed in chunks of resamples to bound memory. Deterministic for a given ``seed``
    (``numpy.random.default_rng``).

    Coverage, measured by simulation (nominal 0.95, 2000 resamples, 1000 repetitions each):

    * one seed, 300 points with Bernoulli(0.7) outcomes, interval for the accuracy: 0.955;
    * two models over the same 300 points, each point of difficulty ``q ~ Uniform(0.2, 0.8)`` shared by both,
      each seed shifting its model's success probability by ``Uniform(-0.1, 0.1)``, A better by 0.05;
      interval for the difference: 0.966 with 8 seeds per model (slightly conservative: the per-seed
      accuracies already vary by the point noise, and the point draw adds it once more) and 0.931 with 3
      seeds per model (slightly low: a resampled mean of ``S`` seeds has only ``(S-1)/S`` of the seed
      variance, and percentile intervals over 3 values are coarse). With 2 or 3 seeds read the interval as
      a little optimistic, and report the sign test alongside.
    """
    c = _check_confidence(confidence)
    if isinstance(n_resamples, bool) or int(n_resamples) != n_resamples or n_resamples < 100:
        raise UserError(f"n_resamples must be an integer >= 100, got {n_resamples!r}")
    n_resamples = int(n_resamples)
    a_arr = _as_matrix(a, "a")
    b_arr = None if b is None else _as_matrix(b, "b")
    if b_arr is not None and b_arr.shape[1] != a_arr.shape[1]:
        raise UserError(
            f"a and b must be scored on the same points, got {a_arr.shape[1]} points for a and {b_arr.shape[1]} for b"
        )
    n_points = int(a_arr.shape[1])
    s_a = int(a_arr.shape[0])
    s_b = 0 if b_arr is None else int(b_arr.shape[0])
    both = a_arr if b_arr is None else np.concatenate([a_arr, b_arr], axis=0)
    patterns, pattern_counts = np.unique(both, axis=1, return_counts=True)  # [S, K], [K]
    grouped = 3 * int(pattern_counts.size) <= n_points
    pattern_values = (patterns if grouped else both).T.astype(np.float64)  # [K, S], K = P when not grouped
    n_columns = int(pattern_values.shape[0])

    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n_columns)
    diffs = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        if grouped:
            point_counts = rng.multinomial(n_points, pattern_counts / n_points, size=size)  # [size, K]
        else:
            drawn = rng.integers(0, n_points, size=(size, n_points)) + n_points * np.arange(size)[:, None]
            point_counts = np.bincount(drawn.ravel(), minlength=size * n_points).reshape(size, n_points)
        seed_acc = (point_counts @ pattern_values) / n_points  # [size, S_a + S_b]
        seeds_a = rng.multinomial(s_a, np.full(s_a, 1.0 / s_a), size=size)
        d = (seed_acc[:, :s_a] * seeds_a).sum(axis=1) / s_a
        if s_b:
            seeds_b = rng.multinomial(s_b, np.full(s_b, 1.0 / s_b), size=size)
            d = d - (seed_acc[:, s_a:] * seeds_b).sum(axis=1) / s_b
        diffs[start : start + size] = d

    estimate = float(a_arr.mean()) - (0.0 if b_arr is None else float(b_arr.mean()))
    low, high = np.quantile(diffs, [(1.0 - c) / 2.0, (1.0 + c) / 2.0])
    below = (np.count_nonzero(diffs <= 0) + 1) / (n_resamples + 1)
    above = (np.count_nonzero(diffs >= 0) + 1) / (n_resamples + 1)
    p_value = float(min(1.0, 2.0 * min(below, above)))
    levels = "points and seeds" if max(s_a, s_b) > 1 else "points"
    method = f"paired bootstrap over {n_resamples} resamples of {levels}"
    return BootstrapResult(estimate, float(low), float(high), c, n_resamples, p_value, method)


def distinguishable(result: McNemarResult | BootstrapResult, alpha: float = 0.05) -> bool:
    """Whether the two models differ at level ``alpha``.

    McNemar: ``p_value < alpha``. Bootstrap: the result's own ``1 - alpha`` interval excludes 0 (``low > 0``
    or ``high < 0``); the result must have been computed at ``confidence = 1 - alpha``.
    """
    try:
        level = float(alpha)
    except (TypeError, ValueError):
        raise UserError(f"alpha must be a number strictly between 0 and 1, got {alpha!r}") from None
    if not 0.0 < level < 1.0:
        raise UserError(f"alpha must be strictly between 0 and 1 (e.g. 0.05), got {alpha!r}")
    if isinstance(result, McNemarResult):
        return result.p_value < level
    if isinstance(result, BootstrapResult):
        if not math.isclose(result.confidence, 1.0 - level, abs_tol=1e-9):
            raise UserError(
                f"the bootstrap interval is at confidence {result.confidence:g} but alpha {level:g} needs "
                f"confidence {1.0 - level:g}; rerun paired_bootstrap with confidence={1.0 - level:g}"
            )
        return result.low > 0.0 or result.high < 0.0
    raise UserError(f"distinguishable takes a McNemarResult or a BootstrapResult, got {type(result).__name__}")
