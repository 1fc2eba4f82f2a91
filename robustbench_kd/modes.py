"""Temporary network state: train/eval mode (without losing any submodule's own flag), parameter grads."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from .distiller import STUDENT_MODES


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
