"""A real disk-full (here: a file-size limit) during ``distill``: one line, exit 1, the last good checkpoint kept.

The operating system refuses the write, not a test double: the child process runs under ``RLIMIT_FSIZE``
(Python ignores SIGXFSZ, so the write fails with EFBIG, as a full disk fails with ENOSPC). Where the disk
fills inside a large tensor, torch's zip writer reports the failure as a multi-line ``RuntimeError`` from
``inline_container.cc`` with no errno; :mod:`robustbench_kd.storage.atomic` turns it back into the
``OSError`` the CLI prints in one line.
"""

from __future__ import annotations

import errno
import io
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from robustbench_kd.storage import atomic
from robustbench_kd.storage.checkpoint import load_checkpoint
from robustbench_kd.testing.runs import tiny_digits_raw


def _run_file(tmp_path: Path) -> Path:
    """Three tiny deterministic epochs on digits, a checkpoint file per epoch."""
    raw = tiny_digits_raw("run", merge={"checkpoint": {"every": 1}}, optim={"epochs": 3, "lr": 0.05})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(
    tmp_path: Path, *args: str, file_limit: int | None = None, prelude: str = ""
) -> subprocess.CompletedProcess[str]:
    """``robustbench-kd -q ARGS`` in a new process in ``tmp_path``, optionally under a file-size limit."""

    def limit() -> None:
        if file_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    code = f"{prelude}\nfrom robustbench_kd.cli import main\nraise SystemExit(main({['-q', *args]!r}))"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        preexec_fn=limit,  # the limit applies to the child alone
        stdin=subprocess.DEVNULL,
        timeout=600,
        check=False,
    )


def _student(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["student"]


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: its per-epoch checkpoints give the sizes and the weights to compare with."""
    root = tmp_path_factory.mktemp("reference")
    done = _cli(root, "distill", str(_run_file(root)), "--no-eval")
    assert done.returncode == 0, done.stderr
    return root / "run" / "checkpoints"


def _first_epoch_fits(reference: Path) -> int:
    """A file-size limit that epoch 1's checkpoint fits and epoch 2's (one more history row) does not."""
    first, second = ((reference / f"epoch_00{i}.pt").stat().st_size for i in (1, 2))
    assert second > first, "the test needs epoch 2's checkpoint to be larger than epoch 1's"
    return first


def test_disk_full_mid_run_is_one_line_keeps_last_pt_and_resumes_exactly(reference, tmp_path):
    run_file = _run_file(tmp_path)
    failed = _cli(tmp_path, "distill", str(run_file), "--no-eval", file_limit=_first_epoch_fits(reference))
    lines = failed.stderr.splitlines()
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith("robustbench-kd: error: cannot read or write run/checkpoints/epoch_002.pt: ")
    assert "File too large" in lines[0] and "--resume" in lines[0]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 1  # the previous good state, intact
    _assert_equal(_student(checkpoints / "last.pt"), _student(reference / "epoch_001.pt"))
    assert not list(checkpoints.glob(".*.tmp")), "the failed write left its temporary file"
    resumed = _cli(tmp_path, "distill", str(run_file), "--no-eval", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 3
    _assert_equal(_student(checkpoints / "last.pt"), _student(reference / "last.pt"))


def _inside_the_largest_tensor(reference: Path) -> int:
    """A file-size limit that falls in the middle of epoch 2's largest tensor record.

    A disk that fills while torch writes a large tensor (written past Python's buffer, straight to the OS)
    is the case torch reports as its own ``RuntimeError`` with no errno; a limit at the end of the file
    fails in the buffered tail instead, where Python's own ``OSError`` surfaces.
    """
    with zipfile.ZipFile(reference / "epoch_002.pt") as archive:
        largest = max(archive.infolist(), key=lambda record: record.file_size)
    assert largest.file_size > 2 * io.DEFAULT_BUFFER_SIZE
    return largest.header_offset + largest.file_size // 2


def test_disk_full_inside_a_tensor_was_a_traceback_and_is_now_one_line(reference, tmp_path):
    run_file = _run_file(tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(reference / "epoch_001.pt", checkpoints / "last.pt")  # the run after epoch 1
    limit = _inside_the_largest_tensor(reference)
    # Control: without the translation, torch's zip writer failure is what the user gets.
    prelude = "import robustbench_kd.storage.atomic as atomic\natomic._os_failure_of = lambda exc, handle: None"
    failed = _cli(tmp_path, "distill", str(run_file), "--no-eval", "--resume", file_limit=limit, prelude=prelude)
    assert failed.returncode == 1
    assert "Traceback" in failed.stderr and "RuntimeError: [enforce fail at inline_container.cc" in failed.stderr
    assert len(failed.stderr.splitlines()) > 10
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == 1  # the data was safe even so
    failed = _cli(tmp_path, "distill", str(run_file), "--no-eval", "--resume", file_limit=limit)
    assert failed.returncode == 1
    assert failed.stderr.splitlines() == [
        "robustbench-kd: error: cannot read or write run/checkpoints/epoch_002.pt: File too large; files written "
        "before are intact (atomic writes) - fix the cause and rerun (distill: add --resume)"
    ]
    _assert_equal(_student(checkpoints / "last.pt"), _student(reference / "epoch_001.pt"))
    assert not list(checkpoints.glob(".*.tmp"))
    resumed = _cli(tmp_path, "distill", str(run_file), "--no-eval", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _assert_equal(_student(checkpoints / "last.pt"), _student(reference / "last.pt"))


def test_a_text_file_the_disk_refuses_is_the_same_one_line(tmp_path):
    """config.yaml, metrics.jsonl, results, model_info, bundle files and figures go through one writer."""
    failed = _cli(tmp_path, "distill", str(_run_file(tmp_path)), "--no-eval", file_limit=200)
    assert failed.returncode == 1, failed.stderr
    assert failed.stderr.splitlines() == [
        "robustbench-kd: error: cannot read or write run/config.yaml: File too large; files written before are "
        "intact (atomic writes) - fix the cause and rerun (distill: add --resume)"
    ]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["run.lock"]


_WRITERS = """
import resource, sys, torch
from robustbench_kd.storage.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_text
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
for name, write in [
    ("t.txt", lambda p: atomic_write_text(p, "x" * 10000)),
    ("b.bin", lambda p: atomic_write_bytes(p, b"x" * 10000)),
    ("small.pt", lambda p: atomic_torch_save({"w": torch.zeros(2000)}, p)),
    ("large.pt", lambda p: atomic_torch_save({"w": torch.zeros(200000)}, p)),
]:
    try:
        write(name)
    except OSError as exc:
        print(name, exc.errno, exc.filename)
"""


def test_every_atomic_writer_raises_the_oses_error_naming_the_file(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _WRITERS], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{n} {errno.EFBIG} {n}" for n in ("t.txt", "b.bin", "small.pt", "large.pt")]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_writer_failure_without_its_cause_is_probed_for_the_errno():
    """torch may drop the OSError; one more byte at the end of the file gets the errno from the OS again."""
    failure = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")
    with open("/dev/full", "wb") as handle:  # every write: ENOSPC, a real full device
        found = atomic._os_failure_of(failure, handle)
    assert isinstance(found, OSError) and found.errno == errno.ENOSPC


def test_a_runtime_error_that_is_not_the_oses_stays_what_it_is(tmp_path):
    with open(tmp_path / "f", "wb") as handle:
        assert atomic._os_failure_of(RuntimeError("some tensor problem"), handle) is None
        assert atomic._os_failure_of(RuntimeError("PytorchStreamWriter failed writing file"), handle) is None
    chained = RuntimeError("[enforce fail at inline_container.cc:672]")
    chained.__context__ = OSError(errno.ENOSPC, "No space left on device")
    with open(tmp_path / "g", "wb") as handle:
        found = atomic._os_failure_of(chained, handle)
    assert isinstance(found, OSError) and found.errno == errno.ENOSPC
