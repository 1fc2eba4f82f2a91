"""Exact t-SNE for the report (robustbench_kd.analysis.reports.tsne): perplexity search, P, embedding, errors."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from robustbench_kd.analysis.reports.tsne import (
    conditional_probabilities,
    joint_probabilities,
    squared_distances,
    tsne_embedding,
)

pytestmark = pytest.mark.single_thread


def _entropy(rows: torch.Tensor) -> torch.Tensor:
    """Natural-log entropy of each row, with 0 log 0 = 0."""
    logs = torch.where(rows > 0, rows.log(), torch.zeros_like(rows))
    return -(rows * logs).sum(dim=1)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("perplexity", [2.0, 10.0, 25.0])
def test_binary_search_hits_the_perplexity(scale: float, perplexity: float) -> None:
    x = scale * torch.randn(80, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cond = conditional_probabilities(squared_distances(x), perplexity)
    assert torch.allclose(cond.sum(dim=1), torch.ones(80, dtype=torch.float64))
    assert torch.all(cond.diagonal() == 0)
    torch.testing.assert_close(
        _entropy(cond).exp(), torch.full((80,), perplexity, dtype=torch.float64), rtol=1e-3, atol=0
    )


def test_joint_p_of_a_unit_square_matches_the_closed_form() -> None:
    # Each corner sees squared distances 1, 1 (sides) and 2 (diagonal): with beta = 0.7,
    # p_side = e^-0.7 / Z and p_diag = e^-1.4 / Z, Z = 2 e^-0.7 + e^-1.4; the perplexity is exp(H).
    a, b = math.exp(-0.7), math.exp(-1.4)
    z = 2 * a + b
    p_side, p_diag = a / z, b / z
    perplexity = math.exp(-2 * p_side * math.log(p_side) - p_diag * math.log(p_diag))
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # diagonals: 0-2 and 1-3
    s, g = p_side / 4, p_diag / 4  # (p_{j|i} + p_{i|j}) / (2N) with p_{j|i} = p_{i|j}
    expected = torch.tensor([[0, s, g, s], [s, 0, s, g], [g, s, 0, s], [s, g, s, 0]], dtype=torch.float64)
    torch.testing.assert_close(joint_probabilities(squared_distances(x), perplexity), expected, rtol=1e-4, atol=0)


def test_joint_p_of_points_on_a_line_matches_a_hand_computation() -> None:
    # 1-D points 0, 1, 3, 7: every point has different distances, so the betas differ and P_ij must
    # average two different conditionals.
    xs, perplexity, n = [0.0, 1.0, 3.0, 7.0], 2.0, 4
    cond = [[0.0] * n for _ in range(n)]
    for i in range(n):
        d = [(xs[i] - xs[j]) ** 2 for j in range(n) if j != i]

        def row(beta: float, d: list[float] = d) -> list[float]:
            w = [math.exp(-beta * (dj - min(d))) for dj in d]
            return [wj / sum(w) for wj in w]

        lo, hi = -30.0, 30.0  # bisection on log(beta): entropy falls as beta grows
        for _ in range(200):
            mid = (lo + hi) / 2
            entropy = -sum(p * math.log(p) for p in row(math.exp(mid)) if p > 0)
            lo, hi = (mid, hi) if entropy > math.log(perplexity) else (lo, mid)
        others = [j for j in range(n) if j != i]
        for j, p in zip(others, row(math.exp(lo)), strict=True):
            cond[i][j] = p
    expected = torch.tensor(
        [[(cond[i][j] + cond[j][i]) / (2 * n) if i != j else 0.0 for j in range(n)] for i in range(n)],
        dtype=torch.float64,
    )
    got = joint_probabilities(squared_distances(torch.tensor(xs)[:, None]), perplexity)
    assert not torch.allclose(torch.tensor(cond), torch.tensor(cond).T, atol=1e-3)  # really asymmetric
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-12)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-9)


def test_three_separated_clusters_stay_separated() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 10) * (20 / math.sqrt(2))  # pairwise 20 apart
    x = torch.cat([centres[k] + torch.randn(30, 10, generator=gen) for k in range(3)])
    labels = torch.arange(3).repeat_interleave(30)
    y, kl = tsne_embedding(x, perplexity=10.0)
    dist = torch.cdist(y, y).fill_diagonal_(math.inf)
    assert torch.equal(labels[dist.argmin(dim=1)], labels)
    assert math.isfinite(kl) and 0.0 <= kl < 1.0


def test_seed_determines_the_output() -> None:
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    y0, kl0 = tsne_embedding(x, perplexity=5.0, iterations=100, seed=0)
    y0_again, kl0_again = tsne_embedding(x, perplexity=5.0, iterations=100, seed=0)
    y1, _ = tsne_embedding(x, perplexity=5.0, iterations=100, seed=1)
    assert torch.equal(y0, y0_again) and kl0 == kl0_again
    assert not torch.allclose(y0, y1)


def test_output_shape_dtype_and_device() -> None:
    y, kl = tsne_embedding(torch.randn(12, 3, dtype=torch.float64), perplexity=3.0, iterations=20)
    assert y.shape == (12, 2) and y.dtype == torch.float32 and y.device.type == "cpu"
    assert isinstance(kl, float) and math.isfinite(kl)


@pytest.mark.parametrize(
    ("features", "match"),
    [
        (torch.randn(3, 5), r"at least 4 points \(N >= 4\), got N=3"),
        (torch.randn(4, 5, 2), r"2-D \(N, D\) tensor, got 3-D"),
        (torch.randn(10, 2), r"perplexity must be a finite number >= 1, got 0.5"),
    ],
)
def test_invalid_inputs_raise(features: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tsne_embedding(features, perplexity=0.5 if features.shape == (10, 2) else 30.0, iterations=5)


def test_constant_features_give_no_nan() -> None:
    x = torch.full((20, 8), 3.7)
    cond = conditional_probabilities(squared_distances(x), 5.0)
    assert torch.allclose(cond, (1 - torch.eye(20, dtype=torch.float64)) / 19)  # all equally near
    y, kl = tsne_embedding(x, perplexity=5.0, iterations=300)
    assert torch.isfinite(y).all() and math.isfinite(kl)


def test_perplexity_is_clipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING, logger="robustbench_kd.analysis.reports.tsne"):
        y, kl = tsne_embedding(x, perplexity=30.0, iterations=50)
    assert "clipped to 3" in caplog.text
    y_explicit, kl_explicit = tsne_embedding(x, perplexity=3.0, iterations=50)  # (N - 1) / 3 = 3
    assert torch.equal(y, y_explicit) and kl == kl_explicit
