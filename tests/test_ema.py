"""[ema]: the update rule by hand, BatchNorm buffers, exact resume, and the <name>_ema outputs."""

from __future__ import annotations

import json

import pytest
import torch

from robustbench_kd.config import config_from_mapping
from robustbench_kd.errors import UserError
from robustbench_kd.jobs.pipeline import distill
from robustbench_kd.scale.ema import StudentEMA
from robustbench_kd.scale.sections import EmaSection
from robustbench_kd.storage.checkpoint import load_checkpoint, state_dict_of
from robustbench_kd.testing.contract import TinyNet
from robustbench_kd.testing.runs import tiny_digits_raw
from robustbench_kd.training.loop import train

NAME = "Ema_SmallCNN"


def nudge(net, seed):
    """Stand-in for an optimiser step: move every parameter by a seeded random amount."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("warmup, decays", [(False, [0.9, 0.9, 0.9]), (True, [2 / 11, 3 / 12, 4 / 13])])
def test_update_formula_by_hand(warmup, decays):
    student = TinyNet(seed=1)
    ema = StudentEMA(student, EmaSection(decay=0.9, warmup=warmup))
    expected = {k: v.clone() for k, v in student.named_parameters()}
    for n, d in enumerate(decays, start=1):
        nudge(student, seed=n)
        assert ema.current_decay() == pytest.approx(d)
        ema.update(student)
        for name, p in student.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach()
    for name, p in ema.module.named_parameters():
        assert torch.allclose(p, expected[name], rtol=1e-6, atol=1e-6), name
        assert not p.requires_grad
    assert ema.updates == 3 and not ema.module.training


def test_every_n_steps():
    student = TinyNet(seed=1)
    ema = StudentEMA(student, EmaSection(decay=0.5, every=2))
    start = ema.module.conv.weight.clone()
    nudge(student, 1)
    assert not ema.maybe_update(student, optimizer_steps=1)
    assert torch.equal(ema.module.conv.weight, start)
    assert ema.maybe_update(student, optimizer_steps=2)
    assert torch.allclose(ema.module.conv.weight, 0.5 * start + 0.5 * student.conv.weight)


def test_batchnorm_buffers_are_copied_not_averaged():
    student = TinyNet(seed=1).train()
    ema = StudentEMA(student, EmaSection(decay=0.99))
    student(torch.rand(16, 1, 8, 8))  # train-mode forward: running statistics move
    ema.update(student)
    for name, buf in student.named_buffers():
        assert torch.equal(dict(ema.module.named_buffers())[name], buf), name
    assert int(ema.module.bn.num_batches_tracked) == 1
    # ... while the parameters are averaged (the student's did not move, so they still agree here).
    nudge(student, 7)
    ema.update(student)
    assert not torch.equal(ema.module.conv.weight, student.conv.weight)


def test_ema_config_validation():
    assert EmaSection().decay == 0 and not EmaSection().enabled
    with pytest.raises(UserError, match=r"ema.decay must be 0 \(off\) or in \(0, 1\)"):
        config_from_mapping({"ema": {"decay": 1.0}})
    with pytest.raises(UserError, match=r"ema.every must be >= 1"):
        config_from_mapping({"ema": {"decay": 0.99, "every": 0}})
    with pytest.raises(UserError, match=r"unknown key ema.decy"):
        config_from_mapping({"ema": {"decy": 0.99}})


# -- runs ------------------------------------------------------------------------------------------
def digits_config(out_dir, *, epochs=3, val_size=0, **sections):
    raw = tiny_digits_raw(
        out_dir,
        merge={
            "run": {"name": NAME},
            "data": {"n_train": 300, "val_size": val_size},
            "optim": {"epochs": epochs, "schedule": "multistep", "milestones": [2]},
            "ema": {"decay": 0.9, "warmup": True},
        },
    )
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config_from_mapping(raw)


def test_ema_is_checkpointed_and_resumes_exactly(tmp_path, host):
    full = train(digits_config(tmp_path / "full"), host=host)
    cfg = digits_config(tmp_path / "split")
    train(cfg, host=host, stop_after=1)
    saved = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert saved["ema"]["updates"] == 3  # 300 images / batch 100 = 3 optimiser steps per epoch
    resumed = train(cfg, host=host, resume=True)
    assert resumed.ema.updates == full.ema.updates == 9
    for key, value in full.ema.module.state_dict().items():
        assert torch.equal(value, resumed.ema.module.state_dict()[key]), key
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    # The average differs from the raw student, and its buffers are the student's.
    assert not torch.equal(full.ema.module.classifier.weight, full.student.classifier.weight)
    for name, buf in full.student.named_buffers():
        assert torch.equal(dict(full.ema.module.named_buffers())[name], buf), name


def test_no_ema_by_default(tmp_path, host):
    cfg = digits_config(tmp_path / "r", epochs=1, ema={"decay": 0.0})
    run = train(cfg, host=host)
    assert run.ema is None and load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["ema"] is None


def test_distill_reports_validates_and_exports_the_ema_student(tmp_path, host):
    out = tmp_path / "r"
    cfg = digits_config(
        out,
        epochs=2,
        val_size=0.1,
        eval={
            "every": 1,
            "n_examples": 32,
            "pgd_steps": 2,
            "attacks": ["clean", "autoattack"],
            "final_n_examples": 16,
            "teachers": False,
            "sanity": False,
        },
    )
    reports = distill(cfg, host=host)
    labels = [r.label for r in reports]
    assert labels[-1] == f"student {NAME}_ema (EMA decay 0.9, epoch 2)"
    ema_report = reports[-1]
    assert ema_report.results_path == out / "results" / f"{NAME}_ema.json"
    assert ema_report.model_info_path == out / "model_info" / "digits" / "Linf" / f"{NAME}_ema.json"
    assert ema_report.checkpoint_path == out / "models" / "digits" / "Linf" / f"{NAME}_ema.pt"
    for path in (ema_report.results_path, ema_report.model_info_path, ema_report.checkpoint_path):
        assert path.is_file(), path
    # The exported zoo weights are the averaged ones stored in the final checkpoint.
    zoo = state_dict_of(torch.load(ema_report.checkpoint_path, weights_only=True))
    saved = load_checkpoint(out / "checkpoints" / "last.pt")["ema"]["module"]
    assert saved.keys() == zoo.keys() and all(torch.equal(v, zoo[k]) for k, v in saved.items())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all({"val_ema_clean_acc", "val_ema_pgd2_acc", "val_clean_acc", "val_pgd2_acc"} <= set(r) for r in rows)
