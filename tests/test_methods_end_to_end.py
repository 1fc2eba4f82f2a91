"""Every registered method trains end to end: on digits through the trainer, and one step with a real
RobustBench zoo architecture as teacher on tiny CIFAR fixtures (offline)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from robustbench_kd.cli import main
from robustbench_kd.config import config_from_mapping
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.testing.fixtures import make_tiny_cifar, save_random_zoo_checkpoint
from robustbench_kd.testing.runs import random_teacher_spec
from robustbench_kd.training.loop import train

METHODS = PluginHost.create(autoload=False).methods.names()
ZOO_TEACHER = "Ding2020MMA"  # WRN-28-4, a real zoo architecture small enough for a CPU step


def teachers_for(cls, spec: str) -> dict[str, str]:
    return {role: spec for role in cls.teacher_roles}


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    return random_teacher_spec(tmp_path_factory.mktemp("teacher") / "teacher.pt", width=2.0)


@pytest.mark.parametrize("name", METHODS)
def test_distill_command_trains_on_digits(tmp_path, host, digits_teacher, name):
    """`robustbench-kd distill RUN.yaml` for every method: 2 epochs, then a small final evaluation."""
    cls = host.methods.get(name)
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "E2E", "out_dir": str(tmp_path / "run"), "progress": False},
                "data": {"dataset": "digits", "n_train": 200, "batch_size": 50},
                "threat": {"eps": 0.2, "alpha": 0.1, "steps": 2},
                "teachers": teachers_for(cls, digits_teacher),
                "method": {"name": name},
                "optim": {"epochs": 2, "lr": 0.05},
                "eval": {"attacks": ["clean", "pgd"], "pgd_steps": 2, "final_n_examples": 16, "teachers": False},
            }
        )
    )
    assert main(["-q", "distill", str(config)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in rows)
    results = json.loads((tmp_path / "run" / "results" / "E2E.json").read_text())
    assert 0 <= results["accuracy"]["pgd-2"] <= results["accuracy"]["clean"] <= 1


@pytest.fixture(scope="module")
def tiny_cifar_and_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_tiny_cifar(root / "data", n_train_per_batch=2, n_test=4)
    save_random_zoo_checkpoint(root / "models", ZOO_TEACHER)
    return root


@pytest.mark.parametrize("name", [m for m in METHODS if PluginHost.create(autoload=False).methods.get(m).teacher_roles])
def test_step_with_a_zoo_teacher_on_tiny_cifar(tmp_path, host, tiny_cifar_and_zoo, name):
    cls = host.methods.get(name)
    cfg = config_from_mapping(
        {
            "run": {"out_dir": str(tmp_path / "run"), "progress": False},
            "data": {
                "dataset": "cifar10",
                "data_dir": str(tiny_cifar_and_zoo / "data"),
                "verify_md5": False,
                "batch_size": 4,
                "n_train": 4,
            },
            "threat": {"eps": "8/255", "alpha": "4/255", "steps": 1},
            "student": {"arch": "small-cnn", "options": {"width": 0.25}},
            "teachers": teachers_for(cls, f"robustbench:cifar10/Linf/{ZOO_TEACHER}"),
            "zoo": {"model_dir": str(tiny_cifar_and_zoo / "models")},
            "method": {"name": name},
            "optim": {"epochs": 1},
        }
    )
    run = train(cfg, host=host)
    assert math.isfinite(run.history[0]["loss"])
    for teacher in run.teachers.values():
        assert not teacher.training and all(p.grad is None for p in teacher.parameters())
