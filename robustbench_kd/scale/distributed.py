"""Multi-process training under ``torchrun`` (DistributedDataParallel): the trainer's backend seam.

``torchrun --nproc_per_node=N -m robustbench_kd.cli distill RUN.toml`` starts N processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Without those variables (or with ``WORLD_SIZE=1``)
every function here is a no-op and training is the single-process loop, unchanged.

What a distributed run does, and why:

* **One global batch, sliced.** Every process builds the same (seed, epoch) permutation and the same
  augmentation of each *global* batch of ``data.batch_size`` samples and keeps its contiguous slice
  (:func:`shard_batches`); ``data.batch_size`` must be divisible by the number of processes. N processes
  with B/N samples each therefore see exactly the samples one process with B sees, per step.
* **DDP only for the outer step.** The attack and the methods' ``prepare`` call the student many times
  per step with input gradients only; they run on the unwrapped network, so no DDP forward bookkeeping
  or buffer broadcast happens inside the inner maximisation and nothing can start a gradient
  all-reduce there. The method's ``loss`` runs through the DDP wrapper, whose backward averages the
  parameter gradients (a mean of equal-sized slice means is the global-batch mean).
  Extra trainable parameters of a method (outside the student) are averaged by :func:`average_gradients`.
* **BatchNorm.** Plain BN normalises each slice with its own statistics, so results differ from one
  process; ``run.sync_bn = true`` synchronises them (:mod:`robustbench_kd.scale.sync_bn`) and makes a DDP run
  match a single-process run with the same global batch up to float rounding.
* **Randomness.** The attack's random start comes from the global torch RNG, seeded per (seed, epoch,
  rank): rank 0 draws what a single process draws for its slice, the others draw independent noise.
  A DDP run therefore equals a single-process run only where the computation does not depend on that
  noise (e.g. ``init = "none"``); its statistics are the same.
* **Method state.** A method declares ``Distiller.supports_distributed``; state that depends on all the
  samples of a step is kept identical on every process by all-reduces in the method (MTARD's loss values,
  IKL class priors), and methods that cannot be kept consistent (GACD's memory bank) are refused.
* **Rank 0 writes.** Logs, progress bars, checkpoints (the unwrapped student: they resume in one process
  and vice versa), ``metrics.jsonl``, per-epoch validation and the final evaluation happen on rank 0;
  the other processes wait at barriers.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from robustbench_kd.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environ() -> DistEnv:
    """The process's place from torchrun's variables; single-process when they are absent."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set them with torchrun)") from None
    return DistEnv(rank, world, local) if world > 1 else DistEnv()


def is_main() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return from_environ().is_main


def process_device(device: torch.device, env: DistEnv) -> torch.device:
    """This process's device for the run's ``device`` (``run.device`` resolved): ``cuda:LOCAL_RANK`` for a CUDA
    run under torchrun, ``device`` itself otherwise."""
    if not env.enabled or device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(
            f"run.device = {str(device)!r} names one GPU, but under torchrun each process uses "
            'cuda:LOCAL_RANK; set run.device = "cuda" (or "auto") and choose GPUs with '
            "CUDA_VISIBLE_DEVICES"
        )
    if env.local_rank >= torch.cuda.device_count():
        raise UserError(
            f"LOCAL_RANK {env.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
            "start at most that many processes per node"
        )
    return torch.device("cuda", env.local_rank)


def check_batch_size(batch_size: int, env: DistEnv) -> None:
    """The global batch must split evenly over the processes."""
    if env.enabled and batch_size % env.world_size:
        raise UserError(
            f"data.batch_size = {batch_size} is the global batch and must be divisible by the "
            f"{env.world_size} processes (torchrun --nproc_per_node); use e.g. "
            f"{max(env.world_size, batch_size - batch_size % env.world_size)}"
        )


def init_process_group(env: DistEnv, device: torch.device) -> None:
    """Join torchrun's process group (nccl on CUDA, gloo otherwise); no-op for one process."""
    if not env.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, **options)
    log.info("process %d of %d joined the %s process group on %s", env.rank, env.world_size, backend, device)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (no-op for one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def quiet_other_ranks() -> None:
    """Only rank 0 logs below WARNING: N processes would repeat every line N times."""
    if not from_environ().is_main:
        logging.getLogger().setLevel(logging.WARNING)


# -- the student -----------------------------------------------------------------------------------
def prepare_student(student: nn.Module, device: torch.device, *, sync_bn: bool) -> nn.Module:
    """Synchronise BatchNorm when asked (before the optimiser is built); return the network to train."""
    env = from_environ()
    if not env.enabled or not sync_bn:
        return student
    from robustbench_kd.scale import sync_bn as sync

    return sync.convert(student, device)


def wrap(student: nn.Module, device: torch.device, *, sync_bn: bool) -> nn.Module | None:
    """The DDP wrapper for the outer loss, or None for one process.

    Buffers (BN running statistics) are broadcast from rank 0 at every wrapper forward unless BatchNorm
    is synchronised, in which case they are identical on every process already.
    """
    env = from_environ()
    if not env.enabled:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Newer torch renames broadcast_buffers (same meaning for what we need: sync at every forward or not).
    params = inspect.signature(DistributedDataParallel).parameters
    sync_key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    options: dict[str, Any] = {sync_key: not sync_bn}
    return DistributedDataParallel(student, device_ids=ids, **options)


# -- data ------------------------------------------------------------------------------------------
def drop_last(n: int, batch_size: int, world_size: int) -> bool:
    """Whether to drop the final partial global batch of an epoch.

    It is dropped when it cannot be split evenly over the processes, and when it would give each process
    a single sample (a one-sample train-mode BatchNorm batch); for one process that is the old rule
    "drop a final batch of one".
    """
    rest = n % batch_size
    return rest != 0 and (rest % world_size != 0 or rest // world_size == 1)


def check_extra_split(real: int, extra: int, env: DistEnv) -> None:
    """With extra data, the real and the extra images of a global batch must each split evenly over the processes."""
    if env.enabled and (real % env.world_size or extra % env.world_size):
        raise UserError(
            f"data.batch_size and data.extra_fraction give {real} real + {extra} extra images per global "
            f"batch; under torchrun each count must be divisible by the {env.world_size} processes "
            "(torchrun --nproc_per_node): change data.batch_size or data.extra_fraction"
        )


def shard_batches(
    batches: Iterable[tuple[Tensor, Tensor, Tensor]], device: torch.device, *, extra: int = 0
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """This process's share of every global ``(x, y, index)`` batch, moved to ``device``.

    A global batch is ``[real | extra]`` with ``extra`` trailing extra-data samples (0 without extra
    data). Each process keeps its contiguous slice of the real part and its slice of the extra part, so
    every process trains on the configured mix (a plain contiguous slice would hand the first processes
    only real images and the last only extra ones: per-process BatchNorm statistics of different
    populations).
    """
    env = from_environ()
    for x, y, index in batches:
        if env.enabled:
            real = len(y) - extra
            r, e = real // env.world_size, extra // env.world_size
            if extra:
                keep = torch.cat(
                    [
                        torch.arange(env.rank * r, (env.rank + 1) * r),
                        torch.arange(real + env.rank * e, real + (env.rank + 1) * e),
                    ]
                )
                x, y, index = x[keep], y[keep], index[keep]
            else:
                part = slice(env.rank * r, (env.rank + 1) * r)
                x, y, index = x[part], y[part], index[part]
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), index


def rank_seed(seed: int) -> int:
    """The seed of this process's global torch RNG: ``seed`` on rank 0, independent streams elsewhere."""
    rank = from_environ().rank
    return (seed + 1_000_033 * rank) % (2**63 - 1)


# -- collectives used by the trainer and by methods -------------------------------------------------
def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the processes in place (no-op for one process); returns it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over the processes (a new tensor; ``tensor`` itself for one process)."""
    if not _active():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of parameters DDP does not manage (a method's own heads) over the processes."""
    if not _active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def reduce_epoch_sums(sums: dict[str, Any], seen: int) -> tuple[dict[str, Any], int]:
    """Sum the per-process epoch sums of the logged terms (one collective per epoch)."""
    if not _active() or not sums:
        return sums, seen
    keys = sorted(sums)
    device = next((v.device for v in sums.values() if isinstance(v, Tensor)), torch.device("cpu"))
    values = torch.stack(
        [torch.as_tensor(sums[k], dtype=torch.float64, device=device).reshape(()) for k in keys]
        + [torch.tensor(float(seen), dtype=torch.float64, device=device)]
    )
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: values[i] for i, k in enumerate(keys)}, int(values[-1].item())


def check_method(distiller: Any, env: DistEnv) -> None:
    """Refuse, with a one-line UserError, a method that cannot train on per-process batch slices."""
    if env.enabled:
        distiller.check_distributed(env.world_size)
