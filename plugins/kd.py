r"""``kd``: Hinton knowledge distillation on clean data (and CKD, the AKD paper's Eq. 1, at temperature 1).

Paper: Hinton, Vinyals, Dean, 'Distilling the Knowledge in a Neural Network', NIPS 2014 Deep
Learning Workshop [https://arxiv.org/abs/1503.02531]. Defaults follow RepDistiller
(HobbitLong/RepDistiller ``DistillKL``, CIFAR-100 runs ``-r 0.1 -a 0.9``).

Loss::

    L = ce_weight * (1/B) sum_b CE(z_S(x_b), y_b)
        + kd_weight * tau^2 * R( KL(p_T^tau(x_b) || p_S^tau(x_b)) )

p^tau = softmax(z / tau); the teacher term is the memoised teacher on the clean batch (no grad);
R is ``kl_reduction`` (batchmean = RepDistiller's ``kl_div(sum) / B``); the tau^2 factor keeps the
gradient scale comparable across temperatures (dropped with ``tau_squared=False``).

CKD ("clean knowledge distillation", AKD paper Eq. 1):
``(1 - lambda) CE(p_S(x), y) + lambda KL(p_S(x), p_T(x))`` is exactly this method with
``temperature=1``, ``kd_weight=lambda``, ``ce_weight=1-lambda`` (tau^2 = 1, so ``tau_squared`` does
not matter; set it False to state it explicitly).

Attack:
    none (``attack_spec`` returns None).

The module reads top-down: this description, the pure loss :func:`kd_loss`, then the distiller
:class:`KD` that gathers its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.losses import kl_per_sample, kl_reduction_option, reduce_kl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec


def kd_loss(
    student_logits: Tensor,
    target_probs: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    tau_squared: bool,
    reduction: str,
) -> LossOutput:
    """``ce_weight * mean_b CE(z_S, y) + kd_weight * [tau^2] * R(KL(q || p_S^tau))`` (module docstring).

    ``target_probs`` q is the teacher's softened output ``softmax(z_T / tau)``; R is :func:`reduce_kl`.
    Terms: ``ce_nat`` and ``kl_nat`` (R(KL), before its weight and tau^2).
    """
    ce_nat = F.cross_entropy(student_logits, labels, reduction="none").mean()
    kl_nat = reduce_kl(
        kl_per_sample(student_logits, target_probs, temperature=temperature), reduction, student_logits.shape[1]
    )
    scale = temperature * temperature if tau_squared else 1.0
    total = ce_weight * ce_nat + kd_weight * scale * kl_nat
    return LossOutput(total=total, terms={"ce_nat": ce_nat.detach(), "kl_nat": kl_nat.detach()})


class KD(Distiller):
    r"""Hinton knowledge distillation: soft teacher targets on clean data, no attack.

    The method (paper, loss, attack, reference defaults, deviations) is described in the module docstring.

    Arguments (``KD.Config``):
        temperature (float): tau. (Default: 4.0, RepDistiller.)
        kd_weight (float): weight of the distillation term (RepDistiller ``-a``). (Default: 0.9.)
        ce_weight (float): weight of the hard-label CE (RepDistiller ``-r``). (Default: 0.1.)
        tau_squared (bool): multiply the KL by tau^2. (Default: True, Hinton / RepDistiller.)
        kl_reduction (str): ``"batchmean"``, ``"mean_all"`` or ``"sum"``. (Default: "batchmean".)

    Teacher roles:
        robust: the teacher to distil (any teacher; a natural one is typical for clean KD).

    Terms logged:
        ``ce_nat`` (hard-label CE), ``kl_nat`` (the reduced KL before the weight and tau^2).

    Examples::

        >>> hinton = KD()                                           # tau 4, 0.9 KD / 0.1 CE
        >>> ckd = KD(KD.Config(temperature=1.0, kd_weight=0.5, ce_weight=0.5, tau_squared=False))
        >>> # run config: [method] name = "kd", temperature = 1.0, kd_weight = 0.5, ce_weight = 0.5
    """

    name: ClassVar[str] = "kd"
    supports_distributed: ClassVar[bool] = True  # stateless, batch-mean loss
    paper: ClassVar[str] = (
        "Geoffrey Hinton, Oriol Vinyals, Jeff Dean. Distilling the Knowledge in a Neural Network. "
        "NIPS 2014 Deep Learning Workshop. arXiv:1503.02531"
    )
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust",)

    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        """Hyper-parameters of Hinton KD (see the class docstring for meanings and provenance)."""

        temperature: float = option(4.0, low=0, low_open=True, help="tau of the distillation KL")
        kd_weight: float = option(0.9, low=0, help="weight of the distillation term (RepDistiller -a)")
        ce_weight: float = option(0.1, low=0, help="weight of the hard-label CE (RepDistiller -r)")
        tau_squared: bool = option(True, choices=(False, True), help="multiply the KL by tau^2")
        kl_reduction: str = kl_reduction_option("batchmean")

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return None

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        logits = self.student_logits(ctx, ctx.x)
        return kd_loss(
            logits,
            ctx.teacher_probs("robust", "clean", temperature=cfg.temperature),
            ctx.y,
            temperature=cfg.temperature,
            kd_weight=cfg.kd_weight,
            ce_weight=cfg.ce_weight,
            tau_squared=cfg.tau_squared,
            reduction=cfg.kl_reduction,
        )


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(KD)
