"""Stub networks, hand-computed reference maths and batch contexts for testing a method's loss exactly.

A method's loss is tested against an independent computation on numbers small enough to follow by hand:
students and teachers are :class:`Affine` maps ``z = w * x + bias`` on 4-dimensional "images" (each input
coordinate is a logit), and :func:`softmax`, :func:`kl` and :func:`cross_entropy` recompute the formulas
in plain Python floats, never through the library's own loss functions::

    ctx = batch_context(x, y, student=Affine(3.0), teachers={"robust": Affine(4.0, bias)}, x_adv=x_adv)
    out = RSLAD().loss(ctx)
    expected = sum(kl(softmax(4 * x[b] + bias), softmax(3 * x_adv[b])) for b in ...) / len(x)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn

from robustbench_kd.context import BatchContext, SetupContext
from robustbench_kd.distiller import Distiller
from robustbench_kd.teachers import Teacher, TeacherSet
from robustbench_kd.threat import ThreatSpec

__all__ = ["Affine", "batch_context", "cross_entropy", "kl", "log_softmax", "set_up", "softmax"]


class Affine(nn.Module):
    """Stub network ``logits = w * x + bias`` with a trainable scalar ``w``.

    ``bias`` is a buffer (fixed), or a parameter with ``trainable_bias=True``. It records what it saw:
    ``calls`` (forward passes), ``inputs`` (detached copies of each input) and ``outputs`` (each output,
    attached to the graph).
    """

    def __init__(
        self,
        w: float = 3.0,
        bias: torch.Tensor | Sequence[float] | None = None,
        *,
        num_classes: int = 4,
        trainable_bias: bool = False,
    ) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w)))
        start = torch.zeros(num_classes) if bias is None else torch.as_tensor(bias, dtype=torch.float32).clone()
        if trainable_bias:
            self.bias = nn.Parameter(start)
        else:
            self.register_buffer("bias", start)
        self.calls = 0
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.inputs.append(x.detach().clone())
        out = self.w * x + self.bias
        self.outputs.append(out)
        return out


def batch_context(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    student: nn.Module,
    teachers: Mapping[str, nn.Module] = {},
    x_adv: torch.Tensor | None = None,
    threat: ThreatSpec | None = None,
    epoch: int = 0,
    num_epochs: int = 1,
    index: torch.Tensor | None = None,
) -> BatchContext:
    """A :class:`BatchContext` over copies of ``x``/``y`` with each teacher module wrapped as a frozen Teacher."""
    ctx = BatchContext(
        x=x.clone(),
        y=y.clone(),
        index=index,
        student=student,
        teachers=TeacherSet({role: Teacher(module) for role, module in teachers.items()}),
        threat=threat if threat is not None else ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10),
        epoch=epoch,
        num_epochs=num_epochs,
    )
    if x_adv is not None:
        ctx.x_adv = x_adv.clone()
    return ctx


def _row(values: Sequence[float] | torch.Tensor) -> list[float]:
    return values.double().tolist() if isinstance(values, torch.Tensor) else [float(v) for v in values]


def softmax(logits: Sequence[float] | torch.Tensor, tau: float = 1.0) -> list[float]:
    """softmax(z / tau) of one row, in float64 with the maximum subtracted."""
    row = _row(logits)
    top = max(row)
    e = [math.exp((v - top) / tau) for v in row]
    return [v / sum(e) for v in e]


def log_softmax(logits: Sequence[float] | torch.Tensor, tau: float = 1.0) -> list[float]:
    """log softmax(z / tau) of one row."""
    row = [v / tau for v in _row(logits)]
    top = max(row)
    log_total = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - log_total for v in row]


def kl(p: Sequence[float], q: Sequence[float]) -> float:
    """KL(p || q) = sum_k p_k (log p_k - log q_k), with 0 log 0 = 0."""
    return sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q, strict=True) if pk > 0)


def cross_entropy(logits: Sequence[float] | torch.Tensor, label: int) -> float:
    """-log softmax(z)_label of one row."""
    return -log_softmax(logits)[label]


def soft_cross_entropy(target: Sequence[float], logits: Sequence[float] | torch.Tensor, tau: float = 1.0) -> float:
    """-sum_k q_k log softmax(z / tau)_k of one row, for a soft target q."""
    return -sum(qk * lk for qk, lk in zip(target, log_softmax(logits, tau), strict=True))


def wmse(
    target_logits: Sequence[float] | torch.Tensor,
    learner_logits: Sequence[float] | torch.Tensor,
    weights: Sequence[float] | Sequence[Sequence[float]] | torch.Tensor,
) -> float:
    """IKL's weighted MSE of one row: (1/4) sum_{j,k} w_jk ((t_j - t_k) - (l_j - l_k))^2.

    ``weights`` is the C x C matrix w, or a vector s standing for the rank-one w = s s^T.
    """
    from typing import Any

    t, lr = _row(target_logits), _row(learner_logits)
    rows: list[Any] = weights.tolist() if isinstance(weights, torch.Tensor) else list(weights)
    if rows and isinstance(rows[0], (list, tuple)):
        w = [[float(v) for v in r] for r in rows]
    else:
        w = [[float(a) * float(b) for b in rows] for a in rows]
    c = len(t)
    return 0.25 * sum(w[j][k] * ((t[j] - t[k]) - (lr[j] - lr[k])) ** 2 for j in range(c) for k in range(c))


def attacked_batch(
    distiller: nn.Module,
    student: nn.Module,
    teachers: Mapping[str, nn.Module] = {},
    *,
    threat: ThreatSpec,
    batch: int = 4,
    num_classes: int = 10,
) -> BatchContext:
    """A random batch of 1x8x8 images (for ``TinyNet``) attacked as the trainer would: ``distiller.prepare``,
    then a :class:`~robustbench_kd.attacks.DistillationAttack` with the distiller's own spec and attack loss.

    ``teachers`` are already-built :class:`~robustbench_kd.teachers.Teacher` objects (or ensembles).
    """
    from typing import Any

    from robustbench_kd.attacks import DistillationAttack

    method: Any = distiller  # a Distiller
    ctx = BatchContext(
        x=torch.rand(batch, 1, 8, 8),
        y=torch.randint(0, num_classes, (batch,)),
        student=student,
        teachers=TeacherSet(dict(teachers)),
        threat=threat,
    )
    method.prepare(ctx)
    spec = method.attack_spec(threat)
    attack = DistillationAttack.from_spec(student, lambda xa: method.attack_loss(ctx, xa), spec)
    ctx.x_adv = attack(ctx.x, ctx.y)
    return ctx


def assert_loss_trains_student(distiller: nn.Module, ctx: BatchContext, frozen: Sequence[nn.Module] = ()) -> None:
    """The attacked batch stays in the eps-ball, the loss is a finite scalar, and its backward reaches every
    student parameter and no parameter of the ``frozen`` modules (teachers)."""
    assert (ctx.x_adv - ctx.x).abs().max() <= ctx.threat.eps + 1e-6
    from typing import Any

    method: Any = distiller  # a Distiller
    out = method.loss(ctx)
    assert torch.isfinite(out.total) and out.total.ndim == 0
    out.total.backward()
    assert all(p.grad is not None for p in ctx.student.parameters())
    assert all(p.grad is None for module in frozen for p in module.parameters())


DistillerT = TypeVar("DistillerT", bound=Distiller)


def set_up(distiller: DistillerT, ctx: BatchContext) -> DistillerT:
    """Call ``distiller.on_setup`` as the trainer does, with the context's student, teachers and input shape.

    For testing a method's loss outside the trainer. ``new_student()`` returns a copy of the context's
    student with its layers re-initialised. Returns the distiller, moved to the batch's device.
    """
    shape = tuple(ctx.x.shape[1:])
    in_channels = shape[0] if len(shape) == 3 else 1

    def fresh_student() -> nn.Module:
        net = copy.deepcopy(ctx.student)
        for module in net.modules():
            reset = getattr(module, "reset_parameters", None)
            if module is not net and callable(reset):
                reset()
        return net

    distiller.on_setup(
        SetupContext(
            student=ctx.student,
            teachers=ctx.teachers,
            num_classes=distiller.num_classes,
            in_channels=in_channels,
            image_size=shape[-1],
            device=ctx.x.device,
            student_factory=fresh_student,
        )
    )
    return distiller.to(ctx.x.device)
