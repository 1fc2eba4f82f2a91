"""``ikl-at``: adversarial training with the Improved KL loss (Cui et al., NeurIPS 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.attacks import module_mode
from robustbench_kd.distiller import STUDENT_MODES, AttackSpec, Distiller, LossOutput
from robustbench_kd.errors import UserError, check_choice
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.divergence import ClassPrior, ikl_per_sample, sample_weight_vectors

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


class IKLAT(Distiller):
    r"""IKL-AT: clean cross-entropy plus the Improved KL between natural and adversarial logits (no teacher).

    Paper: Cui, Tian, Zhong, Qi, Yu, Zhang, 'Decoupled Kullback-Leibler Divergence Loss', NeurIPS 2024
    [https://arxiv.org/abs/2305.13948]. Reference code: jiequancui/DKL
    ``DKLv1/Adv-training-dkl/train_dkl_cifar10.py`` (methods.md §10.3); the loss is
    :mod:`robustbench_kd.methods.divergence`.

    Loss (methods.md §10.2-10.3), target side o_t = z(x) (trainable), learner side o_l = z(x')::

        L = (1/B) sum_b CE(z(x_b), y_b)
            + (1/B) sum_b [ mse_weight * (1/4) sum_{j,k} w_{y_b}^{jk} (Dn_b,jk - Da_b,jk)^2
                            + sce_weight * ( -sum_j sg(softmax(z(x_b)/tau))_j log softmax(z(x'_b)/tau)_j ) ]

    Dn_jk = z(x)^j - z(x)^k, Da_jk = z(x')^j - z(x')^k. Nothing is detached in the wMSE (its gradient
    reaches both z(x) and z(x')); the sCE target is detached; the CE trains z(x). Weights: class-wise
    ``w_y = s_bar_y s_bar_y^T`` where ``s_bar_y`` is the mean of ``softmax(sg z(x)/T)`` over the
    training samples of class y during the PREVIOUS epoch (uniform 1/C in the first epoch), taken from
    the train-mode natural forward of the loss, accumulated in :meth:`after_step` and row-normalised in
    :meth:`on_epoch_end` (:class:`robustbench_kd.methods.divergence.ClassPrior`). The student runs on x' then on x, in
    train mode, separate passes (reference order).

    Attack (reference ``perturb_input``)::

        x' = PGD_{eps_e, a_e, K_e}( sCE(sg softmax(z(x)) -> z(x')) + attack_mse_weight * wMSE(z(x), z(x'); w_y) ),
        x'_0 = x + 0.001 N(0, I), student in EVAL mode

    with z(x) the eval-mode clean logits computed once per batch in :meth:`prepare` (the reference
    recomputes them at every step; in eval mode they are the same tensor). The sCE equals the TRADES
    KL up to a constant, so its input gradient is TRADES'.

    Epsilon curriculum (``eps_schedule="linear"``, reference): in epoch e (1-based) of E,
    ``eps_e = eps * e / E`` -- eps/E in the first epoch, the threat's eps in the last. The epoch comes
    from :meth:`on_epoch_start`. Attack budget per epoch (``attack_budget``):

    * ``"high"`` (default; every reference script passes ``--train_budget high``): K = 5, a = eps_e / 2
      in EVERY epoch. The reference's if-chain has no ``elif``, so its last branch always wins (methods.md
      §14.11); this reproduces what the published models were trained with.
    * ``"intended"``: the schedule that if-chain was presumably meant to give, with s = E / 200:
      e <= int(50 s): K = 2, a = eps_e; e <= int(100 s): K = 3, a = 2 eps_e / 3;
      e <= int(150 s): K = 4, a = eps_e / 2; otherwise K = 5, a = eps_e / 2.
    * ``"low"`` (the argparse default, used by no script): K = 2, a = eps_e.
    * ``"threat"``: the run's threat steps, step size ``threat.alpha * eps_e / threat.eps``.

    ``eps_schedule="constant"`` uses the threat's eps in every epoch.

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
            scripts -- see above.)
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

    Deviations / notes:
        * Not part of this method (documented, not silently dropped): AWP (``awp=True`` is an error),
          the EMA weight average (tau 0.9996 from epoch 150 E / 200, then ``swa.py``) -- a run-level
          feature, not a loss --, and the AutoAugment/Cutout branch that doubles the batch with an
          augmented copy weighted ``--gamma``. The reference recipe also uses cosine LR from 0.2,
          wd 5e-4, batch 128, 200 epochs, WRN-34-10: set those in the run's [optim] / [student].
        * A class with no sample in an epoch keeps its previous prior row (the reference gets NaN).
        * The L2 threat uses the shared PGD primitive (normalised-gradient steps), not the reference's
          SGD-on-delta L2 branch (which also switches to a plain KL).

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
    class Config:
        """Hyper-parameters of IKL-AT (see the class docstring for meanings and provenance)."""

        mse_weight: float = 20.0
        sce_weight: float = 4.0
        prior_temperature: float = 4.0
        sce_temperature: float = 1.0
        prior_mix: float = 1.0
        class_prior: bool = True
        learner_mse_grad: bool = True
        eps_schedule: str = "linear"
        attack_budget: str = "high"
        attack_mse_weight: float | None = None
        attack_student_mode: str = "eval"
        awp: bool = False

        def __post_init__(self) -> None:
            for key in ("mse_weight", "sce_weight"):
                if not getattr(self, key) >= 0.0:
                    raise UserError(f"method.{key} must be >= 0, got {getattr(self, key)}")
            for key in ("prior_temperature", "sce_temperature"):
                if not getattr(self, key) > 0.0:
                    raise UserError(f"method.{key} must be positive, got {getattr(self, key)}")
            if not 0.0 <= self.prior_mix <= 1.0:
                raise UserError(f"method.prior_mix must be in [0, 1], got {self.prior_mix}")
            check_choice("eps_schedule", self.eps_schedule, EPS_SCHEDULES)
            check_choice("attack_budget", self.attack_budget, ATTACK_BUDGETS)
            if self.attack_mse_weight is not None and not self.attack_mse_weight >= 0.0:
                raise UserError(f"method.attack_mse_weight must be >= 0 or None, got {self.attack_mse_weight}")
            check_choice("attack_student_mode", self.attack_student_mode, STUDENT_MODES)
            if self.awp:
                raise UserError(
                    "method.awp: adversarial weight perturbation is not implemented yet for ikl-at; "
                    "set awp = false (the reference recipe uses AWP with gamma 0.005 from epoch 10)"
                )

    def __init__(self, config: IKLAT.Config | None = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        cfg = self.config
        self.prior: ClassPrior | None = (
            ClassPrior(num_classes, temperature=cfg.prior_temperature, mix=cfg.prior_mix) if cfg.class_prior else None
        )
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
        """``(eps_e, step, steps)`` of the attack in 0-based ``epoch`` of ``num_epochs`` (see the class docstring)."""
        cfg = self.config
        e, total = epoch + 1, max(num_epochs, 1)  # the reference counts epochs from 1
        eps = threat.eps * min(e, total) / total if cfg.eps_schedule == "linear" else threat.eps
        if cfg.attack_budget == "high":
            return eps, eps / 2.0, 5
        if cfg.attack_budget == "low":
            return eps, eps, 2
        if cfg.attack_budget == "threat":
            return eps, threat.alpha * eps / threat.eps, threat.steps
        scale = total / 200.0
        if e <= int(50 * scale):
            return eps, eps, 2
        if e <= int(100 * scale):
            return eps, 2.0 * eps / 3.0, 3
        if e <= int(150 * scale):
            return eps, eps / 2.0, 4
        return eps, eps / 2.0, 5

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        eps, step, steps = self.epoch_budget(threat, self._epoch, self._num_epochs)
        return AttackSpec(eps=eps, alpha=min(step, eps), steps=steps, norm=threat.norm, init="gauss",
                          init_std=1e-3, student_mode=self.config.attack_student_mode)

    # -- weights ----------------------------------------------------------------------------
    def weight_vectors(self, labels: Tensor, natural_logits: Tensor) -> Tensor:
        """s with ``w = s s^T``: class-prior rows for the labels, or per-sample softened natural outputs."""
        if self.prior is not None:
            return self.prior.weight_vectors(labels)
        return sample_weight_vectors(natural_logits, self.config.prior_temperature)

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
        ce_nat = F.cross_entropy(logits_nat, ctx.y, reduction="none").mean()
        terms = ikl_per_sample(logits_adv, logits_nat, self.weight_vectors(ctx.y, logits_nat),
                               mse_weight=cfg.mse_weight, sce_weight=cfg.sce_weight,
                               temperature=cfg.sce_temperature, learner_mse_grad=cfg.learner_mse_grad)
        total = ce_nat + terms.total.mean()
        ctx.extras[PRIOR_LOGITS_KEY] = logits_nat.detach()
        return LossOutput(total=total, terms={"ce_nat": ce_nat.detach(), "wmse": terms.wmse.detach().mean(),
                                              "sce": terms.sce.detach().mean()})

    def after_step(self, ctx: BatchContext, out: LossOutput) -> None:
        logits = ctx.extras.get(PRIOR_LOGITS_KEY)
        if self.prior is not None and logits is not None:
            self.prior.accumulate(logits, ctx.y)

    def on_epoch_end(self, epoch: int, num_epochs: int) -> dict[str, float]:
        if self.prior is None:
            return {}
        self.prior.finalize()
        return {"prior_true_class": float(self.prior.prior.diagonal().mean())}


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(IKLAT)
