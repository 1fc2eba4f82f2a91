"""A checkpoint written before the training loop was restructured still resumes, to the same weights.

The fixture (``tests/fixtures/checkpoint_before_restructuring``, see its README) is ``last.pt`` after epoch 1
of a 2-epoch RSLAD-IKL run with EMA, the run's teacher, and the student the old trainer reached by resuming
it. The run is deterministic on CPU, so the weights must be equal bit for bit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from robustbench_kd.config import config_from_mapping
from robustbench_kd.storage.checkpoint import load_checkpoint
from robustbench_kd.testing.runs import tiny_digits_raw
from robustbench_kd.training.loop import train

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_before_restructuring"


def fixture_config(tmp_path, out_dir):
    """The fixture run's config, with its teacher copied into ``tmp_path`` (on CPU: the fixture is CPU's)."""
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        shutil.copy(FIXTURE / "teacher.pt", teacher)
    raw = tiny_digits_raw(
        out_dir,
        merge={"ema": {"decay": 0.9}, "run": {"device": "cpu"}},
        method={"name": "rslad", "divergence": "ikl"},
        teachers={"robust": f"file:{teacher}?arch=small-cnn&width=1.0"},
        optim={"epochs": 2, "lr": 0.05},
    )
    return config_from_mapping(raw)


def assert_equal_states(got, expected):
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_old_checkpoint_resumes_to_the_old_codes_weights(tmp_path):
    cfg = fixture_config(tmp_path, tmp_path / "run")
    saved = load_checkpoint(FIXTURE / "last.pt")
    assert saved["epoch"] == 1 and saved["position"] is None
    # The checkpoint names the teacher where it was made; resume compares the sections that define the
    # training (method, student, validation split, extra data), not the teacher's path.
    assert saved["config"]["teachers"] != cfg.to_dict()["teachers"]
    for section in ("method", "student"):
        assert saved["config"][section] == cfg.to_dict()[section]
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURE / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt")
    run = train(cfg, resume=True)
    assert run.epoch == 2 and len(run.history) == 2
    assert_equal_states(run.student.state_dict(), torch.load(FIXTURE / "final_student_old_code.pt"))


def test_an_uninterrupted_run_reaches_the_same_weights(tmp_path):
    run = train(fixture_config(tmp_path, tmp_path / "whole"))
    assert_equal_states(run.student.state_dict(), torch.load(FIXTURE / "final_student_old_code.pt"))
