"""Extra (generated) data: memory-mapped .npz, a fixed share of every batch, exact resume, one-line errors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from robustbench_kd.config import config_from_mapping
from robustbench_kd.data.datasets import epoch_generator, iterate_batches
from robustbench_kd.data.extra import batch_split, mix_extra, open_extra
from robustbench_kd.data.npz_mmap import memmap_npz
from robustbench_kd.errors import UserError
from robustbench_kd.training.loop import train


def write_extra(path, n=40, shape=(8, 8, 1), num_classes=10, **keys):
    """A generated-data-style file: NHWC uint8 'image', integer 'label' (row j has label j % classes)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    labels = np.arange(n) % num_classes
    np.savez(path, **(keys or {"image": images, "label": labels}))
    return images, labels


def digits_config(out_dir, extra_path, **data):
    return config_from_mapping(
        {
            "run": {"out_dir": str(out_dir), "progress": False, "deterministic": True, "seed": 5},
            "data": {
                "dataset": "digits",
                "batch_size": 20,
                "n_train": 60,
                "extra_path": str(extra_path),
                "extra_fraction": 0.25,
                **data,
            },
            "threat": {"eps": 0.2, "alpha": 0.1, "steps": 1},
            "student": {"arch": "small-cnn", "options": {"width": 0.25}},
            "method": {"name": "pgd-at"},
            "optim": {"epochs": 2, "lr": 0.05},
        }
    )


def test_members_are_memory_mapped_not_loaded(tmp_path):
    path = tmp_path / "gen.npz"
    images, labels = write_extra(path, n=2000, shape=(32, 32, 3))
    arrays = memmap_npz(path)
    assert isinstance(arrays["image"], np.memmap) and isinstance(arrays["label"], np.memmap)
    np.testing.assert_array_equal(arrays["image"], images)
    np.testing.assert_array_equal(arrays["label"], labels)

    extra = open_extra(path, image_shape=(3, 32, 32), num_classes=10)
    assert isinstance(extra.images, np.memmap) and extra.channels_last
    rows = torch.tensor([7, 1999, 7, 3])
    tracemalloc.start()
    x, y = extra.read(rows)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Only the 3 distinct rows are copied (a few KB), never the 6 MB image array.
    assert peak < images.nbytes / 20
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 32, 32)
    assert torch.equal(x, torch.from_numpy(images[[7, 1999, 7, 3]]).permute(0, 3, 1, 2))
    assert y.tolist() == [7, 9, 7, 3]


def test_channels_first_files_and_key_aliases(tmp_path):
    path = tmp_path / "nchw.npz"
    images = np.random.default_rng(1).integers(0, 256, size=(10, 1, 8, 8), dtype=np.uint8)
    np.savez(path, x=images, y=np.arange(10, dtype=np.uint8))
    extra = open_extra(path, image_shape=(1, 8, 8), num_classes=10)
    assert not extra.channels_last
    x, y = extra.read(torch.tensor([2, 5]))
    assert torch.equal(x, torch.from_numpy(images[[2, 5]])) and y.dtype == torch.int64


def test_every_batch_draws_the_configured_count(tmp_path):
    path = tmp_path / "gen.npz"
    write_extra(path, n=40)
    extra = open_extra(path, image_shape=(1, 8, 8), num_classes=10)
    real_x = torch.rand(50, 1, 8, 8)
    real_y = torch.arange(50) % 10
    real_bs, count = batch_split(16, 0.3)
    assert (real_bs, count) == (11, 5)
    batches = iterate_batches(real_x, real_y, batch_size=real_bs, shuffle=True, generator=epoch_generator(0, 0, 1))
    seen_real = []
    for x, y, index in mix_extra(batches, extra, count=count, offset=50, generator=epoch_generator(0, 0, 3)):
        extra_part = index >= 50
        assert int(extra_part.sum()) == count and len(x) == len(y) == len(index)
        rows = index[extra_part] - 50
        assert torch.equal(y[extra_part], rows % 10)  # labels come from the drawn rows
        assert float(x.min()) >= 0 and float(x.max()) <= 1
        seen_real += index[~extra_part].tolist()
    assert sorted(seen_real) == list(range(50))  # one pass over the real data defines the epoch


def test_training_runs_and_resume_is_exact(tmp_path, host):
    path = tmp_path / "gen.npz"
    write_extra(path)
    full = train(digits_config(tmp_path / "full", path), host=host)
    assert full.data.extra is not None and len(full.history) == 2
    split = digits_config(tmp_path / "split", path)
    train(split, host=host, stop_after=1)
    resumed = train(split, host=host, resume=True)
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    # A different fraction is another training stream: resuming with it is refused.
    with pytest.raises(UserError, match="extra_fraction"):
        train(digits_config(tmp_path / "split", path, extra_fraction=0.5), host=host, resume=True)


def test_steps_per_epoch_follow_the_real_share(tmp_path, host):
    path = tmp_path / "gen.npz"
    write_extra(path)
    run = train(digits_config(tmp_path / "run", path, batch_size=20, extra_fraction=0.5), host=host, stop_after=1)
    assert run.global_step == 6  # 60 real images, 10 real per batch


def test_compressed_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "gen.npz"
    np.savez_compressed(path, image=np.zeros((4, 8, 8, 1), np.uint8), label=np.zeros(4, np.int64))
    with pytest.raises(UserError, match=r"np.savez\(\.\.\.\) instead of np.savez_compressed") as info:
        memmap_npz(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"image": np.zeros((4, 6, 6, 1), np.uint8), "label": np.zeros(4, np.int64)}, r"expected \(N, 8, 8, 1\)"),
        ({"image": np.zeros((4, 8, 8, 1), np.float32), "label": np.zeros(4, np.int64)}, "must be uint8"),
        ({"image": np.zeros((4, 8, 8), np.uint8), "label": np.zeros(4, np.int64)}, "must be 4-d"),
        ({"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.zeros(3, np.int64)}, "4 extra images but 3 labels"),
        ({"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.full(4, 10)}, r"in \[0, 10\)"),
        ({"pictures": np.zeros((4, 8, 8, 1), np.uint8), "label": np.zeros(4, np.int64)}, "no image array"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError, match=match) as info:
        open_extra(path, image_shape=(1, 8, 8), num_classes=10)
    assert "\n" not in str(info.value)


def test_not_an_npz_and_missing_file(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(UserError, match=r"not an .npz"):
        memmap_npz(tmp_path / "x.npz")
    with pytest.raises(UserError, match="does not exist"):
        memmap_npz(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"extra_fraction": 1.0, "extra_path": "g.npz"}, r"in \[0, 1\)"),
        ({"extra_fraction": 0.3}, "go together"),
        ({"extra_path": "g.npz"}, "go together"),
        ({"extra_fraction": 0.01, "extra_path": "g.npz", "batch_size": 20}, "gives 0 extra"),
    ],
)
def test_config_checks(data, match):
    with pytest.raises(UserError, match=match):
        config_from_mapping({"data": data})


def test_gacd_refuses_extra_data(tmp_path, host):
    path = tmp_path / "gen.npz"
    write_extra(path)
    teacher_dir = tmp_path / "teacher"
    teacher = train(digits_config(teacher_dir, path), host=host)
    cfg = config_from_mapping(
        {
            **{
                k: v
                for k, v in digits_config(tmp_path / "gacd", path).to_dict().items()
                if k not in ("method", "teachers")
            },
            "method": {"name": "gacd", "nce_k": 8},
            "teachers": {"robust": f"file:{teacher.checkpoint_dir / 'last.pt'}"},
        }
    )
    with pytest.raises(UserError, match=r"'gacd' keeps per-sample state .* remove data.extra_path"):
        train(cfg, host=host)


def test_extra_counts_that_do_not_split_over_the_processes_are_refused_before_joining(tmp_path, host, monkeypatch):
    path = tmp_path / "gen.npz"
    write_extra(path)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    # batch 20, extra_fraction 0.25: 15 real + 5 extra, neither splits over 2 processes.
    with pytest.raises(
        UserError,
        match=r"15 real \+ 5 extra images per global batch; under torchrun each count "
        r"must be divisible by the 2 processes",
    ) as info:
        train(digits_config(tmp_path / "run", path), host=host)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()
    assert not torch.distributed.is_initialized()
