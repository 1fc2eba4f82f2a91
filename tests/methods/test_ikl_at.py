"""Numeric and protocol tests of ``ikl-at`` (IKL adversarial training, no teacher)."""

from __future__ import annotations

import pytest
import torch
from robustbench_kd_plugins import ikl_at
from robustbench_kd_plugins.ikl_at import IKLAT
from robustbench_kd_plugins.trades import TRADES
from torch import nn

from robustbench_kd.config import config_from_mapping
from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.jobs.pipeline import distill
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.registry import Registry
from robustbench_kd.storage.checkpoint import load_checkpoint
from robustbench_kd.testing import Affine, batch_context, cross_entropy, softmax
from robustbench_kd.testing.stubs import soft_cross_entropy
from robustbench_kd.testing.stubs import wmse as wmse_ref
from robustbench_kd.threat import ThreatSpec
from robustbench_kd.training.loop import train

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)
X = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.0, 1.0], [0.7, 0.2, 0.4, 0.6]])
X_ADV = torch.tensor([[0.9, 0.1, 0.3, 0.2], [0.5, 0.6, 0.8, 0.0], [0.1, 0.2, 0.9, 0.6]])
Y = torch.tensor([1, 3, 0])


def _sce(o_t: list[float], o_l: list[float]) -> float:
    return soft_cross_entropy(softmax(o_t), o_l)


def _ctx(
    student: nn.Module | None = None, x: torch.Tensor = X, x_adv: torch.Tensor = X_ADV, y: torch.Tensor = Y
) -> BatchContext:
    return batch_context(x, y, student=student or Affine(3.0, trainable_bias=True), x_adv=x_adv, threat=THREAT)


# -- epsilon curriculum and attack budget ---------------------------------------------------------
def _spec(distiller: IKLAT, epoch: int, num_epochs: int, threat: ThreatSpec = THREAT):
    distiller.on_epoch_start(epoch, num_epochs)
    return distiller.attack_spec(threat)


def test_default_curriculum_high_budget_is_five_steps_of_half_eps_every_epoch() -> None:
    distiller = IKLAT()
    for epoch in range(4):
        spec = _spec(distiller, epoch, 4)
        eps_e = THREAT.eps * (epoch + 1) / 4  # eps * e / E with the reference's 1-based e
        assert spec.eps == pytest.approx(eps_e, rel=1e-12)
        assert spec.alpha == pytest.approx(eps_e / 2, rel=1e-12)
        assert spec.steps == 5
        assert spec.init == "gauss" and spec.init_std == pytest.approx(1e-3) and spec.student_mode == "eval"
    assert _spec(distiller, 3, 4).eps == THREAT.eps  # the threat's radius in the last epoch
    # The reference schedule over 200 epochs: eps/200 first, 8/255 last, still 5 steps of eps_e/2.
    assert _spec(distiller, 0, 200).eps == pytest.approx(THREAT.eps / 200)
    assert (_spec(distiller, 199, 200).eps, _spec(distiller, 199, 200).steps) == (THREAT.eps, 5)


@pytest.mark.parametrize(
    "epoch1,steps,step_frac",
    [
        (1, 2, 1.0),
        (50, 2, 1.0),
        (51, 3, 2 / 3),
        (100, 3, 2 / 3),
        (101, 4, 0.5),
        (150, 4, 0.5),
        (151, 5, 0.5),
        (200, 5, 0.5),
    ],
)
def test_intended_budget_over_200_epochs(epoch1: int, steps: int, step_frac: float) -> None:
    spec = _spec(IKLAT(IKLAT.Config(attack_budget="intended")), epoch1 - 1, 200)
    eps_e = THREAT.eps * epoch1 / 200
    assert spec.eps == pytest.approx(eps_e, rel=1e-12)
    assert spec.steps == steps and spec.alpha == pytest.approx(step_frac * eps_e, rel=1e-12)


def test_low_and_threat_budgets_and_constant_schedule() -> None:
    low = _spec(IKLAT(IKLAT.Config(attack_budget="low")), 1, 4)
    assert (low.steps, low.eps, low.alpha) == (2, pytest.approx(THREAT.eps / 2), pytest.approx(THREAT.eps / 2))
    threat = _spec(IKLAT(IKLAT.Config(attack_budget="threat")), 0, 4)
    assert threat.steps == 10 and threat.eps == pytest.approx(THREAT.eps / 4)
    assert threat.alpha == pytest.approx(THREAT.alpha / 4)  # step scaled with the radius
    constant = _spec(IKLAT(IKLAT.Config(eps_schedule="constant")), 0, 4)
    assert (constant.eps, constant.alpha, constant.steps) == (THREAT.eps, THREAT.eps / 2, 5)
    assert IKLAT().attack_spec(THREAT).eps == THREAT.eps  # before any on_epoch_start: the full radius


# -- loss -------------------------------------------------------------------------------------------
def _hand_loss(s_vectors: list[list[float]], mse_w: float = 20.0, sce_w: float = 4.0) -> tuple[float, float, float]:
    ce = wmse = sce = 0.0
    for b in range(3):
        nat, adv = (3.0 * X[b]).double().tolist(), (3.0 * X_ADV[b]).double().tolist()
        ce += cross_entropy(nat, int(Y[b]))
        wmse += wmse_ref(nat, adv, s_vectors[b])
        sce += _sce(nat, adv)
    ce, wmse, sce = ce / 3, wmse / 3, sce / 3
    return ce + mse_w * wmse + sce_w * sce, wmse, sce


def test_first_epoch_loss_by_hand_uniform_prior() -> None:
    out = IKLAT(num_classes=4).loss(_ctx())
    total, wmse, sce = _hand_loss([[0.25] * 4] * 3)  # uniform prior: w = 1/C^2
    assert out.total.item() == pytest.approx(total, rel=1e-5)
    assert out.terms["wmse"].item() == pytest.approx(wmse, rel=1e-5)
    assert out.terms["sce"].item() == pytest.approx(sce, rel=1e-5)
    assert set(out.terms) == {"ce_nat", "wmse", "sce"}


def test_loss_uses_the_class_prior_row_of_each_label() -> None:
    distiller = IKLAT(IKLAT.Config(mse_weight=2.0, sce_weight=0.5), num_classes=4)
    rows = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.4, 0.3, 0.2, 0.1]])
    distiller.prior.prior.copy_(rows)
    out = distiller.loss(_ctx())
    total, _, _ = _hand_loss([rows[int(y)].tolist() for y in Y], mse_w=2.0, sce_w=0.5)
    assert out.total.item() == pytest.approx(total, rel=1e-5)


def test_wmse_trains_both_branches_sce_only_the_adversarial_one() -> None:
    nat_side, adv_side = nn.Linear(4, 4), nn.Linear(4, 4)

    class TwoHeads(nn.Module):
        """Clean inputs (first column 0.1) go through nat_side, adversarial ones through adv_side."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nat_side(x) if torch.equal(x, X) else adv_side(x)

    for mse_w, sce_w, nat_gets_grad_beyond_ce in [(1.0, 0.0, True), (0.0, 1.0, False)]:
        nat_side.zero_grad()
        adv_side.zero_grad()
        distiller = IKLAT(IKLAT.Config(mse_weight=mse_w, sce_weight=sce_w), num_classes=4)
        ctx = _ctx(TwoHeads())
        out = distiller.loss(ctx)
        (out.total - out.terms["ce_nat"]).backward()  # the CE term is a constant here: look at IKL only
        ce_grad = torch.autograd.grad(nn.functional.cross_entropy(nat_side(X), Y), nat_side.weight)[0]
        nat_side.weight.grad = nat_side.weight.grad - ce_grad
        assert adv_side.weight.grad.abs().sum() > 0
        assert (nat_side.weight.grad.abs().sum() > 1e-7) == nat_gets_grad_beyond_ce


def test_dkl_settings_give_trades_beta_one_in_gradient() -> None:
    """class_prior=False, T = 1, learner_mse_grad=False, weights 1/1: IKL-AT is TRADES(beta=1) in gradient."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x, x_adv = X.double(), X_ADV.double()
    dkl = IKLAT(
        IKLAT.Config(class_prior=False, prior_temperature=1.0, learner_mse_grad=False, mse_weight=1.0, sce_weight=1.0),
        num_classes=4,
    )
    grads = []
    for distiller in (dkl, TRADES(TRADES.Config(beta=1.0, kl_reduction="batchmean"))):
        net.zero_grad()
        distiller.loss(_ctx(net, x, x_adv)).total.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # The default IKL-AT (asymmetry broken, class prior) is a different objective.
    net.zero_grad()
    IKLAT(IKLAT.Config(mse_weight=1.0, sce_weight=1.0), num_classes=4).loss(_ctx(net, x, x_adv)).total.backward()
    assert not all(torch.allclose(p.grad, g) for p, g in zip(net.parameters(), grads[1], strict=True))


# -- attack loss --------------------------------------------------------------------------------
def test_attack_loss_is_sce_to_the_eval_mode_clean_output() -> None:
    ctx = _ctx()
    got = IKLAT(num_classes=4).attack_loss(ctx, X_ADV)
    expected = [_sce((3.0 * X[b]).double().tolist(), (3.0 * X_ADV[b]).double().tolist()) for b in range(3)]
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    with_mse = IKLAT(IKLAT.Config(attack_mse_weight=1.0), num_classes=4).attack_loss(_ctx(), X_ADV)
    extra = [wmse_ref((3.0 * X[b]).double().tolist(), (3.0 * X_ADV[b]).double().tolist(), [0.25] * 4) for b in range(3)]
    assert with_mse.tolist() == pytest.approx([e + m for e, m in zip(expected, extra, strict=True)], rel=1e-5)


def test_attack_mse_weight_reference_default_per_dataset() -> None:
    assert IKLAT(num_classes=10).attack_mse_weight == 0.0  # train_dkl_cifar10.py
    assert IKLAT(num_classes=100).attack_mse_weight == 1.0  # train_dkl_cifar100.py
    assert IKLAT(IKLAT.Config(attack_mse_weight=0.0), num_classes=100).attack_mse_weight == 0.0


def test_attack_target_is_computed_in_eval_mode_once() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
    ctx = _ctx(student)
    distiller = IKLAT(num_classes=4)
    distiller.prepare(ctx)
    assert student.training and student[1].training
    assert torch.equal(ctx.extras[ikl_at.CLEAN_LOGITS_KEY], student.eval()(X).detach())
    student.train()
    distiller.attack_loss(ctx, X_ADV)
    assert ctx.extras[ikl_at.CLEAN_LOGITS_KEY] is distiller.clean_logits(ctx)


# -- class prior through the method hooks -----------------------------------------------------------
def test_prior_from_previous_epoch_natural_outputs_at_temperature() -> None:
    distiller = IKLAT(num_classes=4)
    assert torch.equal(distiller.weight_vectors(Y, torch.zeros(3, 4)), torch.full((3, 4), 0.25))
    distiller.on_epoch_start(0, 2)
    ctx = _ctx()
    out = distiller.loss(ctx)
    distiller.after_step(ctx, out)
    assert torch.equal(distiller.prior.prior, torch.full((4, 4), 0.25))  # lags: nothing before the epoch ends
    metrics = distiller.on_epoch_end(0, 2)
    for b, y in enumerate(Y.tolist()):  # one sample per class: the row is that sample's softmax(z(x) / 4)
        assert distiller.prior.prior[y].tolist() == pytest.approx(
            softmax((3.0 * X[b]).double().tolist(), 4.0), rel=1e-5
        )
    assert distiller.prior.prior[2].tolist() == pytest.approx([0.25] * 4)  # class 2 unseen
    assert metrics["prior_true_class"] == pytest.approx(float(distiller.prior.prior.diagonal().mean()))
    assert torch.equal(distiller.prior.accumulator, torch.zeros(4, 4))


def test_no_prior_buffers_without_class_prior() -> None:
    assert set(IKLAT(num_classes=4).state_dict()) == {"prior.prior", "prior.accumulator"}
    assert IKLAT(IKLAT.Config(class_prior=False), num_classes=4).state_dict() == {}


# -- registration, validation, contract -----------------------------------------------------------
def test_registration_and_validation() -> None:
    registry = Registry("method")
    ikl_at.rbkd_register_methods(registry.bound("ikl-at"))
    assert registry.get("ikl-at") is IKLAT
    assert IKLAT.teacher_roles == ()
    with pytest.raises(UserError, match="not implemented yet"):
        IKLAT.Config(awp=True)
    for bad in (
        {"attack_budget": "medium"},
        {"eps_schedule": "cosine"},
        {"prior_mix": 2.0},
        {"prior_temperature": 0.0},
        {"mse_weight": -1.0},
        {"attack_student_mode": "training"},
    ):
        with pytest.raises(UserError):
            IKLAT.config_from_mapping(bad)
    assert IKLAT.config_from_mapping({"mse_weight": 12.0}).mse_weight == 12.0


# -- training runs on digits --------------------------------------------------------------------------
def _digits(out_dir, **method) -> object:
    return config_from_mapping(
        {
            "run": {"out_dir": str(out_dir), "progress": False, "deterministic": True, "seed": 3},
            "data": {"dataset": "digits", "batch_size": 100, "n_train": 200},
            "threat": {"eps": 0.2, "alpha": 0.1, "steps": 2},
            "student": {"arch": "small-cnn", "options": {"width": 0.5}},
            "method": {"name": "ikl-at", **method},
            "optim": {"epochs": 2, "lr": 0.2},
            "eval": {"attacks": ["clean", "pgd"], "final_n_examples": 32, "pgd_steps": 2, "teachers": False},
        }
    )


@pytest.fixture
def ikl_host() -> PluginHost:
    return PluginHost.create(autoload=False, extra=[ikl_at])


def test_resume_restores_the_class_prior_exactly(tmp_path, ikl_host) -> None:
    full = train(_digits(tmp_path / "full"), host=ikl_host)
    cfg = _digits(tmp_path / "split")
    first = train(cfg, host=ikl_host, stop_after=1)
    prior_after_one = first.distiller.prior.prior.clone()
    assert not torch.equal(prior_after_one, torch.full((10, 10), 0.1))  # epoch 1 moved it
    saved = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["distiller"]
    assert torch.equal(saved["prior.prior"], prior_after_one)
    resumed = train(cfg, host=ikl_host, resume=True)
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    for key, value in full.distiller.state_dict().items():
        assert torch.equal(value, resumed.distiller.state_dict()[key]), key
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_end_to_end_distill_on_digits(tmp_path, ikl_host) -> None:
    reports = distill(_digits(tmp_path / "run", attack_budget="intended", prior_temperature=2.0), host=ikl_host)
    (student,) = reports
    assert set(student.accuracy) == {"clean", "pgd-2"}
    assert 0.0 <= student.accuracy["pgd-2"] <= student.accuracy["clean"] <= 1.0
    assert student.results_path.is_file() and student.checkpoint_path.is_file()
