"""``pgd-at``: Madry et al. PGD adversarial training, with the single-step "fast AT" (FGSM-RS) variant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.distiller import ATTACK_INITS, STUDENT_MODES, AttackSpec, Distiller, LossOutput
from robustbench_kd.errors import UserError, check_choice
from robustbench_kd.hookspecs import hookimpl

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec


class PGDAT(Distiller):
    r"""PGD adversarial training (Madry et al., ICLR 2018), optionally single-step "fast AT".

    Paper: 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083]; fast variant: Wong, Rice, Kolter, 'Fast is better than free:
    Revisiting adversarial training' [https://arxiv.org/abs/2001.03994] (the "AT-FFGSM" teachers of
    the AKD paper).

    Loss (methods.md §1.1)::

        L = (1/B) sum_b [ a * CE(z_S(x_b), y_b) + (1 - a) * CE(z_S(x'_b), y_b) ]

    with ``a = clean_weight`` (0 by default, so the clean forward pass is skipped entirely and the
    loss is Madry's CE(z_S(x'), y)). The clean and adversarial batches run in separate forward passes.

    Attack::

        x' = PGD_{eps, alpha, K}( CE(z_S(x'), y) ),  uniform start U(-eps, eps), student in eval mode

    with eps, alpha, K from the run's threat (K overridable by ``steps``). With ``fast=True`` the
    attack is FGSM with random start: one step of size ``fast_step_factor * eps`` (1.25 eps, Wong
    et al.) from a uniform start, then projection onto the eps-ball and [0,1].

    Arguments (``PGDAT.Config``):
        steps (int | None): attack steps; None = the threat's ``steps``. (Default: None. The
            threat's default of 10 is the SmaraAD/AdaAD baseline; Madry's CIFAR setting and the AKD
            paper's teachers use 7.)
        init (str): attack start, ``"uniform"``, ``"gauss"`` or ``"none"``. (Default: "uniform",
            Madry.)
        attack_student_mode (str): student BN mode during the attack, ``"eval"`` or ``"train"``.
            (Default: "eval" -- AdaAD's Madry helper uses eval, ARD-style code train;
            methods.md §1.1 [SUGGESTION].)
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

    Deviations / notes:
        * The reference FGSM-RS also uses a cyclic LR and mixed precision; those are run options
          (``optim``), not part of the method.

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
    class Config:
        """Hyper-parameters of PGD-AT (see the class docstring for meanings and provenance)."""

        steps: int | None = None
        init: str = "uniform"
        attack_student_mode: str = "eval"
        clean_weight: float = 0.0
        fast: bool = False
        fast_step_factor: float = 1.25

        def __post_init__(self) -> None:
            if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 0):
                raise UserError(f"method.steps must be a non-negative integer or None, got {self.steps!r}")
            check_choice("init", self.init, ATTACK_INITS)
            check_choice("attack_student_mode", self.attack_student_mode, STUDENT_MODES)
            if not 0.0 <= self.clean_weight <= 1.0:
                raise UserError(f"method.clean_weight must be in [0, 1], got {self.clean_weight}")
            if not self.fast_step_factor > 0.0:
                raise UserError(f"method.fast_step_factor must be positive, got {self.fast_step_factor}")
            if self.fast and self.steps is not None and self.steps != 1:
                raise UserError(f"method.fast=true is a single-step attack; method.steps={self.steps} conflicts")

    def fast_step_size(self, eps: float) -> float:
        """The FGSM-RS step size for radius ``eps`` (may exceed eps)."""
        return self.config.fast_step_factor * eps

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        cfg = self.config
        if cfg.fast:
            # FGSM-RS steps 1.25 eps from a uniform start; the projection clips it back into the ball.
            return AttackSpec(eps=threat.eps, alpha=self.fast_step_size(threat.eps), steps=1, norm=threat.norm,
                              init="uniform", student_mode=cfg.attack_student_mode, large_step=True)
        steps = threat.steps if cfg.steps is None else cfg.steps
        return AttackSpec(eps=threat.eps, alpha=threat.alpha, steps=steps, norm=threat.norm,
                          init=cfg.init, student_mode=cfg.attack_student_mode)

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        return F.cross_entropy(self.student_logits(ctx, x_adv), ctx.y, reduction="none")

    def loss(self, ctx: BatchContext) -> LossOutput:
        a = self.config.clean_weight
        ce_adv = F.cross_entropy(self.student_logits(ctx, ctx.x_adv), ctx.y, reduction="none").mean()
        terms = {"ce_adv": ce_adv.detach()}
        if a > 0.0:
            ce_nat = F.cross_entropy(self.student_logits(ctx, ctx.x), ctx.y, reduction="none").mean()
            terms["ce_nat"] = ce_nat.detach()
            total = a * ce_nat + (1.0 - a) * ce_adv
        else:
            total = ce_adv
        return LossOutput(total=total, terms=terms)


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(PGDAT)
