"""robustbench_kd.data.cifar and the CIFAR/zoo fixtures: tiny datasets on disk, read as tensors offline."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from robustbench_kd.data.cifar import load_cifar
from robustbench_kd.errors import UserError
from robustbench_kd.testing.fixtures import make_tiny_cifar, patch_cifar_integrity, tiny_zoo_entry


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


def test_load_tiny_cifar10_shapes_dtypes_and_values(tmp_path: Path, no_network: None) -> None:
    root = make_tiny_cifar(tmp_path, n_train_per_batch=7, n_test=11, seed=5)
    assert root == tmp_path
    x, y = load_cifar("cifar10", root, train=False, verify_md5=False)
    assert x.shape == (11, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.shape == (11,) and y.dtype == torch.int64
    raw = _unpickle(tmp_path / "cifar-10-batches-py" / "test_batch")
    assert torch.equal(x, torch.from_numpy(raw["data"].reshape(-1, 3, 32, 32)))
    assert y.tolist() == raw["labels"]

    xt, yt = load_cifar("CIFAR-10", root, train=True, verify_md5=False)
    assert xt.shape == (35, 3, 32, 32) and yt.shape == (35,)
    first = _unpickle(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    assert torch.equal(xt[:7], torch.from_numpy(first["data"].reshape(-1, 3, 32, 32)))
    assert int(yt.min()) >= 0 and int(yt.max()) <= 9


def test_load_tiny_cifar100(tmp_path: Path, no_network: None) -> None:
    make_tiny_cifar(tmp_path, dataset="cifar100", n_train_per_batch=3, n_test=9, seed=1)
    x, y = load_cifar("cifar100", tmp_path, train=True, verify_md5=False)
    assert x.shape == (15, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    raw = _unpickle(tmp_path / "cifar-100-python" / "train")
    assert y.tolist() == raw["fine_labels"]
    xv, _ = load_cifar("cifar100", tmp_path, train=False, verify_md5=False)
    assert xv.shape == (9, 3, 32, 32)


def test_fixture_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_tiny_cifar(a, seed=3)
    make_tiny_cifar(b, seed=3)
    xa, ya = load_cifar("cifar10", a, train=False, verify_md5=False)
    xb, yb = load_cifar("cifar10", b, train=False, verify_md5=False)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_md5_check_rejects_unofficial_files(tmp_path: Path, no_network: None) -> None:
    make_tiny_cifar(tmp_path)
    with pytest.raises(UserError, match=r"MD5 check.*verify_md5=False"):
        load_cifar("cifar10", tmp_path, train=False)


def test_missing_directory_names_the_expected_path(tmp_path: Path, no_network: None) -> None:
    with pytest.raises(UserError) as info:
        load_cifar("cifar10", tmp_path, train=True)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)
    assert "download=True" in str(info.value)
    with pytest.raises(UserError, match=str(tmp_path / "cifar-100-python")):
        load_cifar("cifar100", tmp_path, train=False, verify_md5=False)


def test_incomplete_or_garbled_directory(tmp_path: Path, no_network: None) -> None:
    make_tiny_cifar(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_5").unlink()
    with pytest.raises(UserError, match=r"missing data_batch_5"):
        load_cifar("cifar10", tmp_path, train=False, verify_md5=False)
    (folder / "data_batch_5").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"cannot be read as CIFAR pickles"):
        load_cifar("cifar10", tmp_path, train=True, verify_md5=False)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"did you mean: cifar100"):
        load_cifar("cifar1000", tmp_path, train=True)


def test_patch_cifar_integrity_serves_robustbench_data_and_restores(tmp_path: Path, no_network: None) -> None:
    import torchvision.datasets.cifar as tv_cifar

    from robustbench_kd.zoo import compat

    compat.import_robustbench()
    from robustbench.data import load_cifar10

    make_tiny_cifar(tmp_path, n_test=12)
    original = tv_cifar.check_integrity
    with patch_cifar_integrity():
        x, y = load_cifar10(n_examples=10, data_dir=str(tmp_path))  # hard-codes download=True
    assert tv_cifar.check_integrity is original
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    ours, labels = load_cifar("cifar10", tmp_path, train=False, verify_md5=False)
    assert torch.allclose(x, ours[:10].float() / 255) and torch.equal(y, labels[:10])


def test_tiny_zoo_entry_restores_the_zoo() -> None:
    from robustbench_kd.zoo import models as zoo

    before = zoo.zoo_names("cifar10", "Linf")
    with tiny_zoo_entry("Standard", lambda: torch.nn.Identity()) as entry:
        assert entry["gdrive_id"] == "offline-test"
        assert zoo.zoo_names("cifar10", "Linf") == before  # replaced in place, same order
    with tiny_zoo_entry("RbkdOnlyHere", torch.nn.Identity, threat_model="corruptions_3d"):
        assert "RbkdOnlyHere" in zoo.zoo_names("cifar10", "corruptions")
    assert zoo.zoo_names("cifar10", "Linf") == before
    assert "RbkdOnlyHere" not in zoo.zoo_names("cifar10", "corruptions")
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    assert model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Standard"]["gdrive_id"] != "offline-test"


def test_fixture_pixels_cover_full_range(tmp_path: Path) -> None:
    make_tiny_cifar(tmp_path, n_test=50)
    x, _ = load_cifar("cifar10", tmp_path, train=False, verify_md5=False)
    values = np.unique(x.numpy())
    assert values.min() < 10 and values.max() > 245
