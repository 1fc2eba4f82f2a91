"""GACD's contrastive machinery: a memory bank of embeddings, class-aware negatives and CRD's NCE critic.

GACD (Bai et al., arXiv:2009.09922) publishes no code; its contrastive part follows CRD (Tian,
Krishnan, Isola, 'Contrastive Representation Distillation', ICLR 2020, arXiv:1910.10699), whose
choices are reproduced here:

* The memory bank holds one l2-normalised embedding per training sample (N rows of dimension d),
  initialised as U(-stdv, stdv) with stdv = 1/sqrt(d/3) (expected norm about 1, not normalised), and
  updated after each optimiser step by ``bank[i] <- l2normalize(m * bank[i] + (1 - m) * e_i)``.
* Negatives of a sample are k rows drawn uniformly WITHOUT replacement among the rows of OTHER classes
  (CRD's supervised ``cls_negative`` mode); rows of unknown class (label -1) are never drawn.
* With P(s) = exp(s / T) / Z the NCE critic is h = P / (P + k/N + 1e-7), and 1 - h is taken as
  (k/N) / (P + k/N + 1e-7); the per-sample log-likelihood is log h(pos) + sum_i log(1 - h(neg_i)).
* Z is set once, on the first batch, to mean(exp(score / T)) * N over its positive and negative
  scores, then frozen.

Everything is evaluated in fp32 in the log domain: exp(s / T) alone is e^10 at T = 0.1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NCE_EPS",
    "init_bank",
    "momentum_update",
    "nce_log_likelihood",
    "nce_normaliser",
    "negative_pool_size",
    "negative_scores",
    "sample_negatives",
    "weighted_nce_loss",
]

#: CRD's ``eps`` inside the NCE critic: h = P / (P + k/N + NCE_EPS).
NCE_EPS = 1e-7


def init_bank(rows: int, dim: int, *, generator: torch.Generator | None = None) -> Tensor:
    """CRD's memory initialisation: U(-stdv, stdv) with stdv = 1/sqrt(dim/3) (expected norm ~ 1, unnormalised)."""
    stdv = 1.0 / math.sqrt(dim / 3.0)
    return torch.rand(rows, dim, generator=generator).mul_(2.0 * stdv).sub_(stdv)


def negative_pool_size(labels: Tensor) -> int:
    """Number of bank rows available as negatives to every class: min_c #(rows with a known label != c)."""
    known = labels[labels >= 0]
    if known.numel() == 0:
        return 0
    counts = torch.bincount(known)
    return int(known.numel() - int(counts.max()))


def sample_negatives(y: Tensor, labels: Tensor, k: int) -> Tensor:
    """Indices ``[B, k_eff]`` of bank rows whose label is known and differs from ``y_b``.

    Uniform without replacement per sample (CRD samples without replacement whenever the pool
    allows); ``k_eff = min(k, negative_pool_size(labels))`` so every sample gets the same number of
    negatives. Rows labelled -1 (never seen) are excluded. Uses the global torch RNG of the bank's
    device (seeded per epoch by the trainer).
    """
    k_eff = min(int(k), negative_pool_size(labels))
    if k_eff <= 0:
        return torch.zeros(len(y), 0, dtype=torch.long, device=labels.device)
    valid = (labels.unsqueeze(0) != y.unsqueeze(1)) & (labels.unsqueeze(0) >= 0)
    keys = torch.rand(valid.shape, device=labels.device)
    keys.masked_fill_(~valid, 2.0)  # every valid key is < 1, so the k_eff smallest are all valid
    return keys.topk(k_eff, dim=1, largest=False, sorted=False).indices


def negative_scores(anchor: Tensor, bank: Tensor, index: Tensor, *, path: str = "auto") -> Tensor:
    """``<anchor_b, bank[index_b,i]>`` as ``[B, k]``; the bank is a constant (no gradient).

    Two exact evaluations: ``"gather"`` (CRD: gather the k rows, B*k*d memory) and ``"matmul"``
    (all N scores, then gather: B*N memory -- far smaller for CIFAR's k = 16384, N = 50000).
    ``"auto"`` picks the one needing less memory.
    """
    b, k = index.shape
    if k == 0:
        return anchor.new_zeros(b, 0)
    bank = bank.detach()
    if path == "auto":
        path = "matmul" if bank.shape[0] <= k * bank.shape[1] else "gather"
    if path == "matmul":
        return (anchor @ bank.t()).gather(1, index)
    if path == "gather":
        return torch.bmm(bank[index], anchor.unsqueeze(2)).squeeze(2)
    raise ValueError(f"path must be 'auto', 'matmul' or 'gather', got {path!r}")


def nce_normaliser(pos: Tensor, neg: Tensor, *, temperature: float, n_data: int) -> Tensor:
    """CRD's Z: mean of exp(score / T) over the positive and negative scores of a batch, times N."""
    scores = torch.cat([pos.detach().unsqueeze(1), neg.detach()], dim=1).float() / temperature
    return torch.exp(torch.logsumexp(scores.flatten(), 0) - math.log(scores.numel()) + math.log(n_data))


def nce_log_likelihood(pos: Tensor, neg: Tensor, *, temperature: float, z: Tensor | float, n_data: int) -> Tensor:
    """Per-sample NCE log-likelihood ``log h(pos) + sum_i log(1 - h(neg_i))``, shape ``[B]``.

    With P(s) = exp(s / T) / Z, k = neg.shape[1] and N = n_data, CRD's critic is
    h = P / (P + k/N + 1e-7) and 1 - h is taken as (k/N) / (P + k/N + 1e-7) (CRD ``ContrastLoss``).
    Evaluated in the log domain in fp32: exp(s / T) alone is e^10 at T = 0.1.
    """
    pos, neg = pos.float(), neg.float()
    k = neg.shape[1]
    log_z = torch.log(torch.as_tensor(z, dtype=torch.float32, device=pos.device))
    noise = k / float(n_data)
    log_c = math.log(noise + NCE_EPS)
    log_p_pos = pos / temperature - log_z
    ll = log_p_pos - torch.logaddexp(log_p_pos, torch.full_like(log_p_pos, log_c))
    if k:
        log_p_neg = neg / temperature - log_z
        ll = ll + (math.log(noise) - torch.logaddexp(log_p_neg, torch.full_like(log_p_neg, log_c))).sum(1)
    return ll


@torch.no_grad()
def momentum_update(bank: Tensor, index: Tensor, embeddings: Tensor, momentum: float) -> None:
    """CRD's memory update in place: ``bank[i] <- l2normalize(m * bank[i] + (1 - m) * e)``."""
    rows = bank[index] * momentum + embeddings.to(bank.dtype) * (1.0 - momentum)
    bank[index] = F.normalize(rows, dim=1)


def weighted_nce_loss(
    pos: Tensor, neg: Tensor, weights: Tensor, *, temperature: float, z: Tensor | float, n_data: int
) -> Tensor:
    """GACD's contrastive loss ``-(1/B) sum_b w_b ll_b`` with ll_b of :func:`nce_log_likelihood`."""
    return -(weights * nce_log_likelihood(pos, neg, temperature=temperature, z=z, n_data=n_data)).mean()
