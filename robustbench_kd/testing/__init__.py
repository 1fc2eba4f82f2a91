"""Helpers for tests and plugin authors that never touch the network.

* :mod:`.contract`: :func:`check_distiller`, the contract every method must satisfy;
* :mod:`.stubs`: stub networks, hand-computed reference maths, batch contexts and attacked batches for exact
  loss tests;
* :mod:`.runs`: tiny whole-run configurations on the embedded digits (``tiny_digits_raw``,
  ``tiny_digits_config``, ``digits_load_context``);
* :mod:`.fixtures`: tiny CIFAR files and random zoo checkpoints in the real on-disk layouts.

The top layer beside the CLI: it may import anything in the library, and the library never imports it.
"""

from robustbench_kd.testing.contract import TinyNet, check_distiller, contract_batch
from robustbench_kd.testing.stubs import (
    Affine,
    assert_loss_trains_student,
    attacked_batch,
    batch_context,
    cross_entropy,
    kl,
    log_softmax,
    set_up,
    soft_cross_entropy,
    softmax,
    wmse,
)

__all__ = [
    "Affine",
    "TinyNet",
    "assert_loss_trains_student",
    "attacked_batch",
    "batch_context",
    "check_distiller",
    "contract_batch",
    "cross_entropy",
    "kl",
    "log_softmax",
    "set_up",
    "soft_cross_entropy",
    "softmax",
    "wmse",
]
