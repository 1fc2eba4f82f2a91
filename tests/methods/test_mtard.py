"""Numeric and protocol tests of ``mtard``: the two-teacher loss, the adaptive weights (trajectory,
rate decay at the LR milestones) and exact resume of the weight state."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from robustbench_kd_plugins import mtard
from robustbench_kd_plugins.mtard import MTARD, adaptive_nat_weight
from torch import nn

from robustbench_kd.config import config_from_mapping
from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.jobs.pipeline import distill
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.registry import Registry
from robustbench_kd.storage.checkpoint import load_checkpoint
from robustbench_kd.students import build_student
from robustbench_kd.testing import Affine, batch_context, softmax
from robustbench_kd.testing.runs import tiny_digits_raw
from robustbench_kd.threat import ThreatSpec
from robustbench_kd.training.loop import train

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)
X = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
X_ADV = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.6, 0.8, 0.0], [0.1, 0.2, 0.9, 0.6]])
Y = torch.tensor([1, 3, 0])
ROB_BIAS = torch.tensor([0.5, -1.0, 2.0, 0.0])
NAT_BIAS = torch.tensor([-0.3, 1.5, 0.0, 0.7])


def _ctx(x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor = Y, student: nn.Module | None = None) -> BatchContext:
    teachers = {"robust": Affine(4.0, ROB_BIAS), "natural": Affine(2.0, NAT_BIAS)}
    return batch_context(
        x,
        y,
        student=student if student is not None else Affine(3.0, num_classes=x.shape[1]),
        teachers=teachers,
        x_adv=x_adv,
        threat=THREAT,
    )


def _ref_kl_mean_all(t_logits: torch.Tensor, s_logits: torch.Tensor, eps: float = 1e-5) -> float:
    """The reference's mean over B*C of p_T * (log(p_T + eps) - log p_S), in double precision."""
    total, count = 0.0, 0
    for t_row, s_row in zip(t_logits.double().tolist(), s_logits.double().tolist(), strict=True):
        p_t, p_s = softmax(t_row), softmax(s_row)
        total += sum(q * (math.log(q + eps) - math.log(p)) for q, p in zip(p_t, p_s, strict=True))
        count += len(t_row)
    return total / count


def _reference_update(
    state: dict[str, float | None], kl_adv: float, kl_nat: float, lr: float, bert: float = 1.0
) -> None:
    """The reference script's weight update, line by line, on Python floats."""
    if state["init_nat"] is None:
        state["init_nat"] = kl_nat
    if state["init_adv"] is None:
        state["init_adv"] = kl_adv
    lhat_adv = kl_adv / state["init_adv"]
    lhat_nat = kl_nat / state["init_nat"]
    inv_rate_adv = lhat_adv**bert
    inv_rate_nat = lhat_nat**bert
    state["nat"] = state["nat"] - lr * (state["nat"] - inv_rate_nat / (inv_rate_adv + inv_rate_nat))
    state["adv"] = 1 - state["nat"]


def _fresh_reference() -> dict[str, float | None]:
    return {"nat": 0.5, "adv": 0.5, "init_nat": None, "init_adv": None}


# -- attack ---------------------------------------------------------------------------------------
def test_attack_spec_gauss_eval() -> None:
    spec = MTARD().attack_spec(THREAT)
    assert (spec.eps, spec.alpha, spec.steps) == (THREAT.eps, THREAT.alpha, 10)
    assert spec.init == "gauss" and spec.init_std == pytest.approx(1e-3)
    assert spec.student_mode == "eval"
    assert MTARD(MTARD.Config(attack_student_mode="train")).attack_spec(THREAT).student_mode == "train"


def test_attack_loss_is_per_sample_ce_on_the_student() -> None:
    ctx = _ctx(X, X_ADV)
    got = MTARD(num_classes=4).attack_loss(ctx, X_ADV)
    expected = [-math.log(softmax((3.0 * X_ADV[b]).double().tolist())[int(Y[b])]) for b in range(3)]
    assert got.shape == (3,)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    assert not ctx.teachers["robust"].net.inputs and not ctx.teachers["natural"].net.inputs  # no teacher


# -- loss -----------------------------------------------------------------------------------------
def test_first_batch_loss_by_hand_teachers_at_the_right_inputs() -> None:
    ctx = _ctx(X, X_ADV)
    out = MTARD(num_classes=4).loss(ctx)
    kl_adv = _ref_kl_mean_all(4.0 * X_ADV + ROB_BIAS, 3.0 * X_ADV)  # robust teacher at x'
    kl_nat = _ref_kl_mean_all(2.0 * X + NAT_BIAS, 3.0 * X)  # natural teacher at x
    assert out.terms["kl_adv"].item() == pytest.approx(kl_adv, rel=1e-5)
    assert out.terms["kl_nat"].item() == pytest.approx(kl_nat, rel=1e-5)
    # first batch: relative losses are 1 and 1, the target is 1/2, the weights stay 0.5/0.5
    assert out.terms["w_adv"].item() == 0.5 and out.terms["w_nat"].item() == 0.5
    assert out.total.item() == pytest.approx(0.5 * kl_adv + 0.5 * kl_nat, rel=1e-5)
    (robust_in,) = ctx.teachers["robust"].net.inputs
    (natural_in,) = ctx.teachers["natural"].net.inputs
    assert torch.equal(robust_in, X_ADV) and torch.equal(natural_in, X)
    # student order as the reference: x' first, then x
    assert [torch.equal(t, X_ADV) for t in ctx.student.inputs] == [True, False]


def test_exact_kl_option_and_cifar100_scale() -> None:
    exact = MTARD(MTARD.Config(teacher_log_eps=0.0), num_classes=4).loss(_ctx(X, X_ADV))
    assert exact.terms["kl_adv"].item() == pytest.approx(
        _ref_kl_mean_all(4.0 * X_ADV + ROB_BIAS, 3.0 * X_ADV, eps=0.0), rel=1e-5
    )
    batchmean = MTARD(MTARD.Config(teacher_log_eps=0.0, kl_reduction="batchmean"), num_classes=4).loss(_ctx(X, X_ADV))
    assert batchmean.terms["kl_nat"].item() == pytest.approx(4 * exact.terms["kl_nat"].item(), rel=1e-5)
    assert MTARD(num_classes=100).kl_scale == 10.0
    assert MTARD(num_classes=10).kl_scale == 1.0
    assert MTARD(MTARD.Config(kl_reduction="batchmean"), num_classes=100).kl_scale == 1.0
    assert MTARD(MTARD.Config(kl_scale=2.0), num_classes=100).kl_scale == 2.0


# -- adaptive weights -----------------------------------------------------------------------------
def test_weight_trajectory_controlled_losses_by_hand() -> None:
    """Four updates from chosen loss values against the reference's float arithmetic and by hand."""
    losses = [(0.8, 0.4), (0.6, 0.36), (0.5, 0.2), (0.7, 0.1)]
    distiller = MTARD(num_classes=4)
    ref = _fresh_reference()
    trajectory = []
    for l_adv, l_nat in losses:
        la, ln = torch.tensor(l_adv), torch.tensor(l_nat)  # float32, like the reference's losses
        distiller.update_weights(la, ln)
        _reference_update(ref, la.item(), ln.item(), 0.025)
        assert distiller.w_nat.item() == ref["nat"] and distiller.w_adv.item() == ref["adv"]  # bitwise
        trajectory.append(distiller.w_nat.item())
    # by hand (references 0.8 / 0.4 from the first batch only):
    # 1: r = (1, 1)          target 1/2          w = 0.5
    # 2: r = (0.75, 0.9)     target 0.9/1.65     w = 0.5 - 0.025 (0.5 - 0.545454...) = 0.5011364
    # 3: r = (0.625, 0.5)    target 0.5/1.125    w = w2 - 0.025 (w2 - 0.444444...)   = 0.4997191
    # 4: r = (0.875, 0.25)   target 0.25/1.125   w = w3 - 0.025 (w3 - 0.222222...)   = 0.4927816
    assert trajectory == pytest.approx([0.5, 0.50113636, 0.49971907, 0.49278164], abs=1e-7)
    assert distiller.init_loss_adv.item() == torch.tensor(0.8).item()
    assert distiller.init_loss_nat.item() == torch.tensor(0.4).item()
    assert bool(distiller.has_init_losses)
    assert distiller.w_adv.item() == 1 - distiller.w_nat.item()


def test_weight_trajectory_through_loss_updates_before_the_weighted_sum() -> None:
    """Loss values from stub models over 4 batches; the batch total uses the UPDATED weights."""
    distiller = MTARD(num_classes=4)
    student = Affine(3.0)
    ref = _fresh_reference()
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.rand(3, 4, generator=gen)
        x_adv = (x + 0.3 * torch.randn(3, 4, generator=gen)).clamp(0, 1)
        with torch.no_grad():
            student.w.fill_(3.0 - 0.5 * step)  # the student "learns": the losses move
        out = distiller.loss(_ctx(x, x_adv, student=student))
        kl_adv, kl_nat = out.terms["kl_adv"], out.terms["kl_nat"]
        _reference_update(ref, kl_adv.item(), kl_nat.item(), 0.025)
        assert distiller.w_nat.item() == ref["nat"] and distiller.w_adv.item() == ref["adv"]
        # reference: total_loss = weight["adv_loss"] * kl_Loss1 + weight["nat_loss"] * kl_Loss2
        assert torch.equal(out.total.detach(), ref["adv"] * kl_adv + ref["nat"] * kl_nat)
        assert out.terms["w_nat"].item() == pytest.approx(ref["nat"], rel=1e-7)
    assert ref["nat"] != 0.5


def test_relative_power_and_fixed_weights() -> None:
    distiller = MTARD(MTARD.Config(relative_power=2.0, weight_lr=0.5))
    ref = _fresh_reference()
    for l_adv, l_nat in [(1.0, 2.0), (0.5, 1.5)]:
        distiller.update_weights(torch.tensor(l_adv), torch.tensor(l_nat))
        _reference_update(ref, l_adv, l_nat, 0.5, bert=2.0)
    assert distiller.w_nat.item() == pytest.approx(ref["nat"], rel=1e-12)
    # r = (0.25, 0.5625): target 0.5625 / 0.8125; w = 0.5 - 0.5 (0.5 - 0.692307...) = 0.596154
    assert distiller.w_nat.item() == pytest.approx(0.5961538, abs=1e-6)

    fixed = MTARD(MTARD.Config(adaptive_weights=False, init_nat_weight=0.25), num_classes=4)
    for _ in range(2):
        out = fixed.loss(_ctx(X, X_ADV))
    assert (fixed.w_adv.item(), fixed.w_nat.item()) == (0.75, 0.25)
    assert out.total.item() == pytest.approx(
        0.75 * out.terms["kl_adv"].item() + 0.25 * out.terms["kl_nat"].item(), rel=1e-6
    )


def test_adaptive_nat_weight_is_the_reference_step() -> None:
    def t(v: float) -> torch.Tensor:
        return torch.tensor(v, dtype=torch.float64)

    # r = (0.75, 0.9): target 0.9 / 1.65; w = 0.5 - 0.025 (0.5 - 0.545454...) = 0.5011364 (as the trajectory test)
    new = adaptive_nat_weight(t(0.5), t(0.025), t(0.6), t(0.36), t(0.8), t(0.4), power=1.0)
    assert new.item() == pytest.approx(0.50113636, abs=1e-7)
    assert adaptive_nat_weight(t(0.3), t(0.025), t(0.0), t(0.0), t(0.0), t(0.4), power=1.0).item() == 0.3  # 0/0


def test_non_finite_update_keeps_the_weights() -> None:
    distiller = MTARD()
    distiller.update_weights(torch.tensor(0.0), torch.tensor(0.5))  # 0/0: reference would crash
    assert distiller.w_nat.item() == 0.5 and distiller.w_adv.item() == 0.5
    distiller.update_weights(torch.tensor(0.3), torch.tensor(0.5))  # 0.3/0 = inf
    assert distiller.w_nat.item() == 0.5
    distiller.update_weights(torch.tensor(float("nan")), torch.tensor(0.5))
    assert distiller.w_nat.item() == 0.5


def _fake_run(schedule: str = "multistep", milestones: list[int] | None = None) -> SimpleNamespace:
    optim = SimpleNamespace(schedule=schedule, milestones=list(milestones or []))
    return SimpleNamespace(config=SimpleNamespace(optim=optim))


def test_rate_decays_at_the_lr_milestones() -> None:
    distiller = MTARD()
    distiller.on_train_start(_fake_run(milestones=[2, 3]))
    assert distiller.milestones == (2, 3)
    rates = []
    for epoch in range(4):
        rates.append(distiller.on_epoch_end(epoch, 4)["weight_lr"])
    # reference: `if epoch in [215, 260, 285]: weight_learn_rate *= 0.1` after the 1-based epoch
    assert rates == [0.025, 0.025 * 0.1, 0.025 * 0.1 * 0.1, 0.025 * 0.1 * 0.1]
    # the next update uses the decayed rate
    ref = _fresh_reference()
    for l_adv, l_nat in [(0.8, 0.4), (0.4, 0.4)]:
        distiller.update_weights(torch.tensor(l_adv), torch.tensor(l_nat))
        _reference_update(ref, torch.tensor(l_adv).item(), torch.tensor(l_nat).item(), 0.025 * 0.1 * 0.1)
    assert distiller.w_nat.item() == ref["nat"]


def test_milestone_sources() -> None:
    cosine = MTARD()
    cosine.on_train_start(_fake_run(schedule="cosine", milestones=[1]))
    assert cosine.milestones == ()
    cosine.on_epoch_end(0, 2)
    assert cosine.weight_lr.item() == 0.025
    override = MTARD.config_from_mapping({"weight_lr_milestones": [1, 1], "weight_lr_gamma": 0.5})
    assert override.weight_lr_milestones == (1, 1)
    distiller = MTARD(override)
    distiller.on_train_start(_fake_run(milestones=[5]))
    assert distiller.milestones == (1, 1)
    assert distiller.on_epoch_end(0, 2)["weight_lr"] == 0.025 * 0.5 * 0.5  # repeated milestone, as MultiStepLR


def test_state_is_in_the_state_dict_and_restores_bitwise() -> None:
    a = MTARD()
    a.on_train_start(_fake_run(milestones=[1]))
    for l_adv, l_nat in [(0.8, 0.4), (0.6, 0.35), (0.55, 0.3)]:
        a.update_weights(torch.tensor(l_adv), torch.tensor(l_nat))
    a.on_epoch_end(0, 2)
    state = a.state_dict()
    assert set(state) == {"w_adv", "w_nat", "init_loss_adv", "init_loss_nat", "has_init_losses", "weight_lr"}
    b = MTARD()
    b.load_state_dict(state)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
        assert value.dtype == b.state_dict()[key].dtype
    # the restored distiller does not take new reference losses
    a.update_weights(torch.tensor(0.5), torch.tensor(0.2))
    b.update_weights(torch.tensor(0.5), torch.tensor(0.2))
    assert a.w_nat.item() == b.w_nat.item() and b.init_loss_adv.item() == torch.tensor(0.8).item()


# -- registration, validation, contract ------------------------------------------------------------
def test_registration_and_validation() -> None:
    registry = Registry("method")
    mtard.rbkd_register_methods(registry.bound("mtard"))
    assert registry.get("mtard") is MTARD
    assert MTARD.teacher_roles == ("robust", "natural")
    for bad in (
        {"init_nat_weight": 1.5},
        {"weight_lr": -0.1},
        {"weight_lr_gamma": 0.0},
        {"weight_lr_milestones": [0]},
        {"weight_lr_milestones": "215"},
        {"relative_power": 0.0},
        {"kl_reduction": "mean"},
        {"kl_scale": 0.0},
        {"teacher_log_eps": -1.0},
        {"attack_student_mode": "test"},
        {"weight_lr_rate": 0.1},
    ):
        with pytest.raises(UserError):
            MTARD.config_from_mapping(bad)


@pytest.fixture
def mtard_host() -> PluginHost:
    return PluginHost.create(autoload=False, extra=[mtard])


# -- training: exact resume and end to end on digits ----------------------------------------------
def _teacher_file(path, seed: int) -> str:
    torch.manual_seed(seed)
    net = build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=2.0)
    torch.save({"state_dict": net.state_dict()}, path)
    return f"file:{path}?arch=small-cnn&width=2.0"


@pytest.fixture(scope="module")
def teacher_specs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("mtard_teachers")
    return {"robust": _teacher_file(root / "robust.pt", 11), "natural": _teacher_file(root / "natural.pt", 12)}


def _digits_config(out_dir, teachers: dict[str, str], **sections):
    merge = {
        "method": {"name": "mtard"},
        "teachers": teachers,
        "optim": {"schedule": "multistep", "milestones": [1]},
        "eval": {"attacks": []},
    }
    raw = tiny_digits_raw(out_dir, merge=merge, **sections)
    return config_from_mapping(raw)


def test_resume_restores_weights_and_equals_uninterrupted(tmp_path, mtard_host, teacher_specs) -> None:
    full = train(_digits_config(tmp_path / "full", teacher_specs), host=mtard_host)
    cfg = _digits_config(tmp_path / "split", teacher_specs)
    first = train(cfg, host=mtard_host, stop_after=1)
    saved = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["distiller"]
    for key, value in first.distiller.state_dict().items():  # checkpointed exactly
        assert torch.equal(saved[key].cpu(), value.cpu()), key
    assert bool(saved["has_init_losses"]) and saved["w_nat"].item() != 0.5
    assert saved["weight_lr"].item() == 0.025 * 0.1  # decayed at the milestone (epoch 1)
    resumed = train(cfg, host=mtard_host, resume=True)
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    for key, value in full.distiller.state_dict().items():
        assert torch.equal(value, resumed.distiller.state_dict()[key]), key
    # the reference losses come from the first batch of epoch 1 only
    assert resumed.distiller.init_loss_adv.item() == saved["init_loss_adv"].item()
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert resumed.history[0]["weight_lr"] == 0.025 * 0.1


def test_end_to_end_distill_on_digits(tmp_path, mtard_host, teacher_specs) -> None:
    cfg = _digits_config(
        tmp_path / "e2e",
        teacher_specs,
        optim={"epochs": 1, "lr": 0.05},
        eval={"attacks": ["clean"], "final_n_examples": 50, "teachers": False},
    )
    reports = distill(cfg, host=mtard_host)
    assert len(reports) == 1
    rows = (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1
    row = json.loads(rows[0])
    assert {"kl_adv", "kl_nat", "w_adv", "w_nat", "weight_lr"} <= set(row)
    assert row["w_adv"] + row["w_nat"] == pytest.approx(1.0)
    assert all(math.isfinite(row[k]) for k in ("loss", "kl_adv", "kl_nat"))
    assert row["weight_lr"] == 0.025
