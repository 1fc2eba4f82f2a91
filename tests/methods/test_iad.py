"""Numeric and protocol tests of ``iad`` (IAD-I and IAD-II)."""

from __future__ import annotations

import pytest
import torch
from robustbench_kd_plugins import iad
from robustbench_kd_plugins.iad import IAD
from torch import nn

from robustbench_kd.attacks import DistillationAttack
from robustbench_kd.config import config_from_mapping
from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.jobs.pipeline import distill
from robustbench_kd.methods.introspection import reliability_weights
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
N_BIAS = torch.tensor([-0.5, 1.5, 0.0, 1.0])
S_W, T_W, N_W = 3.0, 4.0, 2.0


def _rows(w: float, x: torch.Tensor, bias: torch.Tensor | None = None) -> list[list[float]]:
    b = torch.zeros(4) if bias is None else bias
    return [(w * x[i] + b).double().tolist() for i in range(x.shape[0])]


ZT_NAT, ZT_ADV, ZN_ADV = _rows(T_W, X, T_BIAS), _rows(T_W, X_ADV, T_BIAS), _rows(N_W, X_ADV, N_BIAS)
ZS_NAT, ZS_ADV = _rows(S_W, X), _rows(S_W, X_ADV)


def _w(beta: float = 0.1) -> list[float]:
    """w_b = p_T(y_b | x'_b) ** beta, the teacher on the ADVERSARIAL input."""
    return [softmax(ZT_ADV[b])[int(Y[b])] ** beta for b in range(3)]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _ctx(*, natural: bool = False) -> BatchContext:
    teachers = {"robust": Affine(T_W, T_BIAS)}
    if natural:
        teachers["natural"] = Affine(N_W, N_BIAS)
    return batch_context(X, Y, student=Affine(S_W), teachers=teachers, x_adv=X_ADV, threat=THREAT)


def _loss(distiller: IAD, epoch: int, *, natural: bool = False):
    distiller.on_epoch_start(epoch, 200)
    ctx = _ctx(natural=natural)
    return distiller.loss(ctx), ctx


# -- tests ---------------------------------------------------------------------------------------
def test_attack_spec_is_ard_attack() -> None:
    for variant in ("I", "II"):
        spec = IAD(IAD.Config(variant=variant)).attack_spec(THREAT)
        assert (spec.eps, spec.alpha, spec.steps) == (THREAT.eps, THREAT.alpha, 10)
        assert spec.init == "uniform" and spec.student_mode == "train" and not spec.teacher_grad


def test_attack_loss_is_per_sample_ce() -> None:
    got = IAD().attack_loss(_ctx(), X_ADV)
    assert got.tolist() == pytest.approx([cross_entropy(ZS_ADV[b], int(Y[b])) for b in range(3)], rel=1e-6)


def test_reliability_weight_by_hand() -> None:
    logits = torch.tensor(ZT_ADV, dtype=torch.float32, requires_grad=True)
    w = reliability_weights(logits, Y, 0.1)
    assert w.tolist() == pytest.approx(_w(0.1), rel=1e-6)
    assert not w.requires_grad  # a constant weight, as the reference's .item()
    assert reliability_weights(logits, Y, 1.0).tolist() == pytest.approx(_w(1.0), rel=1e-6)
    # Confident wrong teacher: tiny but positive weight, no underflow to NaN.
    w_far = reliability_weights(torch.tensor([[0.0, 200.0]]), torch.tensor([0]), 0.1)
    assert torch.isfinite(w_far).all() and 0 < w_far.item() < 1e-8


def test_variant_defaults() -> None:
    one, two = IAD(), IAD(IAD.Config(variant="II"))
    assert (one.alpha, one.natural_weight, one.begin, one.weight_teacher_term) == (1.0, 0.0, 60, False)
    assert (two.alpha, two.natural_weight, two.begin, two.weight_teacher_term) == (0.5, 0.25, 40, True)
    assert one.clean_forward_when_unused and not two.clean_forward_when_unused
    assert one.config.temperature == 1.0 and one.config.beta == 0.1 and one.config.kl_reduction == "batchmean"
    assert IAD(IAD.Config(variant="II", begin=3, weight_teacher_term=False)).begin == 3
    assert not IAD(IAD.Config(variant="II", weight_teacher_term=False)).weight_teacher_term
    assert one.teacher_roles == ("robust",) and one.optional_teacher_roles == ()
    assert two.teacher_roles == ("robust", "natural") and two.optional_teacher_roles == ()


def test_iad1_warm_up_switch_by_hand() -> None:
    """Before begin: ARD with batchmean; from begin on: + mean_b (1 - w_b) KL(p_S(x_b) || p_S(x'_b))."""
    distiller = IAD(num_classes=4)
    kl_teacher = _mean(kl(softmax(ZT_NAT[b]), softmax(ZS_ADV[b])) for b in range(3))  # teacher on CLEAN x
    w = _w()
    intro = _mean((1 - w[b]) * kl(softmax(ZS_NAT[b]), softmax(ZS_ADV[b])) for b in range(3))

    before, ctx = _loss(distiller, 59)
    assert not distiller.introspection_active
    assert before.total.item() == pytest.approx(kl_teacher, rel=1e-5)
    assert set(before.terms) == {"kl_teacher", "ce_nat"}
    assert ctx.student.calls == 2  # x' then x (reference's clean pass for BN statistics)
    assert set(ctx._memo) == {("robust", "clean")}  # no teacher(x') before the warm-up

    after, ctx = _loss(distiller, 60)
    assert distiller.introspection_active
    assert after.total.item() == pytest.approx(kl_teacher + intro, rel=1e-5)
    assert after.total.item() - before.total.item() == pytest.approx(intro, rel=1e-4)
    assert after.terms["kl_intro"].item() == pytest.approx(intro, rel=1e-5)
    assert after.terms["w_mean"].item() == pytest.approx(_mean(w), rel=1e-6)
    assert after.terms["kl_teacher"].item() == pytest.approx(kl_teacher, rel=1e-5)  # NOT weighted (code)
    assert ctx.student.calls == 2
    assert ctx.teachers["robust"].net.calls == 2  # once on x, once on x'
    # The per-sample weight is applied before the batch mean (not mean(1-w) * mean(KL)).
    kl_self = [kl(softmax(ZS_NAT[b]), softmax(ZS_ADV[b])) for b in range(3)]
    assert abs(intro - (1 - _mean(w)) * _mean(kl_self)) > 1e-4


def test_iad1_paper_form_weights_teacher_term_and_ce_temperature_by_hand() -> None:
    tau, a = 2.0, 0.6
    distiller = IAD(IAD.Config(temperature=tau, alpha=a, weight_teacher_term=True, begin=5), num_classes=4)
    w = _w()
    kl_t = [kl(softmax(ZT_NAT[b], tau), softmax(ZS_ADV[b], tau)) for b in range(3)]
    kl_self = [kl(softmax(ZS_NAT[b]), softmax(ZS_ADV[b])) for b in range(3)]  # tau = 1
    ce = _mean(cross_entropy(ZS_NAT[b], int(Y[b])) for b in range(3))  # CE on the CLEAN student output
    before, _ = _loss(distiller, 4)
    assert before.total.item() == pytest.approx(a * tau**2 * _mean(kl_t) + (1 - a) * ce, rel=1e-5)
    after, _ = _loss(distiller, 5)
    expected = (
        a * tau**2 * _mean(w[b] * kl_t[b] for b in range(3))
        + a * _mean((1 - w[b]) * kl_self[b] for b in range(3))
        + (1 - a) * ce
    )
    assert after.total.item() == pytest.approx(expected, rel=1e-5)


def test_iad2_warm_up_switch_by_hand() -> None:
    distiller = IAD(IAD.Config(variant="II"), num_classes=4)
    w = _w()
    kl_t = [kl(softmax(ZT_ADV[b]), softmax(ZS_ADV[b])) for b in range(3)]  # AT teacher on x'
    kl_n = [kl(softmax(ZN_ADV[b]), softmax(ZS_ADV[b])) for b in range(3)]  # natural teacher on x'
    kl_self = [kl(softmax(ZS_NAT[b]), softmax(ZS_ADV[b])) for b in range(3)]
    ce_adv = _mean(cross_entropy(ZS_ADV[b], int(Y[b])) for b in range(3))  # CE on the ADVERSARIAL output

    before, ctx = _loss(distiller, 39, natural=True)
    assert before.total.item() == pytest.approx(0.25 * ce_adv + 0.5 * _mean(kl_t) + 0.25 * _mean(kl_n), rel=1e-5)
    assert ctx.student.calls == 1  # IAD-II needs no clean pass before the warm-up
    assert set(ctx._memo) == {("robust", "adv"), ("natural", "adv")}

    after, ctx = _loss(distiller, 40, natural=True)
    teacher = _mean(w[b] * kl_t[b] for b in range(3))  # weighted by w (IAD-II code)
    intro = _mean((1 - w[b]) * kl_self[b] for b in range(3))
    assert after.total.item() == pytest.approx(0.25 * ce_adv + 0.5 * (teacher + intro) + 0.25 * _mean(kl_n), rel=1e-5)
    assert after.terms["kl_natural"].item() == pytest.approx(_mean(kl_n), rel=1e-5)
    assert ctx.student.calls == 2
    assert ctx.teachers["robust"].net.calls == 1  # one memoised pass on x' serves target and weight


def test_iad2_temperature_scales_teacher_and_introspection_terms() -> None:
    tau = 3.0
    distiller = IAD(IAD.Config(variant="II", temperature=tau, begin=0), num_classes=4)
    w = _w()
    kl_t = [kl(softmax(ZT_ADV[b], tau), softmax(ZS_ADV[b], tau)) for b in range(3)]
    kl_n = [kl(softmax(ZN_ADV[b], tau), softmax(ZS_ADV[b], tau)) for b in range(3)]
    kl_self = [kl(softmax(ZS_NAT[b]), softmax(ZS_ADV[b])) for b in range(3)]
    ce_adv = _mean(cross_entropy(ZS_ADV[b], int(Y[b])) for b in range(3))
    out, _ = _loss(distiller, 0, natural=True)
    expected = (
        0.25 * ce_adv
        + 0.5 * tau**2 * (_mean(w[b] * kl_t[b] for b in range(3)) + _mean((1 - w[b]) * kl_self[b] for b in range(3)))
        + 0.25 * tau**2 * _mean(kl_n)
    )
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("detach", [False, True])
def test_introspection_target_gradient(detach: bool) -> None:
    """The reference does not detach p_S(x): the loss back-propagates into the clean branch too."""
    distiller = IAD(IAD.Config(detach_self_target=detach, begin=0))
    out, ctx = _loss(distiller, 0)
    logits_adv, logits_nat = ctx.student.outputs  # order: x' then x
    g_nat = torch.autograd.grad(out.total, logits_nat, retain_graph=True, allow_unused=True)[0]
    if detach:
        assert g_nat is None or g_nat.abs().max() == 0
    else:
        assert g_nat is not None and g_nat.abs().max() > 0
    assert torch.autograd.grad(out.total, logits_adv)[0].abs().max() > 0


def test_clean_forward_flag() -> None:
    distiller = IAD(IAD.Config(clean_forward_when_unused=False))
    out, ctx = _loss(distiller, 0)
    assert ctx.student.calls == 1 and "ce_nat" not in out.terms


def test_validation_and_registration() -> None:
    registry = Registry("method")
    iad.rbkd_register_methods(registry.bound("iad"))
    assert registry.get("iad") is IAD
    for bad in (
        {"variant": "III"},
        {"alpha": 1.5},
        {"natural_weight": 0.2},
        {"variant": "II", "alpha": 0.8, "natural_weight": 0.3},
        {"begin": -1},
        {"begin": 1.5},
        {"kl_reduction": "mean"},
        {"attack_student_mode": "training"},
        {"temperature": 0.0},
    ):
        with pytest.raises(UserError):
            IAD.config_from_mapping(bad)
    assert IAD.config_from_mapping({"variant": "II", "begin": 10}).begin == 10


def test_end_to_end_batch_attack_in_train_mode_updates_bn() -> None:
    torch.manual_seed(0)

    class TinyNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4, 10),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    student = TinyNet().train()
    teachers = {"robust": TinyNet(), "natural": TinyNet()}
    distiller = IAD(IAD.Config(variant="II", begin=0))
    distiller.on_epoch_start(0, 1)
    threat = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=3)
    ctx = batch_context(
        torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,)), student=student, teachers=teachers, threat=threat
    )
    spec = distiller.attack_spec(threat)
    bn = student.body[1]
    tracked = int(bn.num_batches_tracked)
    atk = DistillationAttack.from_spec(student, lambda xa: distiller.attack_loss(ctx, xa), spec)
    ctx.x_adv = atk(ctx.x, ctx.y)
    assert int(bn.num_batches_tracked) == tracked + 3  # train-mode attack, as ARD
    out = distiller.loss(ctx)
    out.total.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for t in ctx.teachers.values() for p in t.parameters())


# -- through the trainer on digits ---------------------------------------------------------------
def _teacher_file(tmp_path, seed: int) -> str:
    return random_teacher_spec(tmp_path / f"teacher{seed}.pt", seed=seed)


def _digits(out_dir, teachers, method, eval_section=None):
    return config_from_mapping(
        tiny_digits_raw(out_dir, teachers=teachers, method=method, eval=eval_section or {"attacks": []})
    )


@pytest.fixture
def iad_host() -> PluginHost:
    return PluginHost.create(autoload=False, extra=[iad])


def test_resume_across_the_warm_up_is_exact(tmp_path, iad_host) -> None:
    teachers = {"robust": _teacher_file(tmp_path, 0)}
    method = {"name": "iad", "begin": 1}  # introspection switches on in the second epoch
    full = train(_digits(tmp_path / "full", teachers, method), host=iad_host)
    cfg = _digits(tmp_path / "split", teachers, method)
    first = train(cfg, host=iad_host, stop_after=1)
    assert "kl_intro" not in first.history[0]
    resumed = train(cfg, host=iad_host, resume=True)
    assert "kl_intro" in resumed.history[1] and "w_mean" in resumed.history[1]
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    assert resumed.distiller.method_state() == full.distiller.method_state() == {"epoch": 1}


def test_distill_iad2_on_digits_needs_natural_teacher(tmp_path, iad_host) -> None:
    robust, natural = _teacher_file(tmp_path, 0), _teacher_file(tmp_path, 1)
    method = {"name": "iad", "variant": "II", "begin": 1}
    with pytest.raises(UserError, match="natural"):
        distill(_digits(tmp_path / "missing", {"robust": robust}, method), host=iad_host)
    with pytest.raises(UserError, match="does not use teacher role"):
        distill(_digits(tmp_path / "extra", {"robust": robust, "natural": natural}, {"name": "iad"}), host=iad_host)
    cfg = _digits(
        tmp_path / "run",
        {"robust": robust, "natural": natural},
        method,
        {"attacks": ["clean", "pgd"], "final_n_examples": 32, "pgd_steps": 2, "teachers": False},
    )
    reports = distill(cfg, host=iad_host)
    assert len(reports) == 1 and 0.0 <= reports[0].accuracy["clean"] <= 1.0
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
