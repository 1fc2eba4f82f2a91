"""The inner maximisation of every method: one ``torchattacks.Attack`` driven by a loss closure.

For a method's per-sample attack loss L(x') (``Distiller.attack_loss``) it runs projected gradient
ascent, the inner maximisation of adversarial training as PGD defines it (Madry et al.)::

    x_0 = init(x)
    x_{k+1} = Proj_{B_eps(x) ∩ [0,1]}( x_k + alpha * step(grad_{x_k} sum_b L_b(x_k)) )

with ``step = sign`` for L_inf and ``g / ||g||_2`` (per sample) for L2. Because the steps are sign or
per-sample normalised, summing the per-sample losses gives the same iterates as averaging them.
Gradients are taken w.r.t. the input only (``torch.autograd.grad``), with the student's parameters
set not to require grad for the attack's duration (restored afterwards, also on an exception): nothing
accumulates into the student's or the teachers' parameters, and no weight-gradient path is recorded.

Differences from ``torchattacks.Attack.__call__`` that matter for training, both deliberate:

* The previous train/eval flag of *every* submodule is restored in a ``finally`` block, so an
  exception cannot leave the student in eval mode, and a submodule that was deliberately frozen
  (BN in eval inside a training model) is not flipped back to train.
* ``student_mode="train"`` leaves the modes exactly as the caller set them (ARD/IAD attack with
  batch statistics) instead of forcing every BN and dropout into train mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torchattacks.attack import Attack

from robustbench_kd.distiller import ATTACK_INITS, STUDENT_MODES, AttackSpec
from robustbench_kd.errors import UserError

AttackLoss = Callable[[Tensor], Tensor]


@contextmanager
def module_mode(module: nn.Module, mode: str) -> Iterator[None]:
    """Run the block with ``module`` in ``mode`` and restore every submodule's flag afterwards.

    ``mode="eval"`` switches the whole module to eval; ``mode="train"`` leaves the modes exactly as
    the caller set them (a deliberately frozen BN inside a training model stays frozen). The
    restore runs in ``finally``, so an exception cannot leave the module in the wrong mode.
    """
    if mode not in STUDENT_MODES:
        raise ValueError(f"mode must be one of {', '.join(STUDENT_MODES)}, got {mode!r}")
    saved = [(m, m.training) for m in module.modules()]
    if mode == "eval":
        module.eval()
    try:
        yield
    finally:
        for m, was_training in saved:
            m.training = was_training


@contextmanager
def parameters_frozen(module: nn.Module) -> Iterator[None]:
    """Run the block with ``module``'s parameters not requiring grad; restore exactly those that did.

    For passes that need input gradients only (the inner maximisation): autograd then records no
    weight-gradient paths, and a compiled module traces a graph whose backward computes the input
    gradient alone instead of every weight gradient as well.
    """
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _per_sample_l2(t: Tensor) -> Tensor:
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.ndim - 1)))


def project(x_adv: Tensor, x: Tensor, *, eps: float, norm: str) -> Tensor:
    """Project ``x_adv`` onto the eps-ball around ``x`` (L_inf or L2), then clamp to [0,1]."""
    delta = x_adv - x
    if norm == "Linf":
        delta = delta.clamp(-eps, eps)
    else:
        factor = (eps / (_per_sample_l2(delta) + 1e-12)).clamp(max=1.0)
        delta = delta * factor
    return (x + delta).clamp(0.0, 1.0)


class DistillationAttack(Attack):
    """PGD on an arbitrary per-sample loss of the student (and teachers).

    Args:
        model: the student (its mode is switched for the attack and restored afterwards).
        loss_fn: ``x_adv -> per-sample loss [B]`` to maximise.
        eps: radius; alpha: step size (must not exceed eps); steps: number of steps.
        norm: ``"Linf"`` or ``"L2"``.
        init: ``"uniform"`` (U(-eps, eps) for L_inf, uniform in the ball for L2, then clamped to
            [0,1]), ``"gauss"`` (x + init_std * N(0, I), not clamped before the first step, as in
            TRADES/RSLAD), or ``"none"``.
        student_mode: ``"eval"`` or ``"train"`` (see the module docstring).
        allow_large_step: accept ``alpha > eps`` (FGSM with random start); otherwise that is an
            error, because it almost always means eps and alpha were swapped.

    Examples::

        atk = DistillationAttack(student, lambda xa: F.cross_entropy(student(xa), y, reduction="none"),
                                 eps=8/255, alpha=2/255, steps=10)
        x_adv = atk(x, y)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: AttackLoss,
        *,
        eps: float,
        alpha: float,
        steps: int,
        norm: str = "Linf",
        init: str = "uniform",
        init_std: float = 1e-3,
        student_mode: str = "eval",
        allow_large_step: bool = False,
    ) -> None:
        super().__init__("DistillationAttack", model)
        if norm not in ("Linf", "L2"):
            raise UserError(f"attack norm must be 'Linf' or 'L2', got {norm!r}")
        if init not in ATTACK_INITS:
            raise UserError(f"attack init must be one of {', '.join(ATTACK_INITS)}, got {init!r}")
        if student_mode not in STUDENT_MODES:
            raise UserError(f"student_mode must be one of {', '.join(STUDENT_MODES)}, got {student_mode!r}")
        if eps < 0 or alpha < 0 or steps < 0:
            raise UserError(f"attack eps, alpha and steps must be >= 0, got {eps}, {alpha}, {steps}")
        if steps > 0 and alpha > eps + 1e-12 and not allow_large_step:
            raise UserError(f"attack step size alpha={alpha:.6g} exceeds eps={eps:.6g}")
        self.loss_fn = loss_fn
        self.eps, self.alpha, self.steps = float(eps), float(alpha), int(steps)
        self.norm, self.init, self.init_std = norm, init, float(init_std)
        self.student_mode = student_mode
        self.supported_mode = ["default"]

    # torchattacks calls these around forward(); module_mode in __call__ switches and restores instead.

    @classmethod
    def from_spec(cls, model: nn.Module, loss_fn: AttackLoss, spec: AttackSpec) -> DistillationAttack:
        """The attack a method's :class:`~robustbench_kd.distiller.AttackSpec` describes, on ``loss_fn``."""
        return cls(
            model,
            loss_fn,
            eps=spec.eps,
            alpha=spec.alpha,
            steps=spec.steps,
            norm=spec.norm,
            init=spec.init,
            init_std=spec.init_std,
            student_mode=spec.student_mode,
            allow_large_step=spec.large_step,
        )

    def _change_model_mode(self, given_training: bool) -> None:
        pass

    def _recover_model_mode(self, given_training: bool) -> None:
        pass

    def __call__(self, inputs: Tensor, labels: Tensor | None = None, *args, **kwargs) -> Tensor:
        with module_mode(self.model, self.student_mode), parameters_frozen(self.model):
            return super().__call__(inputs, labels, *args, **kwargs)

    def _init(self, x: Tensor) -> Tensor:
        if self.init == "none" or self.eps == 0:
            return x.clone()
        if self.init == "gauss":
            return x + self.init_std * torch.randn_like(x)
        if self.norm == "Linf":
            start = x + torch.empty_like(x).uniform_(-self.eps, self.eps)
        else:
            direction = torch.randn_like(x)
            direction = direction / (_per_sample_l2(direction) + 1e-12)
            radius = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype)
            start = x + direction * radius * self.eps
        return start.clamp(0.0, 1.0)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        """Return the adversarial batch (detached), within the eps-ball of ``images`` and [0,1]."""
        x = images.clone().detach()
        x_adv = self._init(x).detach()
        ones = None  # d(sum_b L_b)/dL = 1: seeding the backward with it spares a sum and its backward per step
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                per_sample = self.loss_fn(x_adv)
                if ones is None or ones.shape != per_sample.shape:
                    ones = torch.ones_like(per_sample)
                (grad,) = torch.autograd.grad(per_sample, x_adv, grad_outputs=ones)
            with torch.no_grad():
                if self.norm == "Linf":  # one fused op; alpha * (+-1) is exact, so bitwise torchattacks' step
                    x_adv = torch.add(x_adv, grad.sign(), alpha=self.alpha)
                else:
                    x_adv = x_adv + self.alpha * grad / (_per_sample_l2(grad) + 1e-12)
                # torchattacks' projection, op for op: keeps the iterates bitwise equal to its PGD.
                x_adv = project(x_adv, x, eps=self.eps, norm=self.norm)
        if self.steps == 0:  # the start itself (the gaussian one is not clamped) must be in the ball too
            x_adv = project(x_adv, x, eps=self.eps, norm=self.norm)
        return x_adv.detach()
