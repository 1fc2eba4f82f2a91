r"""``smaraad-plus``: SmaraAD++ -- SmaraAD with IAD-style teacher reliability and entropy sample weights.

Paper: Shenglin Yin, Zhen Xiao, Mingxuan Song, Jieyi Long, 'Adversarial Distillation Based on Slack
Matching and Attribution Region Alignment', CVPR 2024, Eq. 10 (pp. 24605-24614, CVF open access; no
arXiv version). No training code is public.

Loss (Eq. 10), batch mean over b::

    L_b = P_b^lam * w_b * G_b  +  (1 - P_b^lam) * ( s * rho(S(x_b), S(x'_b)) + CE(z_S(x_b), y_b) )

* G_b = SmaraAD's teacher guidance (Eq. 9 per sample, constant c included; see
  :mod:`robustbench_kd.methods.slack_matching`).
* P_b = softmax(z_T(x'_b))_{y_b}, the teacher's probability of the label on the student-crafted x' (no
  gradient), lam = 0.1 (IAD's beta): the teacher guidance is trusted in proportion to it, as in IAD
  (Zhu et al., ICLR 2022, arXiv:2106.04928).
* w_b = clamp(1 - H(p_b) / log C, 0, 1) with H the entropy of p_b (no gradient). The paper says only
  "the model's predicted probability distribution"; we take the teacher's softmax on x' by default
  (``entropy_source``).
* Student self-learning: rho(S(x), S(x')) is the soft Spearman correlation of the student's clean and
  adversarial scores (probabilities or logits as ``rank_on``), both with gradient by default (as IAD's
  introspection KL, whose clean side is not detached); the CE is on the student's CLEAN logits.
  s = ``self_rho_sign``: Eq. 10 prints +rho, which minimising would *decorrelate* S(x) and S(x'); the
  default s = -1 minimises -rho (the slack-matching analogue of IAD's KL(S(x') || S(x)), our reading);
  s = +1 is the literal formula.

Before epoch ``begin_epoch`` the loss is plain SmaraAD (Eq. 9, unweighted), as IAD delays its weights;
the paper mentions no warm-up, so the default is 0 (weights from the start).

Attack and forward passes: exactly SmaraAD's (KL(p_T(x') || p_S(x')) + L_align(x') with the teacher in
the loop, gauss start, student in eval mode; then S(x), S(x') in train mode, and the teacher on x' once
under no_grad for G_b, P_b and w_b).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import LossOutput, option
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.slack_matching import PAPER, SlackMatchingConfig, SlackMatchingDistiller
from robustbench_kd.methods.soft_rank import soft_spearman

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar

#: Whose prediction the entropy weight w is computed from.
ENTROPY_SOURCES = ("teacher_adv", "teacher_clean", "student_adv", "student_clean")


def entropy_weight(logits: Tensor) -> Tensor:
    """``w = clamp(1 - H(p) / log C, 0, 1)`` per sample, p = softmax(logits), H = -sum_i p_i log p_i.

    Computed from log-softmax (no log 0); C = ``logits.shape[1]``. Detached: a sample weight.
    """
    with torch.no_grad():
        log_p = F.log_softmax(logits.float(), dim=1)
        entropy = -(log_p.exp() * log_p).sum(dim=1)
        c = logits.shape[1]
        if c < 2:
            return torch.ones_like(entropy)
        return (1.0 - entropy / math.log(c)).clamp(0.0, 1.0).to(logits.dtype)


def eq10_per_sample(
    guidance: Tensor, reliability: Tensor, weight: Tensor, rho_self: Tensor, ce_nat: Tensor, *, sign: float
) -> Tensor:
    """Eq. 10 per sample: ``P^lam w G + (1 - P^lam) (s rho(S(x), S(x')) + CE(z_S(x), y))``."""
    return reliability * weight * guidance + (1.0 - reliability) * (sign * rho_self + ce_nat)


class SmaraADPlus(SlackMatchingDistiller):
    r"""SmaraAD++: per-sample trust in the teacher (IAD) and entropy weights on top of SmaraAD.

    Loss, attack and reference defaults: see the module docstring of ``robustbench_kd_plugins.smaraad_plus``.

    Arguments (``SmaraADPlus.Config``): all of ``SmaraAD``'s (``robustbench_kd_plugins.smaraad``), and
        lam (float): lam, the power on P_b, in [0, 1]. (Default: 0.1, paper Sec. 4.2 following IAD.)
        self_rho_sign (float): s, -1.0 or +1.0. (Default: -1.0, ours; the paper prints +1.)
        entropy_source (str): ``"teacher_adv"``, ``"teacher_clean"``, ``"student_adv"`` or
            ``"student_clean"``. (Default: "teacher_adv", ours.)
        detach_self_target (bool): detach S(x) in the self-learning rho. (Default: False, IAD code.)
        begin_epoch (int): first (0-based) epoch that uses Eq. 10. (Default: 0; IAD uses 60/40.)

    Teacher roles:
        robust: as SmaraAD (single teacher with a CAM-able head).

    Terms logged:
        SmaraAD's (``rho_adv``, ``align_adv``, ``near_ties``, ...) and, from ``begin_epoch`` on,
        ``reliability`` (mean P^lam), ``entropy_w`` (mean w), ``rho_self`` (mean rho(S(x), S(x'))) and
        ``ce_nat`` (mean clean CE).

    Examples::

        >>> plus = SmaraADPlus(num_classes=10)                                  # -rho, teacher entropy
        >>> literal = SmaraADPlus(SmaraADPlus.Config(self_rho_sign=1.0))        # Eq. 10 as printed
        >>> # run config: [method] name = "smaraad-plus", entropy_source = "student_adv"
    """

    name: ClassVar[str] = "smaraad-plus"
    supports_distributed: ClassVar[bool] = False  # CAM taps through DDP: unverified
    paper: ClassVar[str] = PAPER
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust",)

    @dataclass(frozen=True, kw_only=True)
    class Config(SlackMatchingConfig):
        """Hyper-parameters of SmaraAD++ (SmaraAD's plus the Eq. 10 weights; see the class docstring)."""

        lam: float = option(0.1, low=0, high=1, help="power lam on the teacher's probability of the label")
        self_rho_sign: float = option(
            -1.0, choices=(-1.0, 1.0), help="sign s of the self-learning rho: -1 (correlate) or +1 (as printed)"
        )
        entropy_source: str = option(
            "teacher_adv", choices=ENTROPY_SOURCES, help="whose prediction the entropy weight w is computed from"
        )
        detach_self_target: bool = option(False, choices=(False, True), help="detach S(x) in the self-learning rho")
        begin_epoch: int = option(0, low=0, integer=True, help="first 0-based epoch that uses Eq. 10")

    def _entropy_logits(
        self, ctx: BatchContext, teacher_adv: Tensor, student_adv: Tensor, student_nat: Tensor
    ) -> Tensor:
        source = self.config.entropy_source
        if source == "teacher_adv":
            return teacher_adv
        if source == "teacher_clean":
            return ctx.teacher_logits("robust", "clean")
        return (student_adv if source == "student_adv" else student_nat).detach()

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        if ctx.epoch < cfg.begin_epoch:
            return self.slack_loss(ctx)  # plain SmaraAD
        g = self.guidance(ctx, need_clean_logits=True)
        logits_nat = g.logits_nat
        assert logits_nat is not None
        with torch.no_grad():
            p_label = torch.softmax(g.teacher_adv.float(), dim=1).gather(1, ctx.y.view(-1, 1)).squeeze(1)
            reliability = p_label.pow(cfg.lam).to(g.per_sample.dtype)
            weight = entropy_weight(self._entropy_logits(ctx, g.teacher_adv, g.logits_adv, logits_nat))
        self_target = logits_nat.detach() if cfg.detach_self_target else logits_nat
        rho_self = soft_spearman(self.scores(self_target), self.scores(g.logits_adv), cfg.gamma)
        ce_nat = F.cross_entropy(logits_nat, ctx.y, reduction="none")
        per_sample = eq10_per_sample(g.per_sample, reliability, weight, rho_self, ce_nat, sign=cfg.self_rho_sign)
        terms = dict(g.terms)
        terms.update(
            reliability=reliability.mean(),
            entropy_w=weight.mean(),
            rho_self=rho_self.detach().mean(),
            ce_nat=ce_nat.detach().mean(),
        )
        return LossOutput(total=per_sample.mean(), terms=terms)


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(SmaraADPlus)
