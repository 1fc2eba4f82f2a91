"""Every example run file parses against the current config schema (the README points users at them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustbench_kd.config import config_from_mapping, load_file

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_parses(path):
    config = config_from_mapping(load_file(path))
    assert config.method_name
