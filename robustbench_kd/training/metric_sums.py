"""The epoch's running metric sums, kept on the device with one multiply-add per step.

The trainer reports, per epoch, the batch-size-weighted mean of the loss and of every term a method
logs: ``metric = sum_steps B_s * value_s / sum_steps B_s``. The values of a step arrive as one vector
(:meth:`robustbench_kd.training.nan_guard.FiniteGuard.note_loss` stacks them anyway), so the running sum is one
vector per distinct list of names -- a method logs the same terms at every step, so usually one --
and a step costs one fused ``acc += B * values`` instead of a reduction and an addition per term.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


class MetricSums:
    """Batch-size-weighted running sums of named scalars, grouped by the list of names they came with."""

    def __init__(self, groups: Mapping[tuple[str, ...], Tensor] | None = None) -> None:
        self._groups: dict[tuple[str, ...], Tensor] = dict(groups or {})

    def add(self, names: tuple[str, ...], values: Tensor, batch: int) -> None:
        """``sums[names] += batch * values`` (``values``: one scalar per name, on the device)."""
        acc = self._groups.get(names)
        if acc is None:
            self._groups[names] = values * batch
        else:
            acc.add_(values, alpha=batch)

    def by_name(self) -> dict[str, Tensor]:
        """Each name's total over every group it appeared in (0-dim tensors)."""
        totals: dict[str, Tensor] = {}
        for names, acc in self._groups.items():
            for i, name in enumerate(names):
                totals[name] = acc[i] if name not in totals else totals[name] + acc[i]
        return totals

    def position_entries(self) -> dict[str, Any]:
        """What a step checkpoint stores: the groups as they are (an exact resume continues them) and,
        for readers, the totals by name."""
        return {
            "sums": {k: v.detach().clone() for k, v in self.by_name().items()},
            "sum_groups": [(list(names), acc.detach().clone()) for names, acc in self._groups.items()],
        }

    @classmethod
    def from_position(cls, position: Mapping[str, Any]) -> MetricSums:
        """Restore from :meth:`position_entries`; a step checkpoint with only ``"sums"`` becomes one group."""
        if "sum_groups" in position:
            return cls({tuple(names): acc.clone() for names, acc in position["sum_groups"]})
        legacy = dict(position.get("sums", {}))
        if not legacy:
            return cls()
        return cls({tuple(legacy): torch.stack([torch.as_tensor(v).float().reshape(()) for v in legacy.values()])})
