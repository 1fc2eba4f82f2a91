"""The embedded default job, shortened: teacher -> student -> evaluation -> leaderboard files."""

from __future__ import annotations

import json

import pytest
import torch

from robustbench_kd.jobs.quickstart import STUDENT_ID, TEACHER_ID, run_quickstart

# Tiny models and AutoAttack: one torch thread is much faster than several fighting over a busy machine.
pytestmark = pytest.mark.single_thread

LEADERBOARD_KEYS = [
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "autoattack_acc",
    "unreliable",
]


@pytest.mark.slow
def test_quickstart_writes_every_output(tmp_path, host):
    reports = run_quickstart(tmp_path, epochs=3, progress=False, host=host)
    assert [r.label.split()[0] for r in reports] == ["teacher", "student"]
    for model_id in (TEACHER_ID, STUDENT_ID):
        path = tmp_path / "model_info" / "digits" / "Linf" / f"{model_id}.json"
        info = json.loads(path.read_text())
        assert [k for k in info if k != "footnote"] == LEADERBOARD_KEYS
        assert info["eps"] == "0.2" and info["dataset"] == "digits"
        assert isinstance(info["clean_acc"], str) and isinstance(info["autoattack_acc"], str)
        assert isinstance(info["number_forward_passes"], int) and isinstance(info["additional_data"], bool)
        assert float(info["autoattack_acc"]) <= float(info["clean_acc"])
    state = torch.load(tmp_path / "models" / "digits" / "Linf" / f"{STUDENT_ID}.pt", weights_only=True)
    assert "state_dict" in state
    assert (tmp_path / "student" / "config.yaml").is_file()
    assert len((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()) == 3
