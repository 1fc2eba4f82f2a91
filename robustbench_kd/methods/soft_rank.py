"""Differentiable (soft) ranks and the soft Spearman correlation, batched over samples.

SmaraAD's slack matching (Yin et al., 'Adversarial Distillation Based on Slack Matching and
Attribution Region Alignment', CVPR 2024, Eqs. 2-5) replaces the KL between teacher and student outputs
by (minus) the Spearman rank correlation of the two score
vectors, with the hard ranks replaced by sigmoid-smoothed ones so that the loss has a gradient.

Soft rank
---------
For a score vector u in R^n (one sample; n = number of classes) and sharpness gamma > 0::

    r_i(u) = sum_{j=1..n} sigmoid( gamma * (u_j - u_i) )                      (1)

Every j with u_j > u_i contributes ~1, every j with u_j < u_i ~0, and the self term j = i exactly
sigmoid(0) = 1/2 (the public SmaraAD snippet includes it; the paper's Eq. 4 omits the sum over j,
which is required for a rank). So r is a *descending* rank: the largest entry gets ~1/2, the
smallest ~n - 1/2. As gamma -> infinity, r_i tends to::

    #{j : u_j > u_i} + 1/2 * #{j : u_j = u_i}                                 (2)

which is the 1-based "average" (fractional) descending rank of u_i minus 1/2 (:func:`hard_rank` is
the 1-based one). The constant offset cancels in rank differences, so it never changes a Spearman
value. All of this is computed at once for a batch U of shape (B, n) by broadcasting::

    R = sigmoid( gamma * (U[:, None, :] - U[:, :, None]) ).sum(-1)             # (B, n), memory B n^2

Soft Spearman
-------------
With d_i = r_i(u) - r_i(v) (paper Eqs. 2-3)::

    rho(u, v) = 1 - 6 * sum_i d_i^2 / ( n (n^2 - 1) )                          (3)

For hard ranks of vectors without ties this closed form equals the Pearson correlation of the ranks
(``scipy.stats.spearmanr``); with ties it is only an approximation of it. rho stays in [-1, 1] for
soft ranks too: since s_ij + s_ji = 1, a soft-rank vector is the score vector of a fractional
tournament and lies in the permutahedron of (1/2, 3/2, ..., n - 1/2) (Landau), where sum_i d_i^2 is
largest at the vertices, i.e. at hard ranks.

Gradient (why gamma = 1000 gives vanishing gradients)
-----------------------------------------------------
dr_i/du_k = gamma * s_ik (1 - s_ik) for k != i (and minus the sum of those for k = i), with
s_ik = sigmoid(gamma (u_k - u_i)). The factor gamma s (1 - s) is below 5e-4 * gamma once
|gamma (u_k - u_i)| > 10, so with gamma = 1000 only pairs whose scores differ by less than ~0.01
carry gradient. On softmax probabilities that is mostly the many near-zero probabilities of unlikely
classes; the top classes are usually far apart and then get no gradient.
:func:`near_tie_fraction` measures the share of pairs that still carry gradient.

Pitfalls avoided: the public SmaraAD snippet builds ``torch.tensor(list_of_tensors)``, which detaches the
ranks (zero gradient), and loops over the entries of one 1-D vector, which silently
computes nonsense on a (B, C) batch. Here everything is broadcast on tensors, per sample along the
last dimension, and the graph is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "hard_rank",
    "near_tie_fraction",
    "soft_rank",
    "soft_spearman",
    "spearman",
    "spearman_from_ranks",
]


def _pairwise_differences(u: Tensor) -> Tensor:
    """``D[..., i, j] = u[..., j] - u[..., i]`` for scores along the last dimension."""
    if u.dim() < 1 or u.shape[-1] < 1:
        raise ValueError(f"scores must have at least one entry along the last dimension, got shape {tuple(u.shape)}")
    return u.unsqueeze(-2) - u.unsqueeze(-1)


def soft_rank(u: Tensor, gamma: float = 1000.0) -> Tensor:
    """Soft descending rank of each entry along the last dimension, Eq. (1) of the module docstring.

    Args:
        u: scores of shape (..., n) (e.g. (B, C) probabilities or logits).
        gamma: sharpness; larger is closer to the hard rank and has fewer non-zero gradients.

    Returns:
        Tensor of the same shape; the largest entry of each row gets ~1/2, the smallest ~n - 1/2.
        Differentiable w.r.t. ``u``.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    return torch.sigmoid(gamma * _pairwise_differences(u)).sum(dim=-1)


def hard_rank(u: Tensor) -> Tensor:
    """Exact 1-based descending rank along the last dimension; ties share their average rank.

    ``rank_i = #{j: u_j > u_i} + (#{j: u_j = u_i} + 1) / 2``, i.e. the gamma -> infinity limit of
    :func:`soft_rank` plus 1/2. Not differentiable (the result carries no graph).
    """
    with torch.no_grad():
        d = _pairwise_differences(u)
        greater = (d > 0).sum(dim=-1).to(u.dtype)
        equal = (d == 0).sum(dim=-1).to(u.dtype)
        return greater + 0.5 * (equal + 1.0)


def spearman_from_ranks(ranks_u: Tensor, ranks_v: Tensor) -> Tensor:
    """Closed form ``1 - 6 sum_i d_i^2 / (n (n^2 - 1))`` per row, d = ranks_u - ranks_v; shape (...,)."""
    if ranks_u.shape != ranks_v.shape:
        raise ValueError(f"rank shapes differ: {tuple(ranks_u.shape)} vs {tuple(ranks_v.shape)}")
    n = ranks_u.shape[-1]
    if n < 2:
        raise ValueError(f"Spearman correlation needs at least 2 entries per row, got {n}")
    d2 = (ranks_u - ranks_v).pow(2).sum(dim=-1)
    return 1.0 - 6.0 * d2 / float(n * (n * n - 1))


def soft_spearman(u: Tensor, v: Tensor, gamma: float = 1000.0) -> Tensor:
    """Soft Spearman correlation rho(u, v) of each row pair, Eq. (3) with soft ranks.

    Args:
        u, v: scores of the same shape (..., n), compared row by row along the last dimension.
        gamma: soft-rank sharpness (SmaraAD: 1000).

    Returns:
        Tensor of shape (...,); differentiable w.r.t. both inputs (detach one to use it as a target).
    """
    if u.shape != v.shape:
        raise ValueError(f"score shapes differ: {tuple(u.shape)} vs {tuple(v.shape)}")
    return spearman_from_ranks(soft_rank(u, gamma), soft_rank(v, gamma))


def spearman(u: Tensor, v: Tensor) -> Tensor:
    """Exact Spearman closed form with hard (average-tie) ranks, per row; the gamma -> inf limit."""
    return spearman_from_ranks(hard_rank(u), hard_rank(v))


def near_tie_fraction(u: Tensor, gamma: float = 1000.0, threshold: float = 10.0) -> Tensor:
    """Share of ordered pairs i != j with ``|gamma (u_j - u_i)| < threshold`` (a scalar, no graph).

    These are the pairs whose soft-rank term still has a noticeable gradient (at the threshold 10,
    ``gamma s (1 - s)`` has dropped to ~4.5e-5 gamma); a value near 0 means the slack-matching loss is
    almost flat in ``u``. Rows with fewer than two entries give 0.
    """
    with torch.no_grad():
        n = u.shape[-1]
        if n < 2:
            return u.new_zeros(())
        close = (gamma * _pairwise_differences(u)).abs() < threshold
        pairs = close.sum(dim=(-2, -1)).to(torch.float32) - n  # drop the diagonal (always close)
        return (pairs / float(n * (n - 1))).mean()
