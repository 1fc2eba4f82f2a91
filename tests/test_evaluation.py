"""Evaluation attacks, AutoAttack wrapper and the evaluate_model runner, on tiny CPU models."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torchattacks
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.evaluation import (
    VALID_ATTACKS,
    cw_margin_loss,
    evaluate_model,
    fgsm,
    pgd,
    run_autoattack,
)
from robustbench_kd.zoo import compat

pytestmark = pytest.mark.single_thread

EPS = 8 / 255


class TinyCNN(nn.Module):
    """3x8x8 -> 10 logits, with BN and Dropout so train/eval mode matters."""

    def __init__(self, softmax: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(8 * 8 * 8, 10)
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x).flatten(1))
        return logits.softmax(dim=1) if self.softmax else logits


def _make(n: int = 24, softmax: bool = False, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyCNN(softmax=softmax).eval()
    x = torch.rand(n, 3, 8, 8, generator=gen)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels = predictions: clean accuracy is 100%
    return model, x, y


def _linf(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------- attacks


def test_pgd_linf_matches_torchattacks_and_stays_in_ball() -> None:
    model, x, y = _make()
    torch.manual_seed(123)
    expected = torchattacks.PGD(model, eps=EPS, alpha=2 / 255, steps=10, random_start=True)(x, y)
    torch.manual_seed(123)
    got = pgd(model, x, y, eps=EPS, alpha=2 / 255, steps=10, norm="Linf")
    assert torch.equal(got, expected)
    assert _linf(got, x) <= EPS + 1e-6
    assert got.min() >= 0 and got.max() <= 1
    assert not got.requires_grad


def test_pgd_l2_matches_torchattacks_pgdl2_and_stays_in_ball() -> None:
    model, x, y = _make()
    torch.manual_seed(7)
    expected = torchattacks.PGDL2(model, eps=0.5, alpha=0.1, steps=10, random_start=True)(x, y)
    torch.manual_seed(7)
    got = pgd(model, x, y, eps=0.5, alpha=0.1, steps=10, norm="L2")
    # Same draws and updates; only the loss reduction (sum vs mean) differs, i.e. float rounding.
    assert torch.allclose(got, expected, atol=1e-5)
    norms = (got - x).flatten(1).norm(dim=1)
    assert (norms <= 0.5 + 1e-5).all()
    assert got.min() >= 0 and got.max() <= 1


def test_attacks_use_input_gradients_only_and_keep_mode() -> None:
    model, x, y = _make()
    model.train()
    model.features[1].eval()  # a deliberately frozen BN must stay frozen
    modes = [m.training for m in model.modules()]
    for loss in ("ce", "cw"):
        pgd(model, x, y, eps=EPS, alpha=2 / 255, steps=2, norm="Linf", loss=loss)
    fgsm(model, x, y, eps=EPS, norm="L2")
    assert all(p.grad is None for p in model.parameters())
    assert [m.training for m in model.modules()] == modes


def test_fgsm_matches_torchattacks_and_reduces_accuracy() -> None:
    model, x, y = _make()
    got = fgsm(model, x, y, eps=EPS, norm="Linf")
    assert torch.equal(got, torchattacks.FGSM(model, eps=EPS)(x, y))
    assert _linf(got, x) <= EPS + 1e-6
    l2 = fgsm(model, x, y, eps=0.3, norm="L2")
    assert ((l2 - x).flatten(1).norm(dim=1) <= 0.3 + 1e-5).all()
    with torch.no_grad():
        assert (model(got).argmax(1) == y).float().mean() < 1.0


def test_cw_margin_loss_and_cw_pgd() -> None:
    logits = torch.tensor([[2.0, 5.0, 1.0], [0.0, -1.0, 3.0]])
    y = torch.tensor([1, 0])
    assert torch.allclose(cw_margin_loss(logits, y), torch.tensor([-3.0, 3.0]))

    model, x, y = _make()
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, eps=EPS, alpha=2 / 255, steps=20, norm="Linf", loss="cw")
    assert _linf(x_adv, x) <= EPS + 1e-6
    with torch.no_grad():
        before = cw_margin_loss(model(x), y)
        after = cw_margin_loss(model(x_adv), y)
    assert after.mean() > before.mean()
    assert (after > 0).float().mean() > 0.5  # most of a non-robust model's points are broken


def test_attack_edge_cases_and_input_errors() -> None:
    model, x, y = _make(n=4)
    assert torch.equal(pgd(model, x, y, eps=0.0, alpha=0.1, steps=3, norm="Linf"), x)
    with pytest.raises(UserError, match="norm"):
        pgd(model, x, y, eps=EPS, alpha=0.01, steps=1, norm="L1")
    with pytest.raises(UserError, match="loss"):
        pgd(model, x, y, eps=EPS, alpha=0.01, steps=1, norm="Linf", loss="kl")
    with pytest.raises(UserError, match="larger than 1"):
        fgsm(model, x, y, eps=8, norm="Linf")
    with pytest.raises(UserError, match=r"\[0,1\]"):
        evaluate_model(model, x * 2 - 1, y, eps=EPS, attacks="clean", progress=False)


# ------------------------------------------------------------------------------------- runner


def test_evaluate_model_results_modes_and_rng() -> None:
    model, x, y = _make(n=20)
    model.train()
    model.features[1].eval()  # frozen BN inside a training model
    modes = [m.training for m in model.modules()]
    rng_before = torch.get_rng_state()

    result = evaluate_model(
        model, x, y, eps="8/255", attacks=("clean", "fgsm", "pgd", "cw"), batch_size=8,
        pgd_steps=5, progress=False,
    )  # fmt: skip

    assert torch.equal(torch.get_rng_state(), rng_before)
    assert [m.training for m in model.modules()] == modes
    assert list(result.accuracy) == ["clean", "fgsm", "pgd-5", "cw-5"]
    assert result.accuracy["clean"] == 1.0  # labels are the eval-mode predictions
    assert all(0.0 <= v <= 1.0 for v in result.accuracy.values())
    assert result.accuracy["pgd-5"] < 1.0
    assert result.pgd_alpha == pytest.approx(2 / 255) and result.pgd_steps == 5
    for key, flags in result.per_example.items():
        assert flags.dtype == torch.bool and flags.shape == (20,)
        assert result.accuracy[key] == pytest.approx(flags.float().mean().item())
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["eps_str"] == "8/255" and summary["autoattack_version"] is None
    assert "per_example" not in summary

    # Same seed -> same numbers; batching does not change per-example verdicts for PGD.
    again = evaluate_model(model, x, y, eps=EPS, attacks=["pgd"], batch_size=8, pgd_steps=5, progress=False)
    assert torch.equal(again.per_example["pgd-5"], result.per_example["pgd-5"])


def test_evaluate_model_restores_mode_when_an_attack_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = _make(n=4)
    model.train()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("robustbench_kd.evaluation.runner.pgd", boom)
    with pytest.raises(RuntimeError, match="boom"):
        evaluate_model(model, x, y, eps=EPS, attacks=["clean", "pgd"], progress=False)
    assert all(m.training for m in model.modules())


def test_unknown_attack_name_lists_valid_ones() -> None:
    model, x, y = _make(n=4)
    with pytest.raises(UserError) as info:
        evaluate_model(model, x, y, eps=EPS, attacks=["clean", "pgd20"], progress=False)
    message = str(info.value)
    assert "pgd20" in message and "did you mean" in message
    for name in VALID_ATTACKS:
        assert name in message
    with pytest.raises(UserError, match="autoattack_version"):
        evaluate_model(model, x, y, eps=EPS, autoattack_version="fast", progress=False)


def test_evaluate_model_with_autoattack(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = _make(n=16)
    model.train()
    rng_before = torch.get_rng_state()
    result = evaluate_model(
        model, x, y, eps=0.05, attacks=("clean", "pgd", "autoattack", "autoattack-quick"),
        pgd_steps=5, progress=False,
    )  # fmt: skip
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert model.training
    assert list(result.accuracy) == ["clean", "pgd-5", "autoattack", "autoattack-quick"]
    assert result.accuracy["autoattack"] <= result.accuracy["clean"]
    assert result.autoattack_version is not None and "autoattack" in result.autoattack_version
    assert isinstance(result.autoattack_flags, list)
    json.dumps(result.to_dict())


# --------------------------------------------------------------------------------- autoattack


def test_run_autoattack_standard_on_non_robust_model(tmp_path) -> None:
    model, x, y = _make(n=16)
    rng_before = torch.get_rng_state()
    result = run_autoattack(model, x, y, norm="Linf", eps=0.05, log_path=tmp_path / "logs" / "aa.log")
    assert torch.equal(torch.get_rng_state(), rng_before)  # AA re-seeds the global RNG inside
    assert result.attacks == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert result.robust.dtype == torch.bool and result.robust.shape == (16,)
    assert result.accuracy <= 1.0 and result.accuracy == result.robust.float().mean().item()
    assert result.accuracy < 0.5
    assert result.version.startswith("pyautoattack") or "fra31" in result.version
    assert result.seed == 0 and result.flags == []
    assert "apgd-ce" in (tmp_path / "logs" / "aa.log").read_text()


def test_run_autoattack_matches_recomputation_from_x_adv(monkeypatch: pytest.MonkeyPatch) -> None:
    """Robust flags = argmax model(x_adv) == y, exactly as robustbench.eval.benchmark scores."""
    model, x, y = _make(n=24)
    created = []
    adapter = compat.AutoAttack

    class Spy(adapter):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

        def run_standard_evaluation(self, *args: object, **kwargs: object) -> object:
            out = super().run_standard_evaluation(*args, **kwargs)
            self.result = out
            return out

    monkeypatch.setattr(compat, "AutoAttack", Spy, raising=False)
    result = run_autoattack(model, x, y, norm="Linf", eps=0.02, version="quick", seed=3)
    (adversary,) = created
    assert adversary.version == "custom" and adversary.apgd.n_restarts == 1
    assert result.attacks == ["apgd-ce", "apgd-dlr"] and result.mode == "quick"
    x_adv, y_adv = adversary.result
    with torch.no_grad():
        expected = model(x_adv).max(1)[1] == y
    assert torch.equal(result.robust, expected)
    assert torch.equal(result.robust, y_adv == y)
    assert 0.0 < result.accuracy < 1.0  # some points survive at this radius: a real test
    assert (x_adv - x).abs().max() <= 0.02 + 1e-6


def test_run_autoattack_captures_flags_even_when_logger_silenced() -> None:
    model, x, y = _make(n=8, softmax=True)
    aa_logger = logging.getLogger("auto-attack")
    old_level = aa_logger.level
    aa_logger.setLevel(logging.CRITICAL)
    try:
        result = run_autoattack(model, x, y, norm="Linf", eps=0.1, version="quick")
    finally:
        aa_logger.setLevel(old_level)
    assert any("probability distribution" in flag for flag in result.flags)
    assert aa_logger.level == old_level and aa_logger.propagate


def test_run_autoattack_rejects_training_mode_and_bad_version() -> None:
    model, x, y = _make(n=4)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        run_autoattack(model, x, y, norm="Linf", eps=EPS)
    model.eval()
    model.features[3].train()  # a stray Dropout in train mode is just as random
    with pytest.raises(ValueError, match="eval mode"):
        run_autoattack(model, x, y, norm="Linf", eps=EPS)
    model.eval()
    with pytest.raises(UserError, match="version"):
        run_autoattack(model, x, y, norm="Linf", eps=EPS, version="fast")


def test_run_autoattack_with_state_file(tmp_path) -> None:
    model, x, y = _make(n=8)
    state = tmp_path / "aa_state.json"
    result = run_autoattack(model, x, y, norm="Linf", eps=0.02, version="quick", state_path=state)
    assert state.exists()
    assert result.robust.dtype == torch.bool and result.robust.shape == (8,)
    # pyautoattack 0.2.0's own resume always fails (attack set stored as a string); ours reads the
    # finished file back (interrupted runs: tests/test_shards.py).
    again = run_autoattack(model, x, y, norm="Linf", eps=0.02, version="quick", state_path=state)
    assert torch.equal(again.robust, result.robust)
