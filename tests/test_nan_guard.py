"""A non-finite loss or gradient stops training with a one-line error; the last good checkpoint stays."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from robustbench_kd import hookimpl
from robustbench_kd.config import config_from_mapping
from robustbench_kd.distiller import Distiller, LossOutput
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.training.loop import train
from robustbench_kd.training.nan_guard import FiniteGuard, check_finite_weights


class NaNAtStep(Distiller):
    """Clean cross-entropy whose loss (``grad=False``) or only its gradient (``grad=True``) goes NaN at one step."""

    name: ClassVar[str] = "nan-at-step"

    @dataclass(frozen=True)
    class Config:
        at: int = 4  #: global step (0-based) that goes wrong
        grad: bool = False  #: finite loss value, NaN gradient

    def attack_spec(self, threat):
        return None  # clean training: fast, and the attack plays no part here

    def loss(self, ctx) -> LossOutput:
        ce = F.cross_entropy(ctx.student(ctx.x), ctx.y)
        total = ce
        if ctx.global_step == self.config.at:
            if self.config.grad:
                # sqrt at 0: value 0, derivative inf, times the zero inner derivative = NaN gradients.
                total = ce + (ce * 0).sqrt()
            else:
                total = ce * float("nan")
        return LossOutput(total=total, terms={"ce": ce.detach(), "penalty": (total - ce).detach()})


class NaNPlugin:
    @staticmethod
    @hookimpl
    def rbkd_register_methods(registry):
        registry.add(NaNAtStep)


@pytest.fixture
def nan_host() -> PluginHost:
    return PluginHost.create(autoload=False, extra=[NaNPlugin])


def config(out_dir, **method):
    # 300 images / batch 100 = 3 steps per epoch; global step 4 (0-based) is epoch 2, step 2.
    return config_from_mapping(
        {
            "run": {"out_dir": str(out_dir), "progress": False, "seed": 3},
            "data": {"dataset": "digits", "batch_size": 100, "n_train": 300},
            "student": {"arch": "small-cnn", "options": {"width": 0.5}},
            "method": {"name": "nan-at-step", **method},
            "optim": {"epochs": 3, "lr": 0.05},
        }
    )


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# What went wrong at the bad step first, then what followed from the NaN weights (every later term).
@pytest.mark.parametrize(
    "grad,names",
    [(False, "loss, penalty, grad_norm (later also ce)"), (True, "grad_norm (later also loss, ce, penalty)")],
)
def test_nan_stops_with_epoch_step_and_terms_and_keeps_last_good(tmp_path, nan_host, grad, names):
    cfg = config(tmp_path / "run", grad=grad)
    train(cfg, host=nan_host, stop_after=1)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = sha(last)
    with pytest.raises(UserError) as info:
        train(cfg, host=nan_host, resume=True)
    message = str(info.value)
    assert f"training diverged at epoch 2, step 2 (global step 5): non-finite {names};" in message
    assert f"the last good checkpoint {last} is kept" in message and "\n" not in message
    assert sha(last) == before  # untouched: epoch 1's file, never a NaN-trained epoch 2
    assert not (tmp_path / "run" / "checkpoints" / "epoch_002.pt").exists()


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path, nan_host):
    with pytest.raises(
        UserError,
        match=r"epoch 1, step 1 \(global step 1\): non-finite loss, penalty, "
        r"grad_norm \(later also ce\); no checkpoint was written",
    ):
        train(config(tmp_path / "run", at=0), host=nan_host)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_guard_reports_the_first_bad_step_and_checks_only_when_due():
    guard = FiniteGuard(every=3)
    ok, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    guard.note_loss(ok, {"a": ok}, epoch=0, step=0, global_step=0)
    guard.note_loss(nan, {"a": ok, "b": torch.tensor([1.0, float("inf")])}, epoch=0, step=1, global_step=1)
    assert not guard.due()
    guard.note_loss(nan, {"a": nan}, epoch=0, step=2, global_step=2)
    assert guard.due()
    with pytest.raises(UserError, match=r"at epoch 1, step 2 \(global step 2\): non-finite loss, b \(later also a\); "):
        guard.check()


def test_finite_record_passes_and_non_finite_weights_are_refused(tmp_path):
    guard = FiniteGuard()
    guard.note_loss(torch.tensor(0.5), {"ce": torch.tensor(0.5)}, epoch=0, step=0, global_step=0)
    guard.note_gradients([torch.nn.Parameter(torch.ones(2))], global_step=0)  # no .grad yet: nothing recorded
    guard.check()
    check_finite_weights({"w": torch.ones(2), "n": torch.tensor(3)}, epoch=1, last_good=None)
    with pytest.raises(UserError, match=r"student weights bn.running_var are non-finite; no checkpoint was written"):
        check_finite_weights({"bn.running_var": torch.tensor([1.0, float("inf")])}, epoch=1, last_good=None)
