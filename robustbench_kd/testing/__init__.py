"""Helpers for tests and plugin authors that never touch the network.

* :mod:`.contract`: :func:`check_distiller`, the contract every method must satisfy;
* :mod:`.stubs`: stub networks, hand-computed reference maths and batch contexts for exact loss tests;
* :mod:`.runs`: tiny whole-run configurations on the embedded digits;
* :mod:`.fixtures`: tiny CIFAR files and random zoo checkpoints in the real on-disk layouts.
"""

from robustbench_kd.testing.contract import TinyNet, check_distiller, contract_batch
from robustbench_kd.testing.stubs import Affine, batch_context, cross_entropy, kl, log_softmax, softmax

__all__ = ["Affine", "TinyNet", "batch_context", "check_distiller", "contract_batch", "cross_entropy", "kl",
           "log_softmax", "softmax"]
