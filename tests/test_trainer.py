"""Trainer: end-to-end runs on digits, exact resume, checkpoints usable as teachers, errors."""

from __future__ import annotations

import json

import pytest
import torch

from robustbench_kd.config import config_from_mapping
from robustbench_kd.errors import UserError
from robustbench_kd.storage.checkpoint import load_checkpoint
from robustbench_kd.testing.runs import tiny_digits_raw
from robustbench_kd.training.loop import train


def digits_config(out_dir, **sections):
    merge = {"data": {"n_train": 300}, "optim": {"epochs": 3, "schedule": "multistep", "milestones": [2]}}
    return config_from_mapping(tiny_digits_raw(out_dir, merge=merge, **sections))


def weights(run):
    return {k: v.clone() for k, v in run.student.state_dict().items()}


def test_resume_after_epoch_k_equals_uninterrupted(tmp_path, host):
    """Stop after epoch 1, resume, finish: bitwise equal to an uninterrupted 3-epoch run."""
    full = train(digits_config(tmp_path / "full"), host=host)
    split_cfg = digits_config(tmp_path / "split")
    train(split_cfg, host=host, stop_after=1)
    resumed = train(split_cfg, host=host, resume=True)
    for key, value in weights(full).items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_resume_restores_onecycle_schedule(tmp_path, host):
    optim = {"epochs": 2, "lr": 0.05, "schedule": "onecycle", "max_lr": 0.1}
    full = train(digits_config(tmp_path / "a", optim=optim), host=host)
    cfg = digits_config(tmp_path / "b", optim=optim)
    train(cfg, host=host, stop_after=1)
    with pytest.raises(UserError, match="already holds a run"):
        train(cfg, host=host)
    resumed = train(cfg, host=host, resume=True)
    # OneCycle steps per batch: only the checkpointed scheduler state makes the resumed LR trajectory
    # and the weights identical.
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]
    for key, value in weights(full).items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key


def test_outputs_written(tmp_path, host):
    run = train(digits_config(tmp_path / "r", checkpoint={"every": 1}), host=host)
    out = tmp_path / "r"
    assert (out / "config.yaml").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all("ce_adv" in r for r in rows)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "epoch_001.pt",
        "epoch_002.pt",
        "epoch_003.pt",
        "last.pt",
    ]
    data = load_checkpoint(out / "checkpoints" / "epoch_002.pt")
    assert data["epoch"] == 2 and data["student_arch"]["name"] == "small-cnn"
    assert run.epoch == 3


def test_intermediate_checkpoint_is_a_teacher(tmp_path, host):
    """AKD's early-stopped teachers: file:RUN/checkpoints/epoch_NNN.pt loads as a frozen teacher."""
    train(digits_config(tmp_path / "teacher", checkpoint={"every": 1}), host=host)
    spec = f"file:{tmp_path / 'teacher' / 'checkpoints' / 'epoch_001.pt'}"
    cfg = digits_config(
        tmp_path / "student",
        method={"name": "akd", "alpha": 0.5},
        teachers={"robust": {"specs": [spec, spec], "weights": [0.3, 0.7]}},
        optim={"epochs": 1, "lr": 0.05},
    )
    run = train(cfg, host=host)
    teacher = run.teachers["robust"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    saved = load_checkpoint(tmp_path / "teacher" / "checkpoints" / "epoch_001.pt")["student"]
    member = teacher.members[0].net.state_dict()
    assert all(torch.equal(saved[k], member[k]) for k in saved)


def test_quick_eval_every_epoch_is_logged(tmp_path, host):
    """The per-epoch check runs on the validation split (data.val_size) and names the best epoch."""
    run = train(
        digits_config(
            tmp_path / "r",
            data={"dataset": "digits", "batch_size": 100, "n_train": 300, "val_size": 64},
            eval={"every": 1, "n_examples": 32, "pgd_steps": 2},
            optim={"epochs": 1, "lr": 0.05},
        ),
        host=host,
    )
    row = run.history[-1]
    assert 0 <= row["val_clean_acc"] <= 1 and 0 <= row["val_pgd2_acc"] <= row["val_clean_acc"]
    assert row["best_epoch"] == 1 and (tmp_path / "r" / "checkpoints" / "best.pt").is_file()
    assert len(run.data.val_y) == 64


def test_quick_eval_without_a_validation_split_is_an_error(tmp_path, host):
    with pytest.raises(UserError, match=r"set data.val_size"):
        train(digits_config(tmp_path / "r", eval={"every": 1}), host=host)


@pytest.mark.parametrize(
    "method,teachers,error",
    [
        ("rslad", {}, "needs teacher role"),
        ("pgd-at", {"robust": "file:x.pt"}, "does not use teacher role"),
    ],
)
def test_teacher_roles_are_checked(tmp_path, host, method, teachers, error):
    with pytest.raises(UserError, match=error):
        train(digits_config(tmp_path / "r", method={"name": method}, teachers=teachers), host=host)


def test_teacher_with_wrong_class_count_is_rejected(tmp_path, host):
    from robustbench_kd.students import build_student

    net = build_student("small-cnn", num_classes=3, in_channels=1, image_size=8)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "t.pt")
    cfg = digits_config(
        tmp_path / "r", method={"name": "rslad"}, teachers={"robust": f"file:{tmp_path / 't.pt'}?arch=small-cnn"}
    )
    with pytest.raises(UserError):
        train(cfg, host=host)


def test_resume_without_checkpoint_is_an_error(tmp_path, host):
    with pytest.raises(UserError, match="no checkpoint"):
        train(digits_config(tmp_path / "r"), host=host, resume=True)


def test_student_init_from_a_checkpoint(tmp_path, host):
    first = train(digits_config(tmp_path / "a", optim={"epochs": 1, "lr": 0.05}), host=host)
    cfg = digits_config(
        tmp_path / "b",
        student={
            "arch": "small-cnn",
            "options": {"width": 0.5},
            "init_from": str(tmp_path / "a" / "checkpoints" / "last.pt"),
        },
    )
    from robustbench_kd.training.setup import setup_run

    run = setup_run(cfg, host)
    for key, value in first.student.state_dict().items():
        assert torch.equal(value, run.student.state_dict()[key]), key


def test_distiller_sees_the_run_before_training(tmp_path):
    from robustbench_kd import Distiller, LossOutput, hookimpl
    from robustbench_kd.plugin_host import PluginHost

    seen = {}

    class Probe(Distiller):
        """Probe method for the on_train_start hook."""

        name = "probe"

        def attack_spec(self, threat):
            return None

        def on_train_start(self, run):
            seen["milestones"] = list(run.config.optim.milestones)
            seen["epoch"] = run.epoch

        def loss(self, ctx):
            return LossOutput(torch.nn.functional.cross_entropy(ctx.student(ctx.x), ctx.y))

    class Plugin:
        @staticmethod
        @hookimpl
        def rbkd_register_methods(registry):
            registry.add(Probe)

    host = PluginHost.create(autoload=False, extra=[Plugin])
    train(digits_config(tmp_path / "r", method={"name": "probe"}, optim={"epochs": 1, "milestones": [5]}), host=host)
    assert seen == {"milestones": [5], "epoch": 0}


@pytest.mark.parametrize("nesterov", [False, True])
def test_optimizer_updates_equal_the_per_parameter_sgd_bitwise(tmp_path, host, nesterov):
    """The library's multi-tensor SGD gives exactly the updates of torch's default per-parameter loop on CPU."""
    from robustbench_kd.students import build_student
    from robustbench_kd.training.setup import build_optimizer

    cfg = config_from_mapping(tiny_digits_raw(tmp_path, merge={"optim": {"nesterov": nesterov}}))
    torch.manual_seed(0)
    ours = build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=0.5)
    theirs = build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=0.5)
    theirs.load_state_dict(ours.state_dict())
    o = cfg.optim
    optimizers = [
        build_optimizer(cfg, ours, host.methods.get("pgd-at")()),
        torch.optim.SGD(
            theirs.parameters(),
            lr=o.lr,
            momentum=o.momentum,
            weight_decay=o.weight_decay,
            nesterov=nesterov,
            foreach=False,
        ),
    ]
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    for _ in range(3):
        for net, opt in zip((ours, theirs), optimizers, strict=False):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=False):
        assert torch.equal(a, b), name


def test_attack_built_once_per_epoch_and_its_loss_reads_the_current_batch(tmp_path):
    """rbkd_make_attack is called once per epoch for a fixed spec; the reused attack's loss_fn is the
    loss of the batch being attacked (a stale batch would give other labels, so other losses)."""
    import torch.nn.functional as F

    from robustbench_kd import hookimpl
    from robustbench_kd.plugin_host import PluginHost

    class Spy:
        def __init__(self):
            self.built, self.checked = 0, 0

        @hookimpl(tryfirst=True)
        def rbkd_make_attack(self, distiller, student, spec, loss_fn):
            self.built += 1
            spy = self

            def attack(x, y):
                with torch.no_grad():
                    expected = F.cross_entropy(student(x), y, reduction="none")  # pgd-at's attack loss
                    assert torch.equal(loss_fn(x), expected)
                spy.checked += 1
                return x.clone()

            return attack

    spy = Spy()
    host = PluginHost.create(autoload=False, extra=[spy])
    run = train(digits_config(tmp_path), host=host)  # 3 epochs of 3 batches
    assert spy.built == 3
    assert spy.checked == 9
    assert len(run.history) == 3
