"""Optimal-transport feature distortion, the attack GACD uses to make its positives (Feature Scattering).

Feature Scattering (Zhang & Wang, 'Defense Against Adversarial Attacks Using Feature Scattering-based
Adversarial Training', NeurIPS 2019, arXiv:1907.10737) moves a batch's features as far as possible,
in the optimal-transport sense, from the clean batch's features::

    OT(a, b) = sum_ij T_ij C_ij,   C_ij = max(0, 1 - cos(a_i, b_j)),   T = Sinkhorn(C, uniform marginals)

Sinkhorn runs in the log domain with the reference's settings (regulariser 0.01, at most 100
iterations, early stop once sum|u - u_prev| < 0.1); the plan stays differentiable w.r.t. the cost, as
the reference does not detach it. The reference adds 1e-6 inside its log-sum-exp; the log-sum-exp here
is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cosine_cost", "ot_per_sample", "sinkhorn_plan"]


def cosine_cost(a: Tensor, b: Tensor) -> Tensor:
    """Feature Scattering's cost ``C_ij = max(0, 1 - cos(a_i, b_j))`` (cosine eps 1e-6), shape ``[m, n]``."""
    cos = F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=2, eps=1e-6)
    return torch.clamp(1.0 - cos, min=0.0)


def sinkhorn_plan(cost: Tensor, *, reg: float = 0.01, iters: int = 100, tol: float = 0.1) -> Tensor:
    """Entropic OT plan between uniform marginals, log-domain Sinkhorn as Feature Scattering's.

    u, v start at 0; each iteration sets u <- reg (log mu - lse_j M) + u, then v <- reg (log nu -
    lse_i M) + v, with M_ij = (-C_ij + u_i + v_j) / reg; it stops once sum|u - u_prev| < tol
    (``tol = 0`` runs all iterations and avoids a host sync per iteration). Returns exp(M). The plan
    stays differentiable w.r.t. the cost (the reference does not detach it either).
    """
    m, n = cost.shape
    log_mu, log_nu = -math.log(m), -math.log(n)
    u = cost.new_zeros(m)
    v = cost.new_zeros(n)
    for _ in range(iters):
        u_prev = u
        u = reg * (log_mu - torch.logsumexp((-cost + u[:, None] + v[None, :]) / reg, dim=1)) + u
        v = reg * (log_nu - torch.logsumexp((-cost + u[:, None] + v[None, :]) / reg, dim=0)) + v
        if tol > 0 and float((u - u_prev).detach().abs().sum()) < tol:
            break
    return torch.exp((-cost + u[:, None] + v[None, :]) / reg)


def ot_per_sample(clean: Tensor, adv: Tensor, *, reg: float, iters: int, tol: float) -> Tensor:
    """Each adversarial sample's share of the OT objective: ``sum_i T_ij C_ij`` for column j, ``[B]``.

    The shares sum to Feature Scattering's ``sum(T * C)``, so ascending their sum is its attack.
    """
    cost = cosine_cost(clean.float(), adv.float())
    plan = sinkhorn_plan(cost, reg=reg, iters=iters, tol=tol)
    return (plan * cost).sum(0)
