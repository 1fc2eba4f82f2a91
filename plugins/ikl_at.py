r"""``ikl-at``: adversarial training with the Improved KL loss (Cui et al., NeurIPS 2024).

Paper: Cui, Tian, Zhong, Qi, Yu, Zhang, 'Decoupled Kullback-Leibler Divergence Loss', NeurIPS 2024
[https://arxiv.org/abs/2305.13948]. Reference code: jiequancui/DKL
``DKLv1/Adv-training-dkl/train_dkl_cifar10.py``; the loss pieces and the class prior are
:mod:`robustbench_kd.methods.divergence`.

Loss, target side o_t = z(x) (trainable), learner side o_l = z(x')::

    L = (1/B) sum_b CE(z(x_b), y_b)
        + (1/B) sum_b [ mse_weight * (1/4) sum_{j,k} w_{y_b}^{jk} (Dn_b,jk - Da_b,jk)^2
                        + sce_weight * ( -sum_j sg(softmax(z(x_b)/tau))_j log softmax(z(x'_b)/tau)_j ) ]

Dn_jk = z(x)^j - z(x)^k, Da_jk = z(x')^j - z(x')^k. Nothing is detached in the wMSE (its gradient
reaches both z(x) and z(x')); the sCE target is detached; the CE trains z(x). Weights: class-wise
``w_y = s_bar_y s_bar_y^T`` where ``s_bar_y`` is the mean of ``softmax(sg z(x)/T)`` over the
training samples of class y during the PREVIOUS epoch (uniform 1/C in the first epoch), taken from
the train-mode natural forward of the loss, accumulated in ``after_step`` and row-normalised in
``on_epoch_end`` (:class:`robustbench_kd.methods.divergence.ClassPrior`, through the shared
:class:`robustbench_kd.methods.divergence.Divergence` component). The student runs on x' then on x, in
train mode, separate passes (reference order).

Attack (reference ``perturb_input``)::

    x' = PGD_{eps_e, a_e, K_e}( sCE(sg softmax(z(x)) -> z(x')) + attack_mse_weight * wMSE(z(x), z(x'); w_y) ),
    x'_0 = x + 0.001 N(0, I), student in EVAL mode

with z(x) the eval-mode clean logits computed once per batch in ``prepare`` (the reference
recomputes them at every step; in eval mode they are the same tensor). The sCE equals the TRADES
KL up to a constant, so its input gradient is TRADES'.

Epsilon curriculum (``eps_schedule="linear"``, reference): in epoch e (1-based) of E,
``eps_e = eps * e / E`` -- eps/E in the first epoch, the threat's eps in the last. The epoch comes
from ``on_epoch_start``. Attack budget per epoch (``attack_budget``):

* ``"high"`` (default; every reference script passes ``--train_budget high``): K = 5, a = eps_e / 2
  in EVERY epoch. The reference's if-chain has no ``elif``, so its last branch always wins; this
  reproduces what the published models were trained with.
* ``"intended"``: the schedule that if-chain was presumably meant to give, with s = E / 200:
  e <= int(50 s): K = 2, a = eps_e; e <= int(100 s): K = 3, a = 2 eps_e / 3;
  e <= int(150 s): K = 4, a = eps_e / 2; otherwise K = 5, a = eps_e / 2.
* ``"low"`` (the argparse default, used by no script): K = 2, a = eps_e.
* ``"threat"``: the run's threat steps, step size ``threat.alpha * eps_e / threat.eps``.

``eps_schedule="constant"`` uses the threat's eps in every epoch.

Deviations / notes:
    * Not part of this method (documented, not silently dropped): AWP (``awp=True`` is an error),
      the EMA weight average (tau 0.9996 from epoch 150 E / 200, then ``swa.py``) -- a run-level
      feature, not a loss --, and the AutoAugment/Cutout branch that doubles the batch with an
      augmented copy weighted ``--gamma``. The reference recipe also uses cosine LR from 0.2,
      wd 5e-4, batch 128, 200 epochs, WRN-34-10: set those in the run's [optim] / [student].
    * A class with no sample in an epoch keeps its previous prior row (the reference gets NaN).
    * The L2 threat uses the shared PGD primitive (normalised-gradient steps), not the reference's
      SGD-on-delta L2 branch (which also switches to a plain KL).

The module reads top-down: this description, the pure functions :func:`epoch_budget` and :func:`ikl_at_loss`,
then the distiller :class:`IKLAT` that gathers their tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.attacks import module_mode
from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.errors import UserError
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.attack_options import student_mode_option
from robustbench_kd.methods.divergence import ClassPrior, Divergence, ikl_per_sample

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec

#: ``ctx.extras`` key of the student's eval-mode clean logits (the attack target), once per batch.
CLEAN_LOGITS_KEY = "ikl_at.clean_logits"
#: ``ctx.extras`` key of the detached train-mode natural logits that feed the class prior.
PRIOR_LOGITS_KEY = "ikl_at.prior_logits"

EPS_SCHEDULES = ("linear", "constant")
ATTACK_BUDGETS = ("high", "low", "intended", "threat")


def epoch_budget(
    threat: ThreatSpec, epoch: int, num_epochs: int, *, schedule: str, budget: str
) -> tuple[float, float, int]:
    """``(eps_e, step, steps)`` of the attack in 0-based ``epoch`` of ``num_epochs`` (module docstring).

    ``schedule`` is ``eps_schedule`` (``"linear"``: eps * e / E with the 1-based e; ``"constant"``), ``budget``
    the ``attack_budget`` (``"high"``, ``"low"``, ``"threat"`` or ``"intended"``).
    """
    e, total = epoch + 1, max(num_epochs, 1)  # the reference counts epochs from 1
    eps = threat.eps * min(e, total) / total if schedule == "linear" else threat.eps
    if budget == "high":
        return eps, eps / 2.0, 5
    if budget == "low":
        return eps, eps, 2
    if budget == "threat":
        return eps, threat.alpha * eps / threat.eps, threat.steps
    scale = total / 200.0
    if e <= int(50 * scale):
        return eps, eps, 2
    if e <= int(100 * scale):
        return eps, 2.0 * eps / 3.0, 3
    if e <= int(150 * scale):
        return eps, eps / 2.0, 4
    return eps, eps / 2.0, 5


def ikl_at_loss(
    logits_nat: Tensor,
    logits_adv: Tensor,
    labels: Tensor,
    weight_vectors: Tensor,
    *,
    mse_weight: float,
    sce_weight: float,
    sce_temperature: float,
    learner_mse_grad: bool,
) -> LossOutput:
    """``mean_b CE(z(x_b), y_b) + mean_b [mse_weight * wMSE_b + sce_weight * sCE_b]`` (module docstring).

    ``logits_nat`` z(x) is the target side (trained through the CE and the wMSE), ``logits_adv`` z(x') the
    learner side; ``weight_vectors`` s (``w = s s^T``) is ``[B, C]`` or ``[C]``. Terms: ``ce_nat`` and the
    batch means ``wmse`` and ``sce`` before their weights.
    """
    ce_nat = F.cross_entropy(logits_nat, labels, reduction="none").mean()
    terms = ikl_per_sample(
        logits_adv,
        logits_nat,
        weight_vectors,
        mse_weight=mse_weight,
        sce_weight=sce_weight,
        temperature=sce_temperature,
        learner_mse_grad=learner_mse_grad,
    )
    total = ce_nat + terms.total.mean()
    return LossOutput(
        total=total,
        terms={"ce_nat": ce_nat.detach(), "wmse": terms.wmse.detach().mean(), "sce": terms.sce.detach().mean()},
    )


class IKLAT(Distiller):
    r"""IKL-AT: clean cross-entropy plus the Improved KL between natural and adversarial logits (no teacher).

    The method (paper, loss, attack, reference defaults, deviations) is described in the module docstring.

    Arguments (``IKLAT.Config``):
        mse_weight (float): weight of the wMSE; the PAPER's alpha, the reference CODE's ``--beta``.
            (Default: 20.0, scripts ``--beta 20``.)
        sce_weight (float): weight of the sCE; the PAPER's beta, the reference CODE's ``--alpha``.
            (Default: 4.0, scripts ``--alpha 4``; one CIFAR-100 run uses 5.)
        prior_temperature (float): T of the class prior's softmax. (Default: 4.0, scripts ``--T 4``;
            the paper's Table 11 also reports T = 2.)
        sce_temperature (float): tau of the sCE. (Default: 1.0, code.)
        prior_mix (float): m, ``prior = m * new + (1 - m) * old``. (Default: 1.0, code ``--m``.)
        class_prior (bool): IKL's class-wise global weights; False uses per-sample weights
            ``sg(softmax(z(x)/prior_temperature))`` outer product (DKL-style). (Default: True, code.)
        learner_mse_grad (bool): let the wMSE gradient reach z(x'); False restores DKL's stop-gradient.
            (Default: True, code.) With ``class_prior=False, prior_temperature=1, learner_mse_grad=False,
            mse_weight=1, sce_weight=1, sce_temperature=1`` the loss is TRADES with beta = 1 (batchmean)
            in gradient.
        eps_schedule (str): ``"linear"`` or ``"constant"``. (Default: "linear", code.)
        attack_budget (str): ``"high"``, ``"intended"``, ``"low"`` or ``"threat"``. (Default: "high",
            scripts -- see the module docstring.)
        attack_mse_weight (float | None): weight of the wMSE in the attack loss (sCE weight 1). None =
            reference default: 0 (``train_dkl_cifar10.py``) unless the run has 100 classes, then 1
            (``train_dkl_cifar100.py`` attacks with ``dkl_loss(..., 1.0, 1.0)``). (Default: None.)
        attack_student_mode (str): student BN mode in the attack. (Default: "eval", code.)
        awp (bool): adversarial weight perturbation (reference: gamma 0.005 from epoch 10 through a proxy
            model). Not implemented yet: True raises a UserError. (Default: False.)

    Teacher roles:
        none.

    Terms logged:
        ``ce_nat`` (clean CE), ``wmse`` and ``sce`` (batch means, before their weights);
        per epoch ``prior_true_class`` (mean over classes of the prior's diagonal) when ``class_prior``.

    Examples::

        >>> ikl = IKLAT()                                  # code: wMSE 20, sCE 4, T 4, 5-step ramped attack
        >>> paper_t2 = IKLAT(IKLAT.Config(prior_temperature=2.0))
        >>> # run config: [method] name = "ikl-at", mse_weight = 20.0, sce_weight = 4.0
        >>> #             [optim] schedule = "cosine", lr = 0.2, weight_decay = 5e-4, epochs = 200
    """

    name: ClassVar[str] = "ikl-at"
    supports_distributed: ClassVar[bool] = True  # class prior: summed over processes
    paper: ClassVar[str] = (
        "Jiequan Cui, Zhuotao Tian, Zhisheng Zhong, Xiaojuan Qi, Bei Yu, Hanwang Zhang. Decoupled Kullback-Leibler "
        "Divergence Loss. NeurIPS 2024. arXiv:2305.13948"
    )
    teacher_roles: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        """Hyper-parameters of IKL-AT (see the class docstring for meanings and provenance)."""

        mse_weight: float = option(20.0, low=0, help="weight of the wMSE (paper alpha, reference code --beta)")
        sce_weight: float = option(4.0, low=0, help="weight of the soft-label CE (paper beta, reference code --alpha)")
        prior_temperature: float = option(4.0, low=0, low_open=True, help="T of the class prior's softmax")
        sce_temperature: float = option(1.0, low=0, low_open=True, help="tau of the soft-label CE")
        prior_mix: float = option(1.0, low=0, high=1, help="m: prior = m * epoch's class means + (1 - m) * old prior")
        class_prior: bool = option(
            True, choices=(False, True), help="class-wise global weights; false = per-sample weights (DKL-style)"
        )
        learner_mse_grad: bool = option(
            True, choices=(False, True), help="let the wMSE gradient reach z(x'); false = DKL's stop-gradient"
        )
        eps_schedule: str = option("linear", choices=EPS_SCHEDULES, help="linear (eps * e / E) or constant radius")
        attack_budget: str = option(
            "high", choices=ATTACK_BUDGETS, help="attack steps and step size per epoch: high, intended, low or threat"
        )
        attack_mse_weight: float | None = option(
            None, low=0, help="wMSE weight in the attack; None = 1 for 100 classes, else 0 (reference scripts)"
        )
        attack_student_mode: str = student_mode_option("eval")
        awp: bool = option(False, choices=(False, True), help="adversarial weight perturbation (not implemented)")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.awp:
                raise UserError(
                    "method.awp: adversarial weight perturbation is not implemented yet for ikl-at; "
                    "set awp = false (the reference recipe uses AWP with gamma 0.005 from epoch 10)"
                )

    def __init__(self, config: IKLAT.Config | None = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        cfg = self.config
        self.divergence = Divergence(
            "ikl",
            num_classes,
            mse_weight=cfg.mse_weight,
            sce_weight=cfg.sce_weight,
            prior_temperature=cfg.prior_temperature,
            class_prior=cfg.class_prior,
            prior_mix=cfg.prior_mix,
        )
        # Registered here so its buffers are saved as prior.*; None without the class prior.
        self.prior: ClassPrior | None = self.divergence.prior
        # Curriculum position, set by on_epoch_start (0-based epoch). Before any epoch: the full radius.
        self._epoch = 0
        self._num_epochs = 1

    # -- curriculum -------------------------------------------------------------------------
    @property
    def attack_mse_weight(self) -> float:
        """The effective wMSE weight of the attack (resolves ``Config.attack_mse_weight=None``)."""
        if self.config.attack_mse_weight is not None:
            return float(self.config.attack_mse_weight)
        return 1.0 if self.num_classes == 100 else 0.0

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self._epoch, self._num_epochs = int(epoch), int(num_epochs)

    def epoch_budget(self, threat: ThreatSpec, epoch: int, num_epochs: int) -> tuple[float, float, int]:
        """``(eps_e, step, steps)`` of the attack in 0-based ``epoch`` of ``num_epochs`` (:func:`epoch_budget`)."""
        return epoch_budget(
            threat, epoch, num_epochs, schedule=self.config.eps_schedule, budget=self.config.attack_budget
        )

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec:  # always attacks: the curriculum radius
        eps, step, steps = self.epoch_budget(threat, self._epoch, self._num_epochs)
        return AttackSpec(
            eps=eps,
            alpha=min(step, eps),
            steps=steps,
            norm=threat.norm,
            init="gauss",
            init_std=1e-3,
            student_mode=self.config.attack_student_mode,
        )

    # -- weights ----------------------------------------------------------------------------
    def weight_vectors(self, labels: Tensor, natural_logits: Tensor) -> Tensor:
        """s with ``w = s s^T``: class-prior rows for the labels, or per-sample softened natural outputs."""
        return self.divergence.weight_vectors(labels, natural_logits)

    # -- attack -----------------------------------------------------------------------------
    def prepare(self, ctx: BatchContext) -> None:
        if self.attack_spec(ctx.threat).steps > 0:
            self.clean_logits(ctx)

    def clean_logits(self, ctx: BatchContext) -> Tensor:
        """z(x) of the current student in the attack's BN mode, no grad; once per batch (``ctx.extras``)."""
        logits = ctx.extras.get(CLEAN_LOGITS_KEY)
        if logits is None:
            with torch.no_grad(), module_mode(ctx.student, self.config.attack_student_mode):
                logits = self.student_logits(ctx, ctx.x)
            ctx.extras[CLEAN_LOGITS_KEY] = logits
        return logits

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        nat = self.clean_logits(ctx)
        adv = self.student_logits(ctx, x_adv)
        mse_weight = self.attack_mse_weight
        weights = self.weight_vectors(ctx.y, nat) if mse_weight else nat.new_ones(nat.shape[1])
        return ikl_per_sample(adv, nat, weights, mse_weight=mse_weight, sce_weight=1.0).total

    # -- outer loss -------------------------------------------------------------------------
    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        logits_nat = self.student_logits(ctx, ctx.x)
        out = ikl_at_loss(
            logits_nat,
            logits_adv,
            ctx.y,
            self.weight_vectors(ctx.y, logits_nat),
            mse_weight=cfg.mse_weight,
            sce_weight=cfg.sce_weight,
            sce_temperature=cfg.sce_temperature,
            learner_mse_grad=cfg.learner_mse_grad,
        )
        ctx.extras[PRIOR_LOGITS_KEY] = logits_nat.detach()
        return out

    def after_step(self, ctx: BatchContext, out: LossOutput) -> None:
        logits = ctx.extras.get(PRIOR_LOGITS_KEY)
        if logits is not None:
            self.divergence.accumulate(logits, ctx.y)

    def on_epoch_end(self, epoch: int, num_epochs: int) -> dict[str, float]:
        if self.prior is None:
            return {}
        self.divergence.finalize()
        return {"prior_true_class": float(self.prior.prior.diagonal().mean())}


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(IKLAT)
