"""A retired registry name (``gacd-aft``) fails with one line naming its replacement."""

from __future__ import annotations

import textwrap

import pytest

from robustbench_kd.cli import main
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.registry import RETIRED, Registry


def test_a_retired_name_gives_its_advice() -> None:
    registry = Registry("method")
    with pytest.raises(UserError) as info:
        registry.get("gacd-aft")
    message = str(info.value)
    assert message.startswith("method 'gacd-aft' was removed: ") and "\n" not in message
    assert 'name = "pgd-at"' in message and "init_from" in message
    assert "gacd-aft" not in Registry("teacher source")._entries
    with pytest.raises(UserError, match="unknown teacher source 'gacd-aft'"):
        Registry("teacher source").get("gacd-aft")  # the table is per kind


def test_retired_names_are_not_registered() -> None:
    methods = PluginHost.create(autoload=False).methods
    assert all(name not in methods for name in RETIRED["method"])
    assert {"gacd", "gacd-linear", "adaad", "adaiad", "pgd-at"} <= set(methods.names())


def _run_file(tmp_path, method: str) -> str:
    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(f"""
        [run]
        out_dir = "{tmp_path / "run"}"
        progress = false
        [data]
        n_train = 200
        [method]
        {method}
        [optim]
        epochs = 1
    """)
    )
    return str(config)


@pytest.mark.parametrize(
    "argv_of,message",
    [
        (
            lambda tmp: ["methods", "--options", "gacd-aft"],
            "method 'gacd-aft' was removed: GACD's adversarial fine-tuning",
        ),
        (lambda tmp: ["distill", _run_file(tmp, 'name = "gacd-aft"')], 'name = "pgd-at" with [student] init_from'),
    ],
)
def test_cli_exit_code_and_one_line(tmp_path, capsys, argv_of, message) -> None:
    assert main(argv_of(tmp_path)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
