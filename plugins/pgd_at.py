r"""``pgd-at``: Madry et al. PGD adversarial training, with the single-step "fast AT" (FGSM-RS) variant.

Paper: 'Towards Deep Learning Models Resistant to Adversarial Attacks'
[https://arxiv.org/abs/1706.06083]; fast variant: Wong, Rice, Kolter, 'Fast is better than free:
Revisiting adversarial training' [https://arxiv.org/abs/2001.03994] (the "AT-FFGSM" teachers of
the AKD paper).

Loss::

    L = (1/B) sum_b [ a * CE(z_S(x_b), y_b) + (1 - a) * CE(z_S(x'_b), y_b) ]

with ``a = clean_weight`` (0 by default, so the clean forward pass is skipped entirely and the
loss is Madry's CE(z_S(x'), y)). The clean and adversarial batches run in separate forward passes.

Attack::

    x' = PGD_{eps, alpha, K}( CE(z_S(x'), y) ),  uniform start U(-eps, eps), student in eval mode

with eps, alpha, K from the run's threat (K overridable by ``steps``). With ``fast=True`` the
attack is FGSM with random start: one step of size ``fast_step_factor * eps`` (1.25 eps, Wong
et al.) from a uniform start, then projection onto the eps-ball and [0,1].

Deviations / notes:
    * The reference FGSM-RS also uses a cyclic LR and mixed precision; those are run options
      (``optim``), not part of the method.

The module reads top-down: this description, the pure loss :func:`pgd_at_loss`, then the distiller
:class:`PGDAT` that gathers its tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.errors import UserError
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.attack_options import init_option, steps_option, student_mode_option, threat_attack

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec


def pgd_at_loss(
    logits_adv: Tensor, labels: Tensor, *, clean_weight: float = 0.0, logits_nat: Tensor | None = None
) -> LossOutput:
    """``mean_b [a * CE(z(x_b), y_b) + (1 - a) * CE(z(x'_b), y_b)]`` with a = ``clean_weight``.

    ``logits_nat`` is needed (and read) only when ``a > 0``. Terms: ``ce_adv``, and ``ce_nat`` when ``a > 0``.
    """
    ce_adv = F.cross_entropy(logits_adv, labels, reduction="none").mean()
    terms = {"ce_adv": ce_adv.detach()}
    if clean_weight <= 0.0:
        return LossOutput(total=ce_adv, terms=terms)
    assert logits_nat is not None, "clean_weight > 0 trains the clean CE: pass logits_nat"
    ce_nat = F.cross_entropy(logits_nat, labels, reduction="none").mean()
    terms["ce_nat"] = ce_nat.detach()
    return LossOutput(total=clean_weight * ce_nat + (1.0 - clean_weight) * ce_adv, terms=terms)


class PGDAT(Distiller):
    r"""PGD adversarial training (Madry et al., ICLR 2018), optionally single-step "fast AT".

    The method (paper, loss, attack, reference defaults, deviations) is described in the module docstring.

    Arguments (``PGDAT.Config``):
        steps (int | None): attack steps; None = the threat's ``steps``. (Default: None. The
            threat's default of 10 is the SmaraAD/AdaAD baseline; Madry's CIFAR setting and the AKD
            paper's teachers use 7.)
        init (str): attack start, ``"uniform"``, ``"gauss"`` or ``"none"``. (Default: "uniform",
            Madry.)
        attack_student_mode (str): student BN mode during the attack, ``"eval"`` or ``"train"``.
            (Default: "eval", our choice -- AdaAD's Madry helper uses eval, ARD-style code train.)
        clean_weight (float): a in the loss above, in [0, 1]. (Default: 0.0; AdaAD's helper has
            this mixture, off by default.)
        fast (bool): single-step FGSM-RS ("fast AT") instead of PGD: 1 step, uniform start.
            (Default: False.)
        fast_step_factor (float): FGSM-RS step size as a multiple of eps. (Default: 1.25, Wong et
            al.) The step exceeds eps on purpose -- the projection clips it -- so the spec sets
            ``large_step=True``, the one case where ``AttackSpec`` accepts ``alpha > eps``.

    Teacher roles:
        none.

    Terms logged:
        ``ce_adv`` (CE on x'), and ``ce_nat`` (CE on x) when ``clean_weight > 0``.

    Examples::

        >>> madry = PGDAT(PGDAT.Config(steps=7))
        >>> ffgsm = PGDAT(PGDAT.Config(fast=True))    # AKD's AT-FFGSM teachers
        >>> # run config: [method] name = "pgd-at", fast = true
    """

    name: ClassVar[str] = "pgd-at"
    supports_distributed: ClassVar[bool] = True  # stateless, batch-mean loss
    paper: ClassVar[str] = (
        "Aleksander Madry, Aleksandar Makelov, Ludwig Schmidt, Dimitris Tsipras, Adrian Vladu. "
        "Towards Deep Learning Models Resistant to Adversarial Attacks. ICLR 2018. arXiv:1706.06083"
    )
    teacher_roles: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        """Hyper-parameters of PGD-AT (see the class docstring for meanings and provenance)."""

        steps: int | None = steps_option()
        init: str = init_option("uniform")
        attack_student_mode: str = student_mode_option("eval")
        clean_weight: float = option(0.0, low=0, high=1, help="a: weight of the clean CE, 1 - a on the adversarial CE")
        fast: bool = option(False, choices=(False, True), help="single-step FGSM with random start (fast AT)")
        fast_step_factor: float = option(1.25, low=0, low_open=True, help="FGSM-RS step size as a multiple of eps")

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.fast and self.steps is not None and self.steps != 1:
                raise UserError(f"method.fast=true is a single-step attack; method.steps={self.steps} conflicts")

    def fast_step_size(self, eps: float) -> float:
        """The FGSM-RS step size for radius ``eps`` (may exceed eps)."""
        return self.config.fast_step_factor * eps

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        if self.config.fast:
            # FGSM-RS steps 1.25 eps from a uniform start; the projection clips it back into the ball.
            return threat_attack(
                threat, self.config, alpha=self.fast_step_size(threat.eps), steps=1, init="uniform", large_step=True
            )
        return threat_attack(threat, self.config)

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        return F.cross_entropy(self.student_logits(ctx, x_adv), ctx.y, reduction="none")

    def loss(self, ctx: BatchContext) -> LossOutput:
        logits_adv = self.student_logits(ctx, ctx.x_adv)
        logits_nat = self.student_logits(ctx, ctx.x) if self.config.clean_weight > 0.0 else None
        return pgd_at_loss(logits_adv, ctx.y, clean_weight=self.config.clean_weight, logits_nat=logits_nat)


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(PGDAT)
