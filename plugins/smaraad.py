r"""``smaraad``: Slack Matching and Attribution Region Alignment adversarial distillation.

Paper: Shenglin Yin, Zhen Xiao, Mingxuan Song, Jieyi Long, 'Adversarial Distillation Based on Slack
Matching and Attribution Region Alignment', CVPR 2024, pp. 24605-24614 (CVF open access; no arXiv
version). The authors' InsLin/SmaraAD repository holds only a README and a soft-rank snippet, no
training code; this follows the paper.

Building blocks (:mod:`robustbench_kd.methods.soft_rank`, :mod:`robustbench_kd.methods.attribution`)::

    r_i(u)       = sum_j sigmoid(gamma (u_j - u_i))                        soft descending rank
    rho(u, v)    = 1 - 6 sum_i (r_i(u) - r_i(v))^2 / (n (n^2 - 1))          soft Spearman, n = C
    L_sm(x)      = -rho( S(x), T(x) )                                        Eq. 5
    CAM_M(x)     = sum_k W_M[c, k] A_M^k(x)                                  Eq. 6
    L_align(x)   = mean_{ij} ( G(N(CAM_T(x))) - G(N(CAM_S(x))) )_ij^2        Eq. 7

S(x), T(x) are the softmax probabilities (``rank_on = "probs"``, the paper's "predicted probability
distributions") or the logits (the README's usage example); A_M is the map pooled before the final
Linear (the output of ``relu`` in the RobustBench WideResNet), W_M that Linear's weight, c = y
(``cam_class``), N = ReLU + per-image min-max (``cam_normalization``), G = bilinear resize to the input
size (``cam_resize``).

Loss (Eq. 9), batch mean of the per-sample value::

    L = c + (1 - alpha) * (L_sm(x) + a L_align(x)) + alpha * (L_sm(x') + a L_align(x'))

with T(x'), CAM_T(x') (and T(x), CAM_T(x) when alpha < 1) under no_grad and a = ``align_weight``. The
constant c only keeps the printed loss positive; it has no gradient.

Attack (Eq. 8; the teacher in the loop as in AdaAD)::

    x' = PGD_{eps, alpha, K}( KL(p_T(x') || p_S(x')) + a' L_align(x') ),  x'_0 = x + 0.001 N(0, I)

with BOTH models evaluated on the moving point and neither detached, student in eval mode; per sample,
the KL summed over classes plus the per-sample L_align (the sign step makes the batch reduction
irrelevant, but not this relative weighting); a' = ``attack_align_weight``. Budget: the run's threat
(paper: 8/255, 2/255, 10 steps). Forward passes, the attack's start and BN mode follow AdaAD's code,
which SmaraAD builds on (see :mod:`robustbench_kd.methods.slack_matching`).

Reference defaults: alpha = 1 (paper Sec. 4.2: the clean terms vanish), c = 2, gamma = 1000, a = a' = 1.
The CAM of both models explains the label y (our choice, so that both maps explain the same class;
pytorch-grad-cam's default target is each model's own top class, ``cam_class = "top"``).

Deviations / notes:
    * Soft rank as in the public snippet (sum over all j, self term included), but vectorised on tensors
      per sample; the snippet's ``torch.tensor(list)`` would detach the ranks.
    * The README's example returns +rho as the loss; we minimise -rho as in Eq. 5.
    * With gamma = 1000 on probabilities only near-tied classes (|p_i - p_j| < ~0.01) carry gradient;
      ``near_ties`` logs their share.
    * Collapse with the paper's defaults (measured, ``bench/compare_methods.py``): trained from scratch on
      the digits, gamma = 1000 on probabilities drives the student within the first epoch to one
      confident class for every input (near_ties -> 0.8: one score far from nine tied ones), a state
      where no pair involving the top class carries gradient, so it never leaves (10% accuracy).
      ``gamma = 100`` learns (clean accuracy equal to the teacher's in 5 epochs). ``top1_agree`` logs the
      student/teacher top-1 agreement on x'; an epoch below twice chance logs a warning naming these
      flags. Defaults stay the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from robustbench_kd.distiller import LossOutput
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.slack_matching import PAPER, SlackMatchingConfig, SlackMatchingDistiller

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar


class SmaraAD(SlackMatchingDistiller):
    r"""SmaraAD: soft-rank Spearman "slack matching" plus CAM attribution-region alignment.

    Loss, attack and reference defaults: see the module docstring of ``robustbench_kd_plugins.smaraad``.

    Arguments (``SmaraAD.Config``):
        alpha (float): weight of the adversarial terms, in [0, 1]. (Default: 1.0, paper -- the clean
            terms vanish.)
        c (float): the constant of Eq. 9, c >= 1 in the paper. (Default: 2.0, paper.)
        gamma (float): soft-rank sharpness. (Default: 1000.0, paper.)
        rank_on (str): ``"probs"`` (paper) or ``"logits"`` (the README's usage example). (Default: "probs".)
        align_weight (float): a, multiplies L_align in the loss; 0 drops the CAMs (the ablation's
            ``L_sm`` variant). (Default: 1.0, Eq. 9.)
        attack_align_weight (float): a', multiplies L_align in the attack; 0 gives AdaAD's attack.
            (Default: 1.0, Eq. 8.)
        cam_class (str): ``"label"`` (c = y for both models) or ``"top"`` (each model's own arg-max
            class, pytorch-grad-cam's default). (Default: "label", ours.)
        cam_normalization (str): ``"relu_minmax"`` (pytorch-grad-cam), ``"minmax"`` or ``"none"``.
            (Default: "relu_minmax".)
        cam_resize (str): common size of the two CAMs: ``"input"`` (pytorch-grad-cam), ``"teacher"``
            or ``"student"`` map size. (Default: "input".)
        init (str): attack start. (Default: "gauss" (std 0.001), AdaAD's code; the paper does not say.)
        attack_student_mode (str): student BN mode in the attack. (Default: "eval", AdaAD's code.)
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
    class Config(SlackMatchingConfig):
        """Hyper-parameters of SmaraAD (see the class docstring for meanings and provenance)."""

    def loss(self, ctx: BatchContext) -> LossOutput:
        return self.slack_loss(ctx)


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(SmaraAD)
