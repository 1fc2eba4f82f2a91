"""Shared loss primitives, per sample, and the KL options several methods declare: the methods compose these.

Conventions:

* ``kl_per_sample(student_logits, target_probs)`` is KL(p_T || p_S) = sum_c p_T,c (log p_T,c - log p_S,c),
  the teacher (target) distribution first, as every reference implementation computes it. Papers write
  this as "KL(S, T)"; the second paper argument is the target.
* Losses are returned per sample (shape ``[B]``); :func:`reduce_kl` turns a per-sample KL into the
  reduction a reference code used, because the reductions differ by a factor C (number of classes):

  - ``"batchmean"``: (1/B) sum_b KL_b           (TRADES, IAD, Hinton KD)
  - ``"mean_all"``:  (1/(B*C)) sum_b KL_b       (ARD, RSLAD, MTARD; PyTorch ``KLDivLoss()`` default)
  - ``"sum"``:       sum_b KL_b

* :func:`kl_reduction_option` and :func:`kl_scale_option` declare the ``kl_reduction`` / ``kl_scale`` options
  of a method's Config; :func:`reference_kl_scale` resolves ``kl_scale = None`` the way the RSLAD and MTARD
  reference scripts do.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import option

KL_REDUCTIONS = ("batchmean", "mean_all", "sum")


def kl_reduction_option(default: str) -> Any:
    """``kl_reduction``: how a per-sample KL is reduced (:func:`reduce_kl`), default the method's reference code."""
    return option(
        default,
        choices=KL_REDUCTIONS,
        help="KL reduction: batchmean (mean over samples), mean_all (mean over samples and classes) or sum",
    )


def kl_scale_option() -> Any:
    """``kl_scale``: a multiplier of every KL; None resolves through :func:`reference_kl_scale`."""
    return option(
        None,
        low=0,
        low_open=True,
        help="multiplier of every KL; None = 10 for 100 classes with mean_all, else 1 (reference scripts)",
    )


def reference_kl_scale(kl_scale: float | None, num_classes: int, reduction: str) -> float:
    """The KL multiplier s: ``kl_scale`` when set, else the reference default.

    The RSLAD and MTARD CIFAR-100 scripts multiply every KL by 10 "to keep consistent with CIFAR-10" (their
    ``mean_all`` reduction divides by C = 100 instead of 10), so None means 10 for 100 classes with
    ``mean_all`` and 1 otherwise.
    """
    if kl_scale is not None:
        return float(kl_scale)
    return 10.0 if num_classes == 100 and reduction == "mean_all" else 1.0


def soften(logits: Tensor, temperature: float) -> Tensor:
    """``logits / temperature``; at tau = 1 the logits themselves (no division, and none in the backward,
    at every attack step)."""
    return logits if temperature == 1.0 else logits / temperature


def kl_per_sample(student_logits: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(q || p_S^tau) per sample.

    .. math:: \\mathrm{KL}_b = \\sum_c q_{bc} (\\log q_{bc} - \\log \\mathrm{softmax}(z_S / \\tau)_{bc})

    ``target_probs`` q is used as given (callers soften it themselves); ``0 log 0 = 0`` (xlogy), so
    one-hot and label-mixed targets with exact zeros are fine. Gradients flow into ``student_logits``
    and, if it requires grad, into ``target_probs``.
    """
    log_p = F.log_softmax(soften(student_logits, temperature), dim=1)
    return (torch.xlogy(target_probs, target_probs) - target_probs * log_p).sum(dim=1)


def kl_logits_per_sample(student_logits: Tensor, target_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(z_T/tau) || softmax(z_S/tau)) per sample, computed from logits on both sides.

    Uses log-softmax for both distributions (never ``log(softmax)``), so it is finite for any logits.
    """
    log_q = F.log_softmax(soften(target_logits, temperature), dim=1)
    log_p = F.log_softmax(soften(student_logits, temperature), dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1)


def soft_cross_entropy_per_sample(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy with a soft target: ``-sum_c q_c log softmax(z)_c`` per sample."""
    return soft_cross_entropy_from_log_probs(F.log_softmax(logits, dim=1), target_probs)


def soft_cross_entropy_from_log_probs(log_probs: Tensor, target_probs: Tensor) -> Tensor:
    """``-sum_c q_c log p_c`` per sample, from log-probabilities already computed (a caller scoring
    several targets against one prediction takes the log-softmax once)."""
    return -(target_probs * log_probs).sum(dim=1)


def reduce_kl(per_sample: Tensor, reduction: str, num_classes: int) -> Tensor:
    """Reduce a per-sample KL with one of :data:`KL_REDUCTIONS` (see the module docstring)."""
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "mean_all":
        return per_sample.mean() / num_classes
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"kl_reduction must be one of {', '.join(KL_REDUCTIONS)}, got {reduction!r}")


def mix_with_labels(probs: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """Label mixing (AKD Eq. 4): ``q = alpha * probs + (1 - alpha) * onehot(labels)``."""
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return alpha * probs + (1.0 - alpha) * onehot
