"""An epoch's batches: the data order, the extra-data mix, this process's share, and where a resume starts.

Everything random in epoch k derives from ``(run.seed, k)`` alone, one stream per use, so a resumed run
draws what an uninterrupted one draws:

* stream 1: the order of the training set and its augmentation (:func:`~robustbench_kd.data.datasets.iterate_batches`);
* stream 2: the seed of the global torch RNG, which the attacks' random starts draw from
  (:func:`seed_attack_rng`; under torchrun each process gets its own, rank 0's being a single run's);
* stream 3: which extra images join each batch and their augmentation (:func:`~robustbench_kd.data.extra.mix_extra`).

:class:`EpochBatches` yields the epoch's batches in order, as :class:`Batch` records. Every process builds
the same global batches and keeps its slice of the real and of the extra images
(:func:`~robustbench_kd.scale.distributed.shard_batches`). Resumed from a step checkpoint, the batches
finished before it are still drawn (so the generators stay in step) but not yielded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from robustbench_kd.data.datasets import epoch_generator, iterate_batches, num_batches
from robustbench_kd.data.extra import batch_split, mix_extra
from robustbench_kd.errors import UserError
from robustbench_kd.scale import distributed
from robustbench_kd.training.checkpoints import restore_rng
from robustbench_kd.training.setup import Run, drop_last_batch


@dataclass(frozen=True)
class Batch:
    """One batch of an epoch, on the training device (``index`` stays on the CPU)."""

    step: int  #: 0-based position in the epoch
    x: Tensor
    y: Tensor
    index: Tensor


def seed_attack_rng(run: Run, epoch: int, position: dict[str, Any] | None) -> None:
    """Seed the global torch RNG for ``epoch`` (stream 2); a step checkpoint's saved state replaces it."""
    torch.manual_seed(distributed.rank_seed(epoch_generator(run.config.run.seed, epoch, stream=2).initial_seed()))
    if position is not None:  # continue the attack noise where the step checkpoint stopped
        restore_rng(run, position["rng"])


class EpochBatches:
    """The batches of ``epoch`` from ``first_step`` on (0, or where a step checkpoint stopped).

    Attributes:
        total: batches in the whole epoch.
        first_step: the first batch yielded.
    """

    def __init__(self, run: Run, epoch: int, position: dict[str, Any] | None = None) -> None:
        cfg, data = run.config, run.data
        self._real, self._extra = batch_split(cfg.data.batch_size, cfg.data.extra_fraction)
        self._run, self._epoch = run, epoch
        self._drop_last = drop_last_batch(cfg, data)
        self.total = num_batches(len(data.train_y), self._real, self._drop_last)
        self.first_step = 0
        if position is not None:
            if position["batches"] != self.total:
                raise UserError(
                    f"cannot resume mid-epoch: the step checkpoint was written with "
                    f"{position['batches']} batches per epoch, the config gives {self.total}; keep "
                    "data.batch_size and data.n_train"
                )
            self.first_step = int(position["step"])

    def __len__(self) -> int:
        return self.total - self.first_step

    def __iter__(self) -> Iterator[Batch]:
        cfg, data, epoch = self._run.config, self._run.data, self._epoch
        augment = data.augment_default if cfg.data.augment is None else cfg.data.augment
        batches = iterate_batches(
            data.train_x,
            data.train_y,
            batch_size=self._real,
            shuffle=True,
            generator=epoch_generator(cfg.run.seed, epoch, stream=1),
            augment=augment,
            device="cpu",
            drop_last=self._drop_last,
        )
        if self._extra:  # data.extra_fraction of every batch from the memory-mapped extra file
            batches = mix_extra(
                batches,
                data.extra,
                count=self._extra,
                offset=len(data.train_y),
                generator=epoch_generator(cfg.run.seed, epoch, stream=3),
                augment=augment,
            )
        batches = _skip(batches, self.first_step)
        # This process's share of each global batch, moved to the device (one process: just the move).
        shares = distributed.shard_batches(batches, self._run.device, extra=self._extra)
        for step, (x, y, index) in enumerate(shares, start=self.first_step):
            yield Batch(step, x, y, index)


def _skip(batches: Iterator[tuple[Tensor, Tensor, Tensor]], count: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``batches`` without its first ``count``, which are drawn all the same (the generators stay in step)."""
    for i, batch in enumerate(batches):
        if i >= count:
            yield batch
