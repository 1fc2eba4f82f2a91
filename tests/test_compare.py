"""`robustbench-kd compare`: intervals per model, a paired test per pair, refusals of unpairable evaluations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from robustbench_kd.api.compare import compare
from robustbench_kd.cli import main
from robustbench_kd.evaluation.points import PointResults, write_points

N = 200
SETTINGS = {
    "dataset": "cifar10",
    "n_examples": N,
    "data_sha256": "ab" * 32,
    "norm": "Linf",
    "eps": 8 / 255,
    "eps_str": "8/255",
    "pgd_steps": 20,
    "pgd_alpha": 2 / 255,
    "autoattack_mode": "standard",
    "seed": 0,
    "batch_size": 256,
}


def _flags(n_correct: int, *, offset: int = 0) -> torch.Tensor:
    flags = torch.zeros(N, dtype=torch.bool)
    flags[offset : offset + n_correct] = True
    return flags


def _write(directory: Path, model_id: str, autoattack: torch.Tensor, **settings) -> Path:
    clean = torch.ones(N, dtype=torch.bool)
    points = PointResults(
        model_id, torch.arange(N), {"clean": clean, "autoattack": autoattack}, {**SETTINGS, **settings}
    )
    return write_points(directory / "results" / f"{model_id}.points.safetensors", points)


def _sweep(directory: Path, name: str, per_seed: dict[int, torch.Tensor]) -> Path:
    runs = []
    for seed, flags in per_seed.items():
        _write(directory / f"seed_{seed}", f"{name}_seed{seed}", flags)
        runs.append({"seed": seed, "run_dir": f"seed_{seed}", "model_id": f"{name}_seed{seed}", "status": "trained"})
    manifest = {"format": "robustbench_kd.sweep", "format_version": 1, "name": name, "runs": runs}
    (directory / "sweep.json").write_text(json.dumps(manifest))
    return directory


def test_two_single_runs_get_the_exact_mcnemar_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A right on 0..119, B right on 10..109: A alone right on 20 points, B alone on none.
    a = _write(tmp_path / "a", "A2026", _flags(120))
    b = _write(tmp_path / "b", "B2026", _flags(100, offset=10))
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    hand = 2 * 0.5**20  # P[X <= 0] for X ~ Binomial(20, 1/2), two-sided
    assert "| A2026 vs B2026 | +10.00 |" in text
    assert f"| exact McNemar | {hand:.3g} | distinguishable |" in text
    assert "Distinguishable at 95% (AutoAttack): A2026 > B2026 by 10.00 points." in text
    data = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert data["pairs"][0]["p_value"] == pytest.approx(hand, rel=1e-9)
    # Each model's interval: exact Clopper-Pearson over the 200 points (one seed).
    from scipy.stats import binomtest

    ci = binomtest(120, N).proportion_ci(0.95, method="exact")
    accuracy = data["models"][0]["accuracy"]["autoattack"]
    assert (accuracy["estimate"], accuracy["low"], accuracy["high"]) == pytest.approx((0.6, ci.low, ci.high))
    html = (tmp_path / "out" / "comparison.html").read_text()
    assert "data:image/png;base64," in html and "within noise" not in html
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 1000


def test_a_small_difference_between_single_runs_is_within_noise(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", "A2026", _flags(101))
    b = _write(tmp_path / "b", "B2026", _flags(100, offset=1))  # one point each way... A: 0..100, B: 1..100
    result = compare([a, b])
    (verdict,) = result.verdicts
    assert verdict.mcnemar is not None and (verdict.mcnemar.a_only, verdict.mcnemar.b_only) == (1, 0)
    assert verdict.p_value == 1.0 and not verdict.distinguishable
    assert "Within noise at 95% (AutoAttack): A2026 vs B2026 (+0.50" in result.markdown()


def test_sweeps_are_compared_over_seeds_and_points(tmp_path: Path) -> None:
    good = _sweep(tmp_path / "good", "good", {s: _flags(150 + s) for s in (0, 1, 2)})
    poor = _sweep(tmp_path / "poor", "poor", {s: _flags(100 + s, offset=s) for s in (0, 1, 2)})
    result = compare([poor, good], n_resamples=2000)
    (verdict,) = result.verdicts
    assert (verdict.first, verdict.second) == ("good", "poor")  # the better model first
    assert verdict.test == "paired bootstrap over seeds and points" and verdict.distinguishable
    assert verdict.difference == pytest.approx((151 - 101) / N)
    assert verdict.sign is not None and verdict.sign.positive == 3 and verdict.sign.p_value == pytest.approx(0.25)
    assert "cannot go below 0.25 with 3 seeds" in result.markdown()
    interval = result.intervals["autoattack"]["good"]
    assert interval.n == 3 and interval.method == "Student t over 3 seeds"
    values = [150 / N, 151 / N, 152 / N]
    half = 4.302652729911275 * (0.005 / math.sqrt(3))  # t_{0.975, 2} * std / sqrt(3); std of (0.75, 0.755, 0.76)
    assert (interval.estimate, interval.low, interval.high) == pytest.approx(
        (sum(values) / 3, sum(values) / 3 - half, sum(values) / 3 + half)
    )


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"eps": 4 / 255}, "different eps"),
        ({"data_sha256": "cd" * 32}, "different test points (inputs or labels differ)"),
        ({"pgd_steps": 10}, "different pgd_steps"),
        ({"autoattack_mode": "standard,autoattack-quick"}, "different autoattack_mode"),
        ({"norm": "L2"}, "different norm"),
    ],
)
def test_compare_refuses_runs_evaluated_differently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], settings: dict, says: str
) -> None:
    a = _write(tmp_path / "a", "A2026", _flags(120))
    b = _write(tmp_path / "b", "B2026", _flags(100), **settings)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith("robustbench-kd: error: cannot compare A2026 with B2026 point by point:")
    assert says in line
    assert not (tmp_path / "out").exists()


def test_compare_refuses_a_seed_evaluated_on_other_points_inside_a_sweep(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path / "s", "s", {0: _flags(120), 1: _flags(121)})
    _write(sweep / "seed_1", "s_seed1", _flags(121), n_examples=100)
    other = _write(tmp_path / "b", "B2026", _flags(100))
    with pytest.raises(Exception, match="different number of points"):
        compare([sweep, other])


def test_what_compare_cannot_read_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a", "A2026", _flags(120))
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(a)], "compare needs at least two runs or sweeps, got 1"),
        ([str(a), str(tmp_path / "empty")], "is not a run directory, a sweep directory"),
        ([str(a), str(a)], "are both called 'A2026'"),
        ([str(a), str(_write(tmp_path / "b", "B2026", _flags(100))), "--metric", "pgd-20"], "not every compared run"),
    ]
    for argv, says in cases:
        assert main(["compare", *argv]) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert says in line, line


def _hostile_points(tmp_path: Path, kind: str) -> Path:
    """A points file (or sweep) damaged or forged in one way; see the parametrisation below."""
    from safetensors.torch import save_file

    path = tmp_path / "x" / "results" / "X2026.points.safetensors"
    path.parent.mkdir(parents=True)
    good = {"index": torch.arange(N), "clean": torch.ones(N, dtype=torch.bool), "autoattack": _flags(10)}
    meta = {
        "format": "robustbench_kd.points",
        "format_version": "1",
        "model_id": "X2026",
        "keys": json.dumps(["clean", "autoattack"]),
        "settings": json.dumps(SETTINGS),
    }
    if kind == "truncated":
        save_file(good, str(path), metadata=meta)
        path.write_bytes(path.read_bytes()[:-50])
    elif kind == "fifo":
        import os

        os.mkfifo(path)
    elif kind == "float outcome":
        save_file({**good, "autoattack": torch.zeros(N)}, str(path), metadata=meta)
    elif kind == "repeated index":
        save_file({**good, "index": torch.zeros(N, dtype=torch.long)}, str(path), metadata=meta)
    elif kind == "model id with a slash":
        save_file(good, str(path), metadata={**meta, "model_id": "../../etc"})
    elif kind == "newer format":
        save_file(good, str(path), metadata={**meta, "format_version": "2"})
    elif kind == "settings not JSON":
        save_file(good, str(path), metadata={**meta, "settings": "{"})
    elif kind == "sweep outside":
        sweep = tmp_path / "sweep"
        sweep.mkdir()
        runs = [{"seed": 0, "run_dir": "../x", "model_id": "X2026", "status": "trained"}]
        (sweep / "sweep.json").write_text(json.dumps({"format": "robustbench_kd.sweep", "name": "s", "runs": runs}))
        save_file(good, str(path), metadata=meta)
        return sweep
    elif kind == "sweep damaged":
        sweep = tmp_path / "sweep"
        sweep.mkdir()
        (sweep / "sweep.json").write_text('{"format": "robustbench_kd.sweep", "runs": [')
        return sweep
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("truncated", "is not a safetensors file"),
        ("fifo", "not a regular file"),
        ("float outcome", "has outcome 'autoattack' that is not a bool vector"),
        ("repeated index", "point indices that are negative or repeated"),
        ("model id with a slash", "which is not a model id"),
        ("newer format", "has format version '2'"),
        ("settings not JSON", "damaged metadata"),
        ("sweep outside", "outside the sweep"),
        ("sweep damaged", "sweep manifest"),
    ],
)
def test_a_hostile_points_file_or_sweep_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, says: str
) -> None:
    other = _write(tmp_path / "a", "A2026", _flags(120))
    bad = _hostile_points(tmp_path, kind)
    assert main(["compare", str(other), str(bad), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert says in line, line
    assert captured.out == "" and not (tmp_path / "out").exists()
