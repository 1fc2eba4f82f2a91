"""``ard``: Adversarially Robust Distillation (Goldblum et al., AAAI 2020)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import ATTACK_INITS, STUDENT_MODES, AttackSpec, Distiller, LossOutput
from robustbench_kd.errors import UserError, check_choice
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.divergence import (
    ClassPrior,
    check_divergence_options,
    ikl_per_sample,
    sample_weight_vectors,
)
from robustbench_kd.methods.losses import KL_REDUCTIONS, kl_per_sample, reduce_kl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec


class ARD(Distiller):
    r"""ARD: the student on x' matches the teacher's softened output on clean x.

    Paper: Goldblum, Fowl, Feizi, Goldstein, 'Adversarially Robust Distillation', AAAI 2020
    [https://arxiv.org/abs/1905.09747]. Reference code: goldblum/AdversariallyRobustDistillation
    ``main.py`` (loss and attack only; the script has unrelated bugs, methods.md §2).

    Loss (methods.md §2)::

        L = alpha * tau^2 * R( KL(p_T^tau(x) || p_S^tau(x')) ) + (1 - alpha) * (1/B) sum_b CE(z_S(x_b), y_b)

    p^tau = softmax(z / tau); the teacher is memoised on the CLEAN batch (no grad); the CE is on the
    student's CLEAN output at tau = 1 (as in the code). R is ``kl_reduction``; the reference uses
    ``nn.KLDivLoss()`` = mean over all B*C elements (``mean_all``), so the default distillation term is
    tau^2 / C = 90 times the batchmean KL at tau = 30, C = 10. Forward order as the reference:
    student(x') then student(x), both in train mode, separate passes.

    Attack::

        x' = PGD_{eps, alpha, K}( CE(z_S(x'), y) ),  uniform start U(-eps, eps), student in TRAIN mode

    (BN uses batch statistics and its running statistics are updated at every attack step, as in the
    reference ``AttackPGD`` module called after ``net.train()``). Budget: the run's threat (reference:
    8/255, 2/255, 10).

    IKL instead of KL (``divergence="ikl"``; methods.md §10.4 [SUGGESTION], :mod:`robustbench_kd.methods.divergence`):
    the KL term becomes IKL evaluated at the same temperature, i.e. on logits divided by tau::

        alpha * tau^2 * R( ikl_mse_weight * wMSE(z_T(x)/tau, z_S(x')/tau; w_y) + ikl_sce_weight * sCE )
        wMSE(a, b; w) = (1/4) sum_{j,k} w^{jk} ((a^j - a^k) - (b^j - b^k))^2 = wMSE(z_T, z_S; w) / tau^2
        sCE = -sum_j p_T^tau(x)_j log p_S^tau(x')_j          (same gradient as the KL it replaces)

    so tau^2 cancels on the wMSE: its scale does not depend on tau, and ``ikl_mse_weight=0`` trains
    exactly like ``divergence="kl"``. The teacher logits are detached; the wMSE gradient reaches the
    student's adversarial logits (in plain KL the student gets none of it). w_y = s_bar_y s_bar_y^T
    with s_bar_y the mean of the teacher's clean ``softmax(z_T/ikl_prior_temperature)`` over class y in
    the previous epoch (uniform 1/C in the first epoch; accumulated in :meth:`after_step`, finalised in
    :meth:`on_epoch_end`, saved in the checkpoint as buffers ``prior.*``); ``ikl_class_prior=False``
    uses per-sample teacher weights. The attack (hard-label CE) is unchanged.

    Arguments (``ARD.Config``):
        temperature (float): tau. (Default: 30.0, code.)
        alpha (float): weight of the distillation term, in [0, 1]. (Default: 1.0, code -- the CE
            term vanishes.)
        kl_reduction (str): ``"mean_all"``, ``"batchmean"`` or ``"sum"``. (Default: "mean_all", code.)
        init (str): attack start. (Default: "uniform", code.)
        attack_student_mode (str): student BN mode in the attack. (Default: "train", code.)
        clean_forward_when_unused (bool): with ``alpha == 1`` still run the student on x (no grad,
            train mode), as the reference does every batch, so BN running statistics also see the
            clean batch; False skips that pass. (Default: True, code.)
        divergence (str): ``"kl"`` (ARD) or ``"ikl"`` (see above). (Default: "kl".)
        ikl_mse_weight (float): wMSE weight (paper alpha, IKL code ``beta``). (Default: 5.0,
            [SUGGESTION]: the IKL-AT scripts' wMSE:sCE ratio 20:4 with the sCE kept at KL's scale.)
        ikl_sce_weight (float): sCE weight (paper beta, IKL code ``alpha``). (Default: 1.0.)
        ikl_prior_temperature (float): T of the teacher softmax behind the class prior (not tau).
            (Default: 4.0, IKL-AT scripts ``--T 4``.)
        ikl_class_prior (bool): class-wise weights (IKL ``GI``); False = per-sample teacher weights.
            (Default: True.)

    Teacher roles:
        robust: the robust teacher (reference: TRADES WRN-34-10).

    Terms logged:
        ``kl_adv`` (the reduced KL before alpha and tau^2; ``ikl_adv``, the reduced IKL, with
        ``divergence="ikl"``), ``ce_nat`` (clean CE; logged also when alpha == 1 as long as the clean
        pass runs).

    Deviations / notes:
        * The paper also softens the CE (``CE(S^tau(x), y)``); the code does not, nor do we.

    Examples::

        >>> ard = ARD()                                    # tau 30, alpha 1, mean_all, train-mode attack
        >>> ard_ikl = ARD(ARD.Config(divergence="ikl"))    # IKL at tau in place of the KL
        >>> # run config: [method] name = "ard", temperature = 30.0, alpha = 0.9
    """

    name: ClassVar[str] = "ard"
    supports_distributed: ClassVar[bool] = True  # IKL class prior: summed over processes
    paper: ClassVar[str] = (
        "Micah Goldblum, Liam Fowl, Soheil Feizi, Tom Goldstein. Adversarially Robust Distillation. "
        "AAAI 2020. arXiv:1905.09747"
    )
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust",)

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """Hyper-parameters of ARD (see the class docstring for meanings and provenance)."""

        temperature: float = 30.0
        alpha: float = 1.0
        kl_reduction: str = "mean_all"
        init: str = "uniform"
        attack_student_mode: str = "train"
        clean_forward_when_unused: bool = True
        divergence: str = "kl"
        ikl_mse_weight: float = 5.0
        ikl_sce_weight: float = 1.0
        ikl_prior_temperature: float = 4.0
        ikl_class_prior: bool = True

        def __post_init__(self) -> None:
            if not self.temperature > 0.0:
                raise UserError(f"method.temperature must be positive, got {self.temperature}")
            if not 0.0 <= self.alpha <= 1.0:
                raise UserError(f"method.alpha must be in [0, 1], got {self.alpha}")
            check_choice("kl_reduction", self.kl_reduction, KL_REDUCTIONS)
            check_choice("init", self.init, ATTACK_INITS)
            check_choice("attack_student_mode", self.attack_student_mode, STUDENT_MODES)
            check_divergence_options(divergence=self.divergence, mse_weight=self.ikl_mse_weight,
                                     sce_weight=self.ikl_sce_weight, prior_temperature=self.ikl_prior_temperature)

    def __init__(self, config: ARD.Config | None = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        cfg = self.config
        # Only with IKL's class prior: a KL run's state_dict (and its checkpoints) stay as they were.
        self.prior: ClassPrior | None = (
            ClassPrior(num_classes, temperature=cfg.ikl_prior_temperature)
            if cfg.divergence == "ikl" and cfg.ikl_class_prior else None
        )

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return AttackSpec(eps=threat.eps, alpha=threat.alpha, steps=threat.steps, norm=threat.norm,
                          init=self.config.init, student_mode=self.config.attack_student_mode)

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        return F.cross_entropy(self.student_logits(ctx, x_adv), ctx.y, reduction="none")

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        tau = cfg.temperature
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        target = ctx.teacher_probs("robust", "clean", temperature=tau)
        if cfg.divergence == "kl":
            per_sample = kl_per_sample(logits_adv, target, temperature=tau)
        else:
            teacher_logits = ctx.teacher_logits("robust", "clean")
            if self.prior is not None:
                weights = self.prior.weight_vectors(ctx.y)
            else:
                weights = sample_weight_vectors(teacher_logits, cfg.ikl_prior_temperature)
            per_sample = ikl_per_sample(logits_adv / tau, teacher_logits / tau, weights,
                                        mse_weight=cfg.ikl_mse_weight, sce_weight=cfg.ikl_sce_weight,
                                        target_probs=target).total
        kl_adv = reduce_kl(per_sample, cfg.kl_reduction, logits_adv.shape[1])
        total = cfg.alpha * tau * tau * kl_adv
        terms = {("kl_adv" if cfg.divergence == "kl" else "ikl_adv"): kl_adv.detach()}
        if cfg.alpha < 1.0:
            ce_nat = F.cross_entropy(self.student_logits(ctx, ctx.x), ctx.y, reduction="none").mean()
            total = total + (1.0 - cfg.alpha) * ce_nat
            terms["ce_nat"] = ce_nat.detach()
        elif cfg.clean_forward_when_unused:
            with torch.no_grad():
                logits_nat = self.student_logits(ctx, ctx.x)
            terms["ce_nat"] = F.cross_entropy(logits_nat, ctx.y)
        return LossOutput(total=total, terms=terms)

    def after_step(self, ctx: BatchContext, out: LossOutput) -> None:
        if self.prior is not None:
            self.prior.accumulate(ctx.teacher_logits("robust", "clean"), ctx.y)

    def on_epoch_end(self, epoch: int, num_epochs: int) -> dict[str, float]:
        if self.prior is not None:
            self.prior.finalize()
        return {}


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(ARD)
