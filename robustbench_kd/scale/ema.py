"""Exponential moving average (EMA) of the student's weights, configured by ``[ema]``.

Semantics follow timm's ``ModelEmaV2/V3`` and ``torch.optim.swa_utils.AveragedModel`` with an EMA
``multi_avg_fn``: a frozen copy of the student, updated after optimiser steps by ::

    ema_p <- d * ema_p + (1 - d) * p          for every floating-point parameter
    ema_b <- b                                for every buffer (BatchNorm running mean/var, counters)

with ``d = decay`` or, with ``warmup``, ``d = min(decay, (1 + n) / (10 + n))`` at the n-th update (n = 1,
2, ...; TensorFlow's ``ExponentialMovingAverage(num_updates=n)``), so early averages are not dominated by
the random initialisation.

BatchNorm statistics: copied from the student at every update, as ``AveragedModel(use_buffers=False)``
users do before ``update_bn`` and as timm's ``exclude_buffers`` option does. They are the statistics of
the *raw* student's recent activations, not re-estimated for the averaged weights; with a decay near 1 and a
slowly moving student the two agree closely, and re-estimating would need an extra pass over the training
data (and a choice of clean or adversarial inputs) that no reference recipe fixes.

The copy is always in eval mode with parameters that never require grad; it is stored in every checkpoint
and restored exactly on resume.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from robustbench_kd.scale.sections import EmaSection


class StudentEMA:
    """The averaged copy of a student and its update rule.

    Args:
        student: the plain (un-compiled) student; copied now, so create this after loading initial weights.
        section: the run's ``[ema]`` section (``decay > 0``).
    """

    def __init__(self, student: nn.Module, section: EmaSection) -> None:
        self.section = section
        self.module = copy.deepcopy(student).eval()
        self.module.requires_grad_(False)
        self.updates = 0  #: updates applied so far (drives the warm-up rule)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        d = self.section.decay
        if self.section.warmup:
            n = self.updates + 1
            d = min(d, (1 + n) / (10 + n))
        return d

    def maybe_update(self, student: nn.Module, optimizer_steps: int) -> bool:
        """Update after the ``optimizer_steps``-th optimiser step if it is an ``every``-th one."""
        if optimizer_steps % self.section.every:
            return False
        self.update(student)
        return True

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student``'s current parameters; buffers copied."""
        d = self.current_decay()
        params = dict(student.named_parameters())
        averaged: list[torch.Tensor] = []
        current: list[torch.Tensor] = []
        for name, ema_p in self.module.named_parameters():
            p = params[name].detach()
            if ema_p.is_floating_point():
                averaged.append(ema_p)
                current.append(p.to(ema_p.dtype))
            else:
                ema_p.copy_(p)
        if averaged:  # ema <- d * ema + (1 - d) * p, as two fused launches over all parameters
            torch._foreach_mul_(averaged, d)
            torch._foreach_add_(averaged, current, alpha=1.0 - d)
        buffers = dict(student.named_buffers())
        for name, ema_b in self.module.named_buffers():
            ema_b.copy_(buffers[name])
        self.updates += 1

    # -- checkpoint state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint: the averaged weights (CPU) and the update count."""
        return {
            "module": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
