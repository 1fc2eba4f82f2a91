"""Helpers for tests and plugin authors that never touch the network (see :mod:`robustbench_kd.testing.fixtures`)."""
