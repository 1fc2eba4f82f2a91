"""The method plugin shown in the README runs as written: it passes the contract and its options are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustbench_kd.errors import UserError
from robustbench_kd.testing import check_distiller

README = Path(__file__).resolve().parents[1] / "README.md"


def _plugin_example() -> dict:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Writing a method plugin")
    block = text.index("```python\n", start) + len("```python\n")
    namespace: dict = {}
    exec(compile(text[block : text.index("```", block)], "README.md", "exec"), namespace)
    return namespace


def test_readme_plugin_example_passes_the_contract():
    check_distiller(_plugin_example()["MyKD"])


def test_readme_plugin_example_checks_its_declared_option_range():
    with pytest.raises(UserError, match=r"method\.beta must be >= 0, got -1"):
        _plugin_example()["MyKD"].Config(beta=-1)
