"""torchrun / DDP training: two CPU processes (gloo) against one process with the same global batch.

The equivalence configuration: PGD-AT with a zero attack start (``method.init = "none"``), so nothing
depends on the per-rank attack noise, and ``run.sync_bn = true``, so BatchNorm normalises with
statistics of the global batch as one process does. The weights, BN running statistics included, then
agree up to float rounding (gradients are averaged in a different order, BN statistics are summed over
processes).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import robustbench_kd_plugins
import torch
import yaml

import robustbench_kd
from robustbench_kd.config import config_from_mapping
from robustbench_kd.errors import UserError
from robustbench_kd.scale import distributed
from robustbench_kd.storage.checkpoint import load_checkpoint
from robustbench_kd.training.loop import train

TIMEOUT_S = 300


def raw_config(out_dir: Path, **sections) -> dict:
    raw = {
        "run": {"out_dir": str(out_dir), "progress": False, "deterministic": True, "seed": 3, "sync_bn": True},
        "data": {"dataset": "digits", "batch_size": 50, "n_train": 200},
        "threat": {"eps": 0.2, "alpha": 0.1, "steps": 2},
        "student": {"arch": "small-cnn", "options": {"width": 0.5}},
        "method": {"name": "pgd-at", "init": "none"},
        "optim": {"epochs": 2, "lr": 0.05},
    }
    raw.update(sections)
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc -m robustbench_kd.cli distill CONFIG --no-eval ARGS`` on CPU."""
    paths = [str(Path(robustbench_kd.__file__).resolve().parents[1])]
    plugins = Path(robustbench_kd_plugins.__file__).parent
    if plugins.name == "robustbench_kd_plugins":  # a checkout with an import shim: make the workers see it
        paths.append(str(plugins.parent))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "robustbench_kd.cli",
        "distill",
        str(config),
        "--no-eval",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def student_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out_dir / "checkpoints" / "last.pt")["student"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The reference: one process, global batch 50, two epochs; its weights and its checkpoint."""
    out = tmp_path_factory.mktemp("single") / "run"
    run = train(config_from_mapping(raw_config(out)))
    return SimpleNamespace(
        weights={k: v.detach().clone() for k, v in run.student.state_dict().items()},
        checkpoint=out / "checkpoints" / "last.pt",
    )  # also a teacher for the method-state test


def test_two_processes_match_one_process(tmp_path, single_run):
    out = tmp_path / "ddp"
    proc = torchrun(write_config(tmp_path / "run.yaml", raw_config(out)))
    check_ok(proc)
    assert_same_weights(student_weights(out), single_run.weights)
    # Rank 0 alone logged and wrote; metrics cover the whole global batch (200 images per epoch).
    rows = [yaml.safe_load(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert (proc.stdout + proc.stderr).count("epoch 2/2") == 1


def test_two_processes_with_extra_data_match_one_process(tmp_path):
    """Generated data under torchrun: 40 real + 10 extra images per global batch, each process taking 20 + 5.

    With the batch norm synchronised, two processes then train on the same global batches as one."""
    path = tmp_path / "gen.npz"
    rng = np.random.default_rng(1)
    np.savez(path, image=rng.integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8), label=np.arange(64) % 10)
    data = {"dataset": "digits", "batch_size": 50, "n_train": 200, "extra_path": str(path), "extra_fraction": 0.2}
    single = train(config_from_mapping(raw_config(tmp_path / "one", data=data)))
    proc = torchrun(write_config(tmp_path / "run.yaml", raw_config(tmp_path / "two", data=data)))
    check_ok(proc)
    assert_same_weights(
        student_weights(tmp_path / "two"), {k: v.detach() for k, v in single.student.state_dict().items()}
    )
    rows = [yaml.safe_load(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in single.history], rel=1e-4)


def test_each_process_keeps_its_share_of_the_real_and_of_the_extra_images(monkeypatch):
    """A global batch [8 real | 4 extra] over 2 processes: rank 0 gets real 0-3 + extra 8-9, rank 1 the rest."""
    x = torch.arange(12.0).view(12, 1, 1, 1)
    y, index = torch.arange(12), torch.arange(100, 112)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    shares = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        ((xs, ys, idx),) = distributed.shard_batches([(x, y, index)], torch.device("cpu"), extra=4)
        assert torch.equal(xs.flatten(), ys.float()) and torch.equal(idx, ys + 100)
        shares.append(ys.tolist())
    assert shares == [[0, 1, 2, 3, 8, 9], [4, 5, 6, 7, 10, 11]]
    monkeypatch.setenv("RANK", "0")
    ((_, ys, _),) = distributed.shard_batches([(x, y, index)], torch.device("cpu"))  # no extra data: plain halves
    assert ys.tolist() == list(range(6))


def test_resume_ddp_checkpoint_in_one_process(tmp_path, single_run):
    out = tmp_path / "run"
    check_ok(torchrun(write_config(tmp_path / "first.yaml", raw_config(out, optim={"epochs": 1, "lr": 0.05}))))
    resumed = train(config_from_mapping(raw_config(out)), resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert_same_weights({k: v.detach() for k, v in resumed.student.state_dict().items()}, single_run.weights)


def test_resume_single_process_checkpoint_under_ddp(tmp_path, single_run):
    out = tmp_path / "run"
    train(config_from_mapping(raw_config(out)), stop_after=1)
    check_ok(torchrun(write_config(tmp_path / "run.yaml", raw_config(out)), "--resume"))
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2
    assert_same_weights(student_weights(out), single_run.weights)


def test_class_prior_is_the_same_as_in_one_process(tmp_path, single_run):
    """Method state: RSLAD's IKL class prior (teacher outputs of every sample of the epoch) is summed over
    the processes, so the DDP run ends the epoch with the prior one process computes."""
    teacher = f"file:{single_run.checkpoint}"
    raw = dict(
        method={"name": "rslad", "divergence": "ikl"}, teachers={"robust": teacher}, optim={"epochs": 1, "lr": 0.05}
    )
    single = train(config_from_mapping(raw_config(tmp_path / "one", **raw)))
    check_ok(torchrun(write_config(tmp_path / "run.yaml", raw_config(tmp_path / "two", **raw))))
    prior = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["distiller"]["prior.prior"]
    assert not torch.allclose(prior, torch.full_like(prior, 0.1))  # it was updated
    torch.testing.assert_close(prior, single.distiller.prior.prior, rtol=1e-5, atol=1e-6)


def test_batch_not_divisible_is_a_one_line_error_under_torchrun(tmp_path):
    raw = raw_config(tmp_path / "run", data={"dataset": "digits", "batch_size": 45, "n_train": 200})
    proc = torchrun(write_config(tmp_path / "run.yaml", raw))
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("robustbench-kd: error:")]
    assert lines and all("data.batch_size = 45" in line and "divisible by the 2 processes" in line for line in lines)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def two_rank_env(monkeypatch):
    """torchrun's variables for rank 0 of 2; the checks below fail before any process group is joined."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")


def test_batch_not_divisible_is_refused(tmp_path, two_rank_env):
    raw = raw_config(tmp_path / "run", data={"dataset": "digits", "batch_size": 45, "n_train": 200})
    with pytest.raises(UserError, match=r"data.batch_size = 45 .* divisible by the 2 processes") as info:
        train(config_from_mapping(raw))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "method, error",
    [
        ({"name": "gacd"}, "method 'gacd' does not support multi-process"),
        ({"name": "trades", "kl_reduction": "sum"}, "kl_reduction = 'sum' cannot be split over 2 processes"),
    ],
)
def test_unsupported_method_is_refused(tmp_path, two_rank_env, method, error):
    with pytest.raises(UserError, match=error) as info:
        train(config_from_mapping(raw_config(tmp_path / "run", method=method)))
    assert "\n" not in str(info.value)
    assert not torch.distributed.is_initialized()


def test_every_builtin_method_declares_distributed_support(host):
    for entry in host.methods.entries():
        assert "supports_distributed" in vars(entry.value), entry.name


def test_drop_last_keeps_final_batches_that_split_evenly():
    assert not distributed.drop_last(200, 50, 2)
    assert not distributed.drop_last(210, 50, 2)  # 10 left: 5 per process
    assert distributed.drop_last(205, 50, 2)  # 5 left: cannot split in two
    assert distributed.drop_last(202, 50, 2)  # 2 left: one sample per process
    assert distributed.drop_last(201, 50, 1) and not distributed.drop_last(202, 50, 1)  # the one-process rule


def test_single_process_is_unchanged_without_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = distributed.from_environ()
    assert not env.enabled and env.is_main
    batches = [(torch.zeros(4, 1, 8, 8), torch.arange(4), torch.arange(4))]
    ((_x, y, _index),) = distributed.shard_batches(batches, torch.device("cpu"))
    assert len(y) == 4 and distributed.rank_seed(123) == 123
