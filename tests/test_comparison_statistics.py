"""The statistics of model comparisons: formulas against hand computation, coverage by simulation, errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats

from robustbench_kd.analysis.comparison.statistics import (
    BootstrapResult,
    Interval,
    McNemarResult,
    accuracy_interval,
    binomial_interval,
    distinguishable,
    mcnemar_exact,
    paired_bootstrap,
    seed_interval,
    sign_test,
)
from robustbench_kd.errors import UserError


def _outcomes(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-point correctness of A and B with the given counts of each of the four outcome pairs."""
    a = np.array([True] * both + [True] * a_only + [False] * b_only + [False] * neither)
    b = np.array([True] * both + [False] * a_only + [True] * b_only + [False] * neither)
    return a, b


def _mcnemar_by_hand(b: int, c: int) -> float:
    """``min(1, 2 * P[X <= min(b, c)])``, ``X ~ Binomial(b + c, 1/2)``, with exact integer arithmetic."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def _one_line(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


# --- McNemar ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "c"), [(0, 0), (0, 5), (5, 0), (3, 10), (10, 3), (1, 1), (7, 7), (0, 1), (40, 60), (480, 560)]
)
def test_mcnemar_p_value_matches_the_hand_computation(b: int, c: int) -> None:
    a_correct, b_correct = _outcomes(both=20, a_only=b, b_only=c, neither=11)
    result = mcnemar_exact(a_correct, b_correct)
    assert (result.a_only, result.b_only, result.n_points) == (b, c, 31 + b + c)
    assert result.difference == pytest.approx((b - c) / (31 + b + c))
    assert result.p_value == pytest.approx(_mcnemar_by_hand(b, c), rel=1e-9, abs=1e-300)


def test_mcnemar_known_values_and_symmetry() -> None:
    assert mcnemar_exact(*_outcomes(5, 0, 0, 5)).p_value == 1.0
    assert mcnemar_exact(*_outcomes(5, 0, 5, 5)).p_value == pytest.approx(2 / 32)
    forward = mcnemar_exact(*_outcomes(4, 3, 10, 2))
    backward = mcnemar_exact(*_outcomes(4, 10, 3, 2))
    assert forward.p_value == pytest.approx(backward.p_value)
    assert forward.difference == pytest.approx(-backward.difference)
    assert forward.p_value == pytest.approx(2 * sum(math.comb(13, i) for i in range(4)) / 2**13)


def test_mcnemar_matches_scipy_binomtest_on_random_outcomes() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.random(500) < 0.6
        b = rng.random(500) < rng.uniform(0.5, 0.7)
        result = mcnemar_exact(a, b)
        a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
        assert result.p_value == pytest.approx(stats.binomtest(a_only, a_only + b_only, 0.5).pvalue)


def test_mcnemar_matches_statsmodels_when_installed() -> None:
    contingency = pytest.importorskip("statsmodels.stats.contingency_tables")
    for both, b, c, neither in [(20, 3, 10, 7), (50, 40, 60, 10), (5, 0, 5, 5)]:
        ours = mcnemar_exact(*_outcomes(both, b, c, neither)).p_value
        theirs = contingency.mcnemar([[both, b], [c, neither]], exact=True).pvalue
        assert ours == pytest.approx(theirs)


def test_mcnemar_accepts_torch_tensors_and_0_1_numbers() -> None:
    torch = pytest.importorskip("torch")
    a, b = _outcomes(4, 3, 10, 2)
    expected = mcnemar_exact(a, b)
    assert mcnemar_exact(torch.tensor(a), torch.tensor(b)) == expected
    assert mcnemar_exact(a.astype(int), b.astype(float)) == expected


def test_mcnemar_rejects_bad_input_with_one_line() -> None:
    with pytest.raises(UserError, match="same points, got 3 and 4 points") as excinfo:
        mcnemar_exact([True, False, True], [True, False, True, True])
    _one_line(excinfo)
    with pytest.raises(UserError, match="1-D") as excinfo:
        mcnemar_exact(np.ones((2, 3), bool), np.ones((2, 3), bool))
    _one_line(excinfo)
    with pytest.raises(UserError, match="0/1") as excinfo:
        mcnemar_exact([0.5, 1.0], [1.0, 0.0])
    _one_line(excinfo)
    with pytest.raises(UserError, match="non-empty"):
        mcnemar_exact([], [])


# --- intervals -------------------------------------------------------------------------------------------


def test_seed_interval_matches_the_student_t_formula() -> None:
    values = [0.61, 0.58, 0.64, 0.60]
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    for confidence in (0.9, 0.95, 0.99):
        half = stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
        interval = seed_interval(values, confidence)
        assert interval.estimate == pytest.approx(mean)
        assert interval.std == pytest.approx(std)
        assert (interval.low, interval.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
        assert (interval.n, interval.confidence) == (4, confidence)
        assert interval.method == "Student t over 4 seeds"
    # The two-sided 95% quantile of t with 3 degrees of freedom, from tables.
    assert seed_interval(values).high - mean == pytest.approx(3.182446 * std / 2, rel=1e-5)


def test_seed_interval_with_one_seed_has_no_interval() -> None:
    interval = seed_interval([0.7])
    assert interval.estimate == 0.7 and interval.n == 1
    assert math.isnan(interval.low) and math.isnan(interval.high) and math.isnan(interval.std)


@pytest.mark.parametrize("bad", [[], [0.5, float("nan")], [0.5, float("inf")], [[0.5, 0.6]], ["a"]])
def test_seed_interval_rejects_bad_values(bad: object) -> None:
    with pytest.raises(UserError, match="seed values") as excinfo:
        seed_interval(bad)  # type: ignore[arg-type]
    _one_line(excinfo)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1])
def test_confidence_outside_zero_one_is_a_user_error(confidence: float) -> None:
    with pytest.raises(UserError, match="confidence must be strictly between 0 and 1"):
        seed_interval([0.5, 0.6], confidence)
    with pytest.raises(UserError, match="confidence must be strictly between 0 and 1"):
        paired_bootstrap(np.ones((1, 5), bool), confidence=confidence)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (140, 150), (0, 1), (1, 1)])
def test_binomial_interval_is_clopper_pearson(k: int, n: int) -> None:
    interval = binomial_interval(k, n, 0.95)
    # Clopper-Pearson as beta quantiles, written out independently of binomtest.
    low = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
    high = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
    assert interval.estimate == pytest.approx(k / n)
    assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert (interval.low, interval.high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert interval.n == n and math.isnan(interval.std)
    assert interval.method == f"Clopper-Pearson over {n} points"


def test_binomial_interval_known_values() -> None:
    assert binomial_interval(0, 10).low == 0.0
    assert binomial_interval(10, 10).high == 1.0
    # Zero successes in n: the upper bound solves (1 - p)^n = (1 - c) / 2.
    assert binomial_interval(0, 10).high == pytest.approx(1 - 0.025 ** (1 / 10))
    assert binomial_interval(10, 10).low == pytest.approx(0.025 ** (1 / 10))


@pytest.mark.parametrize(("k", "n"), [(-1, 10), (11, 10), (0, 0), (2.5, 10), (True, 3)])
def test_binomial_interval_rejects_bad_counts(k: object, n: object) -> None:
    with pytest.raises(UserError, match="binomial counts") as excinfo:
        binomial_interval(k, n)  # type: ignore[arg-type]
    _one_line(excinfo)


def test_accuracy_interval_one_seed_is_binomial_several_seeds_is_student_t() -> None:
    rng = np.random.default_rng(0)
    one = rng.random((1, 150)) < 0.6
    assert accuracy_interval(one) == binomial_interval(int(one.sum()), 150)
    assert accuracy_interval(one[0]) == binomial_interval(int(one.sum()), 150)
    several = rng.random((3, 150)) < 0.6
    expected = seed_interval(several.mean(axis=1).tolist())
    got = accuracy_interval(several)
    assert isinstance(got, Interval) and got == expected
    assert got.method == "Student t over 3 seeds"


def test_accuracy_interval_rejects_a_cube() -> None:
    with pytest.raises(UserError, match=r"\[n_seeds, n_points\].*got shape \(2, 3, 4\)") as excinfo:
        accuracy_interval(np.ones((2, 3, 4), bool))
    _one_line(excinfo)


# --- sign test -------------------------------------------------------------------------------------------


def test_sign_test_three_seeds_cannot_reach_significance() -> None:
    result = sign_test([0.01, 0.02, 0.005])
    assert (result.positive, result.negative, result.ties) == (3, 0, 0)
    assert result.p_value == pytest.approx(0.25)
    assert result.min_attainable_p == pytest.approx(0.25)


def test_sign_test_excludes_ties_and_matches_the_binomial_formula() -> None:
    result = sign_test([0.01, 0.0, -0.02, 0.03, 0.0, 0.04, 0.05, 0.02])
    assert (result.positive, result.negative, result.ties) == (5, 1, 2)
    assert result.p_value == pytest.approx(_mcnemar_by_hand(5, 1))  # 2 * 7 / 64
    assert result.p_value == pytest.approx(14 / 64)
    assert result.min_attainable_p == pytest.approx(2 / 64)
    assert sign_test([0.0, 0.0]).p_value == 1.0 and sign_test([0.0, 0.0]).min_attainable_p == 1.0
    assert sign_test([1.0] * 6).p_value == pytest.approx(2 / 64)


def test_sign_test_rejects_non_finite_differences() -> None:
    with pytest.raises(UserError, match="finite"):
        sign_test([0.1, float("nan")])
    with pytest.raises(UserError, match="non-empty"):
        sign_test([])


# --- paired bootstrap ------------------------------------------------------------------------------------


def test_paired_bootstrap_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((3, 400)) < 0.6
    b = rng.random((3, 400)) < 0.55
    first = paired_bootstrap(a, b, n_resamples=500, seed=7)
    assert paired_bootstrap(a, b, n_resamples=500, seed=7) == first
    assert paired_bootstrap(a, b, n_resamples=500, seed=8) != first
    assert first.estimate == pytest.approx(a.mean() - b.mean())
    assert first.method == "paired bootstrap over 500 resamples of points and seeds"


def test_paired_bootstrap_deterministic_when_every_point_has_its_own_pattern() -> None:
    # Many seeds make almost every point's column of outcomes distinct, so points are drawn one by one.
    rng = np.random.default_rng(2)
    a = rng.random((8, 60)) < 0.5
    b = rng.random((8, 60)) < 0.5
    first = paired_bootstrap(a, b, n_resamples=300, seed=1)
    assert paired_bootstrap(a, b, n_resamples=300, seed=1) == first
    assert first.low <= first.estimate <= first.high


def test_paired_bootstrap_identical_models_give_zero() -> None:
    rng = np.random.default_rng(4)
    a = rng.random((1, 300)) < 0.7
    result = paired_bootstrap(a, a.copy(), n_resamples=1000)
    assert (result.estimate, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not distinguishable(result)
    several = rng.random((3, 300)) < 0.7
    result = paired_bootstrap(several, several.copy(), n_resamples=1000)
    assert result.estimate == 0.0 and result.low <= 0.0 <= result.high
    assert not distinguishable(result)


def test_paired_bootstrap_separates_a_model_better_on_many_points() -> None:
    rng = np.random.default_rng(5)
    b = rng.random((3, 1000)) < 0.5
    a = b | (rng.random((3, 1000)) < 0.2)  # right wherever B is, and on about a tenth of the points more
    result = paired_bootstrap(a, b, n_resamples=2000)
    assert result.estimate > 0.05 and result.low > 0.0
    assert result.p_value == pytest.approx(2 / 2001)
    assert distinguishable(result)


def test_paired_bootstrap_keeps_the_pairing_over_points() -> None:
    # Both models are right on the same points except 20 where only A is: the paired interval is narrow and
    # excludes 0, although each model's accuracy alone is uncertain by several points of percentage.
    a, b = _outcomes(both=500, a_only=20, b_only=0, neither=480)
    result = paired_bootstrap(a[None, :], b[None, :], n_resamples=2000)
    assert result.estimate == pytest.approx(0.02) and result.low > 0.0
    assert result.high - result.low < 0.03
    assert result.method == "paired bootstrap over 2000 resamples of points"


def test_paired_bootstrap_rejects_bad_input_with_one_line() -> None:
    with pytest.raises(UserError, match="same points, got 10 points for a and 12 for b") as excinfo:
        paired_bootstrap(np.ones((2, 10), bool), np.ones((2, 12), bool))
    _one_line(excinfo)
    with pytest.raises(UserError, match="n_resamples must be an integer >= 100") as excinfo:
        paired_bootstrap(np.ones((2, 10), bool), n_resamples=50)
    _one_line(excinfo)
    with pytest.raises(UserError, match="shape") as excinfo:
        paired_bootstrap(np.ones((0, 10), bool))
    _one_line(excinfo)
    with pytest.raises(UserError, match="rectangular") as excinfo:
        paired_bootstrap([[True, False], [True]])
    _one_line(excinfo)


def _covered(result: BootstrapResult, truth: float) -> bool:
    return result.low <= truth <= result.high


def _assert_coverage_near_nominal(hits: int, repetitions: int) -> None:
    test = stats.binomtest(hits, repetitions, 0.95)
    assert test.pvalue > 0.001, f"coverage {hits}/{repetitions} = {hits / repetitions:.3f} is not about 0.95"


def test_paired_bootstrap_covers_the_accuracy_of_one_run_at_the_nominal_rate() -> None:
    p_true, repetitions = 0.7, 200
    hits = 0
    for repetition in range(repetitions):
        rng = np.random.default_rng(1000 + repetition)
        correct = rng.random((1, 300)) < p_true
        hits += _covered(paired_bootstrap(correct, n_resamples=2000, seed=repetition), p_true)
    _assert_coverage_near_nominal(hits, repetitions)


def test_two_level_bootstrap_covers_a_known_difference_at_about_the_nominal_rate() -> None:
    # Each point has a difficulty q shared by both models; each training seed shifts its model's success
    # probability by a random offset. Population accuracies: E[q] + 0.05 for A and E[q] for B.
    true_difference, n_seeds, n_points, repetitions = 0.05, 8, 300, 200
    hits = 0
    for repetition in range(repetitions):
        rng = np.random.default_rng(5000 + repetition)
        q = rng.uniform(0.2, 0.8, n_points)
        offset_a = rng.uniform(-0.1, 0.1, (n_seeds, 1))
        offset_b = rng.uniform(-0.1, 0.1, (n_seeds, 1))
        a = rng.random((n_seeds, n_points)) < q + true_difference + offset_a
        b = rng.random((n_seeds, n_points)) < q + offset_b
        result = paired_bootstrap(a, b, n_resamples=2000, seed=repetition)
        hits += _covered(result, true_difference)
    _assert_coverage_near_nominal(hits, repetitions)


def test_two_level_bootstrap_covers_the_population_mean_of_one_model() -> None:
    n_seeds, n_points, repetitions = 8, 300, 200
    hits = 0
    for repetition in range(repetitions):
        rng = np.random.default_rng(9000 + repetition)
        q = rng.uniform(0.2, 0.8, n_points)
        offset = rng.uniform(-0.1, 0.1, (n_seeds, 1))
        correct = rng.random((n_seeds, n_points)) < q + offset
        hits += _covered(paired_bootstrap(correct, n_resamples=2000, seed=repetition), 0.5)
    _assert_coverage_near_nominal(hits, repetitions)


# --- distinguishable -------------------------------------------------------------------------------------


def test_distinguishable_for_mcnemar_uses_the_p_value() -> None:
    assert distinguishable(McNemarResult(10, 0, 100, 0.1, 0.002))
    assert not distinguishable(McNemarResult(3, 1, 100, 0.02, 0.625))
    assert not distinguishable(McNemarResult(5, 0, 100, 0.05, 0.0625), alpha=0.05)
    assert distinguishable(McNemarResult(5, 0, 100, 0.05, 0.0625), alpha=0.1)


def test_distinguishable_for_bootstrap_uses_the_interval_at_its_own_level() -> None:
    above = BootstrapResult(0.03, 0.01, 0.05, 0.95, 1000, 0.002, "paired bootstrap")
    below = BootstrapResult(-0.03, -0.05, -0.01, 0.95, 1000, 0.002, "paired bootstrap")
    straddles = BootstrapResult(0.01, -0.01, 0.03, 0.95, 1000, 0.3, "paired bootstrap")
    assert distinguishable(above) and distinguishable(below) and not distinguishable(straddles)
    with pytest.raises(UserError, match=re.escape("confidence 0.95 but alpha 0.01 needs confidence 0.99")) as excinfo:
        distinguishable(above, alpha=0.01)
    _one_line(excinfo)
    with pytest.raises(UserError, match="alpha must be strictly between 0 and 1"):
        distinguishable(above, alpha=0.0)
    with pytest.raises(UserError, match="McNemarResult or a BootstrapResult"):
        distinguishable(0.5)  # type: ignore[arg-type]
