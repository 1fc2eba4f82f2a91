"""Per-epoch diagnostics in a real (tiny digits) run: off costs nothing, on writes the keys and the files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robustbench_kd.analysis.diagnostics import metrics as M
from robustbench_kd.config import config_from_mapping
from robustbench_kd.data.datasets import to_float
from robustbench_kd.errors import UserError
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.testing.runs import tiny_digits_config
from robustbench_kd.training.loop import train

ALL = ["entropy", "calibration", "agreement", "per_class", "trajectories"]


class CountForwards:
    """A plugin counting the student's forward passes (a forward hook added at train start)."""

    def __init__(self):
        self.calls = 0

    @hookimpl
    def rbkd_train_start(self, run):
        run.student.register_forward_hook(lambda *args: setattr(self, "calls", self.calls + 1))


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train(tiny_digits_config(out, optim={"epochs": 1, "lr": 0.05}), host=PluginHost.create(autoload=False))
    return f"file:{out / 'checkpoints' / 'last.pt'}"


def test_diagnostics_off_add_no_forward_pass(tmp_path, monkeypatch):
    """Default config: exactly the forwards of a run without the plugin at all, and collect never runs."""
    from robustbench_kd.analysis.diagnostics import collect

    monkeypatch.setattr(collect, "collect", lambda *a: pytest.fail("diagnostics ran while off"))
    counts = []
    for blocked in ((), ("diagnostics",)):
        counter = CountForwards()
        host = PluginHost.create(autoload=False, blocked=blocked, extra=[counter])
        run = train(tiny_digits_config(tmp_path / f"r{len(blocked)}"), host=host)
        counts.append(counter.calls)
        assert not any(k.startswith("diag_") for k in run.history[-1])
    assert counts[0] == counts[1] > 0
    assert not (tmp_path / "r0" / "diagnostics").exists()


def test_diagnostics_on_cost_extra_forwards(tmp_path):
    """The counter does see them: 2 epochs x (clean + 2 PGD steps + adversarial) passes over 40 points."""
    counter = CountForwards()
    host = PluginHost.create(autoload=False, extra=[counter])
    plain = train(
        tiny_digits_config(tmp_path / "off"), host=PluginHost.create(autoload=False, extra=[off := CountForwards()])
    )
    run = train(
        tiny_digits_config(
            tmp_path / "on", diagnostics={"enabled": ["entropy"], "n_examples": 40, "pgd_steps": 2, "batch_size": 40}
        ),
        host=host,
    )
    # per recorded epoch: PGD = 2 gradient forwards, then one clean and one adversarial forward; the training
    # subset adds none (no validation split: it is the eval split)
    assert counter.calls - off.calls == 2 * (2 + 1 + 1)
    # Eval mode and an isolated RNG: the diagnostics leave training bitwise unchanged.
    after, before = run.student.state_dict(), plain.student.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_diagnostics_on_write_keys_tables_and_trajectories(tmp_path, teacher_file):
    cfg = tiny_digits_config(
        tmp_path / "r",
        method={"name": "kd"},
        teachers={"robust": teacher_file},
        data={"dataset": "digits", "batch_size": 100, "n_train": 200, "val_size": 60},
        eval={"every": 1, "n_examples": 30, "pgd_steps": 2},
        optim={"epochs": 3, "lr": 0.05},
        diagnostics={"enabled": ALL, "n_examples": 50, "pgd_steps": 2, "bins": 5, "every": 2},
    )
    run = train(cfg, host=PluginHost.create(autoload=False))
    out = tmp_path / "r"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # every = 2 over 3 epochs: epochs 2 and 3 (the last is always recorded)
    assert [any(k.startswith("diag_") for k in r) for r in rows] == [False, True, True]
    row = rows[-1]
    for kind in ("clean", "adv"):
        for model in ("student", "teacher_robust"):
            assert 0 <= row[f"diag_val_{model}_{kind}_entropy"] <= np.log(10) + 1e-9
            assert 0 <= row[f"diag_val_{model}_{kind}_ece"] <= 1
        assert 0 <= row[f"diag_val_agree_robust_{kind}"] <= 1
        assert row[f"diag_val_student_{kind}_worst_class_acc"] <= row[f"diag_val_student_{kind}_acc"]
        for part in ("mean", "easy", "hard"):
            assert -1 <= row[f"diag_val_traj_cos_robust_{kind}_{part}"] <= 1 + 1e-9
    assert "diag_train_student_clean_entropy" in row and "diag_train_teacher_robust_clean_entropy" in row
    # The numbers are the formulas on the final student and the first 50 validation points.
    x, y = to_float(run.data.val_x[:50]), run.data.val_y[:50]
    run.student.eval()
    with torch.no_grad():
        logits = run.student(x).double()
    probs = logits.softmax(1)
    assert row["diag_val_student_clean_entropy"] == pytest.approx(M.entropy(probs).mean().item(), rel=1e-6)
    assert row["diag_val_student_clean_acc"] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    table = M.reliability_bins(probs, y, 5)
    assert row["diag_val_student_clean_ece"] == pytest.approx(M.expected_calibration_error(table), rel=1e-6)
    # tables.jsonl: one row per recorded epoch, with the reliability table and per-class accuracies
    tables = [json.loads(line) for line in (out / "diagnostics" / "tables.jsonl").read_text().splitlines()]
    assert [t["epoch"] for t in tables] == [2, 3]
    assert sum(tables[-1]["diag_val_student_clean_reliability"]["count"]) == 50
    assert len(tables[-1]["diag_val_student_adv_class_acc"]) == 10
    # trajectories.npz: 50 samples x 2 recorded epochs, difficulty = mean student CE
    with np.load(out / "diagnostics" / "trajectories.npz") as traj:
        assert traj["epochs"].tolist() == [2, 3] and str(traj["split"]) == "val"
        assert traj["student_clean_p"].shape == traj["teacher_robust_adv_p"].shape == (50, 2)
        assert traj["y"].tolist() == y.tolist()
        assert traj["difficulty_clean"] == pytest.approx(traj["student_clean_ce"].mean(axis=1), rel=1e-6)
        assert traj["student_clean_p"][:, -1] == pytest.approx(M.correct_class_prob(probs, y).numpy(), rel=1e-5)


def test_without_validation_split_diagnostics_use_a_training_subset(tmp_path):
    run = train(
        tiny_digits_config(
            tmp_path / "r", diagnostics={"enabled": ["trajectories"], "n_examples": 20, "adversarial": False}
        ),
        host=PluginHost.create(autoload=False),
    )
    row = run.history[-1]
    assert not any(k.startswith("diag_val") for k in row)
    with np.load(tmp_path / "r" / "diagnostics" / "trajectories.npz") as traj:
        assert str(traj["split"]) == "train" and traj["student_clean_p"].shape == (20, 2)
        assert sorted(traj) == sorted(
            ["epochs", "index", "y", "split", "student_clean_p", "student_clean_ce", "difficulty_clean"]
        )
        index = torch.from_numpy(traj["index"])
        assert traj["y"].tolist() == run.data.train_y[index].tolist()


def test_resume_keeps_one_trajectory_column_per_epoch(tmp_path):
    cfg = tiny_digits_config(
        tmp_path / "r",
        optim={"epochs": 3, "lr": 0.05},
        diagnostics={"enabled": ["trajectories"], "n_examples": 20, "adversarial": False},
    )
    train(cfg, host=PluginHost.create(autoload=False), stop_after=2)
    train(cfg, host=PluginHost.create(autoload=False), resume=True)
    with np.load(tmp_path / "r" / "diagnostics" / "trajectories.npz") as traj:
        assert traj["epochs"].tolist() == [1, 2, 3] and traj["student_clean_p"].shape == (20, 3)


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    cfg = tiny_digits_config(tmp_path / "r", diagnostics={"enabled": ["entropy"], "tensorboard": True})
    with pytest.raises(UserError, match="pip install tensorboard") as info:
        train(cfg, host=PluginHost.create(autoload=False))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_unknown_diagnostic_is_a_config_error():
    with pytest.raises(UserError, match="did you mean: entropy"):
        config_from_mapping({"diagnostics": {"enabled": ["entropi"]}})


def test_tensorboard_gets_the_same_scalars(tmp_path, monkeypatch):
    """With a stand-in SummaryWriter (tensorboard is optional): one scalar per metrics key, step = epoch."""
    import sys
    import types

    written = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, global_step):
            written.append((self.log_dir, key, value, global_step))

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    run = train(
        tiny_digits_config(
            tmp_path / "r",
            diagnostics={"enabled": ["entropy"], "n_examples": 20, "adversarial": False, "tensorboard": True},
        ),
        host=PluginHost.create(autoload=False),
    )
    assert {(k, step) for _, k, _, step in written} == {
        ("diag_train_student_clean_entropy", 1),
        ("diag_train_student_clean_entropy", 2),
    }
    assert written[-1][2] == run.history[-1]["diag_train_student_clean_entropy"]
    assert written[0][0] == str(tmp_path / "r" / "diagnostics" / "tensorboard")


def test_the_ema_student_is_diagnosed_too(tmp_path):
    cfg = tiny_digits_config(
        tmp_path / "r",
        optim={"epochs": 2, "lr": 0.05},
        ema={"decay": 0.9},
        diagnostics={
            "enabled": ["entropy", "calibration", "trajectories"],
            "n_examples": 40,
            "adversarial": False,
            "bins": 5,
        },
    )
    run = train(cfg, host=PluginHost.create(autoload=False))
    row = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][-1]
    # No validation split: the diagnostics run on the seeded training subset.
    index = torch.randperm(len(run.data.train_y), generator=torch.Generator().manual_seed(0))[:40]
    x = to_float(run.data.train_x[index])
    with torch.no_grad():
        probs = run.ema.module.eval()(x).double().softmax(1)
    assert row["diag_train_student_ema_clean_entropy"] == pytest.approx(M.entropy(probs).mean().item(), rel=1e-6)
    assert "diag_train_student_ema_clean_ece" in row
    assert row["diag_train_student_ema_clean_entropy"] != row["diag_train_student_clean_entropy"]
    with np.load(tmp_path / "r" / "diagnostics" / "trajectories.npz") as traj:
        assert traj["student_ema_clean_p"].shape == (40, 2)


def test_tensorboard_event_file_holds_the_metrics_scalars(tmp_path):
    """The real writer (tensorboard is in the test extra): read the event file back, compare with metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(
        tiny_digits_config(
            tmp_path / "r",
            diagnostics={
                "enabled": ["entropy", "calibration"],
                "n_examples": 20,
                "adversarial": False,
                "tensorboard": True,
            },
        ),
        host=PluginHost.create(autoload=False),
    )
    events = EventAccumulator(str(tmp_path / "r" / "diagnostics" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {k for k in run.history[-1] if k.startswith("diag_") and k != "diag_seconds"}
    for tag in tags:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(i + 1, pytest.approx(row[tag], rel=1e-6)) for i, row in enumerate(run.history)]
