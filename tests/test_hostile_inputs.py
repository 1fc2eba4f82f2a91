"""Hostile-input catalogue, first round: run files, data, teachers, checkpoints, evaluate, plugins.

Every bad input is one actionable line, exit 2, no traceback, no output; the harness
(``hostile_harness.py``) builds each case in a sandbox and asserts the whole promise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_harness import Case, Sandbox, assert_keeps_the_promise, distill, evaluate, run_fresh, teacher, with_files

from robustbench_kd.cli import main
from robustbench_kd.errors import UserError


def _truncated_checkpoint(box: Sandbox) -> str:
    name = box.checkpoint("cut.pt")
    data = (box.root / name).read_bytes()
    return box.write("cut.pt", data[: len(data) // 2])


def _truncated_cifar(box: Sandbox) -> None:
    from robustbench_kd.testing.fixtures import make_tiny_cifar

    make_tiny_cifar(box.root / "cifar", n_train_per_batch=4, n_test=4)
    batch = box.root / "cifar" / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:200])


def _previous_run(box: Sandbox, method: str = "trades") -> None:
    """A last.pt as an earlier run with another method would have left it."""
    box.checkpoint("run/checkpoints/last.pt", epoch=1, config={"method": {"name": method}, "student": {}})


EMPTY_DATASET = """
    import torch
    from robustbench_kd import hookimpl
    from robustbench_kd.data.datasets import DataSplits

    def _empty(config):
        x = torch.zeros(0, 1, 8, 8)
        y = torch.zeros(0, dtype=torch.int64)
        return DataSplits("empty", x, y, torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64), 10)

    @hookimpl
    def rbkd_register_datasets(registry):
        registry.add("empty", _empty)
"""
SECOND_RSLAD = """
    from robustbench_kd import hookimpl

    @hookimpl
    def rbkd_register_methods(registry):
        from robustbench_kd_plugins.rslad import RSLAD
        registry.add(RSLAD)
"""
TYPO_HOOK = """
    from robustbench_kd import hookimpl

    @hookimpl
    def rbkd_register_method(registry):
        pass
"""

CASES = [
    # -- run file ------------------------------------------------------------------------------------
    Case("config-missing-file", lambda box: ["distill", "nope.toml"], "config file nope.toml does not exist"),
    Case(
        "config-wrong-extension",
        lambda box: ["distill", box.write("run.json", "{}")],
        "must end in .toml, .yaml or .yml",
    ),
    Case(
        "config-toml-syntax",
        lambda box: ["distill", box.write("run.toml", "[optim\nepochs = 1\n")],
        "is not valid TOML",
    ),
    Case(
        "config-yaml-syntax",
        lambda box: ["distill", box.write("run.yaml", "optim: {epochs: 1\nrun: [\n")],
        "config file run.yaml could not be parsed",
    ),
    Case(
        "config-yaml-not-mapping",
        lambda box: ["distill", box.write("run.yaml", "- a\n- b\n")],
        "must hold a mapping at the top level",
    ),
    Case("unknown-section", distill({"optimiser": {"lr": 0.1}}), "unknown section [optimiser] (did you mean: optim"),
    Case(
        "unknown-key",
        distill({"optim": {"learning_rate": 0.1}}),
        "unknown key optim.learning_rate; valid keys in [optim]:",
    ),
    Case("wrong-type-int", distill({"optim": {"epochs": "ten"}}), "optim.epochs must be an integer, got 'ten'"),
    Case("wrong-type-bool", distill({"data": {"download": "yes"}}), "data.download must be true or false"),
    Case("unknown-method", distill({"method": {"name": "rsald"}}), "unknown method 'rsald' (did you mean: rslad"),
    Case("method-without-name", distill({"method": {"temperature": 2}}), "[method] needs a name"),
    Case(
        "unknown-method-option",
        distill({"method": {"name": "pgd-at", "stepz": 3}}),
        "unknown option method.stepz for method 'pgd-at'",
    ),
    Case(
        "method-option-wrong-type",
        distill({"method": {"name": "trades", "beta": "six"}}),
        "method.beta of method 'trades' must be a number (default 6.0), got 'six'",
    ),
    Case(
        "unknown-dataset", distill({"data": {"dataset": "cifar11"}}), "unknown dataset 'cifar11' (did you mean: cifar10"
    ),
    Case(
        "eps-8-instead-of-8-over-255",
        distill({"data": {"dataset": "cifar10"}, "threat": {"eps": 8}}),
        "threat.eps=8 is larger than 1 for an Linf threat on [0,1] inputs; write it as a fraction of 255",
    ),
    Case(
        "step-larger-than-eps",
        distill({"threat": {"eps": "2/255", "alpha": "4/255"}}),
        "the step size must not exceed the radius",
    ),
    Case("eps-not-a-number", distill({"threat": {"eps": "eight"}}), "threat.eps must be a number or a fraction"),
    Case("unknown-norm", distill({"threat": {"norm": "Linfinity"}}), "threat.norm must be one of"),
    Case("negative-epochs", distill({"optim": {"epochs": -1}}), "optim.epochs must be >= 1, got -1"),
    Case("batch-size-0", distill({"data": {"batch_size": 0}}), "data.batch_size must be >= 1, got 0"),
    Case(
        "test-batch-size-negative",
        distill({"data": {"test_batch_size": -8}}),
        "data.test_batch_size must be >= 1, got -8",
    ),
    Case(
        "bad-schedule",
        distill({"optim": {"schedule": "cosin"}}),
        "optim.schedule must be one of multistep, cosine, onecycle, exponential, constant, got 'cosin'",
    ),
    Case(
        "unknown-eval-attack",
        distill({"eval": {"attacks": ["clean", "pgdd"]}}),
        "unknown attack 'pgdd' in eval.attacks (did you mean: pgd",
    ),
    Case("bad-device", distill({"run": {"device": "gpu0"}}), "is not a device; use auto, cpu, cuda or cuda:N"),
    Case("set-without-equals", lambda box: ["distill", box.config(), "--set", "optim.lr"], "--set expects key=value"),
    Case(
        "unknown-student-arch",
        distill({"student": {"arch": "resnet19"}}),
        "unknown student architecture 'resnet19' (did you mean: resnet18",
    ),
    Case(
        "unknown-student-option",
        distill({"student": {"options": {"depth": 3}}}),
        "unknown option 'depth' for student 'small-cnn'",
    ),
    Case(
        "student-init-from-other-arch",
        with_files(
            lambda box: box.checkpoint("init.pt", num_classes=5), distill({"student": {"init_from": "init.pt"}})
        ),
        "student.init_from init.pt does not match the architecture: Error(s) in loading state_dict for SmallCNN: "
        "size mismatch for classifier.weight",
    ),
    # -- data -----------------------------------------------------------------------------------------
    Case("n-train-0", distill({"data": {"n_train": 0}}), "data.n_train must be >= 1, got 0"),
    Case(
        "val-size-whole-train-set",
        distill({"data": {"val_size": 1500}, "eval": {"every": 1}}),
        "data.val_size = 1500 holds out 1500 of the 1500 training images",
    ),
    Case(
        "cifar-missing-offline",
        distill({"data": {"dataset": "cifar10", "data_dir": "nodata"}}),
        "cifar10 not found: expected the directory nodata/cifar-10-batches-py",
    ),
    Case(
        "cifar-truncated-batch",
        with_files(
            _truncated_cifar, distill({"data": {"dataset": "cifar10", "data_dir": "cifar", "verify_md5": False}})
        ),
        "cannot be read as CIFAR pickles",
    ),
    Case(
        "dataset-plugin-gives-0-images",
        with_files(
            lambda box: box.plugin("rbkd-empty", "empty = hostile_empty", {"hostile_empty": EMPTY_DATASET}),
            distill({"data": {"dataset": "empty"}}),
        ),
        "dataset 'empty' has an empty train split",
    ),
    # -- teachers -------------------------------------------------------------------------------------
    Case("teacher-role-missing", distill({"method": {"name": "kd"}}), "method 'kd' needs teacher role(s) robust"),
    Case(
        "teacher-role-unused",
        teacher(lambda box: f"file:{box.checkpoint()}", method="pgd-at"),
        "method 'pgd-at' does not use teacher role(s) robust",
    ),
    Case("teacher-spec-no-scheme", teacher(lambda box: "Carmon2019Unlabeled"), "has no scheme"),
    Case("teacher-unknown-scheme", teacher(lambda box: "hf:org/model"), "unknown teacher source 'hf'; valid: file"),
    Case(
        "teacher-bad-zoo-ref",
        teacher(lambda box: "robustbench:cifar10/Carmon2019Unlabeled"),
        "bad model-zoo reference 'cifar10/Carmon2019Unlabeled'",
    ),
    Case(
        "teacher-zoo-file-missing-offline",
        teacher(lambda box: "robustbench:cifar10/Linf/Carmon2019Unlabeled"),
        "not found: expected models/cifar10/Linf/Carmon2019Unlabeled.pt",
    ),
    Case(
        "teacher-unknown-zoo-name",
        teacher(lambda box: "robustbench:cifar10/Linf/Carmon2019Unlabelled"),
        "Carmon2019Unlabelled",
    ),
    Case("teacher-file-missing", teacher(lambda box: "file:missing.pt"), "checkpoint missing.pt does not exist"),
    Case(
        "teacher-class-count-mismatch",
        teacher(lambda box: f"file:{box.checkpoint(num_classes=5)}"),
        "predicts 5 classes but digits has 10",
    ),
    Case(
        "teacher-3-channel-on-digits",
        teacher(lambda box: f"file:{box.checkpoint(in_channels=3)}"),
        "does not accept digits inputs of shape (1, 8, 8)",
    ),
    Case(
        "teacher-without-arch",
        teacher(lambda box: f"file:{box.checkpoint(record_arch=False)}"),
        "does not record its architecture; add ?arch=NAME",
    ),
    Case(
        "teacher-ensemble-weights",
        teacher(lambda box: {"specs": [f"file:{box.checkpoint()}"], "weights": [1, 2]}),
        "2 teacher weights given for 1 teachers",
    ),
    # -- checkpoints ----------------------------------------------------------------------------------
    Case("checkpoint-random-bytes", evaluate(model="file:noise.pt"), "checkpoint noise.pt is corrupt or truncated"),
    Case("checkpoint-html-page", evaluate(model="file:page.pt"), "is an HTML page, not a checkpoint"),
    Case(
        "checkpoint-truncated",
        lambda box: evaluate(model=f"file:{_truncated_checkpoint(box)}")(box),
        "checkpoint cut.pt is corrupt or truncated",
    ),
    Case(
        "checkpoint-not-a-dict",
        lambda box: evaluate(model=f"file:{_tensor_file(box)}")(box),
        "holds a Tensor, expected a dict of tensors",
    ),
    Case("resume-without-checkpoint", distill(None, "--resume"), "--resume: no checkpoint at run/checkpoints/last.pt"),
    Case(
        "resume-different-config",
        with_files(_previous_run, distill(None, "--resume")),
        "cannot resume run/checkpoints/last.pt: its [method] section",
    ),
    Case("run-dir-already-used", with_files(_previous_run, distill()), "already holds a run"),
    # -- evaluate / merge-shards ------------------------------------------------------------------------
    Case("evaluate-unknown-attack", evaluate("--attacks", "clean,pgdd"), "unknown attack 'pgdd' (did you mean: pgd"),
    Case("evaluate-eps-8", evaluate("--eps", "8"), "write it as a fraction of 255"),
    Case("evaluate-shard-malformed", evaluate("--name", "X", "--shard", "4/4"), "--shard must be I/N"),
    Case("evaluate-shard-without-name", evaluate("--shard", "0/2"), "--shard needs --name"),
    Case("evaluate-n-examples-0", evaluate("--n-examples", "0"), "--n-examples must be >= 1"),
    Case(
        "evaluate-unknown-dataset",
        lambda box: ["evaluate", "file:x.pt", "--dataset", "mnist", "--out", "eval"],
        "unknown dataset 'mnist'",
    ),
    Case("merge-shards-missing-dir", lambda box: ["merge-shards", "shards/none"], "shards/none"),
    # -- plugins --------------------------------------------------------------------------------------
    Case(
        "plugin-duplicate-name",
        lambda box: (box.plugin("evil-rslad", "rslad = hostile_rslad", {"hostile_rslad": "X = 1\n"}), ["methods"])[1],
        "two plugins are named 'rslad': one from robustbench_kd",
    ),
    Case(
        "plugin-duplicate-method-key",
        lambda box: (
            box.plugin("rslad-again", "rslad2 = hostile_rslad2", {"hostile_rslad2": SECOND_RSLAD}),
            ["methods"],
        )[1],
        "method 'rslad' is registered twice: by plugin 'rslad' and by plugin 'rslad2'",
    ),
    Case(
        "plugin-unknown-hook",
        lambda box: (box.plugin("typo", "typo = hostile_typo", {"hostile_typo": TYPO_HOOK}), ["methods"])[1],
        "implements an unknown hook",
    ),
    Case(
        "plugin-raises-at-import",
        lambda box: (
            box.plugin("broken", "broken = hostile_broken", {"hostile_broken": "raise ImportError('needs torch 9')\n"}),
            ["methods"],
        )[1],
        "plugin 'broken' from broken 0.1 failed to import (ImportError: needs torch 9)",
        fresh=True,
    ),
]


def _tensor_file(box: Sandbox) -> str:
    import torch

    torch.save(torch.zeros(3), box.root / "tensor.pt")
    return "tensor.pt"


def _prepare_static_files(box: Sandbox) -> None:
    box.write("noise.pt", bytes(range(256)) * 8)
    box.write("page.pt", "<!DOCTYPE html>\n<html><body>Quota exceeded</body></html>\n")


def test_catalogue_is_large_and_ids_unique():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_line_exit_2_and_leaves_no_output(case, tmp_path, monkeypatch, capsys):
    assert_keeps_the_promise(case, tmp_path, monkeypatch, capsys, prepare=_prepare_static_files)


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    box = Sandbox(tmp_path)
    argv = ["distill", box.config({"method": {"name": "rsald"}})]
    with pytest.raises(UserError, match="unknown method 'rsald'"):
        main(["--debug", *argv])
    code, _, err, _ = run_fresh(argv, box, debug=True)
    assert code != 0 and "Traceback" in err and "UserError: unknown method 'rsald'" in err
    assert not (tmp_path / "run").exists()


#: The cases whose messages README's "Errors you will see most" shows.
README_CASES = (
    "config-missing-file",
    "config-yaml-syntax",
    "unknown-section",
    "unknown-key",
    "wrong-type-int",
    "unknown-method",
    "unknown-method-option",
    "method-option-wrong-type",
    "unknown-dataset",
    "eps-8-instead-of-8-over-255",
    "step-larger-than-eps",
    "bad-schedule",
    "unknown-eval-attack",
    "unknown-student-arch",
    "cifar-truncated-batch",
    "teacher-role-missing",
    "teacher-spec-no-scheme",
    "teacher-zoo-file-missing-offline",
    "teacher-unknown-zoo-name",
    "teacher-class-count-mismatch",
    "teacher-3-channel-on-digits",
    "checkpoint-html-page",
    "resume-without-checkpoint",
    "resume-different-config",
    "evaluate-shard-malformed",
    "plugin-duplicate-name",
    "plugin-raises-at-import",
)


def test_readme_lists_the_most_common_messages():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Errors you will see most", 1)[1].split("\n## ", 1)[0]
    expected = {c.id: c.expect for c in CASES}
    missing = [case_id for case_id in README_CASES if expected[case_id] not in section]
    assert not missing, f"README's error list no longer shows the messages of {missing}"
