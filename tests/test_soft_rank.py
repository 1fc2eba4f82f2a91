"""Soft ranks and the soft Spearman correlation (SmaraAD's slack matching building blocks)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from robustbench_kd.methods.soft_rank import (
    hard_rank,
    near_tie_fraction,
    soft_rank,
    soft_spearman,
    spearman,
    spearman_from_ranks,
)


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _soft_rank_by_hand(u: list[float], gamma: float) -> list[float]:
    return [sum(_sigmoid(gamma * (uj - ui)) for uj in u) for ui in u]


def _spearman_by_hand(ru: list[float], rv: list[float]) -> float:
    n = len(ru)
    return 1.0 - 6.0 * sum((a - b) ** 2 for a, b in zip(ru, rv, strict=True)) / (n * (n * n - 1))


def test_soft_rank_matches_the_formula_by_hand() -> None:
    u = [0.3, -1.2, 0.31, 2.0, 0.0]
    for gamma in (0.5, 3.0, 1000.0):
        got = soft_rank(torch.tensor(u, dtype=torch.float64), gamma)
        assert got.tolist() == pytest.approx(_soft_rank_by_hand(u, gamma), rel=1e-12, abs=1e-12)


def test_soft_rank_is_descending_and_tends_to_the_hard_rank() -> None:
    u = torch.tensor([[0.1, 0.7, 0.05, 0.15], [3.0, -1.0, 2.0, 0.0]])
    assert hard_rank(u).tolist() == [[3.0, 1.0, 4.0, 2.0], [1.0, 4.0, 2.0, 3.0]]
    # the self term sigmoid(0) = 1/2 offsets the soft rank by -1/2; it cancels in rank differences
    assert torch.allclose(soft_rank(u, 1e5) + 0.5, hard_rank(u))
    # ties share their average rank, which is also the soft limit (sigmoid(0) = 1/2 per tied pair)
    tied = torch.tensor([0.2, 0.5, 0.2, 0.1])
    assert hard_rank(tied).tolist() == [2.5, 1.0, 2.5, 4.0]
    assert torch.allclose(soft_rank(tied, 1e5) + 0.5, hard_rank(tied))


def test_batched_ranks_equal_per_row_computation() -> None:
    torch.manual_seed(0)
    scores = torch.randn(5, 7, dtype=torch.float64)
    other = torch.randn(5, 7, dtype=torch.float64)
    batched = soft_spearman(scores, other, 4.0)
    rows = [soft_spearman(scores[b], other[b], 4.0) for b in range(5)]
    assert batched.shape == (5,)
    assert torch.allclose(batched, torch.stack(rows))
    for b in range(5):
        expected = _spearman_by_hand(
            _soft_rank_by_hand(scores[b].tolist(), 4.0), _soft_rank_by_hand(other[b].tolist(), 4.0)
        )
        assert batched[b].item() == pytest.approx(expected, rel=1e-10)


def test_exact_spearman_equals_scipy_without_ties() -> None:
    stats = pytest.importorskip("scipy.stats")
    torch.manual_seed(1)
    u, v = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, 10, dtype=torch.float64)
    exact = spearman(u, v)
    for b in range(6):
        assert exact[b].item() == pytest.approx(stats.spearmanr(u[b].numpy(), v[b].numpy())[0], rel=1e-10)


def test_soft_spearman_converges_to_the_exact_closed_form_as_gamma_grows() -> None:
    torch.manual_seed(2)
    p = torch.softmax(3 * torch.randn(8, 10, dtype=torch.float64), dim=1)
    q = torch.softmax(3 * torch.randn(8, 10, dtype=torch.float64), dim=1)
    exact = spearman(p, q)
    errors = [(soft_spearman(p, q, gamma) - exact).abs().max().item() for gamma in (1.0, 10.0, 1e3, 1e5, 1e8)]
    assert errors[0] > 1e-2  # very soft ranks are far from the hard ones
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(errors))
    assert errors[-1] < 1e-6
    # identical and reversed orderings are +1 and -1
    assert soft_spearman(p, p * 2.0, 1e8).tolist() == pytest.approx([1.0] * 8)
    assert soft_spearman(p, -p, 1e8).tolist() == pytest.approx([-1.0] * 8)


def test_soft_spearman_stays_in_minus_one_one() -> None:
    torch.manual_seed(3)
    for gamma in (0.1, 1.0, 30.0, 1000.0):
        u, v = torch.rand(64, 6), torch.rand(64, 6)
        rho = soft_spearman(u, v, gamma)
        assert (rho >= -1 - 1e-6).all() and (rho <= 1 + 1e-6).all()


def test_gradients_are_not_detached_and_nonzero_near_ties() -> None:
    # Probabilities with several near-tied small entries: with gamma = 1000, pairs closer than ~0.01
    # carry gradient (the trap of the public snippet: torch.tensor(list) gives none at all).
    logits = torch.tensor([[4.0, 1.0, 0.02, 0.0, -0.01, 0.03, 1.005]], requires_grad=True)
    teacher = torch.tensor([[3.0, 0.0, 1.0, 0.5, -0.5, 2.0, 0.9]])
    probs = torch.softmax(logits, dim=1)
    assert near_tie_fraction(probs, 1000.0) > 0
    rho = soft_spearman(probs, torch.softmax(teacher, dim=1), 1000.0)
    assert rho.requires_grad
    (grad,) = torch.autograd.grad(-rho.sum(), logits)
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-3


def test_gradients_vanish_far_from_ties_at_gamma_1000() -> None:
    """The documented weakness at gamma = 1000: well separated scores give (numerically) zero gradient."""
    u = torch.tensor([[0.6, 0.3, 0.1]], requires_grad=True)
    rho = soft_spearman(u, torch.tensor([[0.1, 0.3, 0.6]]), 1000.0)
    (grad,) = torch.autograd.grad(rho.sum(), u)
    assert grad.abs().max() < 1e-30
    assert near_tie_fraction(u, 1000.0).item() == 0.0


def test_gradcheck_at_moderate_gamma() -> None:
    torch.manual_seed(4)
    u = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: soft_spearman(a, b, 2.0), (u, v))


def test_near_tie_fraction_by_hand() -> None:
    u = torch.tensor([[0.0, 0.005, 0.5, 1.0]])  # only the pair (0, 0.005) is within 10 / gamma
    assert near_tie_fraction(u, 1000.0).item() == pytest.approx(2 / 12)
    assert near_tie_fraction(u, 1.0).item() == pytest.approx(1.0)


def test_errors() -> None:
    with pytest.raises(ValueError):
        soft_rank(torch.rand(3), 0.0)
    with pytest.raises(ValueError):
        soft_spearman(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError):
        spearman_from_ranks(torch.rand(2, 1), torch.rand(2, 1))
