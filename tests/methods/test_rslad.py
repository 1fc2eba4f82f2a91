"""Numeric and protocol tests of ``rslad`` (and its label-mixing option)."""

from __future__ import annotations

import pytest
import torch
from robustbench_kd_plugins import rslad
from robustbench_kd_plugins.rslad import RSLAD, rslad_loss

from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.registry import Registry
from robustbench_kd.teachers import Teacher
from robustbench_kd.testing import Affine, TinyNet, batch_context, kl, softmax
from robustbench_kd.testing.stubs import assert_loss_trains_student, attacked_batch, soft_cross_entropy, wmse
from robustbench_kd.threat import ThreatSpec

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)
X = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
X_ADV = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.6, 0.8, 0.0], [0.1, 0.2, 0.9, 0.6]])
Y = torch.tensor([1, 3, 0])


def _ctx(x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, t_bias: torch.Tensor) -> BatchContext:
    c = x.shape[1]
    return batch_context(
        x,
        y,
        student=Affine(3.0, num_classes=c),
        teachers={"robust": Affine(4.0, t_bias, num_classes=c)},
        x_adv=x_adv,
        threat=THREAT,
    )


def _hand(x, x_adv, y, t_bias, mix: float = 1.0) -> tuple[float, float]:
    """(batchmean KL(q || p_S(x')), batchmean KL(q || p_S(x))) with q from the teacher on CLEAN x."""
    b_size = x.shape[0]
    kl_adv = kl_nat = 0.0
    for b in range(b_size):
        p_t = softmax((4.0 * x[b] + t_bias).double().tolist())
        q = [mix * p + (1 - mix) * (1.0 if k == int(y[b]) else 0.0) for k, p in enumerate(p_t)]
        kl_adv += kl(q, softmax((3.0 * x_adv[b]).double().tolist()))
        kl_nat += kl(q, softmax((3.0 * x[b]).double().tolist()))
    return kl_adv / b_size, kl_nat / b_size


T_BIAS = torch.tensor([0.5, -1.0, 2.0, 0.0])


def test_attack_spec() -> None:
    spec = RSLAD().attack_spec(THREAT)
    assert (spec.eps, spec.alpha, spec.steps) == (THREAT.eps, THREAT.alpha, 10)
    assert spec.init == "gauss" and spec.init_std == pytest.approx(1e-3)
    assert spec.student_mode == "eval"


def test_five_sixths_one_sixth_mean_all_by_hand() -> None:
    ctx = _ctx(X, X_ADV, Y, T_BIAS)
    out = RSLAD(num_classes=4).loss(ctx)
    kl_adv, kl_nat = _hand(X, X_ADV, Y, T_BIAS)
    assert out.terms["kl_adv"].item() == pytest.approx(kl_adv / 4, rel=1e-5)  # mean over B*C
    assert out.terms["kl_nat"].item() == pytest.approx(kl_nat / 4, rel=1e-5)
    assert out.total.item() == pytest.approx((5 / 6) * kl_adv / 4 + (1 / 6) * kl_nat / 4, rel=1e-5)
    assert ctx.teachers["robust"].net.calls == 1  # clean teacher, once


def test_cifar100_scale_times_ten() -> None:
    torch.manual_seed(0)
    x, x_adv = torch.rand(3, 100), torch.rand(3, 100)
    y, t_bias = torch.tensor([4, 50, 99]), torch.randn(100)
    kl_adv, kl_nat = _hand(x, x_adv, y, t_bias)
    expected = 10.0 * ((5 / 6) * kl_adv + (1 / 6) * kl_nat) / 100
    distiller = RSLAD(num_classes=100)
    assert distiller.kl_scale == 10.0
    assert distiller.loss(_ctx(x, x_adv, y, t_bias)).total.item() == pytest.approx(expected, rel=1e-5)
    explicit = RSLAD(RSLAD.Config(kl_scale=1.0), num_classes=100)
    assert explicit.loss(_ctx(x, x_adv, y, t_bias)).total.item() == pytest.approx(expected / 10, rel=1e-5)
    assert RSLAD(num_classes=10).kl_scale == 1.0
    assert RSLAD(RSLAD.Config(kl_reduction="batchmean"), num_classes=100).kl_scale == 1.0


@pytest.mark.parametrize("mix", [0.5, 0.0])
def test_label_mixing_target_by_hand(mix: float) -> None:
    out = RSLAD(RSLAD.Config(label_mix_alpha=mix)).loss(_ctx(X, X_ADV, Y, T_BIAS))
    kl_adv, kl_nat = _hand(X, X_ADV, Y, T_BIAS, mix=mix)
    assert torch.isfinite(out.total)
    assert out.total.item() == pytest.approx(((5 / 6) * kl_adv + (1 / 6) * kl_nat) / 4, rel=1e-5)


def test_adv_weight_option() -> None:
    out = RSLAD(RSLAD.Config(adv_weight=0.5, kl_reduction="batchmean")).loss(_ctx(X, X_ADV, Y, T_BIAS))
    kl_adv, kl_nat = _hand(X, X_ADV, Y, T_BIAS)
    assert out.total.item() == pytest.approx(0.5 * kl_adv + 0.5 * kl_nat, rel=1e-5)


def test_attack_loss_uses_unmixed_target_unless_asked() -> None:
    expected_plain = [
        kl(softmax((4.0 * X[b] + T_BIAS).double().tolist()), softmax((3.0 * X_ADV[b]).double().tolist()))
        for b in range(3)
    ]
    got = RSLAD(RSLAD.Config(label_mix_alpha=0.5)).attack_loss(_ctx(X, X_ADV, Y, T_BIAS), X_ADV)
    assert got.tolist() == pytest.approx(expected_plain, rel=1e-5)
    mixed = RSLAD(RSLAD.Config(label_mix_alpha=0.5, mix_in_attack=True)).attack_loss(_ctx(X, X_ADV, Y, T_BIAS), X_ADV)
    expected_mixed = []
    for b in range(3):
        p_t = softmax((4.0 * X[b] + T_BIAS).double().tolist())
        q = [0.5 * p + 0.5 * (1.0 if k == int(Y[b]) else 0.0) for k, p in enumerate(p_t)]
        expected_mixed.append(kl(q, softmax((3.0 * X_ADV[b]).double().tolist())))
    assert mixed.tolist() == pytest.approx(expected_mixed, rel=1e-5)


def test_end_to_end_batch() -> None:
    torch.manual_seed(0)
    student, teacher = TinyNet(10).train(), Teacher(TinyNet(10, seed=1))
    distiller = RSLAD(RSLAD.Config(label_mix_alpha=0.5))
    tracked = int(student.bn.num_batches_tracked)
    threat = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=2)
    ctx = attacked_batch(distiller, student, {"robust": teacher}, threat=threat)
    assert int(student.bn.num_batches_tracked) == tracked  # eval-mode attack leaves BN statistics alone
    assert student.training
    assert_loss_trains_student(distiller, ctx, frozen=[teacher])


def test_registration_and_validation() -> None:
    registry = Registry("method")
    rslad.rbkd_register_methods(registry.bound("rslad"))
    assert registry.get("rslad") is RSLAD
    assert RSLAD.teacher_roles == ("robust",)
    with pytest.raises(UserError):
        RSLAD.Config(label_mix_alpha=1.5)
    with pytest.raises(UserError):
        RSLAD.Config(kl_scale=0.0)
    assert RSLAD.config_from_mapping({"label_mix_alpha": 0.5}).label_mix_alpha == 0.5


def test_rslad_loss_combines_the_scaled_reductions() -> None:
    adv, nat = torch.tensor([0.4, 1.0, 0.1]), torch.tensor([0.2, 0.3, 0.7])
    out = rslad_loss(adv, nat, adv_weight=0.75, reduction="mean_all", scale=10.0, num_classes=4, name="ikl")
    assert out.terms["ikl_adv"].item() == pytest.approx(10.0 * 1.5 / 3 / 4)
    assert out.terms["ikl_nat"].item() == pytest.approx(10.0 * 1.2 / 3 / 4)
    assert out.total.item() == pytest.approx(0.75 * 1.25 + 0.25 * 1.0)


# -- IKL in place of the KL (divergence="ikl") -----------------------------------------------------
def _hand_ikl(rows: list[list[float]], mse_w: float = 5.0, sce_w: float = 1.0) -> tuple[float, float]:
    """(batchmean IKL(teacher(x) -> student(x')), batchmean IKL(teacher(x) -> student(x))), w = rows[y] rows[y]^T."""
    adv = nat = 0.0
    for b in range(3):
        zt = (4.0 * X[b] + T_BIAS).double().tolist()
        s = rows[int(Y[b])]
        for zs, acc in (((3.0 * X_ADV[b]).double().tolist(), "adv"), ((3.0 * X[b]).double().tolist(), "nat")):
            value = mse_w * wmse(zt, zs, s) + sce_w * soft_cross_entropy(softmax(zt), zs)
            if acc == "adv":
                adv += value
            else:
                nat += value
    return adv / 3, nat / 3


def test_default_divergence_is_kl_without_prior_state() -> None:
    assert RSLAD.Config().divergence == "kl"
    assert RSLAD(num_classes=4).state_dict() == {}
    assert set(RSLAD(RSLAD.Config(divergence="ikl"), num_classes=4).state_dict()) == {
        "prior.prior",
        "prior.accumulator",
    }
    assert RSLAD(RSLAD.Config(divergence="ikl", ikl_class_prior=False), num_classes=4).state_dict() == {}


def test_ikl_first_epoch_by_hand_mean_all() -> None:
    out = RSLAD(RSLAD.Config(divergence="ikl"), num_classes=4).loss(_ctx(X, X_ADV, Y, T_BIAS))
    adv, nat = _hand_ikl([[0.25] * 4] * 4)  # uniform prior in the first epoch
    assert out.terms["ikl_adv"].item() == pytest.approx(adv / 4, rel=1e-5)  # mean over B*C, as the KL
    assert out.terms["ikl_nat"].item() == pytest.approx(nat / 4, rel=1e-5)
    assert out.total.item() == pytest.approx((5 / 6) * adv / 4 + (1 / 6) * nat / 4, rel=1e-5)
    assert "kl_adv" not in out.terms


def test_ikl_prior_from_teacher_clean_outputs_lags_one_epoch() -> None:
    distiller = RSLAD(
        RSLAD.Config(divergence="ikl", ikl_mse_weight=2.0, ikl_sce_weight=0.5, kl_reduction="batchmean"), num_classes=4
    )
    ctx = _ctx(X, X_ADV, Y, T_BIAS)
    distiller.after_step(ctx, distiller.loss(ctx))
    assert torch.equal(distiller.prior.prior, torch.full((4, 4), 0.25))
    distiller.on_epoch_end(0, 2)
    rows = [[0.25] * 4 for _ in range(4)]
    for b in range(3):  # one sample per class: the row is the teacher's clean softmax at T = 4
        rows[int(Y[b])] = softmax(((4.0 * X[b] + T_BIAS) / 4.0).double().tolist())
    assert torch.allclose(distiller.prior.prior, torch.tensor(rows), atol=1e-6)
    out = distiller.loss(_ctx(X, X_ADV, Y, T_BIAS))
    adv, nat = _hand_ikl(rows, mse_w=2.0, sce_w=0.5)
    assert out.total.item() == pytest.approx((5 / 6) * adv + (1 / 6) * nat, rel=1e-5)


def test_ikl_without_wmse_trains_exactly_likekl() -> None:
    grads = []
    for config in (
        RSLAD.Config(label_mix_alpha=0.5),
        RSLAD.Config(label_mix_alpha=0.5, divergence="ikl", ikl_mse_weight=0.0),
    ):
        ctx = _ctx(X, X_ADV, Y, T_BIAS)
        RSLAD(config, num_classes=4).loss(ctx).total.backward()
        grads.append(ctx.student.w.grad.item())
    assert grads[1] == pytest.approx(grads[0], rel=1e-6)
    ctx = _ctx(X, X_ADV, Y, T_BIAS)  # the wMSE adds a gradient the KL never gives the student
    RSLAD(RSLAD.Config(divergence="ikl"), num_classes=4).loss(ctx).total.backward()
    assert ctx.student.w.grad.item() != pytest.approx(grads[0], rel=1e-3)


def test_ikl_attack_is_unchanged() -> None:
    kl = RSLAD(num_classes=4).attack_loss(_ctx(X, X_ADV, Y, T_BIAS), X_ADV)
    ikl = RSLAD(RSLAD.Config(divergence="ikl"), num_classes=4).attack_loss(_ctx(X, X_ADV, Y, T_BIAS), X_ADV)
    assert torch.equal(kl, ikl)


def test_ikl_validation() -> None:
    with pytest.raises(UserError, match="divergence"):
        RSLAD.Config(divergence="js")
    with pytest.raises(UserError, match="ikl_sce_weight"):
        RSLAD.Config(divergence="ikl", ikl_sce_weight=-1.0)


def test_ikl_resume_restores_the_prior_exactly(tmp_path, host) -> None:
    from robustbench_kd.config import config_from_mapping
    from robustbench_kd.students import build_student
    from robustbench_kd.training.loop import train

    torch.manual_seed(0)
    teacher = build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=1.0)
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "teacher.pt")

    def config(out: str):
        return config_from_mapping(
            {
                "run": {"out_dir": str(tmp_path / out), "progress": False, "deterministic": True, "seed": 3},
                "data": {"dataset": "digits", "batch_size": 100, "n_train": 200},
                "threat": {"eps": 0.2, "alpha": 0.1, "steps": 2},
                "student": {"arch": "small-cnn", "options": {"width": 0.5}},
                "method": {"name": "rslad", "divergence": "ikl"},
                "teachers": {"robust": f"file:{tmp_path / 'teacher.pt'}?arch=small-cnn&width=1.0"},
                "optim": {"epochs": 2, "lr": 0.1},
                "eval": {"attacks": []},
            }
        )

    full = train(config("full"), host=host)
    train(config("split"), host=host, stop_after=1)
    resumed = train(config("split"), host=host, resume=True)
    assert not torch.equal(full.distiller.prior.prior, torch.full((10, 10), 0.1))
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    for key, value in full.distiller.state_dict().items():
        assert torch.equal(value, resumed.distiller.state_dict()[key]), key
    assert "ikl_adv" in resumed.history[-1]
