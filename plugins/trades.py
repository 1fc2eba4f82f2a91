r"""``trades``: TRADES (Zhang et al., ICML 2019): clean CE plus beta * KL(p(x) || p(x')).

Paper: Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, 'Theoretically Principled Trade-off between
Robustness and Accuracy', ICML 2019 [https://arxiv.org/abs/1901.08573]. Reference code:
yaodongyu/TRADES ``trades.py``.

Loss::

    L = (1/B) sum_b CE(z(x_b), y_b) + beta * R( KL(p(x_b) || p(x'_b)) )

with R the ``kl_reduction`` (batchmean = (1/B) sum_b, as the reference's
``KLDivLoss(size_average=False) / batch_size``). Nothing is detached: gradients flow through both
p(x) and p(x'). The student runs on x and on x' in separate train-mode forward passes.

Attack::

    x' = PGD_{eps, alpha, K}( sum_c p(x)_c (log p(x)_c - log p(x')_c) ),  x'_0 = x + 0.001 N(0, I)

(reduction sum; sign steps make it irrelevant), student in eval mode. The target p(x) comes from
the current student in the attack's BN mode, computed once per batch in ``prepare`` under no_grad
(the reference recomputes it at every step; in eval mode it is the same tensor).

The budget (eps, alpha, K) is the run's threat. TRADES' official CIFAR-10 budget is
eps = 0.031, alpha = 0.007, K = 10: set it in the run's threat to reproduce it exactly.

The module reads top-down: this description, the pure loss :func:`trades_loss`, then the distiller
:class:`TRADES` that gathers its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.attacks import module_mode
from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.attack_options import student_mode_option, threat_attack
from robustbench_kd.methods.losses import kl_logits_per_sample, kl_per_sample, kl_reduction_option, reduce_kl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec

#: ``ctx.extras`` key of the attack target p(x), computed once per batch under no_grad.
CLEAN_PROBS_KEY = "trades.clean_probs"


def trades_loss(
    logits_nat: Tensor,
    logits_adv: Tensor,
    labels: Tensor,
    *,
    beta: float,
    reduction: str,
    target_logits: Tensor | None = None,
) -> LossOutput:
    """``mean_b CE(z(x_b), y_b) + beta * R(KL(p(x) || p(x')))`` (module docstring), nothing detached.

    ``target_logits`` are the logits behind p(x) in the KL (default ``logits_nat``; the reference's second
    clean forward when asked). R is :func:`reduce_kl`. Terms: ``ce_nat`` and ``kl_adv`` (R(KL), before beta).
    """
    ce_nat = F.cross_entropy(logits_nat, labels, reduction="none").mean()
    target = logits_nat if target_logits is None else target_logits
    kl_adv = reduce_kl(kl_logits_per_sample(logits_adv, target), reduction, logits_adv.shape[1])
    total = ce_nat + beta * kl_adv
    return LossOutput(total=total, terms={"ce_nat": ce_nat.detach(), "kl_adv": kl_adv.detach()})


class TRADES(Distiller):
    r"""TRADES: clean cross-entropy plus a KL robustness regulariser (no teacher).

    The method (paper, loss, attack, reference defaults, deviations) is described in the module docstring.

    Arguments (``TRADES.Config``):
        beta (float): weight of the KL term. (Default: 6.0, TRADES CIFAR-10 script; README: 1-10,
            larger = more robust, less accurate.)
        kl_reduction (str): ``"batchmean"``, ``"mean_all"`` or ``"sum"``. (Default: "batchmean", code.)
        attack_student_mode (str): student BN mode in the attack. (Default: "eval", current
            ``trades.py``; older versions attacked in train mode.)
        recompute_clean_target (bool): run the student on x a second time (train mode) for the KL
            target, as the reference does. Gradients are identical either way; only BN running
            statistics see one more clean-batch update. (Default: False -- no duplicate forward.)

    Teacher roles:
        none.

    Terms logged:
        ``ce_nat`` (clean CE), ``kl_adv`` (the reduced KL, before beta).

    Examples::

        >>> trades = TRADES(TRADES.Config(beta=6.0))
        >>> # run config: [method] name = "trades", beta = 6.0; [threat] eps = 0.031, alpha = 0.007
    """

    name: ClassVar[str] = "trades"
    supports_distributed: ClassVar[bool] = True  # stateless, batch-mean loss
    paper: ClassVar[str] = (
        "Hongyang Zhang, Yaodong Yu, Jiantao Jiao, Eric P. Xing, Laurent El Ghaoui, Michael I. Jordan. "
        "Theoretically Principled Trade-off between Robustness and Accuracy. ICML 2019. arXiv:1901.08573"
    )
    teacher_roles: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        """Hyper-parameters of TRADES (see the class docstring for meanings and provenance)."""

        beta: float = option(6.0, low=0, help="weight of the KL robustness term")
        kl_reduction: str = kl_reduction_option("batchmean")
        attack_student_mode: str = student_mode_option("eval")
        recompute_clean_target: bool = option(
            False, choices=(False, True), help="a second train-mode forward on x for the KL target, as the reference"
        )

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return threat_attack(threat, self.config, init="gauss")

    def prepare(self, ctx: BatchContext) -> None:
        if ctx.threat.steps > 0:
            self.attack_target(ctx)

    def attack_target(self, ctx: BatchContext) -> Tensor:
        """p(x) from the current student, no grad, in the attack's BN mode; once per batch.

        Computed in :meth:`prepare` (or on first use) and kept in ``ctx.extras``; with
        ``attack_student_mode="eval"`` the student is switched to eval for this forward and every
        submodule's mode is restored afterwards, whatever mode the caller left it in.
        """
        target = ctx.extras.get(CLEAN_PROBS_KEY)
        if target is None:
            with torch.no_grad(), module_mode(ctx.student, self.config.attack_student_mode):
                target = torch.softmax(self.student_logits(ctx, ctx.x), dim=1)
            ctx.extras[CLEAN_PROBS_KEY] = target
        return target

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        return kl_per_sample(self.student_logits(ctx, x_adv), self.attack_target(ctx))

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        logits_nat = self.student_logits(ctx, ctx.x)
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        target_logits = self.student_logits(ctx, ctx.x) if cfg.recompute_clean_target else logits_nat
        return trades_loss(
            logits_nat, logits_adv, ctx.y, beta=cfg.beta, reduction=cfg.kl_reduction, target_logits=target_logits
        )


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(TRADES)
