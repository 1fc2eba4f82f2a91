"""Seed sweeps (``robustbench_kd.api.sweep``): one configuration per seed, resumable, aggregated over seeds."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from robustbench_kd.api.runs import resolve_config
from robustbench_kd.api.sweep import distill_seeds, parse_seeds
from robustbench_kd.errors import UserError
from robustbench_kd.threat import SEED_MAX

pytestmark = pytest.mark.single_thread

METRICS = ("clean", "pgd-5")


def sweep_run(out_dir: Path, *, lr: float = 0.05, name: str = "SeedTiny") -> dict:
    """Two epochs of PGD-AT on 96 digits, a 40-point clean + PGD-5 final evaluation: a sweep as a mapping."""
    return {
        "run": {"name": name, "out_dir": str(out_dir), "progress": False, "deterministic": True},
        "data": {"n_train": 96, "batch_size": 32},
        "optim": {"epochs": 2, "lr": lr},
        "eval": {
            "attacks": ["clean", "pgd"],
            "final_n_examples": 40,
            "pgd_steps": 5,
            "teachers": False,
            "sanity": False,
        },
        "report": {"enabled": False},
    }


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["student"]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def accuracy_of(run_dir: Path, model_id: str) -> dict[str, float]:
    return json.loads((run_dir / "results" / f"{model_id}.json").read_text())["accuracy"]


def tree(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``directory`` with its size and modification time."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- seeds ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "seeds"),
    [("0,1,2", [0, 1, 2]), ("0-4", [0, 1, 2, 3, 4]), (" 3 , 7-8 ", [3, 7, 8]), ("5", [5]), ("9-9", [9])],
)
def test_parse_seeds_reads_lists_and_inclusive_ranges(text, seeds):
    assert parse_seeds(text) == seeds
    assert parse_seeds(f"{SEED_MAX - 1}-{SEED_MAX}") == [SEED_MAX - 1, SEED_MAX]


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("", "--seeds is empty"),
        ("0,,1", "has an empty item"),
        ("0,", "has an empty item"),
        ("a", "'a' is not a seed or a range"),
        ("-1", "'-1' is not a seed or a range"),
        ("1.5", "'1.5' is not a seed or a range"),
        ("1-2-3", "'1-2-3' is not a seed or a range"),
        ("4-0", "range '4-0' runs backwards; write it low-high, e.g. 0-4"),
        ("0,1,0", "names seed 0 twice"),
        ("0-3,2", "names seed 2 twice"),
        (str(SEED_MAX + 1), f"must be an integer in [0, {SEED_MAX}]"),
        ("0-4294967295", "names more than 1000 seeds"),
        ("9" * 5000, "is not a seed or a range"),
    ],
)
def test_parse_seeds_refuses_in_one_line_naming_value_and_form(text, phrase):
    message = one_line_error(parse_seeds, text)
    assert phrase in message
    assert any(form in message for form in ("0,1,2", "low-high", f"[0, {SEED_MAX}]"))  # the valid form


def test_seeds_argument_is_checked_before_anything_is_written(tmp_path):
    out = tmp_path / "sweep"
    cases = {
        "0,1": "seeds must be a list of integers",
        (): "seeds is empty",
        (0, 0): "seeds names seed 0 more than once",
        (0, -1): "seeds[1] must be an integer",
        (True,): "seeds[0] must be an integer",
    }
    for seeds, phrase in cases.items():
        assert phrase in one_line_error(distill_seeds, sweep_run(out), seeds, progress=False)
    assert not out.exists()


def test_run_seed_override_with_seeds_is_refused(tmp_path):
    out = tmp_path / "sweep"
    message = one_line_error(distill_seeds, sweep_run(out), [0, 1], overrides=["run.seed=3"], progress=False)
    assert message.startswith("--seeds sets run.seed; drop --set run.seed")
    message = one_line_error(distill_seeds, sweep_run(out), [0], overrides=[" run . seed = 3"], progress=False)
    assert "--seeds sets run.seed" in message
    assert not out.exists()


def test_a_sweep_needs_the_final_evaluation(tmp_path):
    config = sweep_run(tmp_path / "sweep")
    config["eval"]["attacks"] = []
    assert "eval.attacks is empty" in one_line_error(distill_seeds, config, [0], progress=False)
    assert not (tmp_path / "sweep").exists()


def test_a_seed_name_that_is_no_model_id_is_refused_first(tmp_path):
    message = one_line_error(distill_seeds, sweep_run(tmp_path / "s", name="N" * 200), [0], progress=False)
    assert "run.name is not a usable model id" in message
    assert not (tmp_path / "s").exists()


# -- what cannot be a sweep directory -------------------------------------------------------------------
def test_damaged_or_foreign_manifests_and_foreign_directories_are_refused_in_one_line(tmp_path):
    cases = {
        "damaged": ({"sweep.json": "{not json"}, "sweep manifest .* is not valid JSON"),
        "foreign": ({"sweep.json": '{"accuracy": 1}'}, "is not a seed-sweep manifest"),
        "version": (
            {"sweep.json": json.dumps({"format": "robustbench_kd.sweep", "format_version": 7})},
            "has format_version 7; this version reads 1",
        ),
        "entries": (
            {
                "sweep.json": json.dumps(
                    {
                        "format": "robustbench_kd.sweep",
                        "format_version": 1,
                        "name": "SeedTiny",
                        "config": {},
                        "runs": [{"seed": 0, "run_dir": "../elsewhere", "model_id": "SeedTiny_seed0"}],
                    }
                )
            },
            "is damaged: its runs entry",
        ),
        "single run": ({"config.yaml": "run: {}\n"}, "is the directory of a single run"),
        "orphans": ({"seed_0/config.yaml": "run: {}\n"}, "holds seed_0 but no sweep.json"),
    }
    for label, (files, pattern) in cases.items():
        out = tmp_path / label.replace(" ", "_")
        for relative, text in files.items():
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            (out / relative).write_text(text)
        before = tree(out)
        with pytest.raises(UserError, match=pattern) as info:
            distill_seeds(sweep_run(out), [0], progress=False)
        assert "\n" not in str(info.value), label
        assert tree(out) == before, label  # nothing written
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in one_line_error(distill_seeds, sweep_run(tmp_path / "file"), [0], progress=False)


def test_a_sweep_directory_in_use_is_refused(tmp_path):
    import filelock

    out = tmp_path / "sweep"
    out.mkdir()
    holder = filelock.FileLock(str(out / "sweep.lock"), thread_local=False)
    with holder:
        message = one_line_error(distill_seeds, sweep_run(out), [0], progress=False)
    assert "in use by another process" in message and "sweep.lock" in message
    assert sorted(p.name for p in out.iterdir()) == ["sweep.lock"]


# -- sweeps that train ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """Seeds 0 and 1 of the tiny configuration, trained in one sweep."""
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    return distill_seeds(sweep_run(out), [0, 1], progress=False)


@pytest.mark.slow
def test_two_seeds_make_two_runs_a_manifest_and_the_hand_computed_aggregate(two_seeds):
    sweep = two_seeds.sweep_dir
    assert [(r.seed, r.run_dir, r.model_id, r.status) for r in two_seeds.runs] == [
        (0, sweep / "seed_0", "SeedTiny_seed0", "trained"),
        (1, sweep / "seed_1", "SeedTiny_seed1", "trained"),
    ]
    assert not same_weights(student_weights(sweep / "seed_0"), student_weights(sweep / "seed_1"))
    for run in two_seeds.runs:
        assert run.metrics == accuracy_of(run.run_dir, run.model_id)
        assert tuple(run.metrics) == METRICS
    assert two_seeds.paths == {
        "manifest": sweep / "sweep.json",
        "aggregate_json": sweep / "aggregate.json",
        "aggregate_md": sweep / "aggregate.md",
    }

    manifest = json.loads((sweep / "sweep.json").read_text())
    assert (manifest["format"], manifest["format_version"], manifest["name"]) == ("robustbench_kd.sweep", 1, "SeedTiny")
    assert manifest["runs"] == [
        {"seed": 0, "run_dir": "seed_0", "model_id": "SeedTiny_seed0", "status": "trained"},
        {"seed": 1, "run_dir": "seed_1", "model_id": "SeedTiny_seed1", "status": "trained"},
    ]
    shared = resolve_config(sweep_run(sweep)).to_dict()
    for key in ("seed", "out_dir", "name", "progress"):
        del shared["run"][key]
    assert manifest["config"] == shared

    aggregate = json.loads((sweep / "aggregate.json").read_text())
    assert aggregate["seeds"] == [0, 1] and set(aggregate["metrics"]) == set(METRICS)
    t = stats.t.ppf(0.975, 1)
    for key in METRICS:
        values = [accuracy_of(sweep / f"seed_{s}", f"SeedTiny_seed{s}")[key] for s in (0, 1)]
        mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
        half = t * std / math.sqrt(2)
        row = aggregate["metrics"][key]
        assert row["per_seed"] == {"0": values[0], "1": values[1]}
        assert row["mean"] == pytest.approx(mean, abs=1e-12)
        assert row["std"] == pytest.approx(std, abs=1e-12)
        assert row["low"] == pytest.approx(mean - half, abs=1e-12)
        assert row["high"] == pytest.approx(mean + half, abs=1e-12)
        assert (row["n"], row["confidence"]) == (2, 0.95)
        interval = two_seeds.aggregate[key]
        assert (interval.estimate, interval.low, interval.high) == (row["mean"], row["low"], row["high"])
        table_row = (
            f"| {key} | {100 * mean:.2f} | {100 * std:.2f} | [{100 * (mean - half):.2f}, {100 * (mean + half):.2f}] "
            f"| 0: {100 * values[0]:.2f}, 1: {100 * values[1]:.2f} |"
        )
        assert table_row in (sweep / "aggregate.md").read_text()


@pytest.mark.slow
def test_changed_shared_config_or_name_is_refused_before_anything_is_written(two_seeds):
    sweep = two_seeds.sweep_dir
    before = tree(sweep)
    message = one_line_error(distill_seeds, sweep_run(sweep, lr=0.1), [0, 1, 2], progress=False)
    assert "optim.lr = 0.05 in the sweep, 0.1 now" in message
    assert "choose another run.out_dir" in message
    message = one_line_error(distill_seeds, sweep_run(sweep, name="Other"), [2], progress=False)
    assert "run.name = 'SeedTiny' in the sweep, 'Other' now" in message
    assert tree(sweep) == before
    assert not (sweep / "seed_2").exists()


@pytest.mark.slow
def test_adding_a_seed_reruns_nothing_finished(two_seeds, tmp_path, caplog):
    sweep = tmp_path / "grown"
    shutil.copytree(two_seeds.sweep_dir, sweep)
    kept = {
        s: (p.read_bytes(), p.stat().st_mtime_ns)
        for s in (0, 1)
        for p in [sweep / f"seed_{s}" / "checkpoints" / "last.pt"]
    }
    with caplog.at_level(logging.INFO, logger="robustbench_kd.api.sweep"):
        result = distill_seeds(sweep_run(sweep), [0, 1, 2], progress=False)
    assert "seeds 0, 1 finished, not rerun" in caplog.text
    assert [(r.seed, r.status) for r in result.runs] == [(0, "finished"), (1, "finished"), (2, "trained")]
    for s, (data, mtime) in kept.items():
        last = sweep / f"seed_{s}" / "checkpoints" / "last.pt"
        assert (last.read_bytes(), last.stat().st_mtime_ns) == (data, mtime)
    assert [r.metrics for r in result.runs[:2]] == [r.metrics for r in two_seeds.runs]
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert [(e["seed"], e["status"]) for e in manifest["runs"]] == [(0, "finished"), (1, "finished"), (2, "trained")]
    aggregate = json.loads((sweep / "aggregate.json").read_text())
    assert aggregate["seeds"] == [0, 1, 2]
    for key in METRICS:
        values = [r.metrics[key] for r in result.runs]
        assert aggregate["metrics"][key]["n"] == 3
        assert aggregate["metrics"][key]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert aggregate["metrics"][key]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)

    # A sweep of one seed of it: no spread, so no interval (null in JSON, n/a in the table).
    single = distill_seeds(sweep_run(sweep), [2], progress=False)
    assert [r.status for r in single.runs] == ["finished"]
    row = json.loads((sweep / "aggregate.json").read_text())["metrics"]["clean"]
    assert (row["n"], row["std"], row["low"], row["high"]) == (1, None, None, None)
    assert "| n/a | n/a |" in (sweep / "aggregate.md").read_text()
    assert len(json.loads((sweep / "sweep.json").read_text())["runs"]) == 3  # the manifest keeps every seed


@pytest.mark.slow
def test_interrupted_seeds_resume_to_the_uninterrupted_weights(two_seeds, tmp_path, caplog):
    from robustbench_kd.training.loop import train

    sweep = tmp_path / "interrupted"
    shutil.copytree(two_seeds.sweep_dir, sweep)
    # Seed 0 stopped after training, before its results were written.
    (sweep / "seed_0" / "results" / "SeedTiny_seed0.json").unlink()
    # Seed 1 stopped after its first epoch of two.
    shutil.rmtree(sweep / "seed_1")
    seed_1 = ["run.seed=1", "run.name='SeedTiny_seed1'", f"run.out_dir='{sweep / 'seed_1'}'"]
    train(resolve_config(sweep_run(sweep), seed_1), stop_after=1)
    assert torch.load(sweep / "seed_1" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1

    with caplog.at_level(logging.INFO, logger="robustbench_kd.api.sweep"):
        result = distill_seeds(sweep_run(sweep), [0, 1], progress=False)
    assert "seeds 0, 1 resumed from last.pt" in caplog.text
    assert [(r.seed, r.status) for r in result.runs] == [(0, "resumed"), (1, "resumed")]
    for s in (0, 1):
        uninterrupted = two_seeds.sweep_dir / f"seed_{s}"
        assert same_weights(student_weights(sweep / f"seed_{s}"), student_weights(uninterrupted))
        assert result.runs[s].metrics == two_seeds.runs[s].metrics
    manifest = json.loads((sweep / "sweep.json").read_text())
    assert [e["status"] for e in manifest["runs"]] == ["resumed", "resumed"]


# -- the command line: distill --seeds, then compare ------------------------------------------------------
def test_distill_seeds_command_then_compare_the_two_sweeps(tmp_path, capsys):
    """`distill CONFIG --seeds 0,1` twice (two learning rates), then `compare` of the two sweep directories."""
    import yaml

    from robustbench_kd.cli import main

    for lr, name in ((0.05, "fast"), (0.001, "slow")):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(sweep_run(tmp_path / name, lr=lr, name=name)))
        assert main(["distill", str(config), "--seeds", "0,1"]) == 0
        out = capsys.readouterr().out
        assert "| metric | mean | std | 95% interval | per seed |" in out
        assert f"seed 0: trained, {tmp_path / name / 'seed_0'}" in out
        for seed in (0, 1):
            assert (tmp_path / name / f"seed_{seed}" / "results" / f"{name}_seed{seed}.points.safetensors").is_file()
    assert main(["compare", str(tmp_path / "fast"), str(tmp_path / "slow"), "--metric", "pgd-5"]) == 0
    out = capsys.readouterr().out
    assert "| fast | 0,1 |" in out and "| slow | 0,1 |" in out
    assert "paired bootstrap over seeds and points" in out and "better in" in out
    # The verdict in words names the pair either way.
    assert ("Distinguishable at 95% (PGD-5)" in out) or ("Within noise at 95% (PGD-5)" in out)


@pytest.mark.parametrize(
    ("flag", "says"),
    [("--resume", "--seeds resumes unfinished seeds by itself; drop --resume"), ("--no-eval", "drop --no-eval")],
)
def test_distill_seeds_refuses_flags_it_replaces(tmp_path, capsys, flag, says):
    import yaml

    from robustbench_kd.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(sweep_run(tmp_path / "sweep")))
    assert main(["distill", str(config), "--seeds", "0,1", flag]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert says in line
    assert not (tmp_path / "sweep").exists()
