"""The command line: fast --help/methods, one-line errors, distill end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from robustbench_kd.cli import main

HEAVY = ("robustbench", "timm", "sklearn")


@pytest.mark.parametrize("argv", [["--help"], ["methods"], ["distill", "--help"], ["evaluate", "--help"]])
def test_help_and_methods_do_not_import_heavy_packages(argv):
    code = textwrap.dedent(f"""
        import sys
        from robustbench_kd.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        print("HEAVY=" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "HEAVY="


def test_methods_lists_every_method_with_distribution_and_paper(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("standard", "pgd-at", "trades", "kd", "ard", "rslad", "akd"):
        assert f"\n{name} " in out
    assert "robustbench_kd" in out and "Madry" in out and "ICCV 2021" in out


def test_methods_options(capsys):
    assert main(["methods", "--options", "rslad"]) == 0
    assert "method.adv_weight" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["distill", "missing.toml"], "config file missing.toml does not exist"),
        (["methods", "--options", "rslda"], "unknown method 'rslda' (did you mean: rslad"),
        (["evaluate", "file:nope.pt", "--dataset", "digits"], "checkpoint nope.pt does not exist"),
        (["evaluate", "file:nope.pt", "--eps", "8"], "write it as a fraction of 255"),
    ],
)
def test_user_errors_are_one_line_without_traceback(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_distill_end_to_end_on_digits(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(f"""
        [run]
        name = "CliTest_SmallCNN"
        out_dir = "{tmp_path / "run"}"
        progress = false
        [data]
        n_train = 200
        [threat]
        steps = 2
        alpha = 0.1
        [method]
        name = "trades"
        [optim]
        epochs = 1
        [eval]
        attacks = ["clean", "fgsm", "pgd", "cw", "autoattack-quick"]
        final_n_examples = 32
        pgd_steps = 3
    """)
    )
    assert main(["distill", str(config), "--set", "optim.lr=0.02"]) == 0
    out = capsys.readouterr().out
    assert "PGD-3 (step 0.05)" in out and "CW-3" in out and "FGSM" in out
    results = json.loads((tmp_path / "run" / "results" / "CliTest_SmallCNN.json").read_text())
    assert results["n_examples"] == 32
    # No standard AutoAttack -> no leaderboard entry, but the zoo-layout checkpoint is written.
    assert not (tmp_path / "run" / "model_info").exists()
    assert (tmp_path / "run" / "models" / "digits" / "Linf" / "CliTest_SmallCNN.pt").is_file()
