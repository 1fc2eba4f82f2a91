"""Numeric and protocol tests of ``gacd`` (stage 1), ``gacd-linear`` (stage 2) and of stage 3 as ``pgd-at``."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from robustbench_kd_plugins import gacd
from robustbench_kd_plugins.gacd.contrastive import (
    momentum_update,
    nce_log_likelihood,
    negative_scores,
    sample_negatives,
)
from robustbench_kd_plugins.gacd.distiller import GACD
from robustbench_kd_plugins.gacd.linear import GACDLinear
from robustbench_kd_plugins.gacd.transport import cosine_cost, ot_per_sample, sinkhorn_plan
from robustbench_kd_plugins.pgd_at import PGDAT
from torch import nn

from robustbench_kd.attacks import DistillationAttack
from robustbench_kd.config import config_from_mapping
from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.jobs.pipeline import distill
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.registry import Registry
from robustbench_kd.storage.checkpoint import load_checkpoint
from robustbench_kd.students import build_student
from robustbench_kd.teachers import EnsembleTeacher, Teacher, TeacherSet
from robustbench_kd.testing import batch_context, check_distiller, set_up
from robustbench_kd.testing.runs import tiny_digits_raw
from robustbench_kd.threat import ThreatSpec
from robustbench_kd.training.loop import train
from robustbench_kd.training.setup import build_optimizer

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)


@pytest.fixture
def gacd_host() -> PluginHost:
    return PluginHost.create(autoload=False, extra=[gacd])


# -- configuration ---------------------------------------------------------------------------------
def test_registration_and_validation() -> None:
    registry = Registry("method")
    gacd.rbkd_register_methods(registry.bound("gacd"))
    assert registry.get("gacd") is GACD
    assert registry.get("gacd-linear") is GACDLinear
    assert "gacd-aft" not in registry  # retired: stage 3 is pgd-at from the stage-1 checkpoint
    assert GACD.teacher_roles == ("robust",) and GACDLinear.teacher_roles == ()
    cfg = GACD.Config()
    assert (cfg.embed_dim, cfg.nce_k, cfg.nce_t, cfg.nce_momentum) == (128, 16384, 0.1, 0.5)
    assert not cfg.symmetric and cfg.sample_weights and cfg.positive == "adv"
    for bad in (
        {"nce_k": 0},
        {"nce_t": 0.0},
        {"nce_momentum": 1.0},
        {"positive": "both"},
        {"attack_budget": "pgd"},
        {"attack_features": "map"},
        {"attack_student_mode": "test"},
        {"ot_reg": 0.0},
        {"ot_iters": 0},
        {"ot_tol": -1.0},
        {"embed_dim": True},
    ):
        with pytest.raises(UserError):
            GACD.config_from_mapping(bad)
    with pytest.raises(UserError, match=re.escape("method.nce_momentum must be in [0, 1), got 1.0")):
        GACD.config_from_mapping({"nce_momentum": 1.0})
    with pytest.raises(UserError, match=re.escape("method.embed_dim must be an integer (default 128), got True")):
        GACD.Config(embed_dim=True)
    with pytest.raises(UserError):
        PGDAT.config_from_mapping({"init": "zeros"})  # stage 3's options
    assert GACD.config_from_mapping({"nce_k": 64}).nce_k == 64


def test_attack_specs() -> None:
    fs = GACD().attack_spec(THREAT)
    assert (fs.eps, fs.alpha, fs.steps, fs.init, fs.student_mode) == (THREAT.eps, THREAT.eps, 1, "uniform", "eval")
    budget = GACD(GACD.Config(attack_budget="threat")).attack_spec(THREAT)
    assert (budget.eps, budget.alpha, budget.steps, budget.init) == (THREAT.eps, THREAT.alpha, 10, "uniform")
    assert GACD(GACD.Config(positive="clean")).attack_spec(THREAT) is None
    assert GACDLinear().attack_spec(THREAT) is None
    # Stage 3 (adversarial fine-tuning) is pgd-at: Madry's PGD from a uniform start, student in eval mode.
    aft = PGDAT().attack_spec(THREAT)
    assert (aft.eps, aft.alpha, aft.steps, aft.init, aft.student_mode) == (
        THREAT.eps,
        THREAT.alpha,
        10,
        "uniform",
        "eval",
    )
    assert not aft.teacher_grad and not aft.large_step and aft.norm == THREAT.norm
    assert PGDAT(PGDAT.Config(steps=3)).attack_spec(THREAT).steps == 3


# -- building blocks by hand -----------------------------------------------------------------------
def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_momentum_update_by_hand() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    emb = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    momentum_update(bank, torch.tensor([2, 0]), emb, 0.5)
    row2 = _unit([0.5 * 3.0 + 0.5 * 0.0, 0.5 * 4.0 + 0.5 * 1.0])
    row0 = _unit([0.5 * 1.0 + 0.5 * 0.6, 0.5 * 0.0 + 0.5 * 0.8])
    assert bank[2].tolist() == pytest.approx(row2, rel=1e-6)
    assert bank[0].tolist() == pytest.approx(row0, rel=1e-6)
    assert bank[1].tolist() == [0.0, 2.0]  # untouched row
    assert bank[[0, 2]].norm(dim=1).tolist() == pytest.approx([1.0, 1.0], rel=1e-6)


def test_nce_log_likelihood_matches_crd_formula() -> None:
    pos = torch.tensor([0.3, -0.2])
    neg = torch.tensor([[0.1, -0.5, 0.9], [0.0, 0.4, -0.8]])
    t, z, n = 0.1, 7.5, 40
    got = nce_log_likelihood(pos, neg, temperature=t, z=z, n_data=n)
    k = 3
    m_pn = k / n
    for b in range(2):
        p = math.exp(pos[b].item() / t) / z
        expected = math.log(p / (p + m_pn + 1e-7))
        for i in range(k):
            pn = math.exp(neg[b, i].item() / t) / z
            expected += math.log(m_pn / (pn + m_pn + 1e-7))
        assert got[b].item() == pytest.approx(expected, rel=1e-5)


def test_negatives_only_from_other_known_classes_without_replacement() -> None:
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, -1, 1, 2, 2, 0])
    y = torch.tensor([0, 1, 2, 2, 0])
    for _ in range(50):
        idx = sample_negatives(y, labels, k=5)
        assert idx.shape == (5, 5)
        for b in range(len(y)):
            rows = idx[b].tolist()
            assert len(set(rows)) == len(rows)  # without replacement
            assert all(int(labels[r]) != int(y[b]) and int(labels[r]) >= 0 for r in rows)
    # k is clipped to the smallest other-class pool: 11 known rows, the largest class has 4 -> 7
    assert sample_negatives(y, labels, k=16384).shape == (5, 7)
    # every other-class row is eventually drawn (uniform over the pool, not a fixed subset)
    seen = set()
    for _ in range(100):
        seen |= set(sample_negatives(torch.tensor([0]), labels, k=2)[0].tolist())
    assert seen == {1, 2, 4, 5, 8, 9, 10}
    assert sample_negatives(y, torch.full((4,), -1), k=3).shape == (5, 0)


def test_negative_score_paths_agree() -> None:
    torch.manual_seed(0)
    anchor, bank = torch.randn(3, 5, requires_grad=True), torch.randn(20, 5)
    idx = torch.randint(0, 20, (3, 4))
    a = negative_scores(anchor, bank, idx, path="gather")
    b = negative_scores(anchor, bank, idx, path="matmul")
    torch.testing.assert_close(a, b)
    expected = torch.stack([torch.stack([bank[idx[i, j]] @ anchor[i] for j in range(4)]) for i in range(3)])
    torch.testing.assert_close(a, expected)
    (ga,) = torch.autograd.grad(a.sum(), anchor)
    (gb,) = torch.autograd.grad(b.sum(), anchor)
    torch.testing.assert_close(ga, gb)


def test_sinkhorn_plan_has_uniform_marginals() -> None:
    torch.manual_seed(0)
    cost = torch.rand(5, 5) * 2
    plan = sinkhorn_plan(cost, reg=0.1, iters=200, tol=0.0)
    torch.testing.assert_close(plan.sum(1), torch.full((5,), 0.2), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(0), torch.full((5,), 0.2), atol=1e-5, rtol=0)
    plan = sinkhorn_plan(cost, reg=0.01, iters=100, tol=0.0)  # the reference setting: columns exact after v
    torch.testing.assert_close(plan.sum(0), torch.full((5,), 0.2), atol=1e-5, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((5,), 0.2), atol=1e-2, rtol=0)
    # small reg: close to the assignment optimum, so the cost is at most the identity pairing's
    assert float((plan * cost).sum()) <= float(cost.diagonal().mean()) + 1e-3


# -- the loss by hand with stub networks -------------------------------------------------------------
def _linear(weight: list[list[float]]) -> nn.Module:
    """A network whose penultimate features are its input: Sequential(Linear)."""
    lin = nn.Linear(len(weight[0]), len(weight), bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(weight))
    return nn.Sequential(lin)


T_W = [[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]]  # teacher: 2 classes on 3 features
S_W = [[0.2, -0.1, 0.3], [0.4, 0.0, -0.2]]
X = torch.tensor([[0.2, 0.7, 0.1], [0.9, 0.3, 0.5]])
Y = torch.tensor([0, 1])
INDEX = torch.tensor([0, 2])
BANK = torch.tensor([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0], [-0.6, 0.8]])
BANK_T = torch.tensor([[0.0, 1.0], [0.8, -0.6], [-1.0, 0.0], [0.6, 0.8]])
LABELS = torch.tensor([0, 0, 1, 1])
HEAD_S = ([[1.0, 0.5, -0.5], [0.0, 1.0, 2.0]], [0.1, -0.2])
HEAD_T = ([[0.5, 0.0, 1.0], [-1.0, 1.0, 0.0]], [0.0, 0.3])


def _stub(symmetric: bool = False, sample_weights: bool = True) -> tuple[GACD, BatchContext]:
    distiller = GACD(
        GACD.Config(embed_dim=2, positive="clean", symmetric=symmetric, sample_weights=sample_weights), num_classes=2
    )
    ctx = batch_context(
        X, Y, index=INDEX.clone(), student=_linear(S_W), teachers={"robust": _linear(T_W)}, threat=THREAT
    )
    set_up(distiller, ctx)  # builds the heads from the networks' feature widths
    with torch.no_grad():
        for head, (w, b) in ((distiller.embed_s, HEAD_S), (distiller.embed_t, HEAD_T)):
            head.weight.copy_(torch.tensor(w))
            head.bias.copy_(torch.tensor(b))
    distiller.memory_s = BANK.clone()
    distiller.memory_t = BANK_T.clone() if symmetric else torch.zeros(0, 2)
    distiller.memory_labels = LABELS.clone()
    return distiller, ctx


def _embed(w: list[list[float]], b: list[float], f: list[float]) -> list[float]:
    return _unit([_dot(row, f) + bias for row, bias in zip(w, b, strict=True)])


def _hand(symmetric: bool, sample_weights: bool, z: tuple[float, float] | None = None):
    """Loss terms by hand; with 2 rows per class every other-class row is a negative (k_eff = 2)."""
    temp, n = 0.1, 4
    rows = []
    for b in range(2):
        f = X[b].tolist()
        s = _embed(*HEAD_S, f)
        t = _embed(*HEAD_T, f)
        logits = [_dot(row, f) for row in T_W]
        w = math.exp(logits[int(Y[b])]) / sum(math.exp(v) for v in logits) if sample_weights else 1.0
        negs = [r for r in range(4) if int(LABELS[r]) != int(Y[b])]
        rows.append((s, t, w, negs))
    scores_t = [[_dot(t, s)] + [_dot(t, BANK[r].tolist()) for r in negs] for s, t, w, negs in rows]
    scores_s = [[_dot(t, s)] + [_dot(s, BANK_T[r].tolist()) for r in negs] for s, t, w, negs in rows]
    if z is None:
        z_t = sum(math.exp(v / temp) for row in scores_t for v in row) / 6 * n
        z_s = sum(math.exp(v / temp) for row in scores_s for v in row) / 6 * n
    else:
        z_t, z_s = z

    def nce(scores, zz):
        total = 0.0
        for (_s, _t, w, _negs), row in zip(rows, scores, strict=True):
            p = [math.exp(v / temp) / zz for v in row]
            ll = math.log(p[0] / (p[0] + 2 / n + 1e-7)) + sum(math.log((2 / n) / (q + 2 / n + 1e-7)) for q in p[1:])
            total += w * ll
        return -total / 2

    out = {
        "nce": nce(scores_t, z_t),
        "z_t": z_t,
        "z_s": z_s,
        "w": [r[2] for r in rows],
        "s": [r[0] for r in rows],
        "t": [r[1] for r in rows],
    }
    if symmetric:
        out["nce_sym"] = nce(scores_s, z_s)
    return out


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("sample_weights", [True, False])
def test_nce_loss_by_hand(symmetric: bool, sample_weights: bool) -> None:
    distiller, ctx = _stub(symmetric, sample_weights)
    out = distiller.loss(ctx)
    hand = _hand(symmetric, sample_weights)
    assert out.terms["nce"].item() == pytest.approx(hand["nce"], rel=1e-5)
    assert out.terms["w_mean"].item() == pytest.approx(sum(hand["w"]) / 2, rel=1e-5)
    assert distiller.nce_z[0].item() == pytest.approx(hand["z_t"], rel=1e-5)
    if symmetric:
        assert out.terms["nce_sym"].item() == pytest.approx(hand["nce_sym"], rel=1e-5)
        assert distiller.nce_z[1].item() == pytest.approx(hand["z_s"], rel=1e-5)
        assert out.total.item() == pytest.approx(hand["nce"] + hand["nce_sym"], rel=1e-5)
    else:
        assert "nce_sym" not in out.terms
        assert out.total.item() == pytest.approx(hand["nce"], rel=1e-5)


def test_z_is_set_on_the_first_batch_then_frozen() -> None:
    distiller, ctx = _stub(symmetric=True)
    assert not bool(distiller.nce_z_set) and distiller.nce_z.tolist() == [-1.0, -1.0]
    distiller.loss(ctx)
    assert bool(distiller.nce_z_set)
    z_first = distiller.nce_z.clone()
    hand = _hand(True, True)
    assert z_first.tolist() == pytest.approx([hand["z_t"], hand["z_s"]], rel=1e-5)
    # another batch (other inputs, updated bank): Z stays, and the loss uses the frozen Z
    distiller.memory_s = torch.nn.functional.normalize(BANK + 0.3, dim=1)
    ctx.x = X.flip(0).clone()
    distiller.loss(ctx)
    assert torch.equal(distiller.nce_z, z_first)


def test_memory_update_after_step_by_hand() -> None:
    distiller, ctx = _stub(symmetric=True)
    out = distiller.loss(ctx)
    hand = _hand(True, True)
    distiller.after_step(ctx, out)
    for b, row in enumerate(INDEX.tolist()):
        s_new = _unit([0.5 * o + 0.5 * e for o, e in zip(BANK[row].tolist(), hand["s"][b], strict=True)])
        t_new = _unit([0.5 * o + 0.5 * e for o, e in zip(BANK_T[row].tolist(), hand["t"][b], strict=True)])
        assert distiller.memory_s[row].tolist() == pytest.approx(s_new, rel=1e-5, abs=1e-6)
        assert distiller.memory_t[row].tolist() == pytest.approx(t_new, rel=1e-5, abs=1e-6)
    for row in (1, 3):  # rows outside the batch are untouched
        assert torch.equal(distiller.memory_s[row], BANK[row])
        assert torch.equal(distiller.memory_t[row], BANK_T[row])
    snapshot = distiller.memory_s.clone()
    distiller.after_step(ctx, out)  # no pending embeddings: no second update
    assert torch.equal(distiller.memory_s, snapshot)


def test_lazy_bank_grows_with_indices_and_requires_them() -> None:
    distiller, ctx = _stub()
    distiller.memory_s = torch.zeros(0, 2)
    distiller.memory_labels = torch.zeros(0, dtype=torch.long)
    ctx.index = torch.tensor([5, 1])
    distiller.loss(ctx)
    assert distiller.bank_size == 6
    assert distiller.memory_labels.tolist() == [-1, 1, -1, -1, -1, 0]
    ctx.index = None
    with pytest.raises(UserError, match="index"):
        distiller.loss(ctx)


def test_ensemble_teacher_rejected() -> None:
    distiller, ctx = _stub()
    ctx.teachers = TeacherSet({"robust": EnsembleTeacher([Teacher(_linear(T_W)), Teacher(_linear(T_W))])})
    with pytest.raises(UserError, match="ensemble"):
        distiller.loss(ctx)


# -- attack ----------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _batch(seed: int = 0, b: int = 8) -> BatchContext:
    torch.manual_seed(seed)
    threat = ThreatSpec(eps=0.1, alpha=0.025, steps=4)
    return batch_context(
        torch.rand(b, 3, 8, 8),
        torch.arange(b) % 4,
        index=torch.arange(b),
        student=TinyNet().train(),
        teachers={"robust": TinyNet()},
        threat=threat,
    )


@pytest.mark.parametrize("features", ["penultimate", "logits"])
def test_ot_attack_is_finite_and_increases_feature_distortion(features: str) -> None:
    distiller = GACD(GACD.Config(attack_features=features))
    ctx = _batch()
    spec = distiller.attack_spec(ctx.threat)
    student = ctx.student
    bn = student.body[1]
    tracked = int(bn.num_batches_tracked)
    attack = DistillationAttack.from_spec(student, lambda xa: distiller.attack_loss(ctx, xa), spec)
    torch.manual_seed(1)
    x_adv = attack(ctx.x, ctx.y)
    torch.manual_seed(1)  # the same uniform start the attack drew
    start = (ctx.x + torch.empty_like(ctx.x).uniform_(-spec.eps, spec.eps)).clamp(0, 1)
    assert int(bn.num_batches_tracked) == tracked and student.training  # eval-mode attack, mode restored
    student.eval()
    with torch.no_grad():
        at_clean = distiller.attack_loss(ctx, ctx.x)
        at_start = distiller.attack_loss(ctx, start)
        at_adv = distiller.attack_loss(ctx, x_adv)
    assert at_adv.shape == (8,) and torch.isfinite(at_adv).all()
    # random noise of the same size barely moves the features; the one FS step at least doubles the OT distance
    assert at_adv.sum() > 2 * max(at_clean.sum(), at_start.sum())
    assert (x_adv - ctx.x).abs().max() <= spec.eps + 1e-6
    # the per-sample shares sum to the OT objective sum(T * C)
    feats = lambda x: distiller._attack_features(student, x)  # noqa: E731
    with torch.no_grad():
        clean, adv = feats(ctx.x), feats(x_adv)
    cost = cosine_cost(clean, adv)
    plan = sinkhorn_plan(cost, reg=0.01, iters=100, tol=0.1)
    assert at_adv.sum().item() == pytest.approx(float((plan * cost).sum()), rel=1e-5)
    assert ot_per_sample(clean, adv, reg=0.01, iters=100, tol=0.1).tolist() == pytest.approx(at_adv.tolist(), rel=1e-5)


# -- optimiser, contract -------------------------------------------------------------------------------
def test_heads_get_gradients_and_are_in_the_optimiser() -> None:
    distiller = GACD(GACD.Config(nce_k=4))
    ctx = _batch()
    cfg = config_from_mapping({"optim": {"lr": 0.1, "epochs": 1}})
    set_up(distiller, ctx)  # the trainer's order: on_setup, then the optimiser
    optimizer = build_optimizer(cfg, ctx.student, distiller)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    heads = [distiller.embed_s.weight, distiller.embed_s.bias, distiller.embed_t.weight, distiller.embed_t.bias]
    assert all(id(p) in in_optimizer for p in heads)
    ctx.x_adv = ctx.x.clone()
    out = distiller.loss(ctx)
    before = [p.detach().clone() for p in heads]
    optimizer.zero_grad()
    out.total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads)
    assert distiller.embed_s.weight.shape == (128, 8)
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, heads, strict=True))
    assert all(p.grad is None for p in ctx.teachers["robust"].parameters())


def test_stage3_is_pgd_at_with_the_options_of_the_retired_gacd_aft(host: PluginHost) -> None:
    """The retired ``gacd-aft`` configurations, now ``pgd-at`` (same spec, same CE(z_S(x'), y) loss)."""
    check_distiller(PGDAT, host=host)
    check_distiller(PGDAT, host=host, config=PGDAT.Config(steps=1, init="gauss", attack_student_mode="train"))
    ctx = _batch()
    ctx.x_adv = (ctx.x + 0.05).clamp(0, 1)
    out = PGDAT().loss(ctx)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(ctx.student(ctx.x_adv), ctx.y)
    assert set(out.terms) == {"ce_adv"}
    torch.testing.assert_close(out.total.detach(), expected, rtol=1e-6, atol=0)


def test_linear_probe_trains_only_the_classifier_with_frozen_bn() -> None:
    ctx = _batch()
    student = ctx.student
    bn = student.body[1]
    stats = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    out = set_up(GACDLinear(GACDLinear.Config(standardize=False)), ctx).loss(ctx)
    out.total.backward()
    assert student.training and bn.training  # modes restored
    assert torch.equal(bn.running_mean, stats[0]) and int(bn.num_batches_tracked) == stats[1]
    fc = student.body[-1]
    assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in student.named_parameters() if not name.startswith("body.5."))


def _penultimate(student: nn.Module, x: torch.Tensor) -> torch.Tensor:
    student.eval()
    with torch.no_grad():
        return student.body[:-1](x)


def test_standardised_probe_starts_as_the_classifier_and_folds_back_exactly() -> None:
    ctx = _batch()
    student, fc = ctx.student, ctx.student.body[-1]
    probe = set_up(GACDLinear(), ctx)
    out = probe.loss(ctx)
    assert student.training  # modes restored
    feats = _penultimate(student, ctx.x)
    mu, sigma = feats.mean(0), feats.std(0, unbiased=False)
    sigma = sigma.clamp_min(0.1 * sigma[sigma > 0].median())
    torch.testing.assert_close(probe.feature_mean, mu)
    torch.testing.assert_close(probe.feature_std, sigma)
    # V = W sigma, c = b + W mu: the probe's logits equal the classifier's before any step.
    torch.testing.assert_close(probe.probe((feats - mu) / sigma), fc(feats), rtol=1e-5, atol=1e-5)
    ce_before = out.total.item()
    student.train()
    out.total.backward()
    assert fc.weight.grad is None  # the classifier itself is not optimised ...
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.5)
    optimizer.step()
    probe.after_step(ctx, out)  # ... it receives the folded probe: W = V / sigma, b = c - W mu
    torch.testing.assert_close(fc.weight, probe.probe.weight / sigma)
    torch.testing.assert_close(fc.bias, probe.probe.bias - (probe.probe.weight / sigma) @ mu)
    after = probe.loss(ctx)
    torch.testing.assert_close(fc(feats), probe.probe((feats - mu) / sigma), rtol=1e-5, atol=1e-5)
    assert after.total.item() < ce_before


def test_standardised_probe_learns_offset_features_where_plain_sgd_cannot() -> None:
    """Features with a large common offset (as stage 1 leaves them): same SGD, same steps."""
    torch.manual_seed(0)
    centres = torch.randn(4, 16)
    y = torch.arange(256) % 4
    x = centres[y] + 0.3 * torch.randn(256, 16)

    class Offset(nn.Module):  # penultimate = 30 + 10 x, then the classifier
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.fc(30.0 + 10.0 * inputs)

    def train_probe(standardize: bool) -> tuple[list[float], float]:
        torch.manual_seed(1)
        student = Offset()
        method = GACDLinear(GACDLinear.Config(standardize=standardize), num_classes=4)
        ctx = batch_context(x, y, index=torch.arange(256), student=student, threat=THREAT)
        set_up(method, ctx)  # builds the probe (standardised) before the optimiser
        params = list(method.parameters()) if standardize else list(student.fc.parameters())
        optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        losses = []
        for _ in range(30):
            out = method.loss(ctx)
            optimizer.zero_grad()
            out.total.backward()
            optimizer.step()
            method.after_step(ctx, out)
            losses.append(out.total.item())
        with torch.no_grad():
            return losses, (student(x).argmax(1) == y).float().mean().item()

    losses, accuracy = train_probe(standardize=True)
    assert all(a > b for a, b in zip(losses[::5], losses[5::5], strict=False)) and accuracy == 1.0  # steady descent
    losses, _ = train_probe(standardize=False)
    assert max(losses) > 10 * losses[0]  # the same SGD on the raw features blows up first


# -- training: resume and the three stages on digits -----------------------------------------------
@pytest.fixture(scope="module")
def teacher_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gacd_teacher") / "teacher.pt"
    torch.manual_seed(7)
    net = build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=2.0)
    torch.save({"state_dict": net.state_dict()}, path)
    return f"file:{path}?arch=small-cnn&width=2.0"


def _digits_config(out_dir, **sections):
    merge = {
        "method": {"name": "gacd", "nce_k": 64, "symmetric": True},
        "optim": {"schedule": "multistep", "milestones": [1]},
        "eval": {"attacks": []},
    }
    return config_from_mapping(tiny_digits_raw(out_dir, merge=merge, **sections))


def test_resume_restores_bank_and_z_exactly(tmp_path, gacd_host, teacher_spec) -> None:
    teachers = {"robust": teacher_spec}
    full = train(_digits_config(tmp_path / "full", teachers=teachers), host=gacd_host)
    cfg = _digits_config(tmp_path / "split", teachers=teachers)
    first = train(cfg, host=gacd_host, stop_after=1)
    saved = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["distiller"]
    for key, value in first.distiller.state_dict().items():
        assert torch.equal(saved[key].cpu(), value.cpu()), key
    assert saved["memory_s"].shape == (200, 128) and saved["memory_t"].shape == (200, 128)
    assert bool(saved["nce_z_set"]) and (saved["nce_z"] > 0).all()
    assert torch.equal(saved["memory_labels"], first.data.train_y)
    resumed = train(cfg, host=gacd_host, resume=True)
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    for key, value in full.distiller.state_dict().items():
        assert torch.equal(value, resumed.distiller.state_dict()[key]), key
    assert torch.equal(resumed.distiller.nce_z, saved["nce_z"])  # Z frozen across the resume
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_three_stages_end_to_end_on_digits(tmp_path, gacd_host, teacher_spec) -> None:
    ev = {"attacks": ["clean"], "final_n_examples": 50, "teachers": False}
    one = {"epochs": 1, "lr": 0.05}
    stage1 = tmp_path / "stage1"
    distill(
        _digits_config(stage1, teachers={"robust": teacher_spec}, method={"name": "gacd"}, optim=one, eval=ev),
        host=gacd_host,
    )
    row = json.loads((stage1 / "metrics.jsonl").read_text().splitlines()[0])
    assert {"nce", "w_mean", "pos_sim"} <= set(row) and math.isfinite(row["nce"])
    distilled = load_checkpoint(stage1 / "checkpoints" / "last.pt")
    assert distilled["distiller"]["memory_s"].shape == (200, 128)
    assert bool(distilled["distiller"]["nce_z_set"])
    init = str(stage1 / "checkpoints" / "last.pt")
    student = {"arch": "small-cnn", "options": {"width": 0.5}, "init_from": init}

    reports = distill(
        _digits_config(tmp_path / "linear", method={"name": "gacd-linear"}, student=student, optim=one, eval=ev),
        host=gacd_host,
    )
    assert len(reports) == 1
    probe = load_checkpoint(tmp_path / "linear" / "checkpoints" / "last.pt")["student"]
    for key, value in distilled["student"].items():
        if key.startswith("classifier."):
            assert not torch.equal(value, probe[key]), key  # the probe trained
        else:
            assert torch.equal(value, probe[key]), key  # backbone and BN statistics frozen

    # Stage 3, adversarial fine-tuning: pgd-at from the stage-1 weights.
    distill(
        _digits_config(tmp_path / "aft", method={"name": "pgd-at"}, student=student, optim=one, eval=ev), host=gacd_host
    )
    tuned = load_checkpoint(tmp_path / "aft" / "checkpoints" / "last.pt")["student"]
    assert not torch.equal(tuned["features.0.weight"], distilled["student"]["features.0.weight"])
    row = json.loads((tmp_path / "aft" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["ce_adv"])


def test_linear_probe_resume_is_exact(tmp_path, gacd_host) -> None:
    torch.manual_seed(5)
    init = tmp_path / "stage1.pt"
    torch.save(
        {"state_dict": build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=0.5).state_dict()},
        init,
    )
    student = {"arch": "small-cnn", "options": {"width": 0.5}, "init_from": str(init)}
    sections = {"method": {"name": "gacd-linear"}, "student": student}
    full = train(_digits_config(tmp_path / "full", **sections), host=gacd_host)
    cfg = _digits_config(tmp_path / "split", **sections)
    train(cfg, host=gacd_host, stop_after=1)
    resumed = train(cfg, host=gacd_host, resume=True)
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    for key, value in full.distiller.state_dict().items():
        assert torch.equal(value, resumed.distiller.state_dict()[key]), key
    assert full.distiller.feature_mean.shape == (full.distiller.probe.in_features,)
