"""Helpers for tests and plugin authors that never touch the network (see :mod:`robustbench_kd.testing.fixtures`)."""

from robustbench_kd.testing.contract import TinyNet, check_distiller, contract_batch

__all__ = ["TinyNet", "check_distiller", "contract_batch"]
