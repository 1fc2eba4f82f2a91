"""Stop training on a non-finite loss or gradient, without a host sync every step.

Asking "is this loss NaN?" with ``.item()`` each step would stall the accelerator queue every batch.
:class:`FiniteGuard` instead keeps, *on the device*, the first global step at which each watched
quantity (the total loss, each logged term, the gradient norm) was non-finite, and looks at it on
the host only every ``every`` steps, at the end of every epoch and before every checkpoint write
(:meth:`FiniteGuard.check`). So a divergence stops the run within ``every`` steps with a one-line
:class:`~robustbench_kd.errors.UserError` naming the epoch, the step and the quantities, and a
checkpoint never holds weights trained on a NaN: the last good one stays as it was.

The gradient norm is one fused pass over the gradients (``torch.nn.utils.get_total_norm``). It is
skipped under the fp16 GradScaler, whose scaled gradients overflow now and then by design (the
scaler skips those steps); a real divergence there still shows up in the loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from . import distributed
from .errors import UserError

#: host look-ups of the on-device flags: one every this many steps (plus epoch ends and checkpoints)
CHECK_EVERY = 20

GRAD_NORM = "grad_norm"


class FiniteGuard:
    """On-device record of non-finite losses/gradients, checked on the host at intervals.

    Args:
        every: steps between host checks (>= 1); epoch ends and checkpoint writes always check.
    """

    def __init__(self, every: int = CHECK_EVERY) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._names: list[str] = []
        self._first: Tensor | None = None  # per name: first bad global step, -1 while finite
        self._where: dict[int, tuple[int, int]] = {}  # global step -> (epoch, step) since the last check
        self._pending = 0

    def _record(self, names: list[str], values: list[Tensor], global_step: int) -> None:
        # A name seen for the first time (a method may log a term only in some epochs) gets its own slot.
        for name in names:
            if name not in self._names:
                self._names.append(name)
        device = values[0].device
        if self._first is None or len(self._first) < len(self._names) or self._first.device != device:
            old = self._first
            self._first = torch.full((len(self._names),), -1, dtype=torch.long, device=device)
            if old is not None:
                self._first[:len(old)] = old.to(device)
        index = torch.tensor([self._names.index(n) for n in names], device=device)
        bad = ~torch.stack([v.detach().isfinite().all() for v in values])
        current = self._first[index]
        # Keep the first bad step: only slots still at -1 take this step's number.
        self._first[index] = torch.where(bad & (current < 0), torch.full_like(current, global_step), current)

    def note_loss(self, total: Tensor, terms: Mapping[str, Tensor], *, epoch: int, step: int,
                  global_step: int) -> None:
        """Record this step's loss and terms (0-based epoch/step; no host sync)."""
        self._where[global_step] = (epoch, step)
        self._record(["loss", *terms], [total, *terms.values()], global_step)
        self._pending += 1

    def note_gradients(self, params: Iterable[torch.nn.Parameter], *, global_step: int) -> None:
        """Record whether the gradient norm of ``params`` is finite (one fused pass; no host sync)."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            self._record([GRAD_NORM], [torch.nn.utils.get_total_norm(grads)], global_step)

    def due(self) -> bool:
        """Whether ``every`` steps have passed since the last host check."""
        return self._pending >= self.every

    def check(self, last_good: Path | None = None, *, collective: bool = True) -> None:
        """Look at the record on the host (one sync); raise a UserError if anything was non-finite.

        With ``collective`` (the in-loop checks, made by every process at the same steps) the flags
        are summed over torchrun processes, so all of them stop together instead of leaving the
        others waiting in a collective; rank 0's checkpoint writes check locally.
        """
        self._pending = 0
        if self._first is None:
            return
        bad_here = self._first >= 0
        anywhere = bad_here.to(torch.int32)
        if collective:
            anywhere = distributed.all_reduce_sum_(anywhere)
        if not bool(anywhere.any()):
            self._where.clear()
            return
        flagged = [n for n, flag in zip(self._names, anywhere.tolist()) if flag]
        if bool(bad_here.any()):
            first = int(self._first[bad_here].min())
            # Name what went wrong at the first bad step; what followed from it (NaN weights make every
            # later term NaN) is listed apart, so the cause is not buried.
            names = [n for n, at in zip(self._names, self._first.tolist()) if at == first]
            epoch, step = self._where.get(first, (None, None))
            where = (f"epoch {epoch + 1}, step {step + 1} (global step {first + 1})" if epoch is not None
                     else f"global step {first + 1}")
        else:
            names, where = flagged, "another process"
        later = [n for n in flagged if n not in names]
        what = ", ".join(names) + (f" (later also {', '.join(later)})" if later else "")
        kept = (f"the last good checkpoint {last_good} is kept" if last_good is not None and last_good.is_file()
                else "no checkpoint was written")
        raise UserError(f"training diverged at {where}: non-finite {what}; {kept}; lower optim.lr "
                        "or check the method options")


def check_finite_weights(state: Mapping[str, Tensor], *, epoch: int, last_good: Path | None) -> None:
    """Refuse to checkpoint weights holding NaN/inf (e.g. BN statistics that overflowed), whatever the loss said."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        kept = (f"the last good checkpoint {last_good} is kept" if last_good is not None and last_good.is_file()
                else "no checkpoint was written")
        raise UserError(f"training diverged by epoch {epoch}: student weights {', '.join(bad[:3])} are non-finite; "
                        f"{kept}; lower optim.lr or check the method options")
