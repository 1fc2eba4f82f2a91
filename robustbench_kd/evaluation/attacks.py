"""White-box evaluation attacks: FGSM, PGD (cross-entropy) and CW-inf (PGD on the CW margin).

All attacks take a model that maps [0,1] inputs to logits and return adversarial inputs that lie in
the eps-ball around ``x`` (L_inf or L2) and in [0,1]. They differentiate the loss with respect to the
input only (``torch.autograd.grad``), so nothing is accumulated into the model's ``.grad`` buffers,
and they leave the model's train/eval mode alone: evaluate in eval mode (``evaluate_model`` does).

PGD follows ``torchattacks.PGD`` / ``torchattacks.PGDL2`` step for step (same random start, same
draws from the global RNG, same update, projection and clamping), so under the same seed it
produces the same iterates. The only difference is that the loss is summed over the batch instead of
averaged: sign steps (L_inf) and per-example normalised steps (L2) are invariant to that positive
scale, and the sum keeps per-example gradients from underflowing in large batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_kd.errors import UserError
from robustbench_kd.threat import NORMS, validate_eps

__all__ = ["ATTACK_LOSSES", "check_inputs", "cw_margin_loss", "fgsm", "pgd"]

ATTACK_LOSSES = ("ce", "cw")

# torchattacks.PGDL2 adds this to gradient norms before dividing; kept identical so iterates match.
_L2_DIVISION_EPS = 1e-10


def cw_margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Per-example CW margin ``max_{j != y} z_j - z_y`` (positive exactly when misclassified)."""
    true_logit = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    # Mask the true class with -inf so it cannot win the max over the other classes.
    others = logits.scatter(1, y.unsqueeze(1), float("-inf"))
    return others.amax(dim=1) - true_logit


def check_inputs(x: Tensor, y: Tensor) -> None:
    """Raise UserError unless ``x`` is a non-empty float batch in [0,1] and ``y`` matching int labels.

    The [0,1] check catches the commonest evaluation mistake: feeding normalised images to a model
    that (like every RobustBench model) normalises inside ``forward``; eps would then be measured in
    the wrong units.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise UserError("x and y must be torch tensors")
    if x.ndim < 2 or x.shape[0] == 0:
        raise UserError(f"x must be a non-empty batch [N, ...], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise UserError(f"x must be a floating-point tensor in [0,1], got dtype {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UserError(
            f"y must be a 1-D label tensor with one label per input ({x.shape[0]}), got shape {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise UserError(f"y must hold integer class labels, got dtype {y.dtype}")
    lo, hi = x.min().item(), x.max().item()
    if not (0.0 <= lo and hi <= 1.0):  # also false for NaN
        raise UserError(
            f"inputs must lie in [0,1] (got min {lo:.4g}, max {hi:.4g}); pass unnormalised images "
            "and normalise inside the model's forward, as RobustBench models do"
        )


def _summed_loss(logits: Tensor, y: Tensor, loss: str) -> Tensor:
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    return cw_margin_loss(logits, y).sum()


def _input_gradient(model: nn.Module, x_adv: Tensor, y: Tensor, loss: str) -> Tensor:
    y = y.long()  # cross_entropy and gather need int64 class indices
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        value = _summed_loss(model(x_adv), y, loss)
        (grad,) = torch.autograd.grad(value, x_adv)
    return grad


def _per_example_l2(t: Tensor) -> Tensor:
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.ndim - 1)))


def _check(norm: str, eps: float, loss: str = "ce") -> None:
    if norm not in NORMS:
        raise UserError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    validate_eps(eps, norm, what="eps")
    if loss not in ATTACK_LOSSES:
        raise UserError(f"loss must be one of {', '.join(ATTACK_LOSSES)}, got {loss!r}")


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str) -> Tensor:
    """One full-size gradient step on the cross-entropy, without random start.

    L_inf: ``x + eps * sign(grad)`` (identical to ``torchattacks.FGSM``); L2: ``x + eps * grad /
    ||grad||_2`` per example. The result is clamped to [0,1] and detached.
    """
    _check(norm, eps)
    x = x.detach()
    if eps == 0:
        return x.clone()
    grad = _input_gradient(model, x, y, "ce")
    if norm == "Linf":
        x_adv = x + eps * grad.sign()
    else:
        x_adv = x + eps * grad / (_per_example_l2(grad) + _L2_DIVISION_EPS)
    return x_adv.clamp(0.0, 1.0).detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    random_start: bool = True,
    loss: str = "ce",
) -> Tensor:
    """Projected gradient ascent on ``loss`` ("ce": cross-entropy; "cw": CW margin) for ``steps`` steps.

    L_inf: random start ``U(-eps, eps)``, steps ``alpha * sign(grad)``. L2: random start in the ball as
    in ``torchattacks.PGDL2`` (Gaussian direction, radius ``eps * U(0,1)``), steps ``alpha * grad /
    ||grad||_2``. After the start and after every step the iterate is projected onto the eps-ball and
    clamped to [0,1]. Returns the final iterate (no best-loss tracking), detached. Random draws come
    from the global torch RNG, so seed it for reproducible numbers.
    """
    _check(norm, eps, loss)
    if steps < 0:
        raise UserError(f"PGD steps must be >= 0, got {steps}")
    if steps > 0 and not alpha > 0:
        raise UserError(f"PGD step size alpha must be positive, got {alpha}")
    x = x.detach()
    if eps == 0:
        return x.clone()

    x_adv = x.clone()
    if random_start:
        if norm == "Linf":
            x_adv = x_adv + torch.empty_like(x_adv).uniform_(-eps, eps)
        else:
            direction = torch.empty_like(x_adv).normal_()
            length = _per_example_l2(direction)
            radius = torch.zeros_like(length).uniform_(0, 1)
            x_adv = x_adv + direction * (radius / length * eps)
        x_adv = x_adv.clamp(0.0, 1.0).detach()

    for _ in range(steps):
        grad = _input_gradient(model, x_adv, y, loss)
        if norm == "Linf":
            x_adv = x_adv + alpha * grad.sign()
            delta = (x_adv - x).clamp(-eps, eps)
        else:
            x_adv = x_adv + alpha * grad / (_per_example_l2(grad) + _L2_DIVISION_EPS)
            delta = x_adv - x
            # min(eps / ||delta||, 1): a zero delta gives inf -> 1, never NaN (eps > 0 here).
            delta = delta * (eps / _per_example_l2(delta)).clamp(max=1.0)
        x_adv = (x + delta).clamp(0.0, 1.0).detach()
    return x_adv
