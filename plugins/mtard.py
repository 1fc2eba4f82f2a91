r"""``mtard``: Multi-Teacher Adversarial Robustness Distillation (Zhao et al., ECCV 2022): a robust teacher at
x', a natural teacher at x, and adaptively normalised weights between the two KL terms.

Paper: Zhao, Yu, Sun, Zhang, Wei, 'Enhanced Accuracy and Robustness via Multi-Teacher
Adversarial Distillation', ECCV 2022, pp. 585-602 (no arXiv id found for it; the TPAMI 2024 extension
B-MTARD, arXiv:2306.16170, adds entropy-based temperature balancing, not implemented). Reference
code: zhaoshiji123/MTARD (``mtard/mtard_loss.py``, ``mtard/mtard_resnet18_cifar{10,100}.py``).

Loss::

    L_adv = s * R( KL(p_Trob(x') || p_S(x')) )      robust teacher at the student's x' (no grad)
    L_nat = s * R( KL(p_Tnat(x)  || p_S(x))  )      natural teacher at the clean x (no grad)
    L     = w_adv * L_adv + w_nat * L_nat

tau = 1, no hard-label term. R is ``kl_reduction`` (reference: element-wise KL then ``torch.mean``
over B*C, ``mean_all``); s = ``kl_scale`` (reference CIFAR-100 script: 10, so by default s = 10 for
100 classes with ``mean_all``, else 1). The reference writes the element-wise KL as
``p_T * (log(p_T + 1e-5) - log p_S)``: the 1e-5 (``teacher_log_eps``) shifts the loss VALUE, not its
gradient, but MTARD feeds the values into its weights, so it is kept by default
(``teacher_log_eps=0`` gives the exact KL). Student forwards as the reference: student(x') then
student(x), both in train mode, separate passes.

Adaptive Normalization Loss (reference code; once per training batch, inside ``MTARD.loss``, i.e.
after the forwards and BEFORE backward, no gradient)::

    first batch of training only:  L_adv^0 = L_adv,  L_nat^0 = L_nat      (never reset)
    r_adv = (L_adv / L_adv^0)^b,   r_nat = (L_nat / L_nat^0)^b
    w_nat <- w_nat - eta_w * (w_nat - r_nat / (r_adv + r_nat));   w_adv = 1 - w_nat

and the batch's L uses the UPDATED weights (so the first batch uses 0.5/0.5). Initial weights
0.5/0.5, b = 1, eta_w = 0.025, multiplied by 0.1 at the end of every epoch listed in the LR
milestones (reference: 215, 260, 285, 1-based completed epochs, the same moment as its LR
decay). The reference does this on Python floats from ``loss.item()``; here the state is a set of
float64 0-dim buffers updated on the device from the float32 loss values (exactly the same
IEEE-double arithmetic, in the same order, without a host sync per batch); the weights are cast
to the loss dtype before multiplying, as PyTorch does with a Python scalar. The teacher whose
relative loss has fallen less gets more weight.

Attack::

    x' = PGD_{eps, alpha, K}( CE(z_S(x'), y) ),  x'_0 = x + 0.001 N(0, I), student in eval mode

(reference: batch-mean CE; per-sample here, the sign step is identical). Budget: the run's threat
(reference: 8/255, 2/255, 10).

Deviations / notes:
    * The reference crashes (ZeroDivisionError) when a first-batch loss or both relative losses
      are 0. Here a batch whose relative losses or update are not finite (0/0, x/0, NaN losses)
      leaves the weights unchanged, our choice (so a first-batch loss of exactly 0 freezes
      them); a NaN loss still stops training at the end of the epoch.
    * The weights are not clamped, as in the reference: with eta_w in [0, 1] the update is a
      convex combination of w_nat and a target in [0, 1], so w_nat stays in [0, 1].
    * ``MTARD.loss`` advances the weights: call it once per training batch (the trainer does).

The module reads top-down: this description, the pure functions :func:`eps_kl_per_sample`,
:func:`adaptive_nat_weight` and :func:`mtard_loss`, then the distiller :class:`MTARD` that keeps the weight
state and gathers their tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.errors import UserError
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.attack_options import student_mode_option, threat_attack
from robustbench_kd.methods.losses import (
    kl_per_sample,
    kl_reduction_option,
    kl_scale_option,
    reduce_kl,
    reference_kl_scale,
)
from robustbench_kd.scale import distributed

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec

#: dtype of the adaptive-weight state: the reference keeps it in Python floats (IEEE double).
STATE_DTYPE = torch.float64


def eps_kl_per_sample(student_logits: Tensor, teacher_probs: Tensor, *, log_eps: float) -> Tensor:
    """The reference's KL per sample, ``sum_c p_T,c (log(p_T,c + eps) - log p_S,c)``; the exact KL at eps = 0."""
    if log_eps == 0.0:
        return kl_per_sample(student_logits, teacher_probs)
    log_p = F.log_softmax(student_logits, dim=1)
    return (teacher_probs * (torch.log(teacher_probs + log_eps) - log_p)).sum(dim=1)


def adaptive_nat_weight(
    w_nat: Tensor,
    weight_lr: Tensor,
    loss_adv: Tensor,
    loss_nat: Tensor,
    init_loss_adv: Tensor,
    init_loss_nat: Tensor,
    *,
    power: float,
) -> Tensor:
    """One Adaptive Normalization Loss step of w_nat (module docstring), or w_nat unchanged if not finite::

    r = (L / L^0)^b per term;  w_nat - eta_w * (w_nat - r_nat / (r_adv + r_nat))
    """
    rate_adv = (loss_adv / init_loss_adv) ** power
    rate_nat = (loss_nat / init_loss_nat) ** power
    new = w_nat - weight_lr * (w_nat - rate_nat / (rate_adv + rate_nat))
    valid = torch.isfinite(rate_adv) & torch.isfinite(rate_nat) & torch.isfinite(new)
    return torch.where(valid, new, w_nat)


def mtard_loss(kl_adv: Tensor, kl_nat: Tensor, w_adv: Tensor, w_nat: Tensor) -> LossOutput:
    """``w_adv * L_adv + w_nat * L_nat``, the weights cast to the loss dtype (as PyTorch does with a Python float).

    Terms: ``kl_adv``, ``kl_nat`` and the weights used, ``w_adv``, ``w_nat``.
    """
    w_adv = w_adv.to(kl_adv.dtype)
    w_nat = w_nat.to(kl_nat.dtype)
    total = w_adv * kl_adv + w_nat * kl_nat
    return LossOutput(
        total=total,
        terms={"kl_adv": kl_adv.detach(), "kl_nat": kl_nat.detach(), "w_adv": w_adv.clone(), "w_nat": w_nat.clone()},
    )


class MTARD(Distiller):
    r"""MTARD: distil a robust teacher at x' and a natural teacher at x, with adaptive weights.

    The method (paper, loss, attack, reference defaults, deviations) is described in the module docstring.

    Arguments (``MTARD.Config``):
        init_nat_weight (float): initial w_nat in [0, 1] (w_adv = 1 - w_nat). (Default: 0.5, code.)
        adaptive_weights (bool): update the weights; False keeps them at the initial values (the
            fixed-weight form in which the SmaraAD paper summarises MTARD). (Default: True, code.)
        weight_lr (float): eta_w in [0, 1]. (Default: 0.025, code.)
        weight_lr_gamma (float): factor applied to eta_w at each milestone. (Default: 0.1, code: the
            same factor as its LR decay; independent of ``optim.gamma`` here.)
        weight_lr_milestones (tuple[int, ...] | None): completed epochs after which eta_w decays;
            None = ``optim.milestones`` when ``optim.schedule == "multistep"``, otherwise no decay
            (our reading: the reference ties the decay to its step LR schedule). (Default: None.)
        relative_power (float): b ("bert" in the code), > 0. (Default: 1.0, code.)
        kl_reduction (str): ``"mean_all"``, ``"batchmean"`` or ``"sum"``. (Default: "mean_all", code.)
        kl_scale (float | None): s; None = reference default (10 for 100 classes with mean_all, else 1).
            (Default: None.)
        teacher_log_eps (float): epsilon inside log p_T of the KL value, >= 0. (Default: 1e-5, code.)
        attack_student_mode (str): student BN mode in the attack. (Default: "eval", code.)

    Teacher roles:
        robust: the adversarial teacher, applied at x' (reference: TRADES WRN-34-10 on CIFAR-10,
        Gowal2020Uncovering WRN-70-16 on CIFAR-100, the RSLAD teachers).
        natural: the clean (standard-trained) teacher, applied at x (reference: a WRN-34-10).

    State (registered buffers, saved in ``checkpoint["distiller"]`` and restored on resume):
        ``w_adv``, ``w_nat``, ``init_loss_adv``, ``init_loss_nat`` (the first-batch losses),
        ``has_init_losses`` (whether they were taken), ``weight_lr`` (current eta_w). All float64
        (bool for the flag), so the state needs a device with float64 support (CPU, CUDA).

    Terms logged:
        ``kl_adv``, ``kl_nat``: the reduced KLs (s and eps included, weights not); ``w_adv``,
        ``w_nat``: the weights used for the batch (epoch means in the metrics); ``on_epoch_end`` adds
        ``weight_lr`` (eta_w for the next epoch).

    Examples::

        >>> mtard = MTARD(num_classes=10)                            # 0.5/0.5, eta_w 0.025, mean_all
        >>> fixed = MTARD(MTARD.Config(adaptive_weights=False, init_nat_weight=1 / 6))
        >>> # run config: [method] name = "mtard"
        >>> #             [teachers] robust = "robustbench:cifar10/Linf/Zhang2019Theoretically"
        >>> #                        natural = "file:runs/standard/checkpoints/last.pt"
    """

    name: ClassVar[str] = "mtard"
    supports_distributed: ClassVar[bool] = True  # weights: losses averaged over processes
    paper: ClassVar[str] = (
        "Shiji Zhao, Jie Yu, Zhenlong Sun, Bo Zhang, Xingxing Wei. Enhanced Accuracy and Robustness via "
        "Multi-Teacher Adversarial Distillation. ECCV 2022, pp. 585-602 (extension: arXiv:2306.16170)"
    )
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust", "natural")

    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        """Hyper-parameters of MTARD (see the class docstring for meanings and provenance)."""

        init_nat_weight: float = option(0.5, low=0, high=1, help="initial w_nat (w_adv = 1 - w_nat)")
        adaptive_weights: bool = option(
            True, choices=(False, True), help="update the weights each batch; false keeps the initial ones"
        )
        weight_lr: float = option(0.025, low=0, high=1, help="eta_w, rate of the weight update")
        weight_lr_gamma: float = option(0.1, low=0, low_open=True, help="factor applied to eta_w at each milestone")
        # A list, which option() rules do not describe: checked (and made a tuple) in __post_init__.
        weight_lr_milestones: tuple[int, ...] | None = None
        relative_power: float = option(1.0, low=0, low_open=True, help="b, exponent of the relative losses")
        kl_reduction: str = kl_reduction_option("mean_all")
        kl_scale: float | None = kl_scale_option()
        teacher_log_eps: float = option(1e-5, low=0, help="epsilon inside log p_T of the KL (reference: 1e-5)")
        attack_student_mode: str = student_mode_option("eval")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.weight_lr_milestones is not None:
                milestones = self.weight_lr_milestones
                if (
                    isinstance(milestones, (str, bytes))
                    or not isinstance(milestones, Sequence)
                    or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in milestones)
                ):
                    raise UserError(
                        f"method.weight_lr_milestones must be a list of positive epochs, got {milestones!r}"
                    )
                object.__setattr__(self, "weight_lr_milestones", tuple(milestones))

    w_adv: Tensor
    w_nat: Tensor
    init_loss_adv: Tensor
    init_loss_nat: Tensor
    has_init_losses: Tensor
    weight_lr: Tensor

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        cfg = self.config

        def scalar(value: float) -> Tensor:
            return torch.tensor(value, dtype=STATE_DTYPE)

        self.register_buffer("w_nat", scalar(cfg.init_nat_weight))
        self.register_buffer("w_adv", scalar(1.0 - cfg.init_nat_weight))
        self.register_buffer("init_loss_adv", scalar(float("nan")))
        self.register_buffer("init_loss_nat", scalar(float("nan")))
        self.register_buffer("has_init_losses", torch.tensor(False))
        self.register_buffer("weight_lr", scalar(cfg.weight_lr))
        #: completed epochs after which eta_w decays (set from the run in on_train_start)
        self.milestones: tuple[int, ...] = tuple(cfg.weight_lr_milestones or ())

    @property
    def kl_scale(self) -> float:
        """The effective KL multiplier s (resolves ``Config.kl_scale=None`` to the reference default)."""
        return reference_kl_scale(self.config.kl_scale, self.num_classes, self.config.kl_reduction)

    # -- schedule of the weight-update rate -----------------------------------------------------
    def on_train_start(self, run: Any) -> None:
        if self.config.weight_lr_milestones is not None:
            self.milestones = tuple(self.config.weight_lr_milestones)
            return
        optim = run.config.optim
        self.milestones = tuple(int(m) for m in optim.milestones) if optim.schedule == "multistep" else ()

    def on_epoch_end(self, epoch: int, num_epochs: int) -> dict[str, float]:
        # Reference: `if epoch in milestones: weight_learn_rate *= 0.1` after the (1-based) epoch,
        # together with the LR decay; a repeated milestone decays once per repetition, as MultiStepLR.
        with torch.no_grad():
            for _ in range(self.milestones.count(epoch + 1)):
                self.weight_lr.mul_(self.config.weight_lr_gamma)
        return {"weight_lr": float(self.weight_lr)}

    # -- the adaptive weights -------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, loss_adv: Tensor, loss_nat: Tensor) -> None:
        """One step of the Adaptive Normalization Loss from this batch's (reduced) loss values.

        Same arithmetic and order as the reference's Python floats (``.item()`` of a float32 loss
        is its exact value in double precision); no host synchronisation.
        """
        la = loss_adv.detach().to(device=self.w_nat.device, dtype=STATE_DTYPE)
        ln = loss_nat.detach().to(device=self.w_nat.device, dtype=STATE_DTYPE)
        # Under DDP each process has its slice's losses; their mean is the global batch's loss, so every
        # process updates the same weights as one process would (no-op in a single process).
        la, ln = distributed.all_reduce_mean(torch.stack([la, ln])).unbind()
        first = ~self.has_init_losses
        self.init_loss_adv.copy_(torch.where(first, la, self.init_loss_adv))
        self.init_loss_nat.copy_(torch.where(first, ln, self.init_loss_nat))
        self.has_init_losses.fill_(True)
        w_nat = adaptive_nat_weight(
            self.w_nat, self.weight_lr, la, ln, self.init_loss_adv, self.init_loss_nat, power=self.config.relative_power
        )
        self.w_nat.copy_(w_nat)
        self.w_adv.copy_(1 - w_nat)

    # -- per-batch protocol ---------------------------------------------------------------------
    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return threat_attack(threat, self.config, init="gauss")

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        return F.cross_entropy(self.student_logits(ctx, x_adv), ctx.y, reduction="none")

    def distill_kl(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        """s * R( KL(p_T || p_S) ), with ``teacher_log_eps`` inside log p_T as the reference."""
        per_sample = eps_kl_per_sample(student_logits, teacher_probs, log_eps=self.config.teacher_log_eps)
        return self.kl_scale * reduce_kl(per_sample, self.config.kl_reduction, student_logits.shape[1])

    def loss(self, ctx: BatchContext) -> LossOutput:
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        logits_nat = self.student_logits(ctx, ctx.x)
        kl_adv = self.distill_kl(logits_adv, ctx.teacher_probs("robust", "adv"))
        kl_nat = self.distill_kl(logits_nat, ctx.teacher_probs("natural", "clean"))
        if self.config.adaptive_weights:
            self.update_weights(kl_adv, kl_nat)
        return mtard_loss(kl_adv, kl_nat, self.w_adv, self.w_nat)


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(MTARD)
