"""Sharded evaluation (evaluate --shard / merge-shards) and resumable AutoAttack, on tiny CPU models."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from robustbench_kd import hookimpl
from robustbench_kd.cli import main
from robustbench_kd.data.datasets import DataSplits
from robustbench_kd.errors import UserError
from robustbench_kd.evaluation import evaluate_model, run_autoattack
from robustbench_kd.evaluation.autoattack import autoattack_state
from robustbench_kd.evaluation.shards import (
    evaluate_shard,
    merge_and_write,
    merge_shards,
    parse_shard,
    shard_bounds,
    shard_file,
)
from robustbench_kd.jobs.pipeline import evaluate_spec
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.testing.fixtures import make_tiny_cifar, tiny_zoo_entry
from robustbench_kd.zoo.autoattack_resume import read_autoattack_state

pytestmark = pytest.mark.single_thread

EPS = 4 / 255


class PixelBins(nn.Module):
    """Classifies by the first input value alone: class c when it lies in [c/10, (c+1)/10).

    With a Linf radius eps, a correctly classified point is broken by any decent attack exactly when
    that value is closer than eps to its bin's edge, and by none otherwise, whatever the random start:
    so every attack's per-example result is known in advance and cannot depend on batching.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("centers", (torch.arange(num_classes, dtype=torch.float32) + 0.5) / num_classes)
        self.sharpness = nn.Parameter(torch.tensor(100.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x.flatten(1)[:, :1]
        # log1p of a quadratic, not the quadratic: ratios of differences of quadratic logits (AutoAttack's
        # targeted DLR loss) are nearly constant and their float32 gradient underflows to exactly zero.
        return -torch.log1p(self.sharpness * (value - self.centers) ** 2)


def _pixel_values(n: int, seed: int) -> torch.Tensor:
    """n first-pixel values k/255, each 0.5..3.5 (breakable at 4/255) or 4.5..12 (robust) from a bin edge."""

    def gap(p: int) -> float:
        return min(abs(p - 25.5 * m) for m in range(1, 10))

    candidates = [p for p in range(256) if 0.5 <= gap(p) <= 3.5 or 4.5 <= gap(p) <= 12]
    gen = torch.Generator().manual_seed(seed)
    return torch.tensor(candidates)[torch.randperm(len(candidates), generator=gen)[:n]]


def _expected_robust(first: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    pixel = first * 255
    gap = torch.stack([(pixel - 25.5 * m).abs() for m in range(1, 10)]).min(0).values
    return correct & (gap > EPS * 255)


def _pixel_data(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 2, generator=gen)
    x[:, 0, 0, 0] = _pixel_values(n, seed).float() / 255
    y = PixelBins()(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10  # a quarter misclassified, so clean flags are not all True
    return x, y


class PixelPlugin:
    """A 'pixels' dataset and a 'pixel-bins' student architecture, for evaluate_spec with a custom host."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    @hookimpl
    def rbkd_register_datasets(self, registry):
        registry.add(
            "pixels",
            lambda config: DataSplits("pixels", self.x, self.y, self.x, self.y, num_classes=10),
            description="test data",
        )

    @hookimpl
    def rbkd_register_students(self, registry):
        registry.add(
            "pixel-bins",
            lambda num_classes, in_channels, image_size, **options: PixelBins(num_classes),
            description="test model",
        )


def _spec_kwargs(tmp_path: Path, **overrides):
    kwargs = dict(
        dataset="pixels",
        data_dir=str(tmp_path),
        norm="Linf",
        eps=EPS,
        attacks=["clean", "pgd", "autoattack"],
        n_examples=None,
        batch_size=64,
        seed=0,
        pgd_steps=10,
        model_id="Tiny2026Pixel",
        model_dir=str(tmp_path / "models"),
        device="cpu",
        sanity=False,
        progress=False,
    )
    kwargs.update(overrides)
    return kwargs


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> list[str]:
    """Make the (calls+1)-th call of AutoAttack's run_standard_evaluation raise KeyboardInterrupt.

    Returns the list of calls made so far, each as the attack it ran (our resumable runs call it with
    one attack and one batch at a time).
    """
    import pyautoattack.autoattack as pyaa

    original = pyaa.AutoAttack.run_standard_evaluation
    made: list[str] = []

    def interrupted(self, *args, **kwargs):
        if len(made) >= calls:
            raise KeyboardInterrupt
        made.append(",".join(self.attacks_to_run))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pyaa.AutoAttack, "run_standard_evaluation", interrupted)
    return made


# ------------------------------------------------------------------------------------------ shards


def test_shards_are_contiguous_balanced_and_cover_every_example_once() -> None:
    for n in (1, 7, 10, 40, 10000):
        for count in range(1, min(n, 9) + 1):
            bounds = [shard_bounds(n, i, count) for i in range(count)]
            assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
            assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    assert parse_shard("0/4") == (0, 4) and parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ("4/4", "1/0", "-1/2", "1", "a/b", "1/2/3"):
        with pytest.raises(UserError, match="0 <= I < N"):
            parse_shard(bad)


@pytest.mark.slow
def test_two_shards_merge_to_the_unsharded_result(tmp_path: Path) -> None:
    """Clean, PGD and standard AutoAttack: same per-example flags, accuracies and leaderboard entry."""
    x, y = _pixel_data(24)
    host = PluginHost.create(autoload=False, extra=[PixelPlugin(x, y)])
    model_path = tmp_path / "pixel.pt"
    torch.save({"state_dict": PixelBins().state_dict()}, model_path)
    spec = f"file:{model_path}?arch=pixel-bins"

    single = evaluate_spec(spec, out_dir=tmp_path / "single", host=host, **_spec_kwargs(tmp_path))
    sharded = tmp_path / "sharded"
    reports = [
        evaluate_spec(spec, out_dir=sharded, host=host, shard=(i, 2), **_spec_kwargs(tmp_path)) for i in (1, 0)
    ]  # the order the shards finish in does not matter
    directory = sharded / "shards" / "Tiny2026Pixel"
    assert [r.results_path for r in reports] == [shard_file(directory, 1, 2), shard_file(directory, 0, 2)]
    assert reports[0].n_examples == reports[1].n_examples == 12
    assert (directory / "aa_state_0_of_2.json").exists()  # AutoAttack in a shard is resumable by default
    assert (sharded / "models" / "pixels" / "Linf" / "Tiny2026Pixel.pt").exists()  # written by shard 0

    merged = merge_shards(directory)
    flags = merged.result.per_example
    assert list(flags) == ["clean", "pgd-10", "autoattack"]
    correct = flags["clean"]
    assert torch.equal(correct, PixelBins()(x).argmax(1) == y)
    expected = _expected_robust(x[:, 0, 0, 0], correct)
    assert 0 < int(expected.sum()) < int(correct.sum())  # robust and breakable points both present
    assert torch.equal(flags["pgd-10"], expected) and torch.equal(flags["autoattack"], expected)
    # ... and exactly what one unsharded evaluation of the same model gives, point by point.
    model = PixelBins().eval()
    unsharded = evaluate_model(
        model,
        x,
        y,
        norm="Linf",
        eps=EPS,
        attacks=["clean", "pgd", "autoattack"],
        batch_size=64,
        pgd_steps=10,
        progress=False,
    )
    assert all(torch.equal(unsharded.per_example[k], flags[k]) for k in flags)
    assert merged.result.accuracy == unsharded.accuracy == single.accuracy

    report = merge_and_write(directory, host=host)
    assert report.accuracy == single.accuracy and report.n_examples == 24
    ours = json.loads(report.results_path.read_text())
    theirs = json.loads(single.results_path.read_text())
    assert ours["shards"] == 2
    for key in (
        "model",
        "dataset",
        "threat_model",
        "eps",
        "n_examples",
        "accuracy",
        "pgd_alpha",
        "pgd_steps",
        "autoattack_version",
        "seed",
        "batch_size",
    ):
        assert ours[key] == theirs[key], key
    assert set(ours["autoattack_flags"]) == set(theirs["autoattack_flags"])
    info = json.loads(report.model_info_path.read_text())
    single_info = json.loads(single.model_info_path.read_text())
    assert report.model_info_path == sharded / "model_info" / "pixels" / "Linf" / "Tiny2026Pixel.json"
    # The footnote lists AutoAttack's warnings: once each after the merge, as often as logged without it.
    assert {k: v for k, v in info.items() if k != "footnote"} == {
        k: v for k, v in single_info.items() if k != "footnote"
    }


def test_merge_shards_command_on_tiny_cifar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`evaluate --shard` twice, then `merge-shards`: same numbers as one `evaluate`, on a zoo-style model."""
    data = make_tiny_cifar(tmp_path / "data", n_train_per_batch=2, n_test=24, seed=3)
    test_batch = data / "cifar-10-batches-py" / "test_batch"
    raw = pickle.loads(test_batch.read_bytes())
    raw["data"][:, 0] = _pixel_values(24, seed=3).numpy().astype("uint8")
    first = torch.tensor(raw["data"][:, 0]).float() / 255
    labels = ((first * 10).long().clamp(max=9) + (torch.arange(24) % 4 == 0).long()) % 10
    raw["labels"] = labels.tolist()
    test_batch.write_bytes(pickle.dumps(raw, protocol=2))
    model_dir = tmp_path / "models"
    (model_dir / "cifar10" / "Linf").mkdir(parents=True)
    torch.save(PixelBins().state_dict(), model_dir / "cifar10" / "Linf" / "TinyPixelZoo.pt")

    common = [
        "evaluate",
        "robustbench:cifar10/Linf/TinyPixelZoo",
        "--data-dir",
        str(data),
        "--no-verify-md5",
        "--model-dir",
        str(model_dir),
        "--eps",
        "4/255",
        "--attacks",
        "clean,pgd,autoattack-quick",
        "--batch-size",
        "8",
        "--pgd-steps",
        "10",
        "--device",
        "cpu",
        "--name",
        "Tiny2026Zoo",
    ]
    with tiny_zoo_entry("TinyPixelZoo", PixelBins):
        assert main([*common, "--out", str(tmp_path / "single"), "--no-sanity"]) == 0
        for i in range(3):  # with the sanity suite, which then runs on each shard's points
            assert main([*common, "--out", str(tmp_path / "sharded"), "--shard", f"{i}/3"]) == 0
    out = capsys.readouterr().out
    assert "Tiny2026Zoo shard 2/3 (examples 16-23)" in out and "shard_2_of_3.json" in out

    assert main(["merge-shards", str(tmp_path / "sharded" / "shards" / "Tiny2026Zoo")]) == 0
    out = capsys.readouterr().out
    assert "Tiny2026Zoo (3 shards)" in out and "results/Tiny2026Zoo.json" in out
    merged = json.loads((tmp_path / "sharded" / "results" / "Tiny2026Zoo.json").read_text())
    single = json.loads((tmp_path / "single" / "results" / "Tiny2026Zoo.json").read_text())
    assert merged["accuracy"] == single["accuracy"] and merged["n_examples"] == 24
    assert 0 < merged["accuracy"]["autoattack-quick"] < merged["accuracy"]["clean"]
    sanity = merged["sanity"]
    assert [r["n_examples"] for r in sanity["shards"]] == [8, 8, 8]
    assert sanity["reliable"] == all(r["reliable"] for r in sanity["shards"]) and single["sanity"] is None
    # No standard AutoAttack: no leaderboard entry, as without sharding.
    assert not (tmp_path / "sharded" / "model_info").exists()


def _write_clean_shards(out: Path, count: int = 2, **overrides) -> Path:
    x, y = _pixel_data(10)
    kwargs = dict(
        spec="file:pixel.pt",
        model_id="Tiny2026Pixel",
        dataset="pixels",
        norm="Linf",
        eps=EPS,
        attacks=["clean"],
        out_dir=out,
        progress=False,
    )
    kwargs.update(overrides)
    for i in range(count):
        evaluate_shard(PixelBins().eval(), x, y, shard=(i, count), **kwargs)
    return out / "shards" / "Tiny2026Pixel"


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robustbench-kd: error:") and "\n" not in err
    return err


def test_missing_inconsistent_or_overlapping_shards_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = _write_clean_shards(tmp_path / "ok")
    assert merge_shards(directory).result.accuracy["clean"] == 0.7

    assert "does not exist" in _one_line_error(capsys, ["merge-shards", str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    assert "no shard files" in _one_line_error(capsys, ["merge-shards", str(tmp_path / "empty")])

    shard_file(directory, 1, 2).unlink()
    err = _one_line_error(capsys, ["merge-shards", str(directory)])
    assert "1 of 2 shards missing" in err and "shard_1_of_2.json" in err and "--shard 1/2" in err

    directory = _write_clean_shards(tmp_path / "eps")
    _write_clean_shards(tmp_path / "eps_other", eps=2 / 255)
    (tmp_path / "eps_other" / "shards" / "Tiny2026Pixel" / "shard_1_of_2.json").replace(shard_file(directory, 1, 2))
    err = _one_line_error(capsys, ["merge-shards", str(directory)])
    assert "different settings: eps" in err and "shard_0_of_2.json" in err and "shard_1_of_2.json" in err

    directory = _write_clean_shards(tmp_path / "weights")
    with torch.no_grad():
        other = PixelBins()
        other.sharpness.fill_(50.0)
    x, y = _pixel_data(10)
    evaluate_shard(
        other.eval(),
        x,
        y,
        shard=(1, 2),
        spec="file:pixel.pt",
        model_id="Tiny2026Pixel",
        dataset="pixels",
        norm="Linf",
        eps=EPS,
        attacks=["clean"],
        out_dir=tmp_path / "weights",
        progress=False,
    )
    assert "different settings: model_sha256" in _one_line_error(capsys, ["merge-shards", str(directory)])

    directory = _write_clean_shards(tmp_path / "mixed")
    _write_clean_shards(tmp_path / "mixed", count=3)
    assert "split 2, 3 ways" in _one_line_error(capsys, ["merge-shards", str(directory)])

    directory = _write_clean_shards(tmp_path / "overlap")
    path = shard_file(directory, 1, 2)
    raw = json.loads(path.read_text())
    raw["shard"]["start"], raw["shard"]["stop"] = 4, 9
    raw["per_example"]["clean"] = raw["per_example"]["clean"][:5]
    path.write_text(json.dumps(raw))
    assert "overlap or leave a gap" in _one_line_error(capsys, ["merge-shards", str(directory)])

    path.write_text('{"format": "robustbench_kd.eval-shard", "format_ver')
    assert "is not valid JSON" in _one_line_error(capsys, ["merge-shards", str(directory)])

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "shard_0_of_1.json").write_text("{}")
    with pytest.raises(UserError, match=r"not <out>/shards/<name>|not a robustbench-kd shard"):
        merge_and_write(stray)


def test_shard_arguments_are_checked_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert "0 <= I < N" in _one_line_error(capsys, ["evaluate", "file:nope.pt", "--shard", "2/2", "--name", "X"])
    assert "--shard needs --name" in _one_line_error(capsys, ["evaluate", "file:nope.pt", "--shard", "0/2"])
    x, y = _pixel_data(3)
    with pytest.raises(UserError, match="4 shards for 3 examples"):
        evaluate_shard(
            PixelBins().eval(),
            x,
            y,
            shard=(0, 4),
            spec="s",
            model_id="M",
            dataset="pixels",
            norm="Linf",
            eps=EPS,
            attacks=["clean"],
            out_dir=Path("unused"),
            progress=False,
        )


# ------------------------------------------------------------------------------ resumable AutoAttack


class TinyCNN(nn.Module):
    """A random CNN: points near its decision boundaries depend on AutoAttack's random restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _cnn(n: int = 24) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyCNN().eval()
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::6] = (y[::6] + 1) % 10
    return model, x, y


def test_resumed_autoattack_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted before every possible batch (mid-attack and between attacks), resumed: the same flags."""
    model, x, y = _cnn()
    kwargs = dict(norm="Linf", eps=0.02, version="quick", batch_size=8)
    reference = run_autoattack(model, x, y, **kwargs)  # one uninterrupted call, no state file
    assert 0 < int(reference.robust.sum()) < int((model(x).argmax(1) == y).sum())

    made = _interrupt_after(monkeypatch, 10**6)
    fresh = run_autoattack(model, x, y, state_path=tmp_path / "fresh.json", **kwargs)
    monkeypatch.undo()
    assert torch.equal(fresh.robust, reference.robust)
    assert made.count("apgd-ce") >= 2 and made.count("apgd-dlr") >= 1  # several batches, both attacks
    assert read_autoattack_state(tmp_path / "fresh.json").completed == ["apgd-ce", "apgd-dlr"]

    for k in range(len(made)):
        state = tmp_path / f"state_{k}.json"
        _interrupt_after(monkeypatch, k)
        with pytest.raises(KeyboardInterrupt):
            run_autoattack(model, x, y, state_path=state, **kwargs)
        monkeypatch.undo()
        saved = read_autoattack_state(state)
        assert not saved.finished
        if k and made[k] == made[k - 1]:  # stopped inside an attack: the batches still to do are saved
            assert saved.current == made[k] and saved.pending is not None and saved.pending.numel() > 0
        resumed = run_autoattack(model, x, y, state_path=state, **kwargs)
        assert torch.equal(resumed.robust, reference.robust), f"interrupted before call {k + 1}"
        assert read_autoattack_state(state).finished

    # A finished state file is just read back: no attack runs again.
    made = _interrupt_after(monkeypatch, 0)
    again = run_autoattack(model, x, y, state_path=tmp_path / "fresh.json", **kwargs)
    assert made == [] and torch.equal(again.robust, reference.robust)


@pytest.mark.slow
def test_resumed_standard_autoattack_equals_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The leaderboard version, stopped inside its third attack (FAB-T) and resumed."""
    x, y = _pixel_data(16, seed=5)
    model = PixelBins().eval()
    kwargs = dict(norm="Linf", eps=EPS, batch_size=4)
    made = _interrupt_after(monkeypatch, 10**6)  # an uninterrupted run, counting its batches
    reference = run_autoattack(model, x, y, state_path=tmp_path / "reference.json", **kwargs)
    monkeypatch.undo()
    assert torch.equal(reference.robust, _expected_robust(x[:, 0, 0, 0], model(x).argmax(1) == y))
    assert made.count("fab-t") >= 2
    stop = made.index("fab-t") + 1  # one batch into FAB-T

    state = tmp_path / "aa.json"
    _interrupt_after(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        run_autoattack(model, x, y, state_path=state, **kwargs)
    monkeypatch.undo()
    saved = read_autoattack_state(state)
    assert saved.completed == ["apgd-ce", "apgd-t"] and saved.current == "fab-t"
    assert saved.pending is not None and 0 < saved.pending.numel() < int(saved.robust.sum())
    made = _interrupt_after(monkeypatch, 10**6)
    resumed = run_autoattack(model, x, y, state_path=state, **kwargs)
    assert made[0] == "fab-t" and "apgd-ce" not in made  # only the remaining work ran
    assert torch.equal(resumed.robust, reference.robust)
    assert read_autoattack_state(state).completed == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_state_file_of_another_evaluation_is_refused(tmp_path: Path) -> None:
    model, x, y = _cnn(8)
    state = tmp_path / "aa.json"
    run_autoattack(model, x, y, norm="Linf", eps=0.02, version="quick", batch_size=8, state_path=state)
    with pytest.raises(UserError, match=r"different evaluation \(eps is 0\.02 there, 0\.03 now\)") as info:
        run_autoattack(model, x, y, norm="Linf", eps=0.03, version="quick", batch_size=8, state_path=state)
    assert "\n" not in str(info.value) and str(state) in str(info.value)
    with pytest.raises(UserError, match="data_sha256"):
        run_autoattack(model, x.flip(0), y.flip(0), norm="Linf", eps=0.02, version="quick", state_path=state)
    with pytest.raises(UserError, match="attacks"):
        run_autoattack(model, x, y, norm="Linf", eps=0.02, version="standard", state_path=state)
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(UserError, match="model_sha256"):
        run_autoattack(model, x, y, norm="Linf", eps=0.02, version="quick", state_path=state)
    state.write_text("not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        run_autoattack(model, x, y, norm="Linf", eps=0.02, version="quick", state_path=state)


def test_autoattack_state_block_gives_each_version_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = _cnn(8)
    with autoattack_state(tmp_path / "aa.json"):
        result = evaluate_model(model, x, y, eps=0.02, attacks=["clean", "autoattack-quick"], progress=False)
    assert read_autoattack_state(tmp_path / "aa.json").finished
    plain = evaluate_model(model, x, y, eps=0.02, attacks=["autoattack-quick"], progress=False)
    assert torch.equal(result.per_example["autoattack-quick"], plain.per_example["autoattack-quick"])
    with autoattack_state(tmp_path / "aa.json"):
        run_autoattack(model, x, y, norm="Linf", eps=0.02, version="quick")  # resumes the finished file
        with pytest.raises(UserError, match="different evaluation"):
            run_autoattack(model, x[:4], y[:4], norm="Linf", eps=0.02, version="quick")
    with autoattack_state(tmp_path / "both.json"), monkeypatch.context() as patch:
        quick = run_autoattack(model, x, y, norm="Linf", eps=0.02, version="quick")
        _interrupt_after(patch, 0)  # only where the second version's state goes matters here
        with pytest.raises(KeyboardInterrupt):
            run_autoattack(model, x, y, norm="Linf", eps=0.02, version="standard")
    assert read_autoattack_state(tmp_path / "both.json").finished
    assert read_autoattack_state(tmp_path / "both-standard.json").attacks[-1] == "square"
    assert quick.robust.dtype == torch.bool


def test_autoattacks_own_finished_state_file_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state file pyautoattack wrote itself (attack set stored as a string) gives its flags back."""
    from pyautoattack.autoattack import AutoAttack

    model, x, y = _cnn(12)
    adversary = AutoAttack(model, attacks=["apgd-ce", "apgd-dlr"], version="custom", eps=0.02, seed=0)
    adversary.apgd.n_restarts = 1
    state = tmp_path / "theirs.json"
    adversary.run_standard_evaluation(x, y, batch_size=12, state_path=state)
    raw = json.loads(state.read_text())
    assert isinstance(raw["_attacks_to_run"], str)  # the bug that breaks pyautoattack's own resume
    made = _interrupt_after(monkeypatch, 0)
    result = run_autoattack(model, x, y, norm="Linf", eps=0.02, version="quick", state_path=state)
    assert made == []
    assert result.robust.tolist() == [bool(v) for v in raw["_robust_flags"]]


def test_adapter_and_benchmark_resume_through_a_state_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fra31's API and robustbench's benchmark(aa_state_path=...) work with a state file, resumed too."""
    from robustbench_kd.zoo import compat

    robustbench = compat.import_robustbench()
    import robustbench.eval as rb_eval
    from autoattack.state import EvaluationState

    model, x, y = _cnn(12)
    adversary = compat.AutoAttack(
        model, eps=0.02, version="custom", attacks_to_run=["apgd-ce", "apgd-dlr"], device="cpu", seed=0
    )
    adversary.apgd.n_restarts = 1
    _, y_ref = adversary.run_standard_evaluation(x, y, bs=4, return_labels=True)
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        adversary.run_standard_evaluation(x, y, bs=4, state_path=tmp_path / "s.json")
    monkeypatch.undo()
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, bs=4, return_labels=True, state_path=tmp_path / "s.json")
    assert torch.equal(y_adv == y, y_ref == y) and x_adv.shape == x.shape
    loaded = EvaluationState.from_disk(tmp_path / "s.json")
    assert loaded.robust_flags.tolist() == (y_ref == y).tolist()
    assert loaded.robust_flags.mean().item() == pytest.approx(float((y_ref == y).float().mean()))
    assert "apgd-ce" in loaded.run_attacks and loaded.attacks_to_run == {"apgd-ce", "apgd-dlr"}

    class SeededCheapAutoAttack(rb_eval.AutoAttack):
        # benchmark() always runs the standard version unseeded; seed it, and shorten FAB and Square,
        # whose full budgets only cost time here.
        def __init__(self, *args, **kwargs):
            kwargs["seed"] = 0
            super().__init__(*args, **kwargs)
            self.fab.n_iter, self.square.n_queries = 5, 20

    monkeypatch.setattr(rb_eval, "AutoAttack", SeededCheapAutoAttack)
    data = make_tiny_cifar(tmp_path / "data", n_train_per_batch=2, n_test=8, seed=2)
    from robustbench_kd.testing.fixtures import patch_cifar_integrity

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
    common = dict(
        n_examples=8,
        dataset="cifar10",
        threat_model="Linf",
        data_dir=str(data),
        device=torch.device("cpu"),
        batch_size=8,
        eps=1 / 255,
    )
    with patch_cifar_integrity():
        plain = robustbench.eval.benchmark(net, **common)
        state = tmp_path / "bench.json"
        first = robustbench.eval.benchmark(net, aa_state_path=state, **common)
        again = robustbench.eval.benchmark(net, aa_state_path=state, **common)  # a finished state: read back
    assert plain == first == again
