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


@pytest.mark.parametrize(
    "argv,message",
    [
        (["distill"], "the following arguments are required: config (see `robustbench-kd distill --help`)"),
        (["evaluate", "x.pt", "--n-examples", "ten"], "argument --n-examples: invalid int value: 'ten'"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
        (["quickstart", "--epochs"], "argument --epochs: expected one argument"),
        (["methods", "--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_argparse_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("robustbench-kd: error: ") and message in err and err.count("\n") == 1
    assert "usage:" not in err


def test_help_is_argparse_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: robustbench-kd evaluate [-h]") and "--n-examples N_EXAMPLES" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["evaluate", "x.pt", "--n-examples", "-5"], "--n-examples must be >= 1, got -5"),
        (["evaluate", "x.pt", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["evaluate", "x.pt", "--pgd-steps", "0"], "--pgd-steps must be >= 1, got 0"),
        (["evaluate", "x.pt", "--seed", str(2**32)], "--seed must be an integer in [0, 4294967295]"),
        (["evaluate", "x.pt", "--eps", "nan"], "--eps must be a number or a fraction like '8/255', got 'nan'"),
        (["evaluate", "x.pt", "--eps", "1e999"], "--eps must be a finite number, got '1e999'"),
        (["evaluate", "x.pt", "--number-forward-passes", "0"], "--number-forward-passes must be >= 1, got 0"),
        (["evaluate", "x.pt", "--shard", "0/" + "9" * 20], "--shard's N (the number of shards) must be <="),
        (["evaluate", "x.pt", "--out", ""], "--out is empty; give a directory to write into"),
        (["evaluate", "x.pt", "--data-dir", "a\x07b"], "--data-dir 'a\\x07b' contains the control character U+0007"),
        (["evaluate", "x.pt", "--aa-state", " "], "--aa-state is empty"),
        (["quickstart", "--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["quickstart", "--seed", "-1"], "--seed must be an integer in [0, 4294967295]"),
        (["quickstart", "--out", " "], "--out is empty"),
        (["report", "runs/a", "--out", ""], "--out is empty"),
        (["merge-shards", "shards/a", "--out", "x\ty"], "contains the control character U+0009"),
    ],
)
def test_command_line_numbers_and_directories_are_checked_first(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
