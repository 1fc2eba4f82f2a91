"""Teacher introspection, as in IAD: trust the teacher per sample, and learn from yourself where it fails.

Introspective Adversarial Distillation (Zhu et al., 'Reliable Adversarial Distillation with Unreliable
Teachers', ICLR 2022, arXiv:2106.04928) weights each sample's teacher term by how much the teacher
can be trusted on the adversarial example, and gives the remaining weight to a self-distillation
("introspection") term that pulls the student's adversarial prediction towards its own clean one::

    w_b      = softmax(z_T(x'_b))_{y_b} ** beta                        reliability, no gradient, tau = 1
    intro_b  = KL( p_S(x_b) || p_S(x'_b) )                             tau = 1
    teacher  = R( W_b KL(p_T^tau(.) || p_S^tau(x'_b)) ),   W_b = w_b or 1 (``weight_teacher_term``)
    self     = R( (1 - w_b) intro_b )

R is the batch reduction of :func:`robustbench_kd.methods.losses.reduce_kl`; the weights multiply the
per-sample values before it. The reference code does not detach p_S(x) in the introspection KL, so
gradients reach the clean branch too unless ``detach_target`` is set.

The introspection term is switched on after a warm-up of ``begin`` epochs (0-based: active when
``epoch >= begin``); :class:`IntrospectionWarmUp` keeps the epoch counter a distiller needs for
that switch and saves it with the method state, so a resume across the switch is exact.

IAD (``iad``) and AdaIAD (``adaiad``, AdaAD's attack with IAD-I's loss) both compose these parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.methods.losses import kl_logits_per_sample, reduce_kl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext

__all__ = [
    "IntrospectionTerms",
    "IntrospectionWarmUp",
    "clean_pass",
    "iad1_objective",
    "introspection_kl",
    "introspective_terms",
    "reliability_weights",
]


def reliability_weights(teacher_logits_adv: Tensor, y: Tensor, beta: float) -> Tensor:
    """Per-sample trust in the teacher: ``w_b = p_T(y_b | x'_b) ** beta``, detached, shape ``[B]``.

    Computed as ``exp(beta * log_softmax(z_T)_y)`` (the same number as ``softmax(z_T)_y ** beta``,
    without underflow to 0 for a very confident wrong teacher). Temperature 1, as the reference.
    """
    log_p = F.log_softmax(teacher_logits_adv.detach(), dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    return torch.exp(beta * log_p)


def introspection_kl(logits_adv: Tensor, logits_nat: Tensor, *, detach_target: bool) -> Tensor:
    """The self-distillation KL(p_S(x) || p_S(x')) per sample (tau = 1; "KL(S(x'), S(x))" in the paper).

    The reference does not detach p_S(x): gradients reach the clean branch too unless ``detach_target``.
    """
    target = logits_nat.detach() if detach_target else logits_nat
    return kl_logits_per_sample(logits_adv, target)


@dataclass
class IntrospectionTerms:
    """The reduced terms of one batch after the warm-up.

    Attributes:
        teacher: R(W_b KL_b) of the teacher KL (weighted only if asked), before any alpha or tau^2.
        introspection: R((1 - w_b) intro_b); None during the warm-up.
        weights: w_b, shape ``[B]`` (detached); None during the warm-up.
    """

    teacher: Tensor
    introspection: Tensor | None = None
    weights: Tensor | None = None

    def log_terms(self, terms: dict[str, Tensor], *, logits_nat: Tensor | None = None, y: Tensor | None = None) -> None:
        """Add ``kl_teacher``, after the warm-up ``kl_intro`` and ``w_mean``, and ``ce_nat`` (the clean CE,
        whenever the clean pass ran: ``logits_nat`` given) to ``terms``."""
        terms["kl_teacher"] = self.teacher.detach()
        if self.introspection is not None:
            terms["kl_intro"] = self.introspection.detach()
        if self.weights is not None:
            terms["w_mean"] = self.weights.mean()
        if logits_nat is not None and y is not None:
            terms["ce_nat"] = F.cross_entropy(logits_nat.detach(), y)


def introspective_terms(
    teacher_kl: Tensor,
    logits_adv: Tensor,
    logits_nat: Tensor,
    teacher_logits_adv: Tensor,
    y: Tensor,
    *,
    beta: float,
    weight_teacher_term: bool,
    detach_target: bool,
    reduction: str,
) -> IntrospectionTerms:
    """Reliability-weighted teacher term and introspection term of a batch (see the module docstring).

    Args:
        teacher_kl: per-sample KL(p_T^tau || p_S^tau(x')), shape ``[B]`` (the target depends on the method).
        logits_adv, logits_nat: the student's logits on x' and x (with graph).
        teacher_logits_adv: the teacher's logits on x' (the reliability weights are computed from them).
        y: labels.
        beta: exponent of the reliability weight.
        weight_teacher_term: multiply the teacher KL by w_b (the paper's formula) or not.
        detach_target: stop the gradient through p_S(x) in the introspection KL.
        reduction: the batch reduction of both terms (``batchmean``, ``mean_all`` or ``sum``).
    """
    c = logits_adv.shape[1]
    w = reliability_weights(teacher_logits_adv, y, beta)
    teacher = reduce_kl(w * teacher_kl if weight_teacher_term else teacher_kl, reduction, c)
    intro = introspection_kl(logits_adv, logits_nat, detach_target=detach_target)
    return IntrospectionTerms(teacher=teacher, introspection=reduce_kl((1.0 - w) * intro, reduction, c), weights=w)


class IntrospectionWarmUp:
    """Mixin for a Distiller whose introspection term starts at epoch ``self.begin`` (0-based).

    Keeps the current epoch (set by ``on_epoch_start``) and saves it as the method state
    ``{"epoch": e}``, so that a run resumed across the switch continues exactly. Put it before
    ``Distiller`` in the bases and set ``self.begin`` in ``__init__``; the Config declares ``beta`` and
    ``detach_self_target``.
    """

    config: Any
    begin: int
    _epoch: int = 0

    @property
    def introspection_active(self) -> bool:
        """Whether the current epoch is past the warm-up."""
        return self._epoch >= self.begin

    def introspect(
        self,
        ctx: BatchContext,
        teacher_kl: Tensor,
        logits_adv: Tensor,
        logits_nat: Tensor | None,
        *,
        weight_teacher_term: bool,
        reduction: str,
    ) -> IntrospectionTerms:
        """The batch's terms: :func:`introspective_terms` after the warm-up (reading the ``robust`` teacher's
        memoised logits on x'), else only the plain reduced teacher KL (the teacher is not run on x' for it).

        beta and whether p_S(x) is detached come from the Config's ``beta`` and ``detach_self_target``."""
        if self.introspection_active and logits_nat is not None:
            return introspective_terms(
                teacher_kl,
                logits_adv,
                logits_nat,
                ctx.teacher_logits("robust", "adv"),
                ctx.y,
                beta=self.config.beta,
                weight_teacher_term=weight_teacher_term,
                detach_target=self.config.detach_self_target,
                reduction=reduction,
            )
        return IntrospectionTerms(teacher=reduce_kl(teacher_kl, reduction, logits_adv.shape[1]))

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self._epoch = int(epoch)

    def method_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch}

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        self._epoch = int(state.get("epoch", 0))


def iad1_objective(
    kl_teacher: Tensor,
    kl_intro: Tensor | None,
    ce_nat: Tensor | None,
    *,
    alpha: float,
    ce_weight: float,
    temperature: float,
) -> Tensor:
    """IAD-I's total: ``a tau^2 teacher + a self + ce_weight CE(z_S(x), y)``.

    ``kl_intro`` is None during the warm-up; ``ce_nat`` (the clean CE, batch mean) is added only when
    ``ce_weight > 0``. The introspection term carries no tau^2, as in the reference code.
    """
    tau = temperature
    total = alpha * tau * tau * kl_teacher
    if kl_intro is not None:
        total = total + alpha * kl_intro
    if ce_weight > 0.0 and ce_nat is not None:
        total = total + ce_weight * ce_nat
    return total


def clean_pass(student: Any, x: Tensor, *, needed: bool, forward_when_unused: bool) -> Tensor | None:
    """The student's clean logits: with graph if ``needed``; else, if ``forward_when_unused``, a no-grad
    pass whose only effect is that BN running statistics see the clean batch (as the reference codes run
    it every batch); else None."""
    if needed:
        return student(x)
    if forward_when_unused:
        with torch.no_grad():
            return student(x)
    return None
