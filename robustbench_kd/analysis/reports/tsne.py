"""Exact t-SNE (van der Maaten & Hinton, 2008) for the report's 2-D embedding of at most ~1000 features.

With ``d_ij = ||x_i - x_j||^2`` (float64) and, per point i, ``beta_i = 1 / (2 sigma_i^2)``:

* ``p_{j|i} = exp(-beta_i d_ij) / sum_{k != i} exp(-beta_i d_ik)``, ``p_{i|i} = 0``, where beta_i is found
  by binary search so that ``H_i = -sum_j p_{j|i} log p_{j|i} = log(perplexity)`` (natural log);
* ``p_ij = max((p_{j|i} + p_{i|j}) / (2N), 1e-12)`` for i != j, ``p_ii = 0``;
* ``q_ij = (1 + ||y_i - y_j||^2)^-1 / sum_{k != l} (1 + ||y_k - y_l||^2)^-1``, ``q_ii = 0``;
* ``dC/dy_i = 4 sum_j (p_ij - q_ij)(y_i - y_j)(1 + ||y_i - y_j||^2)^-1`` for ``C = KL(P || Q)``.

Gradient descent with momentum 0.5 (then 0.8) and early exaggeration 12 (P multiplied by it) for the
first 250 iterations, learning rate ``max(N / 12 / 4, 50)``, and per-coordinate gains: +0.2 where the
gradient's sign differs from the previous update's, x0.8 otherwise, at least 0.01; Y is re-centred after
each step (Q is translation-invariant). Y starts as N(0, 1e-4^2) from a ``torch.Generator`` seeded with
``seed``, so the output is a function of the seed.
The perplexity is clipped to at most (N - 1) / 3.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

__all__ = ["conditional_probabilities", "joint_probabilities", "squared_distances", "tsne_embedding"]

logger = logging.getLogger(__name__)

EARLY_EXAGGERATION = 12.0
EXAGGERATION_ITERATIONS = 250
P_FLOOR = 1e-12


def squared_distances(x: Tensor) -> Tensor:
    """``||x_i - x_j||^2`` (N, N), float64, centred first (exact zeros for identical rows), diagonal 0."""
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    sq = x.pow(2).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    return d.fill_diagonal_(0.0)


def conditional_probabilities(sq_dists: Tensor, perplexity: float, *, tol: float = 1e-5, max_iter: int = 64) -> Tensor:
    """Row i: ``p_{j|i}`` with beta_i bisected until ``|H_i - log(perplexity)| < tol`` (all rows at once).

    Distances are shifted by each row's off-diagonal minimum before exponentiating (the shift cancels
    in the normalisation), so the largest weight is 1 and zero, equal or huge distances give no NaN.
    """
    d = sq_dists.double()
    n = d.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=d.device)
    d = torch.where(off, d - torch.where(off, d, math.inf).amin(dim=1, keepdim=True), 0.0)  # diagonal 0: no overflow
    target = math.log(perplexity)
    beta = torch.ones(n, 1, dtype=d.dtype, device=d.device)
    lo = torch.zeros_like(beta)
    hi = torch.full_like(beta, math.inf)
    for _ in range(max_iter):
        w = torch.exp(-beta * d) * off
        total = w.sum(dim=1, keepdim=True)
        p = w / total
        entropy = total.log() + beta * (p * d).sum(dim=1, keepdim=True)  # -sum p log p
        err = entropy - target
        active = err.abs() >= tol
        if not bool(active.any()):
            break
        too_flat = active & (err > 0)  # entropy too high: beta too small
        too_sharp = active & (err < 0)
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_sharp, beta, hi)
        raised = torch.where(torch.isinf(hi), beta * 2.0, (lo + hi) / 2.0)
        beta = torch.where(too_flat, raised, torch.where(too_sharp, (lo + hi) / 2.0, beta))
    return p


def joint_probabilities(sq_dists: Tensor, perplexity: float) -> Tensor:
    """Symmetric P: ``max((p_{j|i} + p_{i|j}) / (2N), 1e-12)`` off the diagonal, 0 on it."""
    cond = conditional_probabilities(sq_dists, perplexity)
    p = ((cond + cond.T) / (2.0 * cond.shape[0])).clamp_min(P_FLOOR)
    return p.fill_diagonal_(0.0)


def _student_t(y: Tensor) -> tuple[Tensor, Tensor]:
    """``num_ij = (1 + ||y_i - y_j||^2)^-1`` with a zero diagonal, and Q = num / sum(num) (in place: speed)."""
    sq = y.pow(2).sum(dim=1)
    num = torch.addmm(sq[:, None], y, y.T, alpha=-2.0).add_(sq).clamp_min_(0.0).add_(1.0).reciprocal_()
    num.fill_diagonal_(0.0)
    return num, num / num.sum()


def tsne_embedding(
    features: Tensor, *, perplexity: float = 30.0, iterations: int = 750, seed: int = 0
) -> tuple[Tensor, float]:
    """2-D t-SNE of ``features`` (N, D): float32 (N, 2) CPU coordinates and the final KL(P || Q)."""
    if features.dim() != 2:
        raise ValueError(f"features must be a 2-D (N, D) tensor, got {features.dim()}-D shape {tuple(features.shape)}")
    n = features.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points (N >= 4), got N={n}")
    if not math.isfinite(perplexity) or perplexity < 1.0:
        raise ValueError(f"perplexity must be a finite number >= 1, got {perplexity}")
    x = features.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("features must be finite (no NaN or inf)")
    if perplexity > (n - 1) / 3:
        logger.warning(
            "t-SNE perplexity %g is more than (N - 1) / 3 for N=%d; clipped to %g", perplexity, n, (n - 1) / 3
        )
        perplexity = (n - 1) / 3
    p = joint_probabilities(squared_distances(x), perplexity)
    generator = torch.Generator().manual_seed(seed)
    y = 1e-4 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    update = torch.zeros_like(y)
    gains = torch.ones_like(y)
    lr = max(n / EARLY_EXAGGERATION / 4.0, 50.0)
    for it in range(iterations):
        early = it < EXAGGERATION_ITERATIONS
        num, q = _student_t(y)
        w = p.mul(EARLY_EXAGGERATION if early else 1.0).sub_(q).mul_(num)  # (p_ij - q_ij) num_ij
        grad = 4.0 * (w.sum(dim=1, keepdim=True) * y - w @ y)
        gains = torch.where((grad > 0) != (update > 0), gains + 0.2, gains * 0.8).clamp_min(0.01)
        update = (0.5 if early else 0.8) * update - lr * gains * grad
        y = y + update
        y = y - y.mean(dim=0, keepdim=True)
    _, q = _student_t(y)
    off = p > 0
    kl = (p[off] * (p[off] / q[off].clamp_min(P_FLOOR)).log()).sum()
    return y.float(), float(kl)
