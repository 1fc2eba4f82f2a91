"""Hostile-input catalogue, evaluation: names that become paths, and evaluation files as untrusted input.

Model ids (``--name``, the id inside shard files) name output files, so ``../`` in one writes outside the
output directory; shard files travel between machines and AutoAttack state files are re-read on resume, so
each is read as a regular file of bounded size and checked field by field before anything is written. Every
case keeps the promise of ``hostile_harness.py``: one line, exit 2, no traceback, nothing created or changed.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hostile_harness import Case, Sandbox, _tree, assert_keeps_the_promise, check_catalogue, evaluate, run_fresh

from robustbench_kd.cli import main
from robustbench_kd.evaluation.shards import SHARD_FORMAT, read_shard, shard_bounds
from robustbench_kd.zoo.autoattack_resume import STATE_FORMAT, read_autoattack_state

MODEL = "Hostile2026Shards"
SHARDS = f"out/shards/{MODEL}"
N = 10


# ------------------------------------------------------------------------------------------ shard files


def shard_record(index: int, count: int, *, n: int = N, model_id: str = MODEL, autoattack: bool = False) -> dict:
    """A shard file as ``evaluate --shard`` writes it: every fourth point wrong on clean inputs, and with
    ``autoattack`` every even point (and every wrong one) not robust."""
    start, stop = shard_bounds(n, index, count)
    clean = [0 if (start + i) % 4 == 0 else 1 for i in range(stop - start)]
    per_example = {"clean": clean}
    if autoattack:
        per_example["autoattack"] = [c if (start + i) % 2 else 0 for i, c in enumerate(clean)]
    return {
        "format": SHARD_FORMAT,
        "format_version": 1,
        "shard": {"index": index, "count": count, "start": start, "stop": stop},
        "settings": {
            "model_id": model_id,
            "model": "file:model.pt",
            "model_sha256": "a" * 64,
            "dataset": "digits",
            "n_examples": n,
            "data_sha256": "b" * 64,
            "norm": "Linf",
            "eps": 0.2,
            "attacks": ["clean", "autoattack"] if autoattack else ["clean"],
            "result_keys": list(per_example),
            "pgd_steps": 20,
            "pgd_alpha": 0.05,
            "seed": 0,
            "batch_size": 256,
            "autoattack_version": "pyautoattack 0.2.0" if autoattack else None,
            "model_info": None,
            "architecture": None,
            "zoo_entry": None,
            "sanity": False,
            "robustbench_kd_version": "0.1.0",
        },
        "run": {"device": "cpu", "host": "a", "autoattack_state": None, "autoattack_log": None, "seconds": 1.0},
        "accuracy": {key: sum(flags) / len(flags) for key, flags in per_example.items()},
        "autoattack_flags": [],
        "sanity": None,
        "per_example": per_example,
    }


Edit = Callable[[list[dict], Sandbox], Any]


def merge(
    edit: Edit | None = None,
    *,
    count: int = 2,
    directory: str = SHARDS,
    after: Callable[[Sandbox], Any] | None = None,
    extra: tuple[str, ...] = (),
    **record: Any,
) -> Callable[[Sandbox], list[str]]:
    """``merge-shards`` on ``count`` shard files, after ``edit(records, box)`` changed them (and ``after(box)``)."""

    def build(box: Sandbox) -> list[str]:
        records = [shard_record(i, count, **record) for i in range(count)]
        if edit is not None:
            edit(records, box)
        for i, raw in enumerate(records):
            (box.root / directory).mkdir(parents=True, exist_ok=True)
            (box.root / directory / f"shard_{i}_of_{count}.json").write_text(json.dumps(raw))
        if after is not None:
            after(box)
        return ["merge-shards", directory, *extra]

    return build


def fifo(name: str) -> Callable[[Sandbox], None]:
    def make(box: Sandbox) -> None:
        path = box.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        os.mkfifo(path)

    return make


def dev_zero(name: str) -> Callable[[Sandbox], None]:
    """``name`` as a symlink to /dev/zero: a file that never ends."""

    def make(box: Sandbox) -> None:
        path = box.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.symlink_to("/dev/zero")

    return make


def _set(path: str, value: Any, shard: int = 1) -> Edit:
    """Set ``records[shard][a][b]...`` (``path`` = ``"a.b"``) to ``value``."""

    def edit(records: list[dict], box: Sandbox) -> None:
        *parents, last = path.split(".")
        target = records[shard]
        for key in parents:
            target = target[key]
        target[last] = value

    return edit


def _robust_but_wrong_on_clean(records: list[dict], box: Sandbox) -> None:
    flags = records[0]["per_example"]["autoattack"]
    flags[0] = 1  # example 0 is wrong on clean inputs (every fourth one is)
    records[0]["accuracy"]["autoattack"] = sum(flags) / len(flags)


def _short_flags(records: list[dict], box: Sandbox) -> None:
    records[1]["per_example"]["clean"] = records[1]["per_example"]["clean"][:-1]


def _overlap(records: list[dict], box: Sandbox) -> None:
    records[1]["shard"]["start"] = 4  # shard 1/2 of 10 is 5-9; 4 is shard 0's
    records[1]["per_example"]["clean"].insert(0, 1)
    flags = records[1]["per_example"]["clean"]
    records[1]["accuracy"]["clean"] = sum(flags) / len(flags)


def _duplicate(box: Sandbox) -> None:
    (box.root / SHARDS / "shard_01_of_2.json").write_bytes((box.root / SHARDS / "shard_1_of_2.json").read_bytes())


def _log_to_dev_zero(records: list[dict], box: Sandbox) -> None:
    for i, raw in enumerate(records):
        raw["run"]["autoattack_log"] = f"shard_{i}_of_2.autoattack.log"
        box.write(f"{SHARDS}/shard_{i}_of_2.autoattack.log", "robust accuracy: 50.00%\n")
    dev_zero(f"{SHARDS}/shard_1_of_2.autoattack.log")(box)


def _zoo_entry(**change: Any) -> dict:
    entry: dict[str, Any] = {
        "expression": "SmallCNN(num_classes=10)",
        "imports": ["from robustbench.model_zoo.architectures.rbkd_small_cnn_0a1b2c3d import SmallCNN"],
        "architecture": "SmallCNN",
        "in_robustbench": False,
        "placeholder": False,
        "note": None,
        "architecture_source": {"slug": "small_cnn", "text": "class SmallCNN:\n    pass\n", "names": ["SmallCNN"]},
        "preprocessing": None,
        "not_standalone": None,
    }
    entry.update(change)
    return entry


def _on_every_shard(path: str, value: Any) -> Edit:
    def edit(records: list[dict], box: Sandbox) -> None:
        for shard in range(len(records)):
            _set(path, value, shard)(records, box)

    return edit


# ----------------------------------------------------------------------------------- AutoAttack state files


def state_record(**change: Any) -> dict:
    """A state file of a run stopped inside its second attack, as ``run_resumable`` writes it."""
    raw = {
        "format": STATE_FORMAT,
        "format_version": 1,
        "settings": {"attacks": ["apgd-ce", "apgd-t"], "n_examples": 5},
        "attacks": ["apgd-ce", "apgd-t"],
        "completed": ["apgd-ce"],
        "current": "apgd-t",
        "pending": [2, 3],
        "finished": False,
        "accuracy": {"clean": 0.8, "apgd-ce": 0.6},
        "robust_accuracy": 0.6,
        "warnings": [],
        "batch_size": 4,
        "backend": "pyautoattack 0.2.0",
        "robust_flags": [1, 0, 1, 1, 0],
        "adv_labels": [3, 1, 2, 0, 4],
    }
    raw.update(change)
    return raw


def with_state(text: str | dict) -> Callable[[Sandbox], list[str]]:
    """``evaluate --aa-state state.json`` with that file."""

    def build(box: Sandbox) -> list[str]:
        box.write("state.json", text if isinstance(text, str) else json.dumps(text))
        return evaluate("--aa-state", "state.json")(box)

    return build


def with_prepared(prepare: Callable[[Sandbox], Any], then: Callable[[Sandbox], list[str]]):
    def build(box: Sandbox) -> list[str]:
        prepare(box)
        return then(box)

    return build


def _oversized_state(box: Sandbox) -> None:
    with open(box.root / "state.json", "wb") as handle:  # sparse: costs no disk
        handle.truncate(65 << 20)


CASES = [
    # -- names that become paths ------------------------------------------------------------------------
    Case("eval-name-parent-dirs", evaluate("--name", "../../escape"), "--name must be 1-200 characters"),
    Case("eval-name-absolute-path", evaluate("--name", "/tmp/escape"), "got '/tmp/escape'"),
    Case(
        "eval-name-with-shard-and-slash",
        evaluate("--name", "a/b", "--shard", "0/2"),
        "--name must be 1-200 characters from letters, digits",
    ),
    Case("eval-out-control-character", evaluate("--out", "eval\x1b[2J"), "contains the control character U+001B"),
    Case(
        "eval-out-is-a-file",
        with_prepared(lambda box: box.write("taken", "x"), evaluate("--out", "taken")),
        "--out taken is a file, not a directory",
    ),
    Case("eval-out-empty", evaluate("--out", ""), "--out is empty"),
    Case(
        "eval-shard-model-id-escapes",
        merge(model_id="../../../escape"),
        f"the model id in shard file {SHARDS}/shard_0_of_2.json must be 1-200 characters",
    ),
    Case("eval-merge-out-empty", merge(extra=("--out", "")), "--out is empty"),
    # -- bounded reads ------------------------------------------------------------------------------------
    Case(
        "eval-aa-state-fifo",
        with_prepared(fifo("state.json"), evaluate("--aa-state", "state.json")),
        "AutoAttack state file state.json is a FIFO (named pipe), not a regular file",
        fresh=True,
        timeout=120,
    ),
    Case(
        "eval-aa-state-dev-zero",
        with_prepared(dev_zero("zero.json"), evaluate("--aa-state", "zero.json")),
        "AutoAttack state file zero.json is a device, not a regular file",
        fresh=True,
        timeout=120,
        max_rss_mib=1500,
    ),
    Case(
        "eval-aa-state-directory",
        with_prepared(lambda box: (box.root / "statedir").mkdir(), evaluate("--aa-state", "statedir")),
        "AutoAttack state file statedir is a directory",
    ),
    Case(
        "eval-aa-state-oversized",
        with_prepared(_oversized_state, evaluate("--aa-state", "state.json")),
        "AutoAttack state file state.json is larger than 64 MiB",
    ),
    Case(
        "eval-shard-file-fifo",
        merge(after=fifo(f"{SHARDS}/shard_1_of_2.json")),
        f"shard file {SHARDS}/shard_1_of_2.json is a FIFO (named pipe)",
        fresh=True,
        timeout=120,
    ),
    Case(
        "eval-shard-log-dev-zero",
        merge(_log_to_dev_zero, autoattack=True),
        f"AutoAttack log {SHARDS}/shard_1_of_2.autoattack.log is a device",
        fresh=True,
        timeout=120,
        max_rss_mib=1500,
    ),
    # -- forged or damaged shard files --------------------------------------------------------------------
    Case(
        "eval-shard-robust-but-wrong-on-clean",
        merge(_robust_but_wrong_on_clean, autoattack=True),
        "marks example 0 robust under autoattack but wrong on clean inputs",
    ),
    Case(
        "eval-shard-flags-wrong-length",
        merge(_short_flags),
        "has 4 flags for 'clean' where its range needs 5",
    ),
    Case("eval-shard-ranges-overlap", merge(_overlap), "covers examples 4-9 but shard 1/2 of 10 examples is 5-9"),
    Case(
        "eval-shard-accuracy-nan",
        merge(_set("accuracy.clean", float("nan"))),
        "holds NaN, which is not a number JSON allows",
    ),
    Case(
        "eval-shard-accuracy-percent",
        merge(_set("accuracy.clean", 60.0)),
        "has accuracy['clean'] = 60.0, expected a number in [0, 1]",
    ),
    Case(
        "eval-shard-accuracy-not-its-flags",
        merge(_set("accuracy.clean", 1.0)),
        "says clean accuracy 1 but its flags give 0.8",
    ),
    Case("eval-shard-negative-index", merge(_set("shard.index", -1)), "claims shard -1/2 of 10 examples"),
    Case("eval-shard-settings-differ", merge(_set("settings.seed", 1)), "different settings: seed is 0"),
    Case(
        "eval-shard-model-ids-differ",
        merge(_set("settings.model_id", "Other2026Model")),
        "different model ids 'Hostile2026Shards' in shard_0_of_2.json but 'Other2026Model' in shard_1_of_2.json",
    ),
    Case(
        "eval-shard-duplicate-name",
        merge(after=_duplicate),
        "shard_01_of_2.json and shard_1_of_2.json in out/shards/Hostile2026Shards are both shard 1/2",
    ),
    Case("eval-shard-bool-as-string", merge(_set("settings.sanity", "false")), "settings.sanity = 'false'"),
    Case(
        "eval-shard-flags-as-strings",
        merge(_set("per_example.clean", ["1", "1", "0", "1", "1"])),
        "has the flag '1' for 'clean'; flags are the integers 0 and 1",
    ),
    Case(
        "eval-shard-count-in-the-trillions",
        merge(count=1, directory="out/shards/Big", after=lambda box: _rename_to_huge_count(box)),
        "999999999999 of 1000000000000 shards missing",
        fresh=True,
        timeout=120,
    ),
    Case(
        "eval-shard-log-name-escapes",
        merge(_set("run.autoattack_log", "../../../../etc/passwd")),
        "names the AutoAttack log '../../../../etc/passwd'; a shard's log is shard_1_of_2.autoattack.log",
    ),
    Case(
        "eval-shard-zoo-entry-file-escapes",
        merge(
            _on_every_shard(
                "settings.zoo_entry", _zoo_entry(architecture_source={"slug": "../../x", "text": "", "names": []})
            )
        ),
        "architecture_source.slug = '../../x'",
    ),
    Case(
        "eval-shard-zoo-entry-injects-lines",
        merge(_on_every_shard("settings.zoo_entry", _zoo_entry(note="ok\nimport os; os.system('id')"))),
        "settings.zoo_entry.note",
    ),
    Case(
        "eval-shard-model-info-wrong-type",
        merge(_on_every_shard("settings.model_info", {"number_forward_passes": "2"})),
        "model_info.number_forward_passes must be a positive integer",
    ),
    # -- forged or damaged AutoAttack state files ---------------------------------------------------------
    Case(
        "eval-aa-state-pending-out-of-range",
        with_state(state_record(pending=[2, 99])),
        "has pending that is not a list of integers in 0..4",
    ),
    Case(
        "eval-aa-state-accuracy-nan",
        with_state(json.dumps(state_record(accuracy={"clean": float("nan")}))),
        "has accuracy['clean'] = nan, expected an accuracy in [0, 1]",
    ),
    Case(
        "eval-aa-state-flags-wrong-length",
        with_state(state_record(robust_flags=[1, 0, 1])),
        "has 3 robust flags for its 5 examples",
    ),
    Case(
        "eval-aa-state-bool-as-string",
        with_state(state_record(finished="yes")),
        "has finished = 'yes', expected true or false",
    ),
    Case(
        "eval-aa-state-legacy-attacks-not-a-set",
        with_state({"_attacks_to_run": "__import__('os')", "_robust_flags": None}),
        "which is not a set of attack names",
    ),
]


def _rename_to_huge_count(box: Sandbox) -> None:
    directory = box.root / "out" / "shards" / "Big"
    (directory / "shard_0_of_1.json").rename(directory / "shard_0_of_1000000000000.json")


def test_catalogue_ids_unique() -> None:
    assert len(CASES) >= 10 and all(case.id.startswith("eval-") for case in CASES)
    check_catalogue(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_evaluation_input_is_one_line_exit_2_and_leaves_no_output(case, tmp_path, monkeypatch, capsys):
    assert_keeps_the_promise(case, tmp_path, monkeypatch, capsys)


def test_the_unedited_files_are_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The baselines the cases damage are valid, so each case fails for the reason it names."""
    monkeypatch.chdir(tmp_path)
    box = Sandbox(tmp_path)
    assert main(merge()(box)) == 0, capsys.readouterr().err
    merged = json.loads((tmp_path / "out" / "results" / f"{MODEL}.json").read_text())
    assert merged["accuracy"] == {"clean": 0.7} and merged["shards"] == 2
    path = tmp_path / "aa.json"
    path.write_text(json.dumps(shard_record(0, 2, autoattack=True)))
    assert read_shard(path).accuracy == {"clean": 0.6, "autoattack": 0.4}
    record = shard_record(0, 1)
    record["settings"]["zoo_entry"] = _zoo_entry()
    path.write_text(json.dumps(record))
    assert read_shard(path).settings["zoo_entry"]["expression"] == "SmallCNN(num_classes=10)"
    path.write_text(json.dumps(state_record()))
    state = read_autoattack_state(path)
    assert state.current == "apgd-t" and state.pending.tolist() == [2, 3]


# ------------------------------------------------------------------------ the severe findings, with controls


def test_model_id_from_shard_files_cannot_write_outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """Shard files whose model id is ``../../../escape``: the merge used to write escape.json above results/."""
    from robustbench_kd.evaluation import points, shards

    nest = tmp_path / "a" / "b" / "c"
    nest.mkdir(parents=True)
    monkeypatch.chdir(nest)
    argv = merge(model_id="../../../escape")(Sandbox(nest))
    escaped = nest.parent / "escape.json"  # out/results/../../../escape.json: three levels above results/

    # Control: with the id checks taken out (the shard reader's, and the per-point file's name), the same files
    # make the merge write outside out/.
    with monkeypatch.context() as patch:
        patch.setattr(shards, "validate_model_id", lambda value, **_: value)
        patch.setattr(points, "validate_model_id", lambda value, **_: value)
        assert main(argv) == 0
    capsys.readouterr()
    assert escaped.is_file() and not escaped.resolve().is_relative_to((nest / "out").resolve())
    escaped.unlink()
    (nest.parent / "escape.points.safetensors").unlink()
    (nest / "out" / "results").rmdir()  # made on the way

    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "the model id in shard file" in err[0] and "'../../../escape'" in err[0]
    assert _tree(tmp_path) == before  # nothing created, in out/ or in any directory above it
    assert not any(p.name.startswith("escape") for p in tmp_path.rglob("*"))


def test_evaluate_name_with_parent_dirs_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """``evaluate --name ../../escape`` used to write results/ and escape.json before the name was refused."""
    from robustbench_kd.evaluation import final_report, points
    from robustbench_kd.jobs import pipeline

    nest = tmp_path / "x" / "y" / "z"
    nest.mkdir(parents=True)
    monkeypatch.chdir(nest)
    argv = evaluate("--name", "../../escape")(Sandbox(nest))

    # Control: without the checks before evaluating, the evaluation runs and writes results before a later
    # check (the zoo checkpoint's path) refuses the name.
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "validate_model_id", lambda value, **_: value)
        patch.setattr(final_report, "validate_model_id", lambda value, **_: value)
        patch.setattr(points, "validate_model_id", lambda value, **_: value)
        assert main(argv) == 2
    capsys.readouterr()
    escaped = nest / "escape.json"  # eval/results/../../escape.json
    assert escaped.is_file() and (nest / "eval" / "results").is_dir()
    escaped.unlink()
    (nest / "escape.points.safetensors").unlink()
    (nest / "eval" / "results").rmdir()
    (nest / "eval").rmdir()

    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("robustbench-kd: error: --name must be")
    assert _tree(tmp_path) == before
    assert not any(p.name.startswith("escape") for p in tmp_path.rglob("*"))


def test_aa_state_fifo_and_dev_zero_return_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FIFO as state file used to block forever and /dev/zero to be read until memory ran out."""
    monkeypatch.chdir(tmp_path)
    box = Sandbox(tmp_path)
    fifo("state.json")(box)

    # Control: a plain read of the FIFO blocks (no writer) until a writer opens and closes it.
    done: list[str] = []
    reader = threading.Thread(target=lambda: done.append((tmp_path / "state.json").read_text()), daemon=True)
    reader.start()
    reader.join(timeout=0.5)
    assert reader.is_alive() and not done
    with open(tmp_path / "state.json", "w"):
        pass  # the writer end: the reader sees end-of-file
    reader.join(timeout=10)
    assert done == [""]
    # ... and /dev/zero never ends: 64 MiB read and still no end of file.
    with open("/dev/zero", "rb") as handle:
        assert sum(len(handle.read(1 << 20)) for _ in range(64)) == 64 << 20

    for name, kind in (("state.json", "FIFO"), ("zero.json", "device")):
        if name == "zero.json":
            dev_zero(name)(box)
        argv = evaluate("--aa-state", name)(box)
        code, _, err, rss_mib = run_fresh(argv, box, timeout=120, memory_cap=True)
        assert code == 2 and len(err.splitlines()) == 1 and f"{name} is a {kind}" in err, err
        assert 0 < rss_mib <= 1500


# ------------------------------------------------------------------ check-submission reads a hostile bundle


def _bundle(root: Path) -> Path:
    from robustbench_kd.evaluation.export import save_zoo_checkpoint
    from robustbench_kd.evaluation.model_info import build_model_info, write_model_info
    from robustbench_kd.students import build_student
    from robustbench_kd.submission.bundle import write_submission_bundle

    info = build_model_info(dataset="cifar10", threat_model="Linf", eps=8 / 255, clean_acc=0.9, autoattack_acc=0.5)
    info_path = write_model_info(root, info, dataset="cifar10", threat_model="Linf", model_id=MODEL)
    net = build_student("small-cnn", num_classes=10, in_channels=3, image_size=32, width=0.25)
    checkpoint = save_zoo_checkpoint(net, root, dataset="cifar10", threat_model="Linf", model_id=MODEL)
    log = root / "aa.log"
    log.write_text("using standard version including apgd-ce\nrobust accuracy: 50.00%\n")
    bundle = write_submission_bundle(
        root,
        model_id=MODEL,
        threat_model="Linf",
        info_path=info_path,
        checkpoint_path=checkpoint,
        results={"n_examples": 10000, "seed": 0, "eps_str": "8/255", "accuracy": {"clean": 0.9, "autoattack": 0.5}},
        constructor=None,
        autoattack_log=log,
    )
    return bundle.directory


def _manifest(change: dict) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "bundle.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))

    return edit


def _replace(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        (directory / name).unlink()
        make(directory / name)

    return edit


def _entry_robust_above_clean(directory: Path) -> None:
    path = directory / f"{MODEL}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "autoattack_acc": "95.00"}))


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_manifest({"model_id": "../../../escape"}), "the model_id in bundle.json must be 1-200 characters"),
        (_manifest({"architecture_files": ["../../../../etc/passwd"]}), "not plain module file names"),
        (_replace("autoattack.log", os.mkfifo), "autoattack.log is a FIFO (named pipe)"),
        (_replace("autoattack.log", lambda p: p.symlink_to("/dev/zero")), "autoattack.log is a device"),
        (_replace("bundle.json", os.mkfifo), "bundle.json is a FIFO (named pipe)"),
        (_replace("zoo_entry.py", lambda p: p.symlink_to("/dev/zero")), "zoo_entry.py is a device"),
        (_entry_robust_above_clean, "autoattack_acc 95.00% is above clean_acc 90.00%"),
    ],
    ids=[
        "model-id-escapes",
        "architecture-file-escapes",
        "log-fifo",
        "log-dev-zero",
        "manifest-fifo",
        "entry-dev-zero",
        "robust-above-clean",
    ],
)
def test_check_submission_reports_a_hostile_bundle_without_hanging(tmp_path: Path, edit, problem) -> None:
    """check-submission lists what is wrong with a bundle: a hostile file is one PROBLEM line, never a hang."""
    directory = _bundle(tmp_path)
    edit(directory)
    box = Sandbox(tmp_path)
    code, out, err, rss_mib = run_fresh(
        ["check-submission", str(directory), "--no-load"], box, timeout=120, memory_cap=True
    )
    assert code == 1 and "Traceback" not in out + err, (out, err)
    assert any(line.startswith("PROBLEM") and problem in line for line in out.splitlines()), out
    assert 0 < rss_mib <= 1500
