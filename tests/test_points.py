"""Per-point results: every evaluation writes, per test point, its outcome under each attack and AutoAttack stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_shards import EPS, PixelBins, PixelPlugin, _expected_robust, _pixel_data, _spec_kwargs
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.evaluation import run_autoattack
from robustbench_kd.evaluation.autoattack_stages import StageRecorder, stage_flags
from robustbench_kd.evaluation.points import (
    PointResults,
    pairing_problem,
    points_path,
    read_points,
    write_points,
)
from robustbench_kd.evaluation.shards import merge_and_write
from robustbench_kd.jobs.pipeline import evaluate_spec
from robustbench_kd.plugin_host import PluginHost

pytestmark = pytest.mark.single_thread

STANDARD = ["apgd-ce", "apgd-t", "fab-t", "square"]


def _linear(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small random classifier and points it partly gets right, partly wrong, several of them breakable."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(40, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[::7] = (y[::7] + 1) % 10
    return net, x, y


def test_stage_flags_are_robust_after_each_attack() -> None:
    robust = torch.tensor([True, False, False, False, False])
    fooled_by = torch.tensor([-1, 0, 2, -1, 1])  # point 3: wrong on clean inputs, fooled by nothing
    stages = stage_flags(robust, fooled_by, ["a", "b", "c"])
    assert stages["a"].tolist() == [True, False, True, False, True]
    assert stages["b"].tolist() == [True, False, True, False, False]
    assert stages["c"].tolist() == [True, False, False, False, False]


def test_a_single_autoattack_call_and_the_resumable_driver_give_the_same_stages(tmp_path: Path) -> None:
    net, x, y = _linear()
    single = run_autoattack(net, x, y, norm="Linf", eps=0.03, batch_size=16, seed=0)
    driven = run_autoattack(net, x, y, norm="Linf", eps=0.03, batch_size=16, seed=0, state_path=tmp_path / "s.json")
    assert list(single.stages) == list(driven.stages) == STANDARD
    for attack in STANDARD:
        assert torch.equal(single.stages[attack], driven.stages[attack]), attack
    clean = net(x).argmax(1) == y
    previous = clean
    for attack in STANDARD:  # each stage keeps a subset of the points the one before kept
        assert not bool((single.stages[attack] & ~previous).any())
        previous = single.stages[attack]
    assert torch.equal(single.stages["square"], single.robust)
    assert int(clean.sum()) > int(single.stages["apgd-ce"].sum()) > 0  # APGD-CE breaks some, not all
    # The state file says which attack fooled each point.
    saved = json.loads((tmp_path / "s.json").read_text())
    assert len(saved["fooled_by"]) == 40 and set(saved["fooled_by"]) <= {-1, 0, 1, 2, 3}


def test_the_recorder_refuses_calls_that_do_not_follow_the_official_batching(caplog) -> None:
    net, x, y = _linear()
    recorder = StageRecorder(type("Adversary", (), {"model": net})())
    clean = net(x).argmax(1) == y
    recorder.calls = [("apgd-ce", y[clean][:16], y[clean][:16])]  # one batch where the loop makes two
    assert recorder.fooled_by(["apgd-ce"], clean_correct=clean, y=y, batch_size=16, final_robust=clean) is None
    assert "do not follow the official batching" in caplog.text


def test_two_shard_points_files_merge_into_the_unsharded_file(tmp_path: Path) -> None:
    x, y = _pixel_data(24)
    host = PluginHost.create(autoload=False, extra=[PixelPlugin(x, y)])
    model_path = tmp_path / "pixel.pt"
    torch.save({"state_dict": PixelBins().state_dict()}, model_path)
    spec = f"file:{model_path}?arch=pixel-bins"
    single = evaluate_spec(spec, out_dir=tmp_path / "single", host=host, **_spec_kwargs(tmp_path))
    for index in (1, 0):
        evaluate_spec(spec, out_dir=tmp_path / "sharded", host=host, shard=(index, 2), **_spec_kwargs(tmp_path))
    merged = merge_and_write(tmp_path / "sharded" / "shards" / "Tiny2026Pixel", host=host)

    assert single.points_path == points_path(tmp_path / "single" / "results", "Tiny2026Pixel")
    assert json.loads(single.results_path.read_text())["points"] == "Tiny2026Pixel.points.safetensors"
    one, two = read_points(single.points_path), read_points(merged.points_path)
    keys = ["clean", "pgd-10", "autoattack", *(f"autoattack/{a}" for a in STANDARD)]
    assert list(one.outcomes) == list(two.outcomes) == keys
    assert torch.equal(one.index, torch.arange(24)) and torch.equal(two.index, one.index)
    for key in keys:
        assert torch.equal(one.outcomes[key], two.outcomes[key]), key
    assert one.settings == two.settings
    assert one.settings["data_sha256"] and one.settings["eps"] == pytest.approx(EPS)
    # The outcomes are the right ones, not just equal: this model's robust points are known in advance.
    correct = PixelBins()(x).argmax(1) == y
    assert torch.equal(one.outcomes["clean"], correct)
    assert torch.equal(one.outcomes["autoattack"], _expected_robust(x[:, 0, 0, 0], correct))
    assert pairing_problem(one, two, key="autoattack") is None


def _points(model_id: str = "A2026", **settings) -> PointResults:
    base = {"dataset": "cifar10", "n_examples": 4, "data_sha256": "ab" * 32, "norm": "Linf", "eps": 8 / 255}
    base.update(pgd_steps=20, pgd_alpha=2 / 255, autoattack_mode="standard")
    base.update(settings)
    flags = torch.tensor([True, False, True, True])
    return PointResults(model_id, torch.arange(4), {"clean": flags, "autoattack": flags & False}, base)


def test_a_points_file_round_trips_and_pairs_only_like_with_like(tmp_path: Path) -> None:
    a = _points()
    path = write_points(tmp_path / "A2026.points.safetensors", a)
    back = read_points(path)
    assert back.model_id == "A2026" and back.settings == a.settings and torch.equal(back.index, a.index)
    assert all(torch.equal(back.outcomes[k], a.outcomes[k]) for k in a.outcomes)
    assert pairing_problem(back, _points("B2026"), key="autoattack") is None
    assert "different eps" in pairing_problem(a, _points("B2026", eps=4 / 255), key="autoattack")
    assert "test points" in pairing_problem(a, _points("B2026", data_sha256="cd" * 32), key="autoattack")
    assert "pgd_steps" in pairing_problem(a, _points("B2026", pgd_steps=10), key="autoattack")
    assert "no 'pgd-20' outcome" in pairing_problem(a, _points("B2026"), key="pgd-20")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not safetensors at all", "is not a safetensors file"),
        (None, "is not a points file"),
    ],
)
def test_a_damaged_or_foreign_points_file_is_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "X.points.safetensors"
    if content is None:
        from safetensors.torch import save_file

        save_file({"index": torch.arange(3)}, str(path), metadata={"format": "something else"})
    else:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        read_points(path)
    assert "\n" not in str(error.value)
