"""``kd``: Hinton knowledge distillation on clean data (and CKD, the AKD paper's Eq. 1, at temperature 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F

from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput
from robustbench_kd.errors import UserError, check_choice
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.losses import KL_REDUCTIONS, kl_per_sample, reduce_kl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec


class KD(Distiller):
    r"""Hinton knowledge distillation: soft teacher targets on clean data, no attack.

    Paper: Hinton, Vinyals, Dean, 'Distilling the Knowledge in a Neural Network', NIPS 2014 Deep
    Learning Workshop [https://arxiv.org/abs/1503.02531]. Defaults follow RepDistiller
    (HobbitLong/RepDistiller ``DistillKL``, CIFAR-100 runs ``-r 0.1 -a 0.9``).

    Loss (methods.md §1.3)::

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
    class Config:
        """Hyper-parameters of Hinton KD (see the class docstring for meanings and provenance)."""

        temperature: float = 4.0
        kd_weight: float = 0.9
        ce_weight: float = 0.1
        tau_squared: bool = True
        kl_reduction: str = "batchmean"

        def __post_init__(self) -> None:
            if not self.temperature > 0.0:
                raise UserError(f"method.temperature must be positive, got {self.temperature}")
            if not (self.kd_weight >= 0.0 and self.ce_weight >= 0.0):
                raise UserError(
                    f"method.kd_weight and method.ce_weight must be >= 0, got {self.kd_weight}, {self.ce_weight}"
                )
            check_choice("kl_reduction", self.kl_reduction, KL_REDUCTIONS)

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return None

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        tau = cfg.temperature
        logits = self.student_logits(ctx, ctx.x)
        ce_nat = F.cross_entropy(logits, ctx.y, reduction="none").mean()
        target = ctx.teacher_probs("robust", "clean", temperature=tau)
        kl_nat = reduce_kl(kl_per_sample(logits, target, temperature=tau), cfg.kl_reduction, logits.shape[1])
        scale = tau * tau if cfg.tau_squared else 1.0
        total = cfg.ce_weight * ce_nat + cfg.kd_weight * scale * kl_nat
        return LossOutput(total=total, terms={"ce_nat": ce_nat.detach(), "kl_nat": kl_nat.detach()})


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(KD)
