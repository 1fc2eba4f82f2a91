r"""SmaraAD's teacher guidance, shared by ``smaraad`` and ``smaraad-plus``: slack matching plus CAM alignment.

Paper: Shenglin Yin, Zhen Xiao, Mingxuan Song, Jieyi Long, 'Adversarial Distillation Based on Slack
Matching and Attribution Region Alignment', CVPR 2024, pp. 24605-24614 (CVF open access; no arXiv
version). The parts, per sample (:mod:`robustbench_kd.methods.soft_rank`,
:mod:`robustbench_kd.methods.attribution`)::

    rho(S, T)    soft Spearman correlation of the student's and the teacher's scores      (Eqs. 2-4)
    L_sm(x)      = -rho( S(x), T(x) )                                                    (Eq. 5)
    L_align(x)   = mean_ij ( G(N(CAM_T(x))) - G(N(CAM_S(x))) )_ij^2                      (Eqs. 6-7)
    G_b          = c + (1 - alpha) (L_sm(x) + a L_align(x)) + alpha (L_sm(x') + a L_align(x'))   (Eq. 9)

S, T are softmax probabilities (``rank_on = "probs"``, the paper) or logits; a = ``align_weight``; the
teacher terms run without gradient; the constant c only keeps the printed loss positive. The attack
(Eq. 8, the teacher in the loop as in AdaAD) ascends, per sample::

    KL(p_T(x') || p_S(x')) + a' L_align(x'),   x'_0 = x + 0.001 N(0, I), student in eval mode

with BOTH models evaluated on the moving point and neither detached, so the gradient w.r.t. x' includes
the teacher's input gradient through its logits and its CAM; a' = ``attack_align_weight``.

Student passes as in AdaAD's code, which SmaraAD builds on: S(x) first, then S(x'), both in train mode,
separate passes; when nothing needs S(x) it still runs without gradient so that BN running statistics
see the clean batch (``clean_forward_when_unused``).

A collapse monitor: with gamma = 1000 on probabilities, soft ranks only move near-tied scores, and a
student trained from scratch can end in one confident class for every input, where no pair involving the
top class carries gradient. The share of x' where student and teacher pick the same class is logged
(``top1_agree``) and an epoch below twice chance logs a warning naming the remedies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from robustbench_kd.data.datasets import to_float
from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.errors import UserError
from robustbench_kd.methods.attack_options import init_option, student_mode_option, threat_attack
from robustbench_kd.methods.attribution import CAM_CLASSES, CAM_NORMALIZATIONS, CAM_RESIZE, CamAlignment
from robustbench_kd.methods.features import locate_feature_map
from robustbench_kd.methods.losses import kl_logits_per_sample
from robustbench_kd.methods.soft_rank import near_tie_fraction, soft_spearman
from robustbench_kd.teachers import EnsembleTeacher

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.threat import ThreatSpec

__all__ = [
    "COLLAPSE_AGREEMENT",
    "PAPER",
    "RANK_INPUTS",
    "Guidance",
    "SlackMatchingConfig",
    "SlackMatchingDistiller",
    "guidance_term",
    "rank_scores",
    "slack_guidance",
]

log = logging.getLogger(__name__)

#: What the soft ranks are computed on.
RANK_INPUTS = ("probs", "logits")

#: top-1 agreement with the teacher below this multiple of chance (1 / C) over an epoch is a collapse.
COLLAPSE_AGREEMENT = 2.0

PAPER = (
    "Shenglin Yin, Zhen Xiao, Mingxuan Song, Jieyi Long. Adversarial Distillation Based on Slack Matching and "
    "Attribution Region Alignment. CVPR 2024, pp. 24605-24614 (CVF open access; no arXiv version)"
)


# -- pure functions --------------------------------------------------------------------------------------
def rank_scores(logits: Tensor, rank_on: str) -> Tensor:
    """What the soft ranks are computed on: softmax probabilities (``"probs"``) or the logits themselves."""
    return torch.softmax(logits, dim=1) if rank_on == "probs" else logits


def guidance_term(rho: Tensor, align: Tensor | None, align_weight: float) -> Tensor:
    """``L_sm + a L_align = -rho + a L_align`` per sample (the alignment only when computed)."""
    term = -rho
    return term if align is None else term + align_weight * align


def slack_guidance(adv_term: Tensor, nat_term: Tensor | None, *, alpha: float, c: float) -> Tensor:
    """Eq. 9 per sample: ``c + alpha adv_term + (1 - alpha) nat_term`` (the clean term only when given)."""
    per_sample = c + alpha * adv_term
    return per_sample if nat_term is None else per_sample + (1.0 - alpha) * nat_term


# -- configuration and distiller ---------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SlackMatchingConfig(MethodConfig):
    """Options of SmaraAD's teacher guidance and attack (each method's Config derives from this)."""

    alpha: float = option(1.0, low=0, high=1, help="weight of the adversarial terms; 1 - alpha on the clean ones")
    c: float = option(2.0, help="constant of Eq. 9 (no gradient; c >= 1 in the paper)")
    gamma: float = option(1000.0, low=0, low_open=True, help="soft-rank sharpness")
    rank_on: str = option("probs", choices=RANK_INPUTS, help="rank softmax probabilities (paper) or logits")
    align_weight: float = option(1.0, low=0, help="weight of L_align in the loss; 0 drops the CAMs")
    attack_align_weight: float = option(1.0, low=0, help="weight of L_align in the attack; 0 = AdaAD's attack")
    cam_class: str = option("label", choices=CAM_CLASSES, help="class each CAM explains: the label or the top class")
    cam_normalization: str = option("relu_minmax", choices=CAM_NORMALIZATIONS, help="per-image CAM normalisation")
    cam_resize: str = option("input", choices=CAM_RESIZE, help="common size of the two CAMs")
    init: str = init_option("gauss")
    attack_student_mode: str = student_mode_option("eval")
    clean_forward_when_unused: bool = option(
        True, choices=(False, True), help="with alpha = 1 still run S(x) without grad before S(x')"
    )


@dataclass
class Guidance:
    """The teacher-guidance part of one batch (Eq. 9), per sample, plus what SmaraAD++ reuses.

    Attributes:
        per_sample: ``c + (1 - alpha) (L_sm(x) + L_align(x)) + alpha (L_sm(x') + L_align(x'))``, shape (B,).
        logits_adv: student logits on x' (train mode, with graph).
        logits_nat: student logits on x (with graph) when they were computed with gradient, else None.
        teacher_adv: teacher logits on x' (no graph).
        terms: detached values to log.
    """

    per_sample: Tensor
    logits_adv: Tensor
    logits_nat: Tensor | None
    teacher_adv: Tensor
    terms: dict[str, Tensor]


def check_single_teacher(teacher: nn.Module) -> nn.Module:
    """The teacher, refusing a multi-member ensemble (it has no single CAM)."""
    if isinstance(teacher, EnsembleTeacher) and len(teacher.members) > 1:
        raise UserError(
            f"smaraad needs a single robust teacher for its class activation maps, got an ensemble of "
            f"{len(teacher.members)} ({teacher.spec}); configure one teacher"
        )
    return teacher


class SlackMatchingDistiller(Distiller):
    """SmaraAD's attack, teacher guidance (:meth:`guidance`) and collapse monitor; subclasses define ``loss``."""

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        cfg = self.config
        self.alignment = CamAlignment(classes=cfg.cam_class, normalization=cfg.cam_normalization, resize=cfg.cam_resize)
        self._agreement: list = [0.0, 0]  # this epoch's sum of batch top-1 agreements, number of batches

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def teacher(ctx: BatchContext) -> nn.Module:
        """The robust teacher, rejecting multi-member ensembles (they have no single CAM)."""
        return check_single_teacher(ctx.teachers["robust"])

    def scores(self, logits: Tensor) -> Tensor:
        """What the soft ranks are computed on (see :func:`rank_scores`)."""
        return rank_scores(logits, self.config.rank_on)

    def slack_matching(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """Per-sample soft Spearman rho(S, T) (L_sm = -rho)."""
        return soft_spearman(self.scores(student_logits), self.scores(teacher_logits), self.config.gamma)

    def _forward(self, model: nn.Module, x: Tensor, y: Tensor, cam: bool) -> tuple[Tensor, Tensor | None]:
        if not cam:
            return model(x), None
        return self.alignment.forward(model, x, y)

    # -- protocol --------------------------------------------------------------------------------
    def on_train_start(self, run: Any) -> None:
        """Fail before the first batch if the teacher or the student has no CAM-able feature map."""
        cfg = self.config
        teacher = check_single_teacher(run.teachers["robust"])
        if cfg.align_weight == 0.0 and cfg.attack_align_weight == 0.0:
            return
        example = to_float(run.data.train_x[:2]).to(run.device)
        for model in (teacher, run.student):
            locate_feature_map(model, example)

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return threat_attack(threat, self.config, teacher_grad=True)

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        weight = self.config.attack_align_weight
        teacher = self.teacher(ctx)
        use_cam = weight > 0.0
        logits_s, cam_s = self._forward(ctx.student, x_adv, ctx.y, use_cam)
        logits_t, cam_t = self._forward(teacher, x_adv, ctx.y, use_cam)  # NOT detached: teacher in the loop
        loss = kl_logits_per_sample(logits_s, logits_t)
        if use_cam:
            assert cam_s is not None and cam_t is not None
            loss = loss + weight * self.alignment.loss(cam_t, cam_s, x_adv)
        return loss

    def guidance(self, ctx: BatchContext, *, need_clean_logits: bool = False) -> Guidance:
        """Eq. 9 per sample. ``need_clean_logits`` keeps S(x) with its graph (SmaraAD++)."""
        cfg = self.config
        teacher = self.teacher(ctx)
        use_cam = cfg.align_weight > 0.0
        clean_terms = cfg.alpha < 1.0
        terms: dict[str, Tensor] = {}
        # Student passes in AdaAD's order: clean first, then adversarial (BN running statistics).
        logits_nat: Tensor | None = None
        cam_s_nat: Tensor | None = None
        if clean_terms or need_clean_logits:
            logits_nat, cam_s_nat = self._forward(ctx.student, ctx.x, ctx.y, use_cam and clean_terms)
        elif cfg.clean_forward_when_unused:
            with torch.no_grad():
                ctx.student(ctx.x)
        logits_adv, cam_s_adv = self._forward(ctx.student, ctx.x_adv, ctx.y, use_cam)
        with torch.no_grad():
            if use_cam:
                teacher_adv, cam_t_adv = self.alignment.forward(teacher, ctx.x_adv, ctx.y)
            else:
                teacher_adv, cam_t_adv = ctx.teacher_logits("robust", "adv"), None

        rho_adv = self.slack_matching(logits_adv, teacher_adv)
        terms["rho_adv"] = rho_adv.detach().mean()
        terms["near_ties"] = near_tie_fraction(self.scores(logits_adv.detach()), cfg.gamma)
        agree = (logits_adv.detach().argmax(1) == teacher_adv.argmax(1)).float().mean()
        terms["top1_agree"] = agree
        self._agreement[0] = self._agreement[0] + agree  # stays a tensor: no device sync per step
        self._agreement[1] += 1
        align_adv: Tensor | None = None
        if use_cam:
            assert cam_s_adv is not None and cam_t_adv is not None
            align_adv = self.alignment.loss(cam_t_adv, cam_s_adv, ctx.x_adv)
            terms["align_adv"] = align_adv.detach().mean()
        nat: Tensor | None = None
        if clean_terms:
            assert logits_nat is not None
            with torch.no_grad():
                if use_cam:
                    teacher_nat, cam_t_nat = self.alignment.forward(teacher, ctx.x, ctx.y)
                else:
                    teacher_nat, cam_t_nat = ctx.teacher_logits("robust", "clean"), None
            rho_nat = self.slack_matching(logits_nat, teacher_nat)
            terms["rho_nat"] = rho_nat.detach().mean()
            align_nat: Tensor | None = None
            if use_cam:
                assert cam_s_nat is not None and cam_t_nat is not None
                align_nat = self.alignment.loss(cam_t_nat, cam_s_nat, ctx.x)
                terms["align_nat"] = align_nat.detach().mean()
            nat = guidance_term(rho_nat, align_nat, cfg.align_weight)
        per_sample = slack_guidance(guidance_term(rho_adv, align_adv, cfg.align_weight), nat, alpha=cfg.alpha, c=cfg.c)
        return Guidance(
            per_sample=per_sample,
            logits_adv=logits_adv,
            logits_nat=logits_nat,
            teacher_adv=teacher_adv.detach(),
            terms=terms,
        )

    def slack_loss(self, ctx: BatchContext) -> LossOutput:
        """SmaraAD's loss: the batch mean of Eq. 9."""
        g = self.guidance(ctx)
        return LossOutput(total=g.per_sample.mean(), terms=g.terms)

    # -- collapse monitor ------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self._agreement = [0.0, 0]

    def method_state(self) -> dict[str, Any]:
        # The epoch's tally so far: a mid-epoch resume (checkpoint.every_steps) judges the whole epoch.
        return {"agreement": [torch.as_tensor(self._agreement[0]).detach(), int(self._agreement[1])]}

    def load_method_state(self, state: Any) -> None:
        if "agreement" in state:
            self._agreement = [state["agreement"][0], int(state["agreement"][1])]

    def on_epoch_end(self, epoch: int, num_epochs: int) -> dict[str, float]:
        """Warn when the student has collapsed away from the teacher's top class (see the module docstring)."""
        total, batches = float(self._agreement[0]), self._agreement[1]
        if batches and total / batches < COLLAPSE_AGREEMENT * 1.0 / self.num_classes:
            log.warning(
                "%s: in epoch %d the student picked the teacher's top class on x' for only %.1f%% of the "
                "samples (chance: %.1f%%): slack matching has lost its gradient (soft ranks at gamma = %g "
                'only move near-tied scores); try method.gamma = 100 or method.rank_on = "logits"',
                self.name,
                epoch + 1,
                100 * total / batches,
                100 / self.num_classes,
                self.config.gamma,
            )
        return {}
