"""Stop training on a non-finite loss or gradient, without a host sync every step.

Asking "is this loss NaN?" with ``.item()`` each step would stall the accelerator queue every batch.
:class:`FiniteGuard` instead keeps, *on the device*, the value each watched quantity (the total
loss, each logged term, the gradient norm) took at each step since the last check, and tests them
on the host only every ``every`` steps, at the end of every epoch and before every checkpoint write
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

from robustbench_kd.errors import UserError
from robustbench_kd.scale import distributed

#: host look-ups of the on-device flags: one every this many steps (plus epoch ends and checkpoints)
CHECK_EVERY = 20

GRAD_NORM = "grad_norm"


class FiniteGuard:
    """On-device record of the losses/gradient norms of recent steps, checked on the host at intervals.

    Each step costs one ``torch.stack`` of its (scalar) loss terms, plus the fused gradient norm;
    the finiteness test itself runs once per check, over all steps since the last one.

    Args:
        every: steps between host checks (>= 1); epoch ends and checkpoint writes always check.
    """

    def __init__(self, every: int = CHECK_EVERY) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._names: list[str] = []  # every name seen, in order of first appearance (the collective's layout)
        self._rows: list[tuple[int, tuple[str, ...], Tensor]] = []  # (global step, names, values) since the check
        self._where: dict[int, tuple[int, int]] = {}  # global step -> (epoch, step) since the last check
        self._pending = 0

    def _record(self, names: tuple[str, ...], values: list[Tensor], global_step: int) -> Tensor:
        for name in names:
            if name not in self._names:
                self._names.append(name)
        # A term that is not a scalar is summarised by its mean (non-finite iff an element is, barring
        # overflow, which the epoch's metrics would not survive either).
        row = torch.stack([v.detach().float() if v.ndim == 0 else v.detach().float().mean() for v in values])
        self._rows.append((global_step, names, row))
        return row

    def note_loss(
        self, total: Tensor, terms: Mapping[str, Tensor], *, epoch: int, step: int, global_step: int
    ) -> tuple[tuple[str, ...], Tensor]:
        """Record this step's loss and terms (0-based epoch/step; no host sync).

        Returns the names (``"loss"`` first, then the terms) and the recorded values, one scalar each:
        the trainer sums the same vector into the epoch's metrics instead of reducing every term again.
        """
        self._where[global_step] = (epoch, step)
        names = ("loss", *terms)
        row = self._record(names, [total, *terms.values()], global_step)
        self._pending += 1
        return names, row

    def note_gradients(self, params: Iterable[torch.nn.Parameter], *, global_step: int) -> None:
        """Record the gradient norm of ``params`` (one fused pass; no host sync)."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            # ||g|| = ||(||g_1||, ..., ||g_n||)||: torch's get_total_norm without its per-call grouping by
            # device and dtype (a model's gradients share both), which cost more than the norms themselves.
            if len({(g.device, g.dtype) for g in grads}) == 1:
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            else:
                norm = torch.nn.utils.get_total_norm(grads)
            self._record((GRAD_NORM,), [norm], global_step)

    def due(self) -> bool:
        """Whether ``every`` steps have passed since the last host check."""
        return self._pending >= self.every

    def _flags(self) -> Tensor:
        """Per name (``self._names`` order): 1 if it was non-finite at any recorded step, on the device."""
        groups: dict[tuple[str, ...], list[Tensor]] = {}
        for _, names, values in self._rows:
            groups.setdefault(names, []).append(values)
        device = self._rows[0][2].device if self._rows else torch.device("cpu")
        flags = torch.zeros(len(self._names), dtype=torch.int32, device=device)
        for names, rows in groups.items():
            bad = (~torch.stack(rows).isfinite()).any(dim=0).to(torch.int32)
            index = torch.tensor([self._names.index(n) for n in names], device=device)
            flags.index_add_(0, index, bad)
        return flags.clamp_(max=1)

    def _first_bad(self) -> tuple[int, list[str]]:
        """Host side, only once something was flagged: the first bad global step and what was bad there."""
        first, names_at = None, set()
        for step, names, values in self._rows:
            bad = [n for n, ok in zip(names, values.isfinite().tolist(), strict=True) if not ok]
            if bad and (first is None or step < first):
                first, names_at = step, set(bad)
            elif bad and step == first:
                names_at.update(bad)
        assert first is not None, "_first_bad is called only once a recorded value was non-finite"
        return first, [n for n in self._names if n in names_at]

    def check(self, last_good: Path | None = None, *, collective: bool = True) -> None:
        """Look at the record on the host (one sync); raise a UserError if anything was non-finite.

        With ``collective`` (the in-loop checks, made by every process at the same steps) the flags
        are summed over torchrun processes, so all of them stop together instead of leaving the
        others waiting in a collective; rank 0's checkpoint writes check locally.
        """
        self._pending = 0
        if not self._names:
            return
        bad_here = self._flags()
        anywhere = distributed.all_reduce_sum_(bad_here.clone()) if collective else bad_here
        if not bool(anywhere.any()):
            self._rows.clear()
            self._where.clear()
            return
        flagged = [n for n, flag in zip(self._names, anywhere.tolist(), strict=True) if flag]
        if bool(bad_here.any()):
            first, names = self._first_bad()
            # Name what went wrong at the first bad step; what followed from it (NaN weights make every
            # later term NaN) is listed apart, so the cause is not buried.
            at = self._where.get(first)  # (epoch, step)
            where = (
                f"epoch {at[0] + 1}, step {at[1] + 1} (global step {first + 1})"
                if at is not None
                else f"global step {first + 1}"
            )
        else:
            names, where = flagged, "another process"
        later = [n for n in flagged if n not in names]
        what = ", ".join(names) + (f" (later also {', '.join(later)})" if later else "")
        kept = (
            f"the last good checkpoint {last_good} is kept"
            if last_good is not None and last_good.is_file()
            else "no checkpoint was written"
        )
        raise UserError(
            f"training diverged at {where}: non-finite {what}; {kept}; lower optim.lr or check the method options"
        )


def check_finite_weights(state: Mapping[str, Tensor], *, epoch: int, last_good: Path | None) -> None:
    """Refuse to checkpoint weights holding NaN/inf (e.g. BN statistics that overflowed), whatever the loss said."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        kept = (
            f"the last good checkpoint {last_good} is kept"
            if last_good is not None and last_good.is_file()
            else "no checkpoint was written"
        )
        raise UserError(
            f"training diverged by epoch {epoch}: student weights {', '.join(bad[:3])} are non-finite; "
            f"{kept}; lower optim.lr or check the method options"
        )
