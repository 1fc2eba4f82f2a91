"""BatchNorm whose training-mode statistics span every process of a distributed run (``run.sync_bn``).

With DistributedDataParallel each process sees only its slice of the global batch, so plain
BatchNorm normalises with per-slice statistics: the forward pass, the gradients and the running
statistics all differ from one process training on the whole batch. Synchronised BatchNorm computes
the mean and variance over the global batch instead.

``torch.nn.SyncBatchNorm`` does that on GPUs only (it refuses CPU tensors), so :func:`convert` uses it
on CUDA and, elsewhere (CPU with the gloo backend), :class:`GlobalBatchNormMixin`: the same
statistics from two differentiable all-reduces (sum and count, then the centred sum of squares;
two passes rather than ``E[x^2] - E[x]^2`` for accuracy). The backward of each all-reduce sums the
incoming gradients over processes, which is what makes the per-process gradients add up to the
single-process gradient of the global batch.

Both keep the parameter and buffer names of the original layers, so checkpoints load into a plain
(unsynchronised) network and back. Outside training mode, or without an initialised process group
of more than one process, both behave exactly like ``nn.BatchNorm*d``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the incoming gradients over processes too.

    (``torch.distributed.nn.functional.all_reduce`` does the same but is deprecated.)
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def differentiable_all_reduce(tensor: Tensor) -> Tensor:
    """``sum_over_processes(tensor)``, differentiable (see :class:`_AllReduceSum`)."""
    return _AllReduceSum.apply(tensor)


class GlobalBatchNormMixin:
    """Training-mode BatchNorm over the whole distributed batch; mixed into a ``nn.BatchNorm*d`` class."""

    def forward(self, input: Tensor) -> Tensor:
        bn = cast(nn.modules.batchnorm._BatchNorm, self)  # mixed into a BatchNorm: all attributes are its
        if not (bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)  # type: ignore[misc]
        bn._check_input_dim(input)
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            # momentum None means a cumulative moving average, as in nn.BatchNorm.
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        local_count = input.new_tensor([input.numel() / input.shape[1]])
        totals = differentiable_all_reduce(torch.cat([input.sum(dims), local_count]))
        count = totals[-1].detach()
        mean = totals[:-1] / count
        centred = input - mean.view(shape)
        var = differentiable_all_reduce(centred.pow(2).sum(dims)) / count
        out = centred * torch.rsqrt(var + bn.eps).view(shape)
        if bn.affine:
            out = out * bn.weight.view(shape) + bn.bias.view(shape)
        running_mean, running_var = bn.running_mean, bn.running_var
        if bn.track_running_stats and running_mean is not None and running_var is not None:
            with torch.no_grad():
                unbiased = var.detach() * (count / (count - 1).clamp_min(1))
                running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out


_GLOBAL_CLASSES: dict[type, type] = {}


def _global_class(cls: type) -> type:
    # A subclass of the layer's own class: isinstance checks against nn.BatchNorm2d keep working.
    if cls not in _GLOBAL_CLASSES:
        _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (GlobalBatchNormMixin, cls), {})
    return _GLOBAL_CLASSES[cls]


def convert(module: nn.Module, device: torch.device) -> nn.Module:
    """Return ``module`` with every BatchNorm layer synchronised across the process group.

    CUDA: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (new layer objects sharing the same
    parameters). Other devices: each BatchNorm's class is switched in place to its
    :class:`GlobalBatchNormMixin` variant (same object, parameters and buffers).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for sub in module.modules():
        if isinstance(sub, _BN_TYPES) and not isinstance(sub, GlobalBatchNormMixin):
            sub.__class__ = _global_class(type(sub))
    return module
