"""Numeric and protocol tests of ``smaraad-plus`` (SmaraAD++, Eq. 10)."""

from __future__ import annotations

import math

import pytest
import torch
from cam_stubs import STUDENT, TEACHER, CamStub, check_distill_logs, check_resume_is_exact, mse, normalize, rho
from robustbench_kd_plugins import smaraad_plus
from robustbench_kd_plugins.smaraad import SmaraAD
from robustbench_kd_plugins.smaraad_plus import SmaraADPlus, entropy_weight

from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.registry import Registry
from robustbench_kd.testing import batch_context, softmax
from robustbench_kd.testing.runs import random_teacher_spec
from robustbench_kd.threat import ThreatSpec

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)
METHOD, SEED = "smaraad-plus", 7


# -- pure-Python reference formulas ----------------------------------------------------------------


def _entropy_w(logits: list[float]) -> float:
    p = softmax(logits)
    h = -sum(pi * math.log(pi) for pi in p if pi > 0)
    return min(max(1.0 - h / math.log(len(p)), 0.0), 1.0)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 2, 3, 3, generator=gen)
    x_adv = (x + 0.2 * (2 * torch.rand(x.shape, generator=gen) - 1)).clamp(0, 1)
    return x, x_adv, torch.tensor([0, 2, 3, 1])


def _ctx(x, x_adv, y, epoch: int = 0) -> BatchContext:
    return batch_context(
        x,
        y,
        student=CamStub(**STUDENT),
        teachers={"robust": CamStub(**TEACHER)},
        x_adv=x_adv,
        threat=THREAT,
        epoch=epoch,
        num_epochs=3,
    )


def _eq10_by_hand(
    x, x_adv, y, *, gamma=1000.0, rank_on="probs", c=2.0, lam=0.1, sign=-1.0, source="teacher_adv"
) -> float:
    s, t = CamStub(**STUDENT), CamStub(**TEACHER)
    total = 0.0
    for b in range(x.shape[0]):
        yb = int(y[b])
        zs_adv, zs_nat = s.hand_logits(x_adv[b]), s.hand_logits(x[b])
        zt_adv, zt_nat = t.hand_logits(x_adv[b]), t.hand_logits(x[b])
        scores = (lambda z: softmax(z)) if rank_on == "probs" else (lambda z: z)
        guidance = (
            c
            - rho(scores(zs_adv), scores(zt_adv), gamma)
            + mse(normalize(t.hand_cam(x_adv[b], yb)), normalize(s.hand_cam(x_adv[b], yb)))
        )
        reliability = softmax(zt_adv)[yb] ** lam
        w = _entropy_w(
            {"teacher_adv": zt_adv, "teacher_clean": zt_nat, "student_adv": zs_adv, "student_clean": zs_nat}[source]
        )
        ce = -math.log(softmax(zs_nat)[yb])
        self_term = sign * rho(scores(zs_nat), scores(zs_adv), gamma)
        total += reliability * w * guidance + (1 - reliability) * (self_term + ce)
    return total / x.shape[0]


# -- tests ----------------------------------------------------------------------------------------


def test_entropy_weight_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [20.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, -1.0]])
    w = entropy_weight(logits)
    assert w[0].item() == pytest.approx(0.0, abs=1e-6)  # uniform: maximal entropy
    assert w[1].item() == pytest.approx(1.0, abs=1e-6)  # (almost) one-hot
    assert w[2].item() == pytest.approx(_entropy_w([2.0, 1.0, 0.0, -1.0]), rel=1e-6)
    assert not entropy_weight(logits.requires_grad_(True)).requires_grad


def test_defaults() -> None:
    cfg = SmaraADPlus.Config()
    assert (cfg.alpha, cfg.c, cfg.gamma, cfg.lam, cfg.self_rho_sign) == (1.0, 2.0, 1000.0, 0.1, -1.0)
    assert (cfg.entropy_source, cfg.begin_epoch, cfg.rank_on, cfg.cam_class) == ("teacher_adv", 0, "probs", "label")
    spec = SmaraADPlus().attack_spec(THREAT)
    assert spec.init == "gauss" and spec.student_mode == "eval" and spec.teacher_grad


def test_eq10_by_hand_default() -> None:
    x, x_adv, y = _data()
    out = SmaraADPlus().loss(_ctx(x, x_adv, y))
    assert out.total.item() == pytest.approx(_eq10_by_hand(x, x_adv, y), rel=1e-5)
    s, t = CamStub(**STUDENT), CamStub(**TEACHER)
    rel = [softmax(t.hand_logits(x_adv[b]))[int(y[b])] ** 0.1 for b in range(4)]
    assert out.terms["reliability"].item() == pytest.approx(sum(rel) / 4, rel=1e-5)
    ce = [-math.log(softmax(s.hand_logits(x[b]))[int(y[b])]) for b in range(4)]
    assert out.terms["ce_nat"].item() == pytest.approx(sum(ce) / 4, rel=1e-5)


@pytest.mark.parametrize("source", ["teacher_adv", "teacher_clean", "student_adv", "student_clean"])
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_eq10_by_hand_flags(source: str, sign: float) -> None:
    x, x_adv, y = _data(1)
    cfg = SmaraADPlus.Config(gamma=5.0, rank_on="logits", lam=0.3, c=1.5, self_rho_sign=sign, entropy_source=source)
    out = SmaraADPlus(cfg).loss(_ctx(x, x_adv, y))
    expected = _eq10_by_hand(x, x_adv, y, gamma=5.0, rank_on="logits", c=1.5, lam=0.3, sign=sign, source=source)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)


def test_begin_epoch_falls_back_to_smaraad() -> None:
    x, x_adv, y = _data()
    cfg = SmaraADPlus.Config(begin_epoch=2)
    before = SmaraADPlus(cfg).loss(_ctx(x, x_adv, y, epoch=1))
    plain = SmaraAD().loss(_ctx(x, x_adv, y, epoch=1))
    assert before.total.item() == pytest.approx(plain.total.item(), rel=1e-6)
    assert "reliability" not in before.terms
    after = SmaraADPlus(cfg).loss(_ctx(x, x_adv, y, epoch=2))
    assert after.total.item() == pytest.approx(_eq10_by_hand(x, x_adv, y), rel=1e-5)


def _grads(cfg: SmaraADPlus.Config) -> tuple[float, list[torch.Tensor]]:
    x, x_adv, y = _data(2)
    ctx = _ctx(x, x_adv, y)
    out = SmaraADPlus(cfg).loss(ctx)
    out.total.backward()
    return out.total.item(), [p.grad.clone() for p in ctx.student.parameters()]


def test_detach_self_target_changes_gradient_not_value() -> None:
    value, grads = _grads(SmaraADPlus.Config(gamma=3.0, rank_on="logits"))
    value_d, grads_d = _grads(SmaraADPlus.Config(gamma=3.0, rank_on="logits", detach_self_target=True))
    assert value == pytest.approx(value_d, rel=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(grads, grads_d, strict=True))


def test_sample_weights_carry_no_gradient() -> None:
    """With the entropy weight from the student itself, the gradient must treat w (and P^lam) as constants."""
    from robustbench_kd.methods.soft_rank import soft_spearman

    cfg = SmaraADPlus.Config(gamma=3.0, rank_on="logits", entropy_source="student_adv")
    x, x_adv, y = _data(3)
    ctx = _ctx(x, x_adv, y)
    distiller = SmaraADPlus(cfg)
    out = distiller.loss(ctx)
    (got,) = torch.autograd.grad(out.total, ctx.student.features.weight)
    ctx = _ctx(x, x_adv, y)
    g = distiller.guidance(ctx, need_clean_logits=True)
    reliability = torch.softmax(g.teacher_adv, 1).gather(1, y.view(-1, 1)).squeeze(1) ** 0.1
    w = entropy_weight(g.logits_adv.detach())
    rho_self = soft_spearman(g.logits_nat, g.logits_adv, 3.0)
    ce = torch.nn.functional.cross_entropy(g.logits_nat, y, reduction="none")
    manual = (reliability * w * g.per_sample + (1 - reliability) * (-rho_self + ce)).mean()
    (expected,) = torch.autograd.grad(manual, ctx.student.features.weight)
    assert manual.item() == pytest.approx(out.total.item(), rel=1e-6)
    assert torch.allclose(got, expected, atol=1e-6)


def test_registration_and_validation() -> None:
    registry = Registry("method")
    smaraad_plus.rbkd_register_methods(registry.bound("smaraad-plus"))
    assert registry.get("smaraad-plus") is SmaraADPlus
    assert SmaraADPlus.teacher_roles == ("robust",) and "CVPR 2024" in SmaraADPlus.paper
    for bad in (
        {"lam": 2.0},
        {"self_rho_sign": 0.5},
        {"entropy_source": "both"},
        {"begin_epoch": -1},
        {"alpha": -0.1},
        {"cam_resize": "max"},
    ):
        with pytest.raises(UserError):
            SmaraADPlus.config_from_mapping(bad)
    with pytest.raises(TypeError):
        SmaraADPlus(SmaraAD.Config())
    assert SmaraADPlus.config_from_mapping({"self_rho_sign": 1.0, "cam_class": "top"}).self_rho_sign == 1.0


# -- end to end on digits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> str:
    return random_teacher_spec(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def test_distill_on_digits(tmp_path, host, digits_teacher) -> None:
    check_distill_logs(tmp_path / "run", host, digits_teacher, METHOD, seed=SEED, terms=("reliability", "entropy_w"))


def test_resume_equals_uninterrupted(tmp_path, host, digits_teacher) -> None:
    """begin_epoch = 1 switches to Eq. 10 exactly at the resume boundary."""
    full = check_resume_is_exact(tmp_path, host, digits_teacher, METHOD, seed=SEED, begin_epoch=1)
    assert "reliability" not in full.history[0] and "reliability" in full.history[1]
