"""Exact kill-and-resume and atomic state.

``robustbench-kd distill`` runs as a subprocess with a step checkpoint after every optimiser step and is
killed with SIGKILL, then resumed with ``--resume``, again and again, until it finishes. Some kills land at
a seeded random instant after the process starts writing checkpoints; others are made to land inside a
checkpoint write by a ``sitecustomize`` that only this test puts on the subprocess's path (the library has
no test hook). After every kill ``checkpoints/last.pt`` must load and be the previous file or a newer
complete one; at the end the student, method state, optimiser and history must be bitwise those of an
uninterrupted run.

The write-failure tests inject ENOSPC in the middle of a write and check that the previous ``last.pt``
survives, loadable, without a temp file left behind.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import robustbench_kd.storage.atomic as rbkd_io
from robustbench_kd.config import config_from_mapping
from robustbench_kd.errors import UserError
from robustbench_kd.storage.checkpoint import load_checkpoint, save_checkpoint
from robustbench_kd.testing.runs import tiny_digits_raw
from robustbench_kd.training import checkpoints as run_checkpoints
from robustbench_kd.training.loop import train

# Installed in the subprocess only: RBKD_TEST_KILL="N:mode" kills the process with SIGKILL in the N-th
# atomic write of last.pt (1-based, counted per process). partial: after half of a chunk of the temp file;
# before_replace: the temp file is complete but not yet renamed; after_replace: last.pt is replaced, the
# next file (metrics.jsonl, another step) not yet written.
SITECUSTOMIZE = """
import contextlib, os, signal
spec = os.environ.get("RBKD_TEST_KILL")
if spec:
    import robustbench_kd.storage.atomic as io
    at, mode = spec.split(":")
    at, real, count = int(at), io._atomic_binary_file, [0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    class Partial:
        def __init__(self, handle):
            self.handle, self.written = handle, 0
        def write(self, data):
            if self.written + len(data) > 1000:
                self.handle.write(bytes(data)[: max(1, len(data) // 2)])
                self.handle.flush()
                die()
            self.written += len(data)
            return self.handle.write(data)
        def __getattr__(self, name):
            return getattr(self.handle, name)

    @contextlib.contextmanager
    def writer(path):
        if os.path.basename(str(path)) == "last.pt":
            count[0] += 1
        hit = count[0] == at and os.path.basename(str(path)) == "last.pt"
        with real(path) as handle:
            yield Partial(handle) if hit and mode == "partial" else handle
            if hit and mode == "before_replace":
                handle.flush()
                die()
        if hit and mode == "after_replace":
            die()

    io._atomic_binary_file = writer
"""

TIMING_KEYS = ("seconds", "images_per_s")


def run_file(tmp: Path, out: Path, **sections) -> Path:
    raw = tiny_digits_raw(
        out,
        merge={
            "run": {"seed": 5},
            "data": {"batch_size": 50, "n_train": 1000},
            "optim": {"epochs": 4, "schedule": "multistep", "milestones": [2]},
            "checkpoint": {"every_steps": 1},
        },
        **sections,
    )
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    paths = [str(hook), *(p for p in sys.path if p)]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def distill(config: Path, env: dict, *, resume: bool, kill: str | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "robustbench_kd.cli", "-q", "distill", str(config), "--no-eval"]
    env = dict(env, RBKD_TEST_KILL=kill) if kill else env
    return subprocess.Popen(
        args + (["--resume"] if resume else []), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def finish(proc: subprocess.Popen) -> int:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
    return proc.returncode


def inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def comparable(data: dict) -> dict:
    """What must match bitwise: weights, method state, optimiser, position, history without timings."""
    return {
        "student": data["student"],
        "distiller": data["distiller"],
        "method_state": data["method_state"],
        "optimizer": data["optimizer"],
        "scheduler": data["scheduler"],
        "epoch": data["epoch"],
        "global_step": data["global_step"],
        "position": data["position"],
        "history": [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in data["history"]],
    }


def assert_bitwise_equal(a, b, where="checkpoint"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def kill_chain(config: Path, env: dict, last: Path, plan: list, rng: random.Random) -> int:
    """Kill the run once per entry of ``plan``, resuming each time; then let it finish. Returns the kills."""
    kills, step = 0, -1
    for trial in plan:
        resume = last.is_file()
        if trial == "time":
            before = inode(last)
            proc = distill(config, env, resume=resume)
            while inode(last) == before and proc.poll() is None:  # training has started writing
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.1))
            proc.send_signal(signal.SIGKILL)
        else:
            proc = distill(config, env, resume=resume, kill=trial)
        assert finish(proc) == -signal.SIGKILL, f"trial {trial!r} ended before the kill"
        kills += 1
        temps = list(last.parent.glob(".last.pt.*.tmp"))
        if trial.endswith(("partial", "before_replace")):
            assert temps, f"trial {trial!r} did not die inside a write"
        # Never corrupt: the previous complete last.pt or a newer complete one.
        data = load_checkpoint(last)
        assert data["global_step"] >= step, trial
        step = data["global_step"]
    assert finish(distill(config, env, resume=True)) == 0
    assert not list(last.parent.glob(".*.tmp")), "stale temp files were not cleaned up on resume"
    return kills


def test_sigkill_at_random_points_then_resume_is_bitwise_exact(tmp_path, env):
    rng = random.Random(6)
    # pgd-at: random attack starts (global RNG), seeded data order and augmentation (epoch generators).
    augment = {"dataset": "digits", "batch_size": 50, "n_train": 1000, "augment": True}
    base_cfg = run_file(tmp_path, tmp_path / "pgd_base", data=augment)
    assert finish(distill(base_cfg, env, resume=False)) == 0
    baseline = load_checkpoint(tmp_path / "pgd_base" / "checkpoints" / "last.pt")
    cfg = run_file(tmp_path, tmp_path / "pgd_killed", data=augment)
    last = tmp_path / "pgd_killed" / "checkpoints" / "last.pt"
    kills = kill_chain(
        cfg, env, last, ["time", "3:partial", "time", "2:before_replace", "time", "21:after_replace"], rng
    )
    assert_bitwise_equal(comparable(baseline), comparable(load_checkpoint(last)))

    # rslad with IKL: a class prior accumulated over each epoch (method state) and a teacher; the
    # pgd-at baseline serves as the teacher.
    teacher = f"file:{tmp_path / 'pgd_base' / 'checkpoints' / 'last.pt'}"
    sections = {"method": {"name": "rslad", "divergence": "ikl"}, "teachers": {"robust": teacher}}
    base_cfg = run_file(tmp_path, tmp_path / "ikl_base", **sections)
    assert finish(distill(base_cfg, env, resume=False)) == 0
    baseline = load_checkpoint(tmp_path / "ikl_base" / "checkpoints" / "last.pt")
    cfg = run_file(tmp_path, tmp_path / "ikl_killed", **sections)
    last = tmp_path / "ikl_killed" / "checkpoints" / "last.pt"
    kills += kill_chain(cfg, env, last, ["2:partial", "time", "19:after_replace", "time", "3:before_replace"], rng)
    resumed = load_checkpoint(last)
    assert_bitwise_equal(comparable(baseline), comparable(resumed))
    assert torch.equal(baseline["distiller"]["prior.prior"], resumed["distiller"]["prior.prior"])
    assert kills >= 10


# -- write failures ----------------------------------------------------------------------------------
def enospc_after_some_bytes(monkeypatch):
    """Make every torch.save inside an atomic write fail with ENOSPC after writing part of the file."""

    def full_disk(obj, handle):
        handle.write(b"PK\x03\x04 partial checkpoint bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rbkd_io.torch, "save", full_disk)


def test_write_failure_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"epoch": 1, "student": {"w": torch.arange(4.0)}})
    enospc_after_some_bytes(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"epoch": 2, "student": {"w": torch.zeros(4)}})
    monkeypatch.undo()
    data = load_checkpoint(path)
    assert data["epoch"] == 1 and torch.equal(data["student"]["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_full_disk_is_one_line_from_the_cli_and_names_the_file(tmp_path, monkeypatch, capsys):
    from robustbench_kd.cli import main

    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"epoch": 1, "student": {"w": torch.arange(4.0)}})
    enospc_after_some_bytes(monkeypatch)
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"epoch": 2, "student": {"w": torch.zeros(4)}})
    assert info.value.filename == str(path)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run: {{out_dir: {tmp_path / 'run'}, progress: false}}\n"
        "data: {dataset: digits, n_train: 64, batch_size: 32}\n"
        "method: {name: standard}\noptim: {epochs: 1}\n"
    )
    assert main(["distill", str(config), "--no-eval"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "last.pt" in err[0], err
    assert "Traceback" not in err[0]


def test_step_checkpoint_write_failure_then_resume_is_exact(tmp_path, host, monkeypatch):
    """ENOSPC during the 5th step checkpoint: training stops, last.pt is the 4th; resume ends bitwise equal."""

    def cfg(out):
        return config_from_mapping(
            {
                "run": {"out_dir": str(out), "progress": False, "deterministic": True, "seed": 3},
                "data": {"dataset": "digits", "batch_size": 50, "n_train": 200},
                "threat": {"eps": 0.2, "alpha": 0.1, "steps": 2},
                "student": {"arch": "small-cnn", "options": {"width": 0.5}},
                "method": {"name": "pgd-at"},
                "optim": {"epochs": 2, "lr": 0.05, "schedule": "onecycle", "max_lr": 0.1},
                "checkpoint": {"every_steps": 1},
            }
        )

    full = train(cfg(tmp_path / "full"), host=host)
    real_save, writes = rbkd_io.torch.save, []

    def save_until_full(obj, handle):
        writes.append(obj["global_step"])
        if len(writes) == 5:
            handle.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, handle)

    monkeypatch.setattr(rbkd_io.torch, "save", save_until_full)
    split = cfg(tmp_path / "split")
    with pytest.raises(OSError, match="No space left"):
        train(split, host=host)
    monkeypatch.undo()
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    data = load_checkpoint(last)
    # config.yaml is not a torch.save; the 4 completed writes were steps 1..3 and the epoch end (step 4).
    assert data["global_step"] == writes[3] and data["position"] is None and data["epoch"] == 1
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]
    # A temp file from a killed writer (no cleanup ran) is removed when the run resumes.
    (last.parent / ".last.pt.killed.tmp").write_bytes(b"half")
    resumed = train(split, host=host, resume=True)
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]


def test_mid_epoch_resume_is_exact_with_ema_and_method_state(tmp_path, host, monkeypatch):
    """Stopped inside an epoch (step checkpoint), resumed: weights, EMA and epoch metrics equal."""

    def cfg(out):
        return config_from_mapping(
            {
                "run": {"out_dir": str(out), "progress": False, "deterministic": True, "seed": 4},
                "data": {"dataset": "digits", "batch_size": 50, "n_train": 200, "augment": True},
                "threat": {"eps": 0.2, "alpha": 0.1, "steps": 2},
                "student": {"arch": "small-cnn", "options": {"width": 0.5}},
                "method": {"name": "pgd-at"},
                "optim": {"epochs": 2, "lr": 0.05, "schedule": "multistep", "milestones": [1]},
                "checkpoint": {"every_steps": 3},
                "ema": {"decay": 0.9},
            }
        )

    full = train(cfg(tmp_path / "full"), host=host)

    class Stop(Exception):
        pass

    real = run_checkpoints.save_checkpoint

    def stop_after_second_epoch_step_checkpoint(path, payload):
        real(path, payload)
        if payload["position"] is not None and payload["epoch"] == 1:
            raise Stop  # like a kill right after the write

    monkeypatch.setattr(run_checkpoints, "save_checkpoint", stop_after_second_epoch_step_checkpoint)
    split = cfg(tmp_path / "split")
    with pytest.raises(Stop):
        train(split, host=host)
    monkeypatch.undo()
    position = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["position"]
    assert position["epoch"] == 1 and 0 < position["step"] < position["batches"]
    resumed = train(split, host=host, resume=True)
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    for key, value in full.ema.state_dict().items():
        assert_bitwise_equal(value, resumed.ema.state_dict()[key], key)
    strip = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in full.history]
    assert strip == [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in resumed.history]


def test_every_steps_must_not_be_negative():
    with pytest.raises(UserError, match=r"checkpoint.every_steps must be >= 0"):
        config_from_mapping({"checkpoint": {"every_steps": -1}})
