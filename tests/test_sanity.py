"""Evaluation sanity suite: gradient-masked models are flagged, a PGD-AT model is not, eps units are checked."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustbench_kd.cli import main
from robustbench_kd.config import config_from_mapping
from robustbench_kd.data.datasets import to_float
from robustbench_kd.errors import UserError
from robustbench_kd.evaluation import (
    SANITY_CHECKS,
    evaluate_model,
    fgsm,
    pgd,
    run_autoattack,
    run_sanity_checks,
)
from robustbench_kd.evaluation.final_report import evaluate_and_write
from robustbench_kd.jobs.pipeline import evaluate_run, evaluate_spec
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.teachers import Teacher, TeacherSet
from robustbench_kd.training.loop import train

pytestmark = pytest.mark.single_thread

EPS = 0.2  # digits: separates standard (0% AA) from adversarially trained models


def _digits_run(out_dir, method: str, epochs: int, steps: int):
    cfg = config_from_mapping({
        "run": {"out_dir": str(out_dir), "progress": False, "seed": 0},
        "data": {"dataset": "digits", "batch_size": 64, "n_train": 1000},
        "threat": {"eps": EPS, "alpha": 0.08, "steps": steps},
        "student": {"arch": "small-cnn", "options": {"width": 0.5}},
        "method": {"name": method},
        "optim": {"epochs": epochs, "lr": 0.05, "schedule": "multistep", "milestones": [epochs - 1]},
        "eval": {"attacks": ["clean", "pgd"], "final_n_examples": 48, "pgd_steps": 5, "teachers": False},
    })  # fmt: skip
    return train(cfg, host=PluginHost.create(autoload=False))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small PGD-AT CNN (robust) and a standard one (the transfer teacher), trained once for the module."""
    root = tmp_path_factory.mktemp("sanity")
    robust = _digits_run(root / "robust", "pgd-at", epochs=6, steps=3)
    standard = _digits_run(root / "standard", "standard", epochs=4, steps=1)
    x, y = to_float(robust.data.test_x[:128]), robust.data.test_y[:128]
    return {
        "run": robust,
        "robust": robust.student.eval(),
        "standard": standard.student.eval(),
        "x": x,
        "y": y,
        "robust_ckpt": root / "robust" / "checkpoints" / "last.pt",
        "standard_ckpt": root / "standard" / "checkpoints" / "last.pt",
    }


class Quantised(nn.Module):
    """x -> round(x * k) / k before the classifier: torch.round has a zero gradient everywhere."""

    def __init__(self, net: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * self.levels) / self.levels)


class Saturated(nn.Module):
    """Logits times a huge temperature: softmax saturates and cross-entropy gradients underflow to 0."""

    def __init__(self, net: nn.Module, temperature: float = 1e4) -> None:
        super().__init__()
        self.net, self.temperature = net, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.temperature


# ------------------------------------------------------------------------------------------- verdicts


def test_pgd_trained_model_passes_every_check(trained) -> None:
    report = run_sanity_checks(
        trained["robust"], trained["x"], trained["y"], norm="Linf", eps=EPS, teacher=trained["standard"], seed=0
    )
    assert report.reliable, report.reasons
    assert report.checks == {name: True for name in SANITY_CHECKS}
    assert list(report.sweep) == ["0", "0.05", "0.1", "0.2", "0.4"]
    accs = list(report.sweep.values())
    assert accs[0] > 0.5 and accs[3] > 0.1  # clean and robust at eps: a real robust model
    assert all(b <= a + 0.01 for a, b in itertools.pairwise(accs))
    assert report.unbounded_eps == 1.0 and report.unbounded_accuracy <= 0.05
    assert report.transfer_accuracy >= report.whitebox_accuracy
    json.dumps(report.to_dict())  # JSON-serialisable as written to results/<id>.json


@pytest.mark.parametrize("wrap", [Quantised, Saturated], ids=["round-quantisation", "saturated-softmax"])
def test_gradient_masked_models_are_flagged(trained, wrap, caplog) -> None:
    masked = wrap(trained["robust"]).eval()
    with caplog.at_level(logging.WARNING, logger="robustbench_kd.evaluation.sanity"):
        report = run_sanity_checks(
            masked, trained["x"], trained["y"], norm="Linf", eps=EPS, teacher=trained["standard"]
        )
    assert not report.reliable
    # Three independent symptoms: no gradient, no effect of an unbounded radius, and a black-box
    # transfer attack beating the white-box one.
    assert report.checks["gradients"] is False and report.zero_gradient_fraction > 0.5
    assert report.checks["unbounded"] is False and report.unbounded_accuracy > 0.05
    assert report.checks["transfer"] is False and report.transfer_accuracy < report.whitebox_accuracy - 0.05
    assert "evaluation sanity checks failed" in caplog.text and "transfer attack" in caplog.text


def test_masking_is_caught_without_teacher_or_gradient_check(trained) -> None:
    """The unbounded-radius check alone flags masking when neither a teacher nor the gradient check is used."""
    report = run_sanity_checks(
        Quantised(trained["robust"]),
        trained["x"],
        trained["y"],
        norm="Linf",
        eps=EPS,
        zero_gradient_max_fraction=1.0,
        n_examples=64,
    )
    assert not report.reliable and report.checks["gradients"] is True
    assert report.checks["transfer"] is None and report.skipped["transfer"] == "no teacher given"
    assert any("unbounded radius" in r for r in report.reasons)


class _NoisyEverywhere(nn.Module):
    """Predicts the label only when the input is rough: accuracy rises with the PGD random start."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        roughness = (x - x.mean(dim=(1, 2, 3), keepdim=True)).abs().mean(dim=(1, 2, 3))
        vote = torch.sign(roughness - 0.01) * 10  # sign(): zero gradient, like a hard threshold
        return torch.stack([-vote, vote], dim=1)


def test_accuracy_rising_with_eps_is_flagged() -> None:
    x, y = torch.full((32, 1, 8, 8), 0.5), torch.ones(32, dtype=torch.long)
    report = run_sanity_checks(_NoisyEverywhere(), x, y, norm="Linf", eps=EPS)
    assert report.sweep["0"] == 0.0 and report.sweep["0.05"] == 1.0
    assert report.checks["monotone"] is False
    assert any("rises with eps" in r and "0 -> " in r for r in report.reasons)


class _StuckInTraining(nn.Module):
    """BatchNorm + Dropout that ignore .eval() (a train() override), as a badly wrapped model would."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 10)
        )

    def train(self, mode: bool = True) -> _StuckInTraining:
        return super().train(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Softmax(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).softmax(dim=1)


def test_training_mode_randomness_and_probabilities_are_flagged(trained) -> None:
    x, y = trained["x"][:32], trained["y"][:32]
    stuck = run_sanity_checks(_StuckInTraining(), x, y, norm="Linf", eps=EPS)
    assert stuck.checks["eval_mode"] is False and stuck.checks["deterministic"] is False
    assert any("stay in training mode" in r for r in stuck.reasons)
    assert any("identical forward passes" in r for r in stuck.reasons)

    class AlwaysDropout(nn.Module):  # F.dropout(training=True): random even in eval mode
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return trained["robust"](F.dropout(inp, 0.3, training=True))

    noisy = run_sanity_checks(AlwaysDropout(), x, y, norm="Linf", eps=EPS)
    assert noisy.checks["eval_mode"] is True and noisy.checks["deterministic"] is False

    probs = run_sanity_checks(_Softmax(trained["robust"]), x, y, norm="Linf", eps=EPS)
    assert probs.checks["logits"] is False and any("probabilities" in r for r in probs.reasons)


def test_autoattack_flags_become_reasons(trained) -> None:
    flags = [
        "there are 3 points with zero gradient! This might lead to unreliable evaluation",
        "there are 2 points with zero gradient! This might lead to unreliable evaluation",
        "Square Attack has decreased the robust accuracy of 2.00%.",
    ]
    report = run_sanity_checks(
        trained["robust"], trained["x"], trained["y"], norm="Linf", eps=EPS, autoattack_flags=flags, n_examples=32
    )
    assert not report.reliable and report.checks["autoattack"] is False
    assert report.reasons[-2].startswith(
        "AutoAttack flagged zero input gradients (gradient masking) (2 times; first: there are 3"
    )
    assert "Square attack beat the white-box attacks" in report.reasons[-1]
    assert report.to_dict()["autoattack_flags"] == flags


def test_modes_rng_and_tolerances(trained) -> None:
    model = trained["robust"].train()
    before = torch.random.get_rng_state()
    try:
        a = run_sanity_checks(model, trained["x"], trained["y"], norm="Linf", eps="1/5", n_examples=40, seed=3)
        assert all(m.training for m in model.modules())  # restored
        assert torch.equal(torch.random.get_rng_state(), before)
    finally:
        model.eval()
    b = run_sanity_checks(model, trained["x"], trained["y"], norm="Linf", eps=0.2, n_examples=40, seed=3)
    assert a.to_dict() == b.to_dict()  # eval mode was used throughout; the seed fixes every number
    # Tolerances never drop below one example (monotone) / two examples (transfer) of the subset.
    assert b.settings["tolerance"] == pytest.approx(1 / 40) and b.settings["transfer_margin"] == pytest.approx(0.05)
    l2 = run_sanity_checks(model, trained["x"], trained["y"], norm="L2", eps=1.0, n_examples=40)
    assert l2.unbounded_eps == pytest.approx(8.0) and l2.checks["unbounded"] is True  # sqrt(64): the cube diameter
    with pytest.raises(UserError, match="tolerance must be a fraction"):  # 5 meant as 5 points
        run_sanity_checks(model, trained["x"], trained["y"], norm="Linf", eps=EPS, tolerance=5)


# ---------------------------------------------------------------------------------------- eps units


def test_eps_in_pixel_units_is_rejected_by_every_entry_point(trained, tmp_path) -> None:
    model, x, y = trained["robust"], trained["x"][:8], trained["y"][:8]
    message = "write it as a fraction of 255"
    for call in (
        lambda: run_sanity_checks(model, x, y, norm="Linf", eps=8),
        lambda: evaluate_model(model, x, y, norm="Linf", eps=8, attacks=["clean"], progress=False),
        lambda: run_autoattack(model, x, y, norm="Linf", eps=8),
        lambda: pgd(model, x, y, eps=8, alpha=2, steps=1, norm="Linf"),
        lambda: fgsm(model, x, y, eps=8, norm="Linf"),
        lambda: evaluate_spec(
            "file:does-not-exist.pt",
            dataset="digits",
            data_dir=str(tmp_path),
            norm="Linf",
            eps=8,
            attacks=["clean"],
            n_examples=8,
            batch_size=8,
            seed=0,
            pgd_steps=1,
            out_dir=tmp_path,
            model_id=None,
            model_dir=str(tmp_path),
        ),
    ):
        with pytest.raises(UserError, match=message) as info:
            call()
        assert "\n" not in str(info.value)

    # An L2 radius beyond the diameter of the [0,1] cube (sqrt(64) = 8 for 8x8 digits) is pixel units too,
    # and evaluate_and_write refuses it before attacking anything.
    class MustNotRun(nn.Module):
        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            raise AssertionError("evaluated with an eps in the wrong unit")

    with pytest.raises(UserError, match=r"diameter sqrt\(64\)"):
        evaluate_and_write(
            MustNotRun(),
            x,
            y,
            label="m",
            model_id="M",
            dataset="digits",
            norm="L2",
            eps=128,
            attacks=["clean"],
            out_dir=tmp_path,
        )
    with pytest.raises(UserError, match=message):
        evaluate_and_write(
            MustNotRun(),
            x,
            y,
            label="m",
            model_id="M",
            dataset="digits",
            norm="Linf",
            eps=8,
            attacks=["clean"],
            out_dir=tmp_path,
        )
    assert not (tmp_path / "results").exists()


def test_evaluate_cli_rejects_eps_units_in_one_line(trained, tmp_path, capsys) -> None:
    ckpt = f"file:{trained['robust_ckpt']}"
    for extra, message in (
        (["--eps", "8"], "write it as a fraction of 255"),
        (["--threat", "L2", "--eps", "128"], "diameter sqrt(64)"),
    ):
        code = main(
            [
                "evaluate",
                ckpt,
                "--dataset",
                "digits",
                "--attacks",
                "clean",
                "--n-examples",
                "8",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
                *extra,
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------------------- integration


def test_evaluate_and_write_marks_masked_model_unreliable(trained, tmp_path) -> None:
    x, y = trained["x"][:24], trained["y"][:24]
    common = {
        "dataset": "digits",
        "norm": "Linf",
        "eps": EPS,
        "attacks": ["clean", "pgd", "autoattack"],
        "out_dir": tmp_path,
        "batch_size": 64,
        "pgd_steps": 5,
        "progress": False,
        "save_model": False,
    }
    masked = evaluate_and_write(
        Quantised(trained["robust"]).eval(),
        x,
        y,
        label="masked",
        model_id="Masked2026Q",
        teacher=trained["standard"],
        **common,
    )
    info = json.loads(masked.model_info_path.read_text())
    assert info["unreliable"] is True
    # One short sentence: AA repeats its zero-gradient warning per target class, merged into one finding.
    footnote = info["footnote"]
    assert footnote.startswith("Potentially unreliable AutoAttack evaluation: the sanity checks found ")
    assert footnote.endswith(".") and ". " not in footnote and len(footnote) < 250
    assert len(masked.flags) > 1 and footnote.count("gradients") == 1 and "there are" not in footnote
    results = json.loads(masked.results_path.read_text())
    assert results["sanity"]["reliable"] is False and results["sanity"]["transfer_accuracy"] is not None
    assert results["sanity"]["reasons"] == masked.sanity.reasons

    skipped = evaluate_and_write(
        trained["robust"],
        x,
        y,
        label="plain",
        model_id="Plain2026",
        sanity=False,
        **{**common, "attacks": ["clean", "pgd"]},
    )
    assert skipped.sanity is None and json.loads(skipped.results_path.read_text())["sanity"] is None


def test_evaluate_run_uses_robust_teacher_and_config_switch(trained, tmp_path) -> None:
    run = trained["run"]
    with_teacher = dataclasses.replace(run, teachers=TeacherSet({"robust": Teacher(trained["standard"], spec="std")}))
    reports = evaluate_run(with_teacher, export_dir=tmp_path / "on")
    assert len(reports) == 1 and reports[0].sanity is not None and reports[0].sanity.reliable
    results = json.loads((tmp_path / "on" / "results" / f"{run.config.run.name}.json").read_text())
    assert results["sanity"]["transfer_accuracy"] is not None and results["sanity"]["n_examples"] == 48

    off = dataclasses.replace(
        run, config=dataclasses.replace(run.config, eval=dataclasses.replace(run.config.eval, sanity=False))
    )
    evaluate_run(off, export_dir=tmp_path / "off")
    assert json.loads((tmp_path / "off" / "results" / f"{run.config.run.name}.json").read_text())["sanity"] is None


def test_evaluate_cli_teacher_and_no_sanity(trained, tmp_path, capsys) -> None:
    base = [
        "evaluate",
        f"file:{trained['robust_ckpt']}",
        "--dataset",
        "digits",
        "--attacks",
        "clean,pgd",
        "--n-examples",
        "32",
        "--pgd-steps",
        "5",
        "--device",
        "cpu",
    ]
    assert (
        main([*base, "--teacher", str(trained["standard_ckpt"]), "--name", "Robust2026", "--out", str(tmp_path / "a")])
        == 0
    )
    sanity = json.loads((tmp_path / "a" / "results" / "Robust2026.json").read_text())["sanity"]
    assert sanity["reliable"] is True and sanity["transfer_accuracy"] is not None
    assert "UNRELIABLE" not in capsys.readouterr().out
    assert main([*base, "--no-sanity", "--name", "Robust2026", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "results" / "Robust2026.json").read_text())["sanity"] is None
