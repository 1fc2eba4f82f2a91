"""The DKL/IKL loss pieces (``robustbench_kd.methods.divergence``): hand values, the KL equivalence, the class prior,
and the divergence component (options and KL-or-IKL term) that ard and rslad share."""

from __future__ import annotations

import math

import pytest
import torch

from robustbench_kd.errors import UserError
from robustbench_kd.methods.divergence import (
    ClassPrior,
    Divergence,
    DivergenceOptions,
    dkl_per_sample,
    ikl_per_sample,
    pairwise_logit_differences,
    sample_weight_vectors,
    sce_per_sample,
    wmse_pairwise_per_sample,
    wmse_per_sample,
)
from robustbench_kd.methods.losses import kl_logits_per_sample, kl_per_sample
from robustbench_kd.testing import softmax
from robustbench_kd.testing.stubs import wmse

O_T = [[1.0, -0.5, 2.0], [0.3, 0.1, -1.2]]  # target side (teacher / natural), B = 2, C = 3
O_L = [[0.2, 0.7, 1.1], [-0.4, 0.9, 0.0]]  # learner side (student / adversarial)
S = [[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]]  # rank-one weight factors: w = s s^T


def _outer(s: list[float]) -> list[list[float]]:
    return [[a * b for b in s] for a in s]


def test_pairwise_differences_layout() -> None:
    d = pairwise_logit_differences(torch.tensor([[1.0, 4.0, 6.0]]))
    assert d[0].tolist() == [[0.0, -3.0, -5.0], [3.0, 0.0, -2.0], [5.0, 2.0, 0.0]]  # D[j, k] = o_j - o_k


def test_wmse_by_hand() -> None:
    expected = [wmse(O_T[b], O_L[b], _outer(S[b])) for b in range(2)]
    fast = wmse_per_sample(torch.tensor(O_T), torch.tensor(O_L), torch.tensor(S))
    pairwise = wmse_pairwise_per_sample(torch.tensor(O_T), torch.tensor(O_L), torch.tensor([_outer(s) for s in S]))
    assert fast.tolist() == pytest.approx(expected, rel=1e-6)
    assert pairwise.tolist() == pytest.approx(expected, rel=1e-6)
    # A non-rank-one weight: only the pairwise form applies.
    w = [[0.0, 1.0, 2.0], [1.0, 0.0, 0.5], [2.0, 0.5, 3.0]]
    got = wmse_pairwise_per_sample(torch.tensor(O_T), torch.tensor(O_L), torch.tensor(w))
    assert got.tolist() == pytest.approx([wmse(O_T[b], O_L[b], w) for b in range(2)], rel=1e-6)
    # A shared [C] weight vector broadcasts over the batch.
    shared = wmse_per_sample(torch.tensor(O_T), torch.tensor(O_L), torch.tensor(S[0]))
    assert shared.tolist() == pytest.approx([wmse(O_T[b], O_L[b], _outer(S[0])) for b in range(2)], rel=1e-6)


def test_wmse_fast_form_matches_pairwise_in_value_and_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    o_t = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    o_l = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.rand(5, 7, generator=gen, dtype=torch.float64) + 0.01
    fast = wmse_per_sample(o_t, o_l, s)
    slow = wmse_pairwise_per_sample(o_t, o_l, s.unsqueeze(2) * s.unsqueeze(1))
    assert torch.allclose(fast, slow, rtol=1e-12, atol=1e-12)
    g_fast = torch.autograd.grad(fast.sum(), (o_t, o_l))
    g_slow = torch.autograd.grad(slow.sum(), (o_t, o_l))
    for a, b in zip(g_fast, g_slow, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_sce_by_hand() -> None:
    tau = 2.0
    expected = []
    for b in range(2):
        q = softmax(O_T[b], tau)
        log_p = [math.log(p) for p in softmax(O_L[b], tau)]
        expected.append(-sum(qi * lp for qi, lp in zip(q, log_p, strict=True)))
    q = torch.softmax(torch.tensor(O_T) / tau, dim=1)
    assert sce_per_sample(torch.tensor(O_L), q, tau).tolist() == pytest.approx(expected, rel=1e-6)
    terms = ikl_per_sample(
        torch.tensor(O_L), torch.tensor(O_T), torch.tensor(S), mse_weight=20.0, sce_weight=4.0, temperature=tau
    )
    assert terms.sce.tolist() == pytest.approx(expected, rel=1e-6)
    wmse_values = [wmse(O_T[b], O_L[b], _outer(S[b])) for b in range(2)]  # no temperature in the wMSE
    assert terms.wmse.tolist() == pytest.approx(wmse_values, rel=1e-6)
    weighted = [20.0 * m + 4.0 * c for m, c in zip(wmse_values, expected, strict=True)]
    assert terms.total.tolist() == pytest.approx(weighted, rel=1e-6)


def test_sce_target_is_detached() -> None:
    o_t = torch.tensor(O_T, requires_grad=True)
    o_l = torch.tensor(O_L, requires_grad=True)
    sce = sce_per_sample(o_l, torch.softmax(o_t, dim=1))
    g_t, g_l = torch.autograd.grad(sce.sum(), (o_t, o_l), allow_unused=True)
    assert g_t is None
    assert torch.allclose(g_l, torch.softmax(o_l, 1) - torch.softmax(o_t, 1).detach(), atol=1e-6)


def _grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    o_t = (2.0 * torch.randn(6, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    o_l = (2.0 * torch.randn(6, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    return o_t, o_l


def test_dkl_equals_kl_in_gradient(logits) -> None:
    """DKL reduces to KL(s_t || s_l) in gradient w.r.t. BOTH sides when

    weights are per sample, w = sg(s_t s_t^T) with s_t = softmax(o_t) at T = 1 (no class prior),
    the wMSE is stopped on the learner side (learner_mse_grad=False: the asymmetry kept),
    mse_weight = sce_weight = 1 and the sCE temperature is 1.
    """
    o_t, o_l = logits
    kl_t, kl_l = _grads(kl_logits_per_sample(o_l, o_t).sum(), o_t, o_l)
    dkl_t, dkl_l = _grads(dkl_per_sample(o_l, o_t).sum(), o_t, o_l)
    assert torch.allclose(dkl_t, kl_t, rtol=1e-9, atol=1e-12)
    assert torch.allclose(dkl_l, kl_l, rtol=1e-9, atol=1e-12)
    # The same through the general function with those settings spelled out.
    terms = ikl_per_sample(
        o_l,
        o_t,
        sample_weight_vectors(o_t, 1.0),
        mse_weight=1.0,
        sce_weight=1.0,
        temperature=1.0,
        learner_mse_grad=False,
    )
    ikl_t, ikl_l = _grads(terms.total.sum(), o_t, o_l)
    assert torch.allclose(ikl_t, kl_t, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ikl_l, kl_l, rtol=1e-9, atol=1e-12)
    # Values: sCE = KL + H(s_t); the wMSE adds its own (non-negative) value.
    with torch.no_grad():
        s_t = torch.softmax(o_t, 1)
        entropy = -(s_t * torch.log_softmax(o_t, 1)).sum(1)
        assert torch.allclose(terms.sce, kl_logits_per_sample(o_l, o_t) + entropy, atol=1e-12)
    # With a detached target (distillation), the wMSE is dead and KL's gradient is the sCE's.
    kd_l = _grads(kl_logits_per_sample(o_l, o_t.detach()).sum(), o_l)[0]
    sce_l = _grads(sce_per_sample(o_l, torch.softmax(o_t, 1)).sum(), o_l)[0]
    assert torch.allclose(kd_l, sce_l, rtol=1e-9, atol=1e-12)


def test_breaking_the_asymmetry_adds_the_wmse_gradient_to_the_learner(logits) -> None:
    o_t, o_l = logits
    kl_t, kl_l = _grads(kl_logits_per_sample(o_l, o_t).sum(), o_t, o_l)
    terms = ikl_per_sample(o_l, o_t, sample_weight_vectors(o_t), mse_weight=1.0, sce_weight=1.0)
    ikl_t, ikl_l = _grads(terms.total.sum(), o_t, o_l)
    assert torch.allclose(ikl_t, kl_t, rtol=1e-9, atol=1e-12)  # target side untouched
    # The wMSE depends on o_t - o_l only: its learner gradient is minus KL's target gradient.
    assert torch.allclose(ikl_l, kl_l - kl_t, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(ikl_l, kl_l)


def test_class_prior_weights_change_the_target_gradient(logits) -> None:
    o_t, o_l = logits
    kl_t = _grads(kl_logits_per_sample(o_l, o_t).sum(), o_t)[0]
    prior = torch.softmax(torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5], dtype=torch.float64), 0)
    terms = ikl_per_sample(o_l, o_t, prior, mse_weight=1.0, sce_weight=1.0, learner_mse_grad=False)
    assert not torch.allclose(_grads(terms.total.sum(), o_t)[0], kl_t)


def test_mse_weight_zero_skips_the_wmse() -> None:
    terms = ikl_per_sample(torch.tensor(O_L), torch.tensor(O_T), torch.tensor(S), mse_weight=0.0, sce_weight=2.0)
    assert terms.wmse.tolist() == [0.0, 0.0]
    assert torch.allclose(terms.total, 2.0 * terms.sce)


# -- ClassPrior ---------------------------------------------------------------------------------
def test_class_prior_starts_uniform() -> None:
    prior = ClassPrior(4, temperature=4.0)
    assert torch.equal(prior.prior, torch.full((4, 4), 0.25))
    assert torch.equal(prior.weight_vectors(torch.tensor([2, 0])), torch.full((2, 4), 0.25))
    assert torch.equal(prior.pairwise_weights(torch.tensor([1])), torch.full((1, 4, 4), 1 / 16))


def test_class_prior_accumulates_row_normalises_and_lags_one_epoch() -> None:
    t = 4.0
    prior = ClassPrior(3, temperature=t)
    batches = [
        (torch.tensor([[4.0, 0.0, -2.0], [1.0, 3.0, 0.0]]), torch.tensor([0, 1])),
        (torch.tensor([[0.0, 8.0, 1.0], [2.0, 2.0, 6.0]]), torch.tensor([0, 0])),
    ]
    for z, y in batches:
        prior.accumulate(z, y)
    # Nothing changes before the epoch ends: the weights used during an epoch are the previous one's.
    assert torch.equal(prior.prior, torch.full((3, 3), 1 / 3))
    prior.finalize()
    rows: dict[int, list[list[float]]] = {0: [], 1: []}
    for z, y in batches:
        for b in range(len(y)):
            rows[int(y[b])].append(softmax(z[b].tolist(), t))
    for cls, members in rows.items():
        mean = [sum(m[j] for m in members) / len(members) for j in range(3)]
        assert prior.prior[cls].tolist() == pytest.approx(mean, rel=1e-6)
    assert prior.prior[2].tolist() == pytest.approx([1 / 3] * 3)  # class 2 unseen: keeps its row (no NaN)
    assert prior.prior.sum(dim=1).tolist() == pytest.approx([1.0] * 3)
    assert torch.equal(prior.accumulator, torch.zeros(3, 3))
    # The next epoch starts from the new prior; an epoch without data leaves it as is.
    before = prior.prior.clone()
    prior.finalize()
    assert torch.equal(prior.prior, before)


def test_class_prior_mix() -> None:
    prior = ClassPrior(2, temperature=1.0, mix=0.25)
    prior.accumulate_probs(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    prior.finalize()
    # prior = m * new + (1 - m) * old, old = 1/2 everywhere
    expected = torch.tensor([[0.25 + 0.75 * 0.5, 0.75 * 0.5], [0.75 * 0.5, 0.25 + 0.75 * 0.5]])
    assert torch.allclose(prior.prior, expected)


def test_class_prior_state_dict_round_trip_is_exact() -> None:
    prior = ClassPrior(5, temperature=4.0)
    prior.accumulate(torch.randn(8, 5), torch.arange(8) % 5)
    prior.finalize()
    prior.accumulate(torch.randn(3, 5), torch.tensor([1, 1, 4]))
    other = ClassPrior(5, temperature=4.0)
    other.load_state_dict(prior.state_dict())
    assert torch.equal(other.prior, prior.prior) and torch.equal(other.accumulator, prior.accumulator)
    assert set(prior.state_dict()) == {"prior", "accumulator"}


def test_class_prior_validation() -> None:
    with pytest.raises(ValueError):
        ClassPrior(3, temperature=0.0)
    with pytest.raises(ValueError):
        ClassPrior(3, mix=1.5)


def test_divergence_option_validation() -> None:
    DivergenceOptions(divergence="ikl", ikl_mse_weight=5.0, ikl_sce_weight=1.0, ikl_prior_temperature=4.0)
    with pytest.raises(UserError, match="divergence"):
        DivergenceOptions(divergence="js")
    with pytest.raises(UserError, match="ikl_mse_weight"):
        DivergenceOptions(divergence="ikl", ikl_mse_weight=-1.0)
    with pytest.raises(UserError, match="ikl_prior_temperature"):
        DivergenceOptions(divergence="ikl", ikl_prior_temperature=0.0)


# -- Divergence: the KL-or-IKL term of ard and rslad ------------------------------------------------
def test_divergence_kl_is_the_tempered_kl_without_state() -> None:
    kl = Divergence("kl", 3)
    assert kl.prior is None
    q = torch.softmax(torch.tensor(O_T) / 2.0, dim=1)
    got = kl.per_sample(
        torch.tensor(O_L), q, teacher_logits=torch.tensor(O_T), labels=torch.tensor([0, 2]), temperature=2.0
    )
    assert torch.equal(got, kl_per_sample(torch.tensor(O_L), q, temperature=2.0))
    assert Divergence("ikl", 3, class_prior=False).prior is None


def test_divergence_ikl_at_temperature_by_hand() -> None:
    """IKL on logits / tau with the class prior's (first-epoch uniform) rows as weights."""
    tau, labels = 2.0, torch.tensor([0, 2])
    ikl = Divergence("ikl", 3, mse_weight=5.0, sce_weight=0.5)
    q = torch.softmax(torch.tensor(O_T) / tau, dim=1)
    got = ikl.per_sample(torch.tensor(O_L), q, teacher_logits=torch.tensor(O_T), labels=labels, temperature=tau)
    expected = []
    for b in range(2):
        o_t, o_l = [v / tau for v in O_T[b]], [v / tau for v in O_L[b]]
        sce = -sum(qi * math.log(p) for qi, p in zip(softmax(o_t), softmax(o_l), strict=True))
        expected.append(5.0 * wmse(o_t, o_l, [1 / 3] * 3) + 0.5 * sce)
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    per_sample = Divergence("ikl", 3, class_prior=False, prior_temperature=4.0)
    assert torch.equal(
        per_sample.weight_vectors(labels, torch.tensor(O_T)), torch.softmax(torch.tensor(O_T) / 4.0, dim=1)
    )


def test_divergence_prior_accumulates_and_finalizes() -> None:
    ikl = Divergence.from_options(DivergenceOptions(divergence="ikl", ikl_prior_temperature=2.0), 3)
    assert ikl.prior is not None and ikl.prior.temperature == 2.0
    ikl.accumulate(torch.tensor(O_T), torch.tensor([0, 2]))
    assert torch.equal(ikl.prior.prior, torch.full((3, 3), 1 / 3))  # lags until the epoch ends
    ikl.finalize()
    assert ikl.prior.prior[2].tolist() == pytest.approx(softmax(O_T[1], 2.0), rel=1e-6)
    assert torch.equal(ikl.weight_vectors(torch.tensor([2]), torch.zeros(1, 3)), ikl.prior.prior[2:3])
    Divergence("kl", 3).accumulate(torch.tensor(O_T), torch.tensor([0, 2]))  # no state: nothing to do
