"""Numeric and protocol tests of ``adaad`` (AdaAD and AdaIAD)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from robustbench_kd_plugins import adaad
from robustbench_kd_plugins.adaad import AdaAD, AdaIAD
from torch import nn

from robustbench_kd.attacks import DistillationAttack
from robustbench_kd.config import config_from_mapping
from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.jobs.pipeline import distill
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.registry import Registry
from robustbench_kd.testing import Affine, batch_context, cross_entropy, kl, softmax
from robustbench_kd.testing.runs import random_teacher_spec, tiny_digits_raw
from robustbench_kd.threat import ThreatSpec
from robustbench_kd.training.loop import train

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)
X = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
X_ADV = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.6, 0.8, 0.0], [0.1, 0.2, 0.9, 0.6]])
Y = torch.tensor([1, 3, 0])
T_BIAS = torch.tensor([0.5, -1.0, 2.0, 0.0])


class Blind(nn.Module):
    """A student that ignores its input: constant (trainable) logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1) + 0.0 * x.sum()


# -- hand computation ----------------------------------------------------------------------------
def _rows(w: float, x: torch.Tensor, bias: torch.Tensor | None = None) -> list[list[float]]:
    b = torch.zeros(x.shape[1]) if bias is None else bias
    return [(w * x[i] + b).double().tolist() for i in range(x.shape[0])]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _ctx(s_w: float = 3.0, t_w: float = 4.0, *, x=X, x_adv=X_ADV, y=Y, t_bias=T_BIAS) -> BatchContext:
    c = x.shape[1]
    return batch_context(
        x,
        y,
        student=Affine(s_w, num_classes=c, trainable_bias=True),
        teachers={"robust": Affine(t_w, t_bias, num_classes=c, trainable_bias=True)},
        x_adv=x_adv,
        threat=THREAT,
    )


# -- attack --------------------------------------------------------------------------------------
def test_attack_spec() -> None:
    spec = AdaAD().attack_spec(THREAT)
    assert (spec.eps, spec.alpha, spec.steps) == (THREAT.eps, THREAT.alpha, 10)
    assert spec.init == "gauss" and spec.init_std == pytest.approx(1e-3)
    assert spec.student_mode == "eval" and spec.teacher_grad
    assert AdaIAD().attack_spec(THREAT) == spec  # AdaIAD attacks as AdaAD
    assert AdaAD(AdaAD.Config(init="none")).attack_spec(THREAT).init == "none"


def test_attack_loss_is_kl_teacher_to_student_at_the_same_point_by_hand() -> None:
    ctx = _ctx()
    got = AdaAD().attack_loss(ctx, X_ADV)
    zt, zs = _rows(4.0, X_ADV, T_BIAS), _rows(3.0, X_ADV)
    assert got.tolist() == pytest.approx([kl(softmax(zt[b]), softmax(zs[b])) for b in range(3)], rel=1e-5)
    assert torch.equal(ctx.teachers["robust"].net.inputs[-1], X_ADV)  # teacher at x', not at x
    assert not ctx._memo  # not the memoised no-grad teacher call


def test_attack_gradient_flows_through_the_teacher_input() -> None:
    """grad_x' [KL(T(x') || S(x'))] = student path + teacher path; the teacher path is not dropped."""
    ctx = _ctx()
    x_probe = X_ADV.clone().requires_grad_(True)
    (g_full,) = torch.autograd.grad(AdaAD().attack_loss(ctx, x_probe).sum(), x_probe)
    (g_student,) = torch.autograd.grad(
        AdaAD(AdaAD.Config(attack_teacher_grad=False)).attack_loss(ctx, x_probe).sum(), x_probe
    )
    # The teacher path alone, computed independently with F.kl_div and a detached student.
    teacher = ctx.teachers["robust"]
    with torch.no_grad():
        log_p_s = F.log_softmax(ctx.student(X_ADV), dim=1)
    kl_teacher_only = F.kl_div(log_p_s, F.softmax(teacher(x_probe), dim=1), reduction="sum")
    (g_teacher,) = torch.autograd.grad(kl_teacher_only, x_probe)
    assert g_teacher.abs().max() > 1e-3
    assert torch.allclose(g_full, g_student + g_teacher, atol=1e-6)
    # Teacher parameters are frozen and received nothing.
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_blind_student_attack_moves_only_because_of_the_teacher() -> None:
    torch.manual_seed(0)
    x = torch.rand(5, 4)
    student = Blind(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    ctx = batch_context(
        x, torch.zeros(5, dtype=torch.long), student=student, teachers={"robust": Affine(4.0, T_BIAS)}, threat=THREAT
    )
    teacher = ctx.teachers["robust"]
    x_probe = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(AdaAD().attack_loss(ctx, x_probe).sum(), x_probe)
    assert g.abs().min() > 0  # every input coordinate moves the teacher's output
    results = {}
    for teacher_grad in (True, False):
        distiller = AdaAD(AdaAD.Config(attack_teacher_grad=teacher_grad, init="none"))
        spec = distiller.attack_spec(THREAT)
        atk = DistillationAttack(
            student,
            lambda xa, d=distiller: d.attack_loss(ctx, xa),
            eps=spec.eps,
            alpha=spec.alpha,
            steps=3,
            init=spec.init,
            student_mode=spec.student_mode,
        )
        results[teacher_grad] = atk(x, ctx.y)
    assert torch.equal(results[False], x)  # no teacher path: zero gradient, x' never moves
    moved = (results[True] - x).abs()
    assert moved.max() > 0 and moved.max() <= THREAT.eps + 1e-6
    # ... and the KL between teacher and student at x' grew.
    before = AdaAD().attack_loss(ctx, x).sum().item()
    after = AdaAD().attack_loss(ctx, results[True]).sum().item()
    assert after > before
    assert all(p.grad is None for p in teacher.parameters())
    assert student.logits.grad is None  # the attack takes input gradients only


# -- loss ----------------------------------------------------------------------------------------
def test_kl_reduction_defaults() -> None:
    assert AdaAD(num_classes=10).kl_reduction == "mean_all"
    assert AdaAD(num_classes=100).kl_reduction == "batchmean"
    assert AdaIAD(num_classes=10).kl_reduction == "batchmean"
    assert AdaAD(AdaAD.Config(kl_reduction="sum"), num_classes=10).kl_reduction == "sum"
    assert AdaAD().temperature == 1.0
    assert AdaIAD().temperature == 30.0
    assert AdaIAD(AdaIAD.Config(temperature=1.0)).temperature == 1.0


def test_default_loss_mean_all_by_hand() -> None:
    ctx = _ctx()
    out = AdaAD(num_classes=4).loss(ctx)
    zt, zs = _rows(4.0, X_ADV, T_BIAS), _rows(3.0, X_ADV)
    kl_adv = _mean(kl(softmax(zt[b]), softmax(zs[b])) for b in range(3))
    assert out.total.item() == pytest.approx(kl_adv / 4, rel=1e-5)  # mean over B*C; alpha = 1
    assert set(out.terms) == {"kl_adv"}
    # Reference order: student(x) (BN statistics only, alpha = 1) then student(x').
    assert ctx.student.calls == 2
    assert torch.equal(ctx.student.inputs[0], X) and torch.equal(ctx.student.inputs[1], X_ADV)
    assert set(ctx._memo) == {("robust", "adv")}  # no clean teacher pass when alpha = 1


def test_alpha_mixes_clean_kl_by_hand() -> None:
    out = AdaAD(AdaAD.Config(alpha=0.7), num_classes=4).loss(_ctx())
    zt_adv, zs_adv = _rows(4.0, X_ADV, T_BIAS), _rows(3.0, X_ADV)
    zt_nat, zs_nat = _rows(4.0, X, T_BIAS), _rows(3.0, X)
    kl_adv = _mean(kl(softmax(zt_adv[b]), softmax(zs_adv[b])) for b in range(3))
    kl_nat = _mean(kl(softmax(zt_nat[b]), softmax(zs_nat[b])) for b in range(3))
    assert out.total.item() == pytest.approx((0.7 * kl_adv + 0.3 * kl_nat) / 4, rel=1e-5)
    assert out.terms["kl_nat"].item() == pytest.approx(kl_nat / 4, rel=1e-5)


def test_hundred_classes_batchmean_by_hand() -> None:
    torch.manual_seed(0)
    x, x_adv, t_bias = torch.rand(3, 100), torch.rand(3, 100), torch.randn(100)
    ctx = _ctx(x=x, x_adv=x_adv, y=torch.tensor([4, 50, 99]), t_bias=t_bias)
    zt, zs = _rows(4.0, x_adv, t_bias), _rows(3.0, x_adv)
    kl_adv = _mean(kl(softmax(zt[b]), softmax(zs[b])) for b in range(3))
    assert AdaAD(num_classes=100).loss(ctx).total.item() == pytest.approx(kl_adv, rel=1e-5)


def test_clean_forward_flag() -> None:
    ctx = _ctx()
    AdaAD(AdaAD.Config(clean_forward_when_unused=False)).loss(ctx)
    assert ctx.student.calls == 1 and torch.equal(ctx.student.inputs[0], X_ADV)


def test_adaiad_warm_up_switch_by_hand() -> None:
    """``adaiad``: IAD-I loss with the teacher target at x', tau = 30, batchmean, begin = 60."""
    tau = 30.0
    s_w, t_w = 30.0, 40.0  # large logits so that the tau = 30 distributions are far from uniform
    distiller = AdaIAD(num_classes=4)
    zt_adv, zs_adv, zs_nat = _rows(t_w, X_ADV, T_BIAS), _rows(s_w, X_ADV), _rows(s_w, X)
    kl_t = [kl(softmax(zt_adv[b], tau), softmax(zs_adv[b], tau)) for b in range(3)]
    w = [softmax(zt_adv[b])[int(Y[b])] ** 0.1 for b in range(3)]
    kl_self = [kl(softmax(zs_nat[b]), softmax(zs_adv[b])) for b in range(3)]

    distiller.on_epoch_start(59, 200)
    before = distiller.loss(_ctx(s_w, t_w))
    assert before.total.item() == pytest.approx(tau**2 * _mean(kl_t), rel=1e-4)
    assert "kl_intro" not in before.terms

    distiller.on_epoch_start(60, 200)
    ctx = _ctx(s_w, t_w)
    after = distiller.loss(ctx)
    intro = _mean((1 - w[b]) * kl_self[b] for b in range(3))
    assert after.total.item() == pytest.approx(tau**2 * _mean(kl_t) + intro, rel=1e-4)
    assert after.terms["kl_intro"].item() == pytest.approx(intro, rel=1e-4)
    assert after.terms["w_mean"].item() == pytest.approx(_mean(w), rel=1e-5)
    assert ctx.teachers["robust"].net.calls == 1  # one memoised teacher pass on x' (target and weight)
    assert ctx.student.calls == 2


def test_adaiad_options_by_hand() -> None:
    a = 0.8
    distiller = AdaIAD(AdaIAD.Config(temperature=1.0, alpha=a, begin=0, weight_teacher_term=True), num_classes=4)
    distiller.on_epoch_start(0, 1)
    zt_adv, zs_adv, zs_nat = _rows(4.0, X_ADV, T_BIAS), _rows(3.0, X_ADV), _rows(3.0, X)
    w = [softmax(zt_adv[b])[int(Y[b])] ** 0.1 for b in range(3)]
    kl_t = [kl(softmax(zt_adv[b]), softmax(zs_adv[b])) for b in range(3)]
    kl_self = [kl(softmax(zs_nat[b]), softmax(zs_adv[b])) for b in range(3)]
    ce = _mean(cross_entropy(zs_nat[b], int(Y[b])) for b in range(3))
    expected = (
        a * _mean(w[b] * kl_t[b] for b in range(3))
        + a * _mean((1 - w[b]) * kl_self[b] for b in range(3))
        + (1 - a) * ce
    )
    assert distiller.loss(_ctx()).total.item() == pytest.approx(expected, rel=1e-5)


def test_validation_and_registration() -> None:
    registry = Registry("method")
    adaad.rbkd_register_methods(registry.bound("adaad"))
    assert registry.get("adaad") is AdaAD and registry.get("adaiad") is AdaIAD
    assert AdaAD.teacher_roles == AdaIAD.teacher_roles == ("robust",)
    for bad in (
        {"variant": "iad"},
        {"alpha": -0.1},
        {"temperature": 0.0},
        {"kl_reduction": "mean"},
        {"init": "normal"},
        {"attack_student_mode": "training"},
        {"unknown": 1},
        {"beta": 0.1},
    ):
        with pytest.raises(UserError):
            AdaAD.config_from_mapping(bad)
    for bad in ({"begin": -1}, {"alpha": 1.5}, {"temperature": 0.0}, {"kl_reduction": "mean"}, {"variant": "adaiad"}):
        with pytest.raises(UserError):
            AdaIAD.config_from_mapping(bad)
    assert AdaAD.config_from_mapping({"variant": "adaad"}) == AdaAD.Config()


def test_retired_adaiad_variant_names_its_replacement() -> None:
    with pytest.raises(UserError) as info:
        AdaAD.config_from_mapping({"variant": "adaiad", "begin": 60})
    assert 'name = "adaiad"' in str(info.value) and "\n" not in str(info.value)


# -- through the trainer on digits ---------------------------------------------------------------
def _teacher_file(tmp_path) -> str:
    return random_teacher_spec(tmp_path / "teacher.pt")


def _digits(out_dir, teacher, method, eval_section=None):
    return config_from_mapping(
        tiny_digits_raw(out_dir, teachers={"robust": teacher}, method=method, eval=eval_section or {"attacks": []})
    )


@pytest.fixture
def ada_host() -> PluginHost:
    return PluginHost.create(autoload=False, extra=[adaad])


def test_resume_adaiad_across_the_warm_up_is_exact(tmp_path, ada_host) -> None:
    teacher = _teacher_file(tmp_path)
    method = {"name": "adaiad", "begin": 1, "temperature": 4.0}
    full = train(_digits(tmp_path / "full", teacher, method), host=ada_host)
    cfg = _digits(tmp_path / "split", teacher, method)
    train(cfg, host=ada_host, stop_after=1)
    resumed = train(cfg, host=ada_host, resume=True)
    assert "kl_intro" not in resumed.history[0] and "kl_intro" in resumed.history[1]
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    assert resumed.distiller.method_state() == full.distiller.method_state() == {"epoch": 1}


def test_distill_adaad_on_digits(tmp_path, ada_host) -> None:
    cfg = _digits(
        tmp_path / "run",
        _teacher_file(tmp_path),
        {"name": "adaad"},
        {"attacks": ["clean", "pgd"], "final_n_examples": 32, "pgd_steps": 2, "teachers": False},
    )
    reports = distill(cfg, host=ada_host)
    assert len(reports) == 1 and 0.0 <= reports[0].accuracy["clean"] <= 1.0
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2 and all('"kl_adv"' in row for row in rows)
