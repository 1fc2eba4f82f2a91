"""Hostile-input catalogue: run directories, resumes and teacher pins.

One writer per run directory (a lock ``distill`` holds from start to finish, released by the kernel when
its holder dies), a resume that would change what ``last.pt`` was trained with, checkpoints of another
format, run-directory parts that are not what a run writes, and teacher specs whose pin or options are
empty, doubled or unknown. Every case is one line, exit 2, nothing written; the control tests first show
each attack working with its guard removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import filelock
import pytest
import torch
from hostile_harness import (
    Case,
    Sandbox,
    _tree,
    assert_keeps_the_promise,
    check_catalogue,
    distill,
    evaluate,
    teacher,
    with_files,
)

from robustbench_kd import teachers
from robustbench_kd.cli import main
from robustbench_kd.config import load_config
from robustbench_kd.errors import UserError
from robustbench_kd.storage import checkpoint as checkpoint_module
from robustbench_kd.storage.checkpoint import FORMAT, load_checkpoint
from robustbench_kd.storage.hashing import sha256_of
from robustbench_kd.storage.run_lock import LOCK_NAME, RunDirLock
from robustbench_kd.teachers import TeacherSpec
from robustbench_kd.training import checkpoints, loop

#: Locks the cases hold as "the other process"; released after each test.
_HELD: list[filelock.BaseFileLock] = []


@pytest.fixture(autouse=True)
def _release_held_locks() -> Iterator[None]:
    yield
    while _HELD:
        _HELD.pop().release()


# -- builders ----------------------------------------------------------------------------------------
def _teacher_file(query: str | Callable[[Sandbox], str]) -> Callable[[Sandbox], str]:
    """A real small-cnn teacher file and a spec reading it with ``query`` after the ``?``."""

    def spec(box: Sandbox) -> str:
        name = box.checkpoint("teacher.pt")
        return f"file:{name}?{query(box) if callable(query) else query}"

    return spec


def _digest_of_teacher(box: Sandbox) -> str:
    return sha256_of(box.root / box.checkpoint("teacher.pt"))


def _hold_lock(box: Sandbox) -> None:
    """Another process is using run/: its lock is held (here by this process, through another open file)."""
    (box.root / "run").mkdir(exist_ok=True)
    lock = filelock.FileLock(str(box.root / "run" / LOCK_NAME), thread_local=False)
    lock.acquire(timeout=0)
    _HELD.append(lock)


def _trained_with(
    sections: dict[str, dict[str, Any]] | None = None,
    changed: dict[str, dict[str, Any]] | None = None,
    **entries: Any,
) -> Callable[[Sandbox], None]:
    """A last.pt trained with the sandbox's config (``sections``) changed by ``changed``."""

    def prepare(box: Sandbox) -> None:
        config = load_config(box.root / box.config(sections, name="trained.toml")).to_dict()
        for section, values in (changed or {}).items():
            config[section] = {**config[section], **values}
        box.checkpoint("run/checkpoints/last.pt", epoch=1, config=config, **entries)

    return prepare


def _raw_checkpoint(payload: dict[str, Any]) -> Callable[[Sandbox], None]:
    """A last.pt saved with plain torch.save (no format entry added)."""

    def prepare(box: Sandbox) -> None:
        (box.root / "run" / "checkpoints").mkdir(parents=True)
        torch.save(payload, box.root / "run" / "checkpoints" / "last.pt")

    return prepare


def _with_format(fmt: str) -> Callable[[Sandbox], None]:
    def prepare(box: Sandbox) -> None:
        _trained_with()(box)
        path = box.root / "run" / "checkpoints" / "last.pt"
        data = load_checkpoint(path)
        data["format"] = fmt
        torch.save(data, path)

    return prepare


def _mkdir(relative: str) -> Callable[[Sandbox], None]:
    return lambda box: (box.root / relative).mkdir(parents=True)


def _mkfifo(relative: str) -> Callable[[Sandbox], None]:
    def prepare(box: Sandbox) -> None:
        (box.root / relative).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(box.root / relative)

    return prepare


KD = {"method": {"name": "kd"}}
SWAPPED = {"robust": {"members": ["file:sha256=" + "0" * 64], "weights": None, "combine": "probs"}}

CASES = [
    # -- teacher pins and options ---------------------------------------------------------------------
    Case(
        "rundir-pin-empty-sha256",
        teacher(_teacher_file("sha256="), method="kd"),
        "option 'sha256' has an empty value (an unset shell variable?)",
    ),
    Case(
        "rundir-pin-stray-comma",
        teacher(_teacher_file(lambda box: f"sha256={_digest_of_teacher(box)},"), method="kd"),
        "holds an empty digest",
    ),
    Case(
        "rundir-pin-given-twice",
        teacher(_teacher_file(lambda box: f"sha256={'0' * 64}&sha256={_digest_of_teacher(box)}"), method="kd"),
        "gives option 'sha256' twice",
    ),
    Case("rundir-pin-without-value", teacher(_teacher_file("sha256"), method="kd"), "is not key=value"),
    Case("rundir-spec-empty-arch", teacher(_teacher_file("arch="), method="kd"), "option 'arch' has an empty value"),
    Case("rundir-spec-dangling-question-mark", teacher(_teacher_file(""), method="kd"), "ends in '?' with no options"),
    Case(
        "rundir-spec-trailing-ampersand",
        teacher(_teacher_file("arch=small-cnn&"), method="kd"),
        "has an empty option (a doubled or trailing '&')",
    ),
    Case(
        "rundir-zoo-spec-unknown-option",
        teacher(lambda box: "robustbench:cifar10/Linf/Standard?sha265=" + "0" * 64, method="kd"),
        "unknown option 'sha265' (did you mean: sha256?) for the robustbench: source",
    ),
    Case(
        "rundir-evaluate-empty-pin",
        with_files(lambda box: box.checkpoint("model.pt"), evaluate(model="file:model.pt?sha256=")),
        "option 'sha256' has an empty value",
    ),
    # -- one writer per run directory -----------------------------------------------------------------
    Case("rundir-lock-held", with_files(_hold_lock, distill()), "run directory run is in use by another process"),
    Case(
        "rundir-lock-held-during-resume",
        with_files(lambda box: (_trained_with()(box), _hold_lock(box)), distill(None, "--resume")),
        "run directory run is in use by another process",
    ),
    Case(
        "rundir-lock-file-is-a-directory",
        with_files(_mkdir(f"run/{LOCK_NAME}"), distill()),
        f"run/{LOCK_NAME} is not a regular file",
    ),
    # -- run-directory parts that are not what a run writes --------------------------------------------
    Case(
        "rundir-last-pt-is-a-directory",
        with_files(_mkdir("run/checkpoints/last.pt"), distill()),
        "run/checkpoints/last.pt is a directory, not a regular file",
    ),
    Case(
        "rundir-last-pt-is-a-fifo",
        with_files(_mkfifo("run/checkpoints/last.pt"), distill(None, "--resume")),
        "run/checkpoints/last.pt is a FIFO, not a regular file",
        fresh=True,
        timeout=120,
    ),
    Case(
        "rundir-out-dir-is-a-file",
        with_files(lambda box: box.write("run", "not a directory\n"), distill()),
        "run is a file, not a directory",
    ),
    Case(
        "rundir-metrics-is-a-directory",
        with_files(_mkdir("run/metrics.jsonl"), distill()),
        "run/metrics.jsonl is a directory, not a regular file",
    ),
    # -- checkpoint format ----------------------------------------------------------------------------
    Case(
        "rundir-resume-newer-format",
        with_files(_with_format("robustbench_kd.storage.checkpoint/2"), distill(None, "--resume")),
        "newer than this robustbench_kd reads",
    ),
    Case(
        "rundir-resume-foreign-format",
        with_files(_with_format("someothertool/1"), distill(None, "--resume")),
        "not a robustbench_kd training checkpoint",
    ),
    Case(
        "rundir-resume-no-format",
        with_files(_raw_checkpoint({"state_dict": {"w": torch.zeros(2)}}), distill(None, "--resume")),
        "has no 'format' entry",
    ),
    Case(
        "rundir-resume-teacher-checkpoint-as-last-pt",
        with_files(lambda box: box.checkpoint("run/checkpoints/last.pt"), distill(None, "--resume")),
        "its 'config' entry is missing",
    ),
    Case(
        "rundir-resume-checkpoint-without-optimiser",
        with_files(_trained_with(None, None, global_step=3, distiller={}), distill(None, "--resume")),
        "its 'optimizer' entry is missing",
    ),
    # -- a resume that changes what the checkpoint was trained with -----------------------------------------
    Case(
        "rundir-resume-changed-eps",
        with_files(_trained_with(None, {"threat": {"eps": 0.3}}), distill(None, "--resume")),
        "its [threat] section differs: threat.eps = 0.3 in the checkpoint, 0.2 in the config",
    ),
    Case(
        "rundir-resume-changed-norm",
        with_files(_trained_with(None, {"threat": {"norm": "L2", "eps": 0.5}}), distill(None, "--resume")),
        "threat.norm = 'L2' in the checkpoint, 'Linf' in the config",
    ),
    Case(
        "rundir-resume-changed-dataset",
        with_files(_trained_with(None, {"data": {"dataset": "cifar10"}}), distill(None, "--resume")),
        "data.dataset = 'cifar10' in the checkpoint, 'digits' in the config",
    ),
    Case(
        "rundir-resume-changed-student-options",
        with_files(_trained_with(None, {"student": {"options": {"width": 2.0}}}), distill(None, "--resume")),
        "student.options = {'width': 2.0} in the checkpoint, {} in the config",
    ),
    Case(
        "rundir-resume-changed-method-option",
        with_files(
            _trained_with({"method": {"name": "trades"}}, {"method": {"beta": 3.0}}),
            distill({"method": {"name": "trades"}}, "--resume"),
        ),
        "its [method] section differs: method.beta = 3.0 in the checkpoint, 6.0 in the config",
    ),
    Case(
        "rundir-resume-changed-seed-and-lr-listed-together",
        with_files(_trained_with(None, {"run": {"seed": 7}}), distill({"optim": {"lr": 0.1}}, "--resume")),
        "run.seed = 7 in the checkpoint, 0 in the config; its [optim] section differs: optim.lr = 0.05",
    ),
    Case(
        "rundir-resume-swapped-teacher-file",
        with_files(
            _trained_with({**KD, "teachers": {"robust": "file:teacher.pt"}}, None, teacher_identity=SWAPPED),
            lambda box: ["distill", box.config({**KD, "teachers": {"robust": f"file:{box.checkpoint()}"}}), "--resume"],
        ),
        "its [teachers] section differs: teachers.robust",
    ),
    Case(
        "rundir-resume-changed-lr-cannot-be-allowed",
        with_files(
            _trained_with(None, {"optim": {"lr": 0.5}}), distill(None, "--resume", "--resume-changed", "optim.lr")
        ),
        "optim.lr = 0.5 in the checkpoint, 0.05 in the config (cannot change on resume",
    ),
    Case(
        "rundir-resume-changed-without-resume",
        distill(None, "--resume-changed", "threat.eps"),
        "--resume-changed applies to --resume only",
    ),
    Case(
        "rundir-resume-changed-unknown-key",
        with_files(_trained_with(), distill(None, "--resume", "--resume-changed", "threat.epsilon")),
        "--resume-changed: unknown key 'threat.epsilon' (did you mean: threat.eps",
    ),
]


def test_catalogue_ids_unique():
    check_catalogue(CASES)
    assert len(CASES) >= 9 and all(c.id.startswith("rundir-") for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_run_dir_is_one_line_exit_2_and_leaves_no_output(case, tmp_path, monkeypatch, capsys):
    assert_keeps_the_promise(case, tmp_path, monkeypatch, capsys)


# -- control: a pin that silently switches off ----------------------------------------------------------
def test_empty_pin_used_to_train_unchecked_and_is_now_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    box = Sandbox(tmp_path)
    argv = teacher(_teacher_file("sha256="), method="kd")(box)
    # The old reading of the query: parse_qsl drops an empty value, so the spec had no pin at all ...
    assert dict(parse_qsl("sha256=")) == {}
    # ... and with that reading restored, distill trains on a teacher file no digest was checked against.
    with monkeypatch.context() as patched:
        patched.setattr(teachers, "parse_spec_query", lambda query, *, text: dict(parse_qsl(query)))
        assert TeacherSpec.parse("file:teacher.pt?sha256=").sha256 == ()
        assert main(argv) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
    shutil.rmtree(tmp_path / "run")
    capsys.readouterr()
    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "option 'sha256' has an empty value" in err[0]
    assert _tree(tmp_path) == before


def test_every_query_option_is_checked_whatever_its_name():
    for query, phrase in [
        ("arch=&width=2", "'arch' has an empty value"),
        ("width=", "'width' has an empty value"),
        ("arch=a&arch=b", "gives option 'arch' twice"),
        ("sha256=%20", "'sha256' has an empty value"),  # a percent-escaped blank is blank too
        ("&arch=a", "has an empty option"),
    ]:
        with pytest.raises(UserError, match=phrase):
            TeacherSpec.parse(f"file:t.pt?{query}")
    spec = TeacherSpec.parse("file:t.pt?arch=small-cnn&width=2&sha256=" + "A" * 64)
    assert spec.options == {"arch": "small-cnn", "width": "2"} and spec.sha256 == ("a" * 64,)
    with pytest.raises(UserError, match="holds an empty digest"):
        checkpoint_module.parse_sha256("", where="x")


# -- control: two processes on one run directory ---------------------------------------------------------
_HOLDER = textwrap.dedent(
    """
    import sys, time, filelock
    lock = filelock.FileLock(sys.argv[1], thread_local=False)
    lock.acquire(timeout=0)
    print("held", flush=True)
    time.sleep(600)
    """
)


def _start_holder(lock_path: Path) -> subprocess.Popen[str]:
    """A second process that holds ``lock_path`` until it is killed (the "first distill")."""
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock_path)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def _stop(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
    child.wait(timeout=60)


def test_second_distill_used_to_write_over_the_first_and_is_now_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    box = Sandbox(tmp_path)
    argv = distill({"run": {"seed": 5}})(box)
    (tmp_path / "run").mkdir()
    first = _start_holder(tmp_path / "run" / LOCK_NAME)
    try:
        # Control: with the lock check removed, the second process trains and writes while the first runs.
        with monkeypatch.context() as patched:
            patched.setattr(RunDirLock, "_acquire", lambda self: None)
            assert main(argv) == 0
        assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
        assert "seed: 5" in (tmp_path / "run" / "config.yaml").read_text()
        shutil.rmtree(tmp_path / "run" / "checkpoints")
        (tmp_path / "run" / "config.yaml").unlink()
        (tmp_path / "run" / "metrics.jsonl").unlink()
        capsys.readouterr()
        before = _tree(tmp_path)
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "run directory run is in use by another process" in err[0], err
        assert _tree(tmp_path) == before
    finally:
        _stop(first)


def test_a_killed_holder_leaves_no_lock_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = distill()(Sandbox(tmp_path))
    (tmp_path / "run").mkdir()
    holder = _start_holder(tmp_path / "run" / LOCK_NAME)
    holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the flock with the process
    holder.wait(timeout=60)
    assert (tmp_path / "run" / LOCK_NAME).exists()
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_the_lock_is_held_for_the_whole_distill_and_released_after(tmp_path, monkeypatch):
    """Held while training and during the final evaluation, free once distill returns (and on a failure)."""
    from robustbench_kd.jobs import pipeline

    monkeypatch.chdir(tmp_path)
    config = load_config(Sandbox(tmp_path).config())
    probes: list[bool] = []

    def probe_lock() -> bool:
        other = filelock.FileLock(str(tmp_path / "run" / LOCK_NAME), thread_local=False)
        try:
            other.acquire(timeout=0)
        except filelock.Timeout:
            return True
        other.release()
        return False

    real_evaluate = pipeline.evaluate_run
    monkeypatch.setattr(
        pipeline, "evaluate_run", lambda run, **kw: (probes.append(probe_lock()), real_evaluate(run, **kw))[1]
    )
    pipeline.distill(config)
    assert probes == [True]
    assert not probe_lock()
    monkeypatch.setattr(pipeline, "evaluate_run", lambda run, **kw: (_ for _ in ()).throw(UserError("boom")))
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with pytest.raises(UserError, match="boom"):
        pipeline.distill(config)
    assert not probe_lock()


def test_a_run_written_while_this_one_set_up_is_not_overwritten(tmp_path, monkeypatch, capsys):
    """A directory without a lock file yet is locked when it is first written; last.pt is checked again then."""
    monkeypatch.chdir(tmp_path)
    box = Sandbox(tmp_path)
    argv = distill()(box)
    real_check = loop._resume_or_refuse

    def check_while_another_finishes(run, **kwargs):
        seen = real_check(run, **kwargs)  # no last.pt yet: a new run
        box.checkpoint("run/checkpoints/last.pt", epoch=1)  # meanwhile the other process has written its run
        return seen

    monkeypatch.setattr(loop, "_resume_or_refuse", check_while_another_finishes)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "got a run (run/checkpoints/last.pt) from another process" in err[0], err
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "run" / "config.yaml").exists()


# -- control: a resume that changes what the checkpoint was trained with ----------------------------------
@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    """A real run directory after one epoch (digits, eps 0.2), copied by each test."""
    root = tmp_path_factory.mktemp("one_epoch")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        assert main(["distill", Sandbox(root).config({"optim": {"epochs": 1}}), "--no-eval"]) == 0
    finally:
        os.chdir(cwd)
    return root / "run"


def _copy_run(source: Path, tmp_path: Path) -> list[str]:
    shutil.copytree(source, tmp_path / "run")
    return ["distill", Sandbox(tmp_path).config({"optim": {"epochs": 2}}), "--no-eval", "--resume"]


def test_resume_with_another_eps_used_to_be_silent_and_is_now_refused(one_epoch_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = _copy_run(one_epoch_run, tmp_path)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tmp_path / "run", snapshot)
    # Control: without the comparison, the resume trains on at eps 0.3 and config.yaml says 0.3, while
    # epoch 1 of the checkpoint was trained at 0.2.
    with monkeypatch.context() as patched:
        patched.setattr(checkpoints, "trained_with_changes", lambda *args: [])
        assert main([*argv, "--set", "threat.eps=0.3"]) == 0
    assert "eps: 0.3" in (tmp_path / "run" / "config.yaml").read_text()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["config_changes"] == []
    shutil.rmtree(tmp_path / "run")
    shutil.copytree(snapshot, tmp_path / "run")
    capsys.readouterr()
    before = _tree(tmp_path)
    assert main([*argv, "--set", "threat.eps=0.3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert "threat.eps = 0.2 in the checkpoint, 0.3 in the config" in err[0]
    assert "--resume-changed threat.eps" in err[0]
    assert _tree(tmp_path) == before
    # Opting in trains on, and every later checkpoint records the change.
    assert main([*argv, "--set", "threat.eps=0.3", "--resume-changed", "threat.eps"]) == 0
    data = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert data["epoch"] == 2 and data["config"]["threat"]["eps"] == 0.3
    assert data["config_changes"] == [{"epoch": 1, "key": "threat.eps", "checkpoint": 0.2, "config": 0.3}]


def test_a_newer_format_used_to_be_read_and_is_now_refused(one_epoch_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = _copy_run(one_epoch_run, tmp_path)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    torch.save({**load_checkpoint(last), "format": FORMAT.rpartition("/")[0] + "/2"}, last)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(tmp_path / "run", snapshot)
    # Control: without the check, a checkpoint of a later layout is resumed as if it were this version's.
    with monkeypatch.context() as patched:
        patched.setattr(checkpoints, "check_format", lambda data, path: None)
        assert main(argv) == 0
    shutil.rmtree(tmp_path / "run")
    shutil.copytree(snapshot, tmp_path / "run")
    capsys.readouterr()
    before = _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "newer than this robustbench_kd reads" in err[0], err
    assert _tree(tmp_path) == before


def test_the_formats_this_version_resumes():
    checkpoint_module.check_format({"format": FORMAT}, "x")
    checkpoint_module.check_format({"format": "robustbench_kd.checkpoint/1"}, "x")  # the older name
    for bad in (None, "robustbench_kd.storage.checkpoint/", "robustbench_kd.storage.checkpoint/v1", 3, "x/1"):
        with pytest.raises(UserError):
            checkpoint_module.check_format({"format": bad}, "x")


def test_a_moved_teacher_file_is_the_same_teacher_and_a_replaced_one_is_not(tmp_path):
    box = Sandbox(tmp_path)
    first = TeacherSpec.parse(f"file:{tmp_path / box.checkpoint('a.pt')}?arch=small-cnn").identity()
    shutil.copy(tmp_path / "a.pt", tmp_path / "b.pt")
    assert TeacherSpec.parse(f"file:{tmp_path / 'b.pt'}?arch=small-cnn").identity() == first
    box.checkpoint("b.pt", epoch=3)  # other bytes under the same name
    assert TeacherSpec.parse(f"file:{tmp_path / 'b.pt'}?arch=small-cnn").identity() != first
    assert teachers.role_identity("robustbench:x/y/z") == teachers.role_identity(["robustbench:x/y/z"])
