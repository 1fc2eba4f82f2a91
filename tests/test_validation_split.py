"""Checkpoint selection without test-set leakage: the validation split, best.pt, resume, final evaluation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from robustbench_kd.config import DataSection, config_from_mapping
from robustbench_kd.data.datasets import DataSplits, split_validation, validation_count
from robustbench_kd.errors import UserError
from robustbench_kd.jobs import pipeline
from robustbench_kd.jobs.pipeline import distill
from robustbench_kd.storage.checkpoint import load_checkpoint, state_dict_of
from robustbench_kd.testing.runs import tiny_digits_raw
from robustbench_kd.training import builders, selection
from robustbench_kd.training.loop import train
from robustbench_kd.training.selection import update_best

NAME = "ValSplit_SmallCNN"


def digits_config(out_dir, *, val_size=0.1, epochs=2, **sections):
    raw = tiny_digits_raw(
        out_dir,
        merge={
            "run": {"name": NAME},
            "data": {"val_size": val_size},
            "optim": {"epochs": epochs},
            # sanity off: the gradient-masking suite is tested in test_sanity.py and would triple the run time here
            "eval": {
                "every": 1,
                "n_examples": 32,
                "pgd_steps": 2,
                "attacks": ["clean"],
                "final_n_examples": 16,
                "teachers": False,
                "sanity": False,
            },
        },
    )
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config_from_mapping(raw)


def indexed_splits(n_train=100, n_test=10):
    """Images whose pixel is their own training index, so held-out and kept images can be told apart."""
    ids = torch.arange(n_train)
    return DataSplits(
        "toy",
        ids.float().view(-1, 1, 1, 1),
        ids.clone(),
        torch.zeros(n_test, 1, 1, 1),
        torch.zeros(n_test, dtype=torch.int64),
        num_classes=n_train,
    )


def rows(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def scripted_quick_eval(monkeypatch, scores):
    """Replace the per-epoch evaluation by fixed (pgd, clean) numbers per epoch (1-based)."""

    def fake(run):
        pgd, clean = scores[run.epoch + 1]
        return {"val_clean_acc": clean, f"val_pgd{run.config.eval.pgd_steps}_acc": pgd}

    monkeypatch.setattr(selection, "quick_eval", fake)


# -- the split -----------------------------------------------------------------------------------
@pytest.mark.parametrize("val_size,count", [(0.2, 20), (13, 13), (0.001, 1)])
def test_split_is_deterministic_disjoint_and_of_the_configured_size(val_size, count):
    data = indexed_splits()
    torch.manual_seed(0)
    first = split_validation(data, val_size)
    torch.manual_seed(123)  # the run's seed must not matter
    second = split_validation(indexed_splits(), val_size)
    assert len(first.val_y) == count and len(first.train_y) == 100 - count
    assert torch.equal(first.val_y, second.val_y) and torch.equal(first.train_y, second.train_y)
    assert not set(first.val_y.tolist()) & set(first.train_y.tolist())
    assert sorted(first.val_y.tolist() + first.train_y.tolist()) == list(range(100))
    assert torch.equal(first.val_x.view(-1).long(), first.val_y)  # images travel with their labels
    assert first.train_y.tolist() == sorted(first.train_y.tolist())  # the loader's order is kept
    assert first.test_x is data.test_x and first.test_y is data.test_y


def test_split_is_a_random_subset_and_zero_means_none():
    split = split_validation(indexed_splits(), 20)
    assert split.val_y.tolist() != sorted(split.val_y.tolist())  # random draw order, not the first 20
    data = indexed_splits()
    assert split_validation(data, 0) is data and not data.has_validation


def test_digits_split_ignores_run_seed_and_n_train(host):
    a = builders.load_data(host, digits_config("a", val_size=150, run={"seed": 0}))
    b = builders.load_data(host, digits_config("b", val_size=150, run={"seed": 7}, data={"n_train": 100}))
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.val_y, b.val_y)
    assert len(a.val_y) == 150 and len(a.train_y) == 200 and len(b.train_y) == 100
    assert len(a.test_y) == 297  # the test split is the loader's, untouched


@pytest.mark.parametrize("value,parsed", [(0.1, 0.1), (500, 500), (500.0, 500), ("1/10", 0.1), (0, 0)])
def test_val_size_accepts_fractions_and_counts(value, parsed):
    section = config_from_mapping({"data": {"val_size": value}}).data
    assert section.val_size == parsed and type(section.val_size) is type(parsed)


@pytest.mark.parametrize("value", [-1, 1.5, True, "ten", float("nan")])
def test_val_size_rejects_other_values(value):
    with pytest.raises(UserError, match=r"data.val_size must be"):
        config_from_mapping({"data": {"val_size": value}})


def test_val_size_must_leave_training_images():
    assert validation_count(0.5, 10) == 5
    with pytest.raises(UserError, match="leave at least one for training"):
        validation_count(10, 10)
    with pytest.raises(UserError, match="leave at least one"):
        split_validation(indexed_splits(), DataSection(val_size=100).val_size)


# -- configuration errors ------------------------------------------------------------------------
def test_eval_every_without_validation_split_is_an_error(tmp_path, host):
    with pytest.raises(UserError, match=r"set data.val_size"):
        train(digits_config(tmp_path / "r", val_size=0), host=host)


def test_validation_split_without_eval_every_is_an_error(tmp_path, host):
    with pytest.raises(UserError, match=r"eval.every = 0 never evaluates them"):
        train(digits_config(tmp_path / "r", eval={"every": 0}), host=host)


def test_select_must_be_pgd_or_clean():
    assert config_from_mapping({"eval": {"select": "clean"}}).eval.select == "clean"
    with pytest.raises(UserError, match=r"eval.select must be one of pgd, clean"):
        config_from_mapping({"eval": {"select": "autoattack"}})


# -- the test set is never read before the final evaluation ---------------------------------------
def guard_test_set(monkeypatch):
    """Swap the loaded test tensors for ones that fail on any use until ``evaluate_run`` starts."""

    class Guarded(torch.Tensor):
        open = False
        uses = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if not cls.open:
                raise AssertionError(f"the test set was read before the final evaluation ({func})")
            cls.uses += 1
            with torch._C.DisableTorchFunctionSubclass():  # results are plain tensors
                return func(*args, **(kwargs or {}))

    real_load, real_evaluate_run = builders.load_data, pipeline.evaluate_run

    def load_data(host, config):
        data = real_load(host, config)
        data.test_x, data.test_y = data.test_x.as_subclass(Guarded), data.test_y.as_subclass(Guarded)
        return data

    def evaluate_run(run, **kwargs):
        Guarded.open = True
        return real_evaluate_run(run, **kwargs)

    monkeypatch.setattr(builders, "load_data", load_data)
    monkeypatch.setattr(pipeline, "evaluate_run", evaluate_run)
    return Guarded


def test_training_with_per_epoch_evaluation_never_reads_the_test_set(tmp_path, host, monkeypatch):
    guard = guard_test_set(monkeypatch)
    reports = distill(digits_config(tmp_path / "r", epochs=2, checkpoint={"every": 1}), host=host)
    assert guard.uses > 0  # the guard works: the final evaluation did read the test set
    history = rows(tmp_path / "r")
    assert all(0 <= r["val_clean_acc"] <= 1 and "val_pgd2_acc" in r for r in history)
    # best.pt is the epoch with the best validation PGD accuracy (clean breaks ties, the earlier epoch wins).
    best = max(history, key=lambda r: (r["val_pgd2_acc"], r["val_clean_acc"], -r["epoch"]))["epoch"]
    assert [r["best_epoch"] for r in history][-1] == best
    saved = load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")
    assert saved["epoch"] == best and saved["best"]["epoch"] == best
    epoch_file = load_checkpoint(tmp_path / "r" / "checkpoints" / f"epoch_{best:03d}.pt")
    assert all(torch.equal(v, epoch_file["student"][k]) for k, v in saved["student"].items())
    assert reports[0].label.startswith(f"student {NAME} (best")


def test_the_guard_catches_a_quick_eval_on_the_test_set(tmp_path, host, monkeypatch):
    """The negative control: the old behaviour (per-epoch check on test points) fails the guard."""
    guard_test_set(monkeypatch)

    def quick_eval_on_test(run):
        return {
            "val_clean_acc": float((run.student(run.data.test_x[:8].float()).argmax(1) == 0).float().mean()),
            "val_pgd2_acc": 0.0,
        }

    monkeypatch.setattr(selection, "quick_eval", quick_eval_on_test)
    with pytest.raises(AssertionError, match="test set was read before the final evaluation"):
        train(digits_config(tmp_path / "r", epochs=1), host=host)


# -- best.pt, resume, final evaluation -----------------------------------------------------------
SCORES = {1: (0.3, 0.9), 2: (0.5, 0.9), 3: (0.4, 0.99), 4: (0.5, 0.9)}  # (pgd, clean): epoch 2 is best


def test_best_checkpoint_survives_resume(tmp_path, host, monkeypatch):
    """Stopped after the best epoch, the resumed run must not replace best.pt with a worse epoch."""
    scripted_quick_eval(monkeypatch, SCORES)
    cfg = digits_config(tmp_path / "r", epochs=4, checkpoint={"every": 1})
    train(cfg, host=host, stop_after=2)
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["best"]["epoch"] == 2
    run = train(cfg, host=host, resume=True)
    assert run.best["epoch"] == 2 and run.best["val_pgd2_acc"] == 0.5
    assert [r["best_epoch"] for r in rows(tmp_path / "r")] == [1, 2, 2, 2]  # epoch 4 ties on PGD and clean
    best = load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")
    epoch2 = load_checkpoint(tmp_path / "r" / "checkpoints" / "epoch_002.pt")
    assert best["epoch"] == 2
    assert all(torch.equal(v, epoch2["student"][k]) for k, v in best["student"].items())


def test_clean_accuracy_breaks_a_pgd_tie():
    cfg = digits_config("x")
    run = SimpleNamespace(config=cfg, data=SimpleNamespace(has_validation=True, val_y=range(50)), best=None)
    assert update_best(run, 1, {"val_pgd2_acc": 0.5, "val_clean_acc": 0.8})
    assert not update_best(run, 2, {"val_pgd2_acc": 0.5, "val_clean_acc": 0.8})
    assert update_best(run, 3, {"val_pgd2_acc": 0.5, "val_clean_acc": 0.9})
    assert not update_best(run, 4, {"val_pgd2_acc": 0.4, "val_clean_acc": 1.0})
    clean = SimpleNamespace(config=digits_config("x", eval={"select": "clean"}), data=run.data, best=None)
    assert update_best(clean, 1, {"val_pgd2_acc": 0.5, "val_clean_acc": 0.8})
    assert update_best(clean, 2, {"val_pgd2_acc": 0.1, "val_clean_acc": 0.9})
    assert run.best["epoch"] == 3 and clean.best["epoch"] == 2 and clean.best["metric"] == "val_clean_acc"


def test_resume_with_other_selection_or_split_is_an_error(tmp_path, host, monkeypatch):
    scripted_quick_eval(monkeypatch, SCORES)
    train(digits_config(tmp_path / "r", epochs=3), host=host, stop_after=1)
    with pytest.raises(UserError, match=r"best.pt was chosen by"):
        train(digits_config(tmp_path / "r", epochs=3, eval={"select": "clean"}), host=host, resume=True)
    with pytest.raises(UserError, match=r"data.val_size = 0.1"):
        train(digits_config(tmp_path / "r", epochs=3, val_size=0.2), host=host, resume=True)


def test_final_evaluation_reports_best_as_the_model_and_last_beside_it(tmp_path, host, monkeypatch):
    scripted_quick_eval(monkeypatch, {1: (0.6, 0.9), 2: (0.4, 0.9)})
    out = tmp_path / "r"
    reports = distill(digits_config(out, epochs=2, checkpoint={"every": 1}), host=host)
    assert [r.results_path.name for r in reports] == [f"{NAME}.json", f"{NAME}_last.json"]
    assert reports[0].label == f"student {NAME} (best, epoch 1)"
    assert reports[1].label == f"student {NAME}_last (last, epoch 2)"
    # The zoo file under <name> holds epoch 1's weights, the one under <name>_last the final ones.
    for model_id, epoch in ((NAME, 1), (f"{NAME}_last", 2)):
        zoo = state_dict_of(torch.load(out / "models" / "digits" / "Linf" / f"{model_id}.pt", weights_only=True))
        saved = load_checkpoint(out / "checkpoints" / f"epoch_{epoch:03d}.pt")["student"]
        assert all(torch.equal(v, zoo[k]) for k, v in saved.items()), model_id


def test_best_equal_to_last_is_evaluated_once(tmp_path, host, monkeypatch):
    scripted_quick_eval(monkeypatch, {1: (0.4, 0.9), 2: (0.6, 0.9)})
    reports = distill(digits_config(tmp_path / "r", epochs=2), host=host)
    assert [r.label for r in reports] == [f"student {NAME} (best = last, epoch 2)"]


def test_without_validation_the_last_epoch_is_the_model(tmp_path, host):
    reports = distill(digits_config(tmp_path / "r", val_size=0, epochs=1, eval={"every": 0}), host=host)
    assert [r.label for r in reports] == [f"student {NAME}"]
    assert not (tmp_path / "r" / "checkpoints" / "best.pt").exists()


def test_missing_best_checkpoint_is_an_error_not_a_fallback(tmp_path, host, monkeypatch):
    scripted_quick_eval(monkeypatch, {1: (0.6, 0.9), 2: (0.4, 0.9)})
    run = train(digits_config(tmp_path / "r", epochs=2), host=host)
    (tmp_path / "r" / "checkpoints" / "best.pt").unlink()
    with pytest.raises(UserError, match=r"best.pt does not exist"):
        pipeline.evaluate_run(run)
