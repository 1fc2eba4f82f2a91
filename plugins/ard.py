r"""``ard``: Adversarially Robust Distillation (Goldblum et al., AAAI 2020).

The student on x' matches the teacher's softened output on clean x.

Paper: Goldblum, Fowl, Feizi, Goldstein, 'Adversarially Robust Distillation', AAAI 2020
[https://arxiv.org/abs/1905.09747]. Reference code: goldblum/AdversariallyRobustDistillation
``main.py``; only its loss and attack are followed (the script has unrelated bugs elsewhere).

Loss::

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

IKL instead of KL (``divergence="ikl"``, our extension; :class:`robustbench_kd.methods.divergence.Divergence`):
the KL term becomes IKL evaluated at the same temperature, i.e. on logits divided by tau::

    alpha * tau^2 * R( ikl_mse_weight * wMSE(z_T(x)/tau, z_S(x')/tau; w_y) + ikl_sce_weight * sCE )
    wMSE(a, b; w) = (1/4) sum_{j,k} w^{jk} ((a^j - a^k) - (b^j - b^k))^2 = wMSE(z_T, z_S; w) / tau^2
    sCE = -sum_j p_T^tau(x)_j log p_S^tau(x')_j          (same gradient as the KL it replaces)

so tau^2 cancels on the wMSE: its scale does not depend on tau, and ``ikl_mse_weight=0`` trains
exactly like ``divergence="kl"``. The teacher logits are detached; the wMSE gradient reaches the
student's adversarial logits (in plain KL the student gets none of it). w_y = s_bar_y s_bar_y^T
with s_bar_y the mean of the teacher's clean ``softmax(z_T/ikl_prior_temperature)`` over class y in
the previous epoch (uniform 1/C in the first epoch; accumulated in ``after_step``, finalised in
``on_epoch_end``, saved in the checkpoint as buffers ``prior.*``); ``ikl_class_prior=False``
uses per-sample teacher weights. The attack (hard-label CE) is unchanged.

Deviations / notes:
    * The paper also softens the CE (``CE(S^tau(x), y)``); the code does not, nor do we.

The module reads top-down: this description, the pure loss :func:`ard_loss`, then the distiller
:class:`ARD` that gathers its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import LossOutput, option
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.attack_options import (
    LabelCrossEntropyAttack,
    init_option,
    student_mode_option,
)
from robustbench_kd.methods.divergence import DivergenceDistiller, DivergenceOptions
from robustbench_kd.methods.losses import kl_reduction_option, reduce_kl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar


def ard_loss(
    divergence_adv: Tensor,
    labels: Tensor,
    *,
    logits_nat: Tensor | None,
    alpha: float,
    temperature: float,
    reduction: str,
    num_classes: int,
    name: str = "kl",
) -> LossOutput:
    """``alpha * tau^2 * R(d_adv) + (1 - alpha) * mean_b CE(z_S(x_b), y_b)``.

    ``divergence_adv`` is the per-sample KL (or IKL) of the student on x' at temperature tau, ``[B]``; R is
    :func:`reduce_kl`. ``logits_nat`` are the student's clean logits: trained through the CE when
    ``alpha < 1``; with ``alpha == 1`` only logged (pass them computed without gradient, or None to skip).
    Terms: ``<name>_adv`` (R(d_adv), before alpha and tau^2) and ``ce_nat`` when ``logits_nat`` is given.
    """
    kl_adv = reduce_kl(divergence_adv, reduction, num_classes)
    total = alpha * temperature * temperature * kl_adv
    terms = {f"{name}_adv": kl_adv.detach()}
    if alpha < 1.0:
        assert logits_nat is not None, "alpha < 1 trains the clean CE: pass logits_nat"
        ce_nat = F.cross_entropy(logits_nat, labels, reduction="none").mean()
        total = total + (1.0 - alpha) * ce_nat
        terms["ce_nat"] = ce_nat.detach()
    elif logits_nat is not None:
        terms["ce_nat"] = F.cross_entropy(logits_nat, labels)
    return LossOutput(total=total, terms=terms)


class ARD(LabelCrossEntropyAttack, DivergenceDistiller):
    r"""ARD: the student on x' matches the teacher's softened output on clean x.

    The method (paper, loss, attack, IKL variant, deviations) is described in the module docstring.

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
        divergence (str): ``"kl"`` (ARD) or ``"ikl"`` (module docstring). (Default: "kl".)
        ikl_mse_weight (float): wMSE weight (paper alpha, IKL code ``beta``). (Default: 5.0, our choice:
            the IKL-AT scripts' wMSE:sCE ratio 20:4 with the sCE kept at KL's scale.)
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
    class Config(DivergenceOptions):
        """Hyper-parameters of ARD (see the class docstring for meanings and provenance)."""

        temperature: float = option(30.0, low=0, low_open=True, help="tau of the distillation KL")
        alpha: float = option(1.0, low=0, high=1, help="weight of the distillation term; 1 - alpha on the clean CE")
        kl_reduction: str = kl_reduction_option("mean_all")
        init: str = init_option("uniform")
        attack_student_mode: str = student_mode_option("train")
        clean_forward_when_unused: bool = option(
            True, choices=(False, True), help="with alpha = 1 still run the student on x (BN statistics, ce_nat)"
        )

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        tau = cfg.temperature
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        per_sample = self.divergence.per_sample(
            logits_adv,
            ctx.teacher_probs("robust", "clean", temperature=tau),
            teacher_logits=ctx.teacher_logits("robust", "clean"),
            labels=ctx.y,
            temperature=tau,
        )
        logits_nat: Tensor | None = None
        if cfg.alpha < 1.0:
            logits_nat = self.student_logits(ctx, ctx.x)
        elif cfg.clean_forward_when_unused:
            with torch.no_grad():
                logits_nat = self.student_logits(ctx, ctx.x)
        return ard_loss(
            per_sample,
            ctx.y,
            logits_nat=logits_nat,
            alpha=cfg.alpha,
            temperature=tau,
            reduction=cfg.kl_reduction,
            num_classes=logits_adv.shape[1],
            name=cfg.divergence,
        )


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(ARD)
