"""``smaraad``: Slack Matching and Attribution Region Alignment adversarial distillation (Yin et al., CVPR 2024)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from robustbench_kd.data.datasets import to_float
from robustbench_kd.distiller import ATTACK_INITS, STUDENT_MODES, AttackSpec, Distiller, LossOutput
from robustbench_kd.errors import UserError, check_choice
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.attribution import CAM_CLASSES, CAM_NORMALIZATIONS, CAM_RESIZE, CamAlignment
from robustbench_kd.methods.features import locate_feature_map
from robustbench_kd.methods.losses import kl_logits_per_sample
from robustbench_kd.methods.soft_rank import near_tie_fraction, soft_spearman
from robustbench_kd.teachers import EnsembleTeacher

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec

log = logging.getLogger(__name__)

#: What the soft ranks are computed on.
RANK_INPUTS = ("probs", "logits")

#: top-1 agreement with the teacher below this multiple of chance (1 / C) over an epoch is a collapse.
COLLAPSE_AGREEMENT = 2.0

PAPER = (
    "Shenglin Yin, Zhen Xiao, Mingxuan Song, Jieyi Long. Adversarial Distillation Based on Slack Matching and "
    "Attribution Region Alignment. CVPR 2024, pp. 24605-24614 (CVF open access; no arXiv version)"
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


class SmaraAD(Distiller):
    r"""SmaraAD: soft-rank Spearman "slack matching" plus CAM attribution-region alignment.

    Paper: Yin, Xiao, Song, Long, 'Adversarial Distillation Based on Slack Matching and Attribution
    Region Alignment', CVPR 2024 (pp. 24605-24614, CVF open access; no arXiv version). Reference
    code: InsLin/SmaraAD holds only a README and a soft-rank snippet (no training code); this follows
    the paper and methods.md §8 / §13.9.

    Building blocks (:mod:`robustbench_kd.methods.soft_rank`, :mod:`robustbench_kd.methods.attribution`)::

        r_i(u)       = sum_j sigmoid(gamma (u_j - u_i))                        soft descending rank
        rho(u, v)    = 1 - 6 sum_i (r_i(u) - r_i(v))^2 / (n (n^2 - 1))          soft Spearman, n = C
        L_sm(x)      = -rho( S(x), T(x) )                                        Eq. 5
        CAM_M(x)     = sum_k W_M[c, k] A_M^k(x)                                  Eq. 6
        L_align(x)   = mean_{ij} ( G(N(CAM_T(x))) - G(N(CAM_S(x))) )_ij^2        Eq. 7

    S(x), T(x) are the softmax probabilities (``rank_on="probs"``, paper) or the logits; A_M is the
    map pooled before the final Linear (hooked with ``FeatureTap``: the output of ``relu`` in the
    RobustBench WideResNet), W_M that Linear's weight, c = y (``cam_class``), N = ReLU + per-image
    min-max (``cam_normalization``), G = bilinear resize to the input size (``cam_resize``).

    Loss (Eq. 9), batch mean of the per-sample value::

        L = c + (1 - alpha) * (L_sm(x) + a L_align(x)) + alpha * (L_sm(x') + a L_align(x'))

    with T(x'), CAM_T(x') (and T(x), CAM_T(x) when alpha < 1) under no_grad, a = ``align_weight``.
    The constant c only keeps the printed loss positive; it has no gradient. Student forward passes
    as in AdaAD's code (which SmaraAD builds on, methods.md §11.2): S(x) first, then S(x'), both in
    train mode, separate passes; with alpha = 1, S(x) runs without gradient only so that BN running
    statistics see the clean batch (``clean_forward_when_unused``).

    Attack (Eq. 8; teacher in the loop as in AdaAD)::

        x' = PGD_{eps, alpha, K}( KL(p_T(x') || p_S(x')) + a' L_align(x') ),  x'_0 = x + 0.001 N(0, I)

    with BOTH models evaluated on the moving point and neither detached: the gradient w.r.t. x'
    includes the teacher's input gradient through its logits and its CAM. Student in eval mode.
    Per sample: KL summed over classes plus the per-sample L_align (the sign step makes the batch
    reduction irrelevant, but not this relative weighting). a' = ``attack_align_weight``.
    Budget: the run's threat (paper: 8/255, 2/255, 10 steps).

    Arguments (``SmaraAD.Config``):
        alpha (float): weight of the adversarial terms, in [0, 1]. (Default: 1.0, paper §4.2 -- the
            clean terms vanish.)
        c (float): the constant of Eq. 9, c >= 1 in the paper. (Default: 2.0, paper.)
        gamma (float): soft-rank sharpness. (Default: 1000.0, paper.) With gamma = 1000 on
            probabilities only near-tied classes (|p_i - p_j| < ~0.01) carry gradient (methods.md
            §14.9); ``near_ties`` logs their share.
        rank_on (str): ``"probs"`` (paper: "predicted probability distributions") or ``"logits"``
            (the README's usage example). (Default: "probs".)
        align_weight (float): a, multiplies L_align in the loss; 0 drops the CAMs (the ablation's
            ``L_sm`` variant). (Default: 1.0, Eq. 9.)
        attack_align_weight (float): a', multiplies L_align in the attack; 0 gives AdaAD's attack.
            (Default: 1.0, Eq. 8.)
        cam_class (str): ``"label"`` (c = y for both models, methods.md §8.1e [SUGGESTION]) or
            ``"top"`` (each model's own arg-max class, pytorch-grad-cam's default). (Default: "label".)
        cam_normalization (str): ``"relu_minmax"`` (pytorch-grad-cam), ``"minmax"`` or ``"none"``.
            (Default: "relu_minmax".)
        cam_resize (str): common size of the two CAMs: ``"input"`` (pytorch-grad-cam), ``"teacher"``
            or ``"student"`` map size. (Default: "input".)
        init (str): attack start. (Default: "gauss" (std 0.001), AdaAD code [SUGGESTION].)
        attack_student_mode (str): student BN mode in the attack. (Default: "eval", AdaAD code
            [SUGGESTION].)
        clean_forward_when_unused (bool): with alpha == 1 still run S(x) (no grad, train mode) before
            S(x'), as AdaAD's code does every batch. (Default: True.)

    Teacher roles:
        robust: the robust teacher; must have a CAM-able head (feature map -> global average pool ->
        Linear), which every RobustBench CIFAR architecture and our students have. Ensembles of
        several teachers are rejected (no single CAM).

    Terms logged:
        ``rho_adv`` (soft Spearman of S(x') and T(x')), ``align_adv`` (L_align(x'), if a > 0),
        ``near_ties`` (share of class pairs of S(x')'s scores with |gamma diff| < 10),
        ``top1_agree`` (share of x' where S and T pick the same class), and
        ``rho_nat`` / ``align_nat`` when alpha < 1.

    Deviations / notes:
        * Soft rank as in the public snippet (sum over all j, self term included), but vectorised on
          tensors per sample; the snippet's ``torch.tensor(list)`` would detach the ranks.
        * The README's example returns +rho as the loss; we minimise -rho as in Eq. 5.
        * Collapse with the paper's defaults (measured, ``bench/compare_methods.py``): trained from
          scratch on the digits, gamma = 1000 on probabilities drives the student within the first
          epoch to one confident class for every input (near_ties -> 0.8: one score far from nine
          tied ones), a state where no pair involving the top class carries gradient, so it never
          leaves (10% accuracy). ``gamma = 100`` learns (clean accuracy equal to the teacher's in
          5 epochs). ``top1_agree`` logs the student/teacher top-1 agreement on x'; an epoch below
          twice chance logs a warning naming these flags. Defaults stay the paper's.

    Examples::

        >>> smara = SmaraAD(num_classes=10)                          # paper defaults
        >>> ablation = SmaraAD(SmaraAD.Config(align_weight=0.0))     # L_sm only
        >>> # run config: [method] name = "smaraad", cam_class = "top"
    """

    name: ClassVar[str] = "smaraad"
    supports_distributed: ClassVar[bool] = False  # CAM taps through DDP: unverified
    paper: ClassVar[str] = PAPER
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust",)

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """Hyper-parameters of SmaraAD (see the class docstring for meanings and provenance)."""

        alpha: float = 1.0
        c: float = 2.0
        gamma: float = 1000.0
        rank_on: str = "probs"
        align_weight: float = 1.0
        attack_align_weight: float = 1.0
        cam_class: str = "label"
        cam_normalization: str = "relu_minmax"
        cam_resize: str = "input"
        init: str = "gauss"
        attack_student_mode: str = "eval"
        clean_forward_when_unused: bool = True

        def __post_init__(self) -> None:
            if not 0.0 <= self.alpha <= 1.0:
                raise UserError(f"method.alpha must be in [0, 1], got {self.alpha}")
            if not self.gamma > 0.0:
                raise UserError(f"method.gamma must be positive, got {self.gamma}")
            check_choice("rank_on", self.rank_on, RANK_INPUTS)
            for key in ("align_weight", "attack_align_weight"):
                if not getattr(self, key) >= 0.0:
                    raise UserError(f"method.{key} must be >= 0, got {getattr(self, key)}")
            for key, allowed in (("cam_class", CAM_CLASSES), ("cam_normalization", CAM_NORMALIZATIONS),
                                 ("cam_resize", CAM_RESIZE), ("init", ATTACK_INITS),
                                 ("attack_student_mode", STUDENT_MODES)):
                if getattr(self, key) not in allowed:
                    raise UserError(f"method.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        cfg = self.config
        self.alignment = CamAlignment(classes=cfg.cam_class, normalization=cfg.cam_normalization,
                                      resize=cfg.cam_resize)
        self._agreement: list = [0.0, 0]  # this epoch's sum of batch top-1 agreements, number of batches

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def teacher(ctx: BatchContext) -> nn.Module:
        """The robust teacher, rejecting multi-member ensembles (they have no single CAM)."""
        teacher = ctx.teachers["robust"]
        _check_single(teacher)
        return teacher

    def scores(self, logits: Tensor) -> Tensor:
        """What the soft ranks are computed on: softmax probabilities or the logits themselves."""
        return torch.softmax(logits, dim=1) if self.config.rank_on == "probs" else logits

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
        teacher = run.teachers["robust"]
        _check_single(teacher)
        if cfg.align_weight == 0.0 and cfg.attack_align_weight == 0.0:
            return
        example = to_float(run.data.train_x[:2]).to(run.device)
        for model in (teacher, run.student):
            locate_feature_map(model, example)

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return AttackSpec(eps=threat.eps, alpha=threat.alpha, steps=threat.steps, norm=threat.norm,
                          init=self.config.init, init_std=1e-3, student_mode=self.config.attack_student_mode,
                          teacher_grad=True)

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
        adv = -rho_adv
        terms["rho_adv"] = rho_adv.detach().mean()
        terms["near_ties"] = near_tie_fraction(self.scores(logits_adv.detach()), cfg.gamma)
        agree = (logits_adv.detach().argmax(1) == teacher_adv.argmax(1)).float().mean()
        terms["top1_agree"] = agree
        self._agreement[0] = self._agreement[0] + agree  # stays a tensor: no device sync per step
        self._agreement[1] += 1
        if use_cam:
            assert cam_s_adv is not None and cam_t_adv is not None
            align_adv = self.alignment.loss(cam_t_adv, cam_s_adv, ctx.x_adv)
            adv = adv + cfg.align_weight * align_adv
            terms["align_adv"] = align_adv.detach().mean()
        per_sample = cfg.c + cfg.alpha * adv
        if clean_terms:
            assert logits_nat is not None
            with torch.no_grad():
                if use_cam:
                    teacher_nat, cam_t_nat = self.alignment.forward(teacher, ctx.x, ctx.y)
                else:
                    teacher_nat, cam_t_nat = ctx.teacher_logits("robust", "clean"), None
            rho_nat = self.slack_matching(logits_nat, teacher_nat)
            nat = -rho_nat
            terms["rho_nat"] = rho_nat.detach().mean()
            if use_cam:
                assert cam_s_nat is not None and cam_t_nat is not None
                align_nat = self.alignment.loss(cam_t_nat, cam_s_nat, ctx.x)
                nat = nat + cfg.align_weight * align_nat
                terms["align_nat"] = align_nat.detach().mean()
            per_sample = per_sample + (1.0 - cfg.alpha) * nat
        return Guidance(per_sample=per_sample, logits_adv=logits_adv, logits_nat=logits_nat,
                        teacher_adv=teacher_adv.detach(), terms=terms)

    def loss(self, ctx: BatchContext) -> LossOutput:
        g = self.guidance(ctx)
        return LossOutput(total=g.per_sample.mean(), terms=g.terms)

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self._agreement = [0.0, 0]

    def method_state(self) -> dict[str, Any]:
        # The epoch's tally so far: a mid-epoch resume (checkpoint.every_steps) judges the whole epoch.
        return {"agreement": [torch.as_tensor(self._agreement[0]).detach(), int(self._agreement[1])]}

    def load_method_state(self, state: Any) -> None:
        if "agreement" in state:
            self._agreement = [state["agreement"][0], int(state["agreement"][1])]

    def on_epoch_end(self, epoch: int, num_epochs: int) -> dict[str, float]:
        """Warn when the student has collapsed away from the teacher's top class (see the class notes)."""
        total, batches = float(self._agreement[0]), self._agreement[1]
        if batches and total / batches < COLLAPSE_AGREEMENT * 1.0 / self.num_classes:
            log.warning(
                "%s: in epoch %d the student picked the teacher's top class on x' for only %.1f%% of the "
                "samples (chance: %.1f%%): slack matching has lost its gradient (soft ranks at gamma = %g "
                "only move near-tied scores); try method.gamma = 100 or method.rank_on = \"logits\"",
                self.name, epoch + 1, 100 * total / batches, 100 / self.num_classes, self.config.gamma)
        return {}


def _check_single(teacher: nn.Module) -> None:
    if isinstance(teacher, EnsembleTeacher) and len(teacher.members) > 1:
        raise UserError(
            f"smaraad needs a single robust teacher for its class activation maps, got an ensemble of "
            f"{len(teacher.members)} ({teacher.spec}); configure one teacher"
        )


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(SmaraAD)
