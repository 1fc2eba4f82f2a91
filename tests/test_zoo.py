"""robustbench_kd.zoo.models: zoo teachers by name, offline, with one-line errors and no surprise downloads."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.storage.hashing import sha256_of
from robustbench_kd.testing.fixtures import save_random_zoo_checkpoint, tiny_zoo_entry
from robustbench_kd.zoo import models as zoo

REPO = Path(__file__).resolve().parents[1]


class TinyNet(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=4, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class TinyEnsemble(nn.Module):
    """Mimics the zoo ensembles: members in ``.models``, logits averaged."""

    def __init__(self) -> None:
        super().__init__()
        self.models = nn.ModuleList([TinyNet(), TinyNet()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.models]).mean(0)


def _seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _zoo_factory(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> Callable[[], nn.Module]:
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    return model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)][name]["model"]


def test_importing_our_modules_does_not_import_robustbench() -> None:
    code = (
        "import sys, robustbench_kd.zoo.models, robustbench_kd.zoo.compat, robustbench_kd.data.cifar, "
        "robustbench_kd.testing.fixtures; "
        "heavy = [m for m in ('robustbench', 'timm', 'torchvision', 'pyautoattack') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_parse_zoo_ref() -> None:
    assert zoo.parse_zoo_ref("cifar10/Linf/Carmon2019Unlabeled") == ("cifar10", "Linf", "Carmon2019Unlabeled")
    assert zoo.parse_zoo_ref(" CIFAR100/linf/X ") == ("cifar100", "Linf", "X")
    for bad in ("Carmon2019Unlabeled", "cifar10/Linf", "cifar10/Linf/a/b", "cifar10//x"):
        with pytest.raises(UserError, match=r"expected <dataset>/<threat_model>/<name>"):
            zoo.parse_zoo_ref(bad)
    with pytest.raises(UserError, match=r"did you mean: cifar10"):
        zoo.parse_zoo_ref("cifar1O/Linf/x")
    with pytest.raises(UserError, match=r"valid: Linf, L2, corruptions, corruptions_3d"):
        zoo.parse_zoo_ref("cifar10/Lp/x")


def test_zoo_names() -> None:
    names = zoo.zoo_names("cifar10", "Linf")
    assert "Ding2020MMA" in names and "Carmon2019Unlabeled" in names and len(names) > 50
    assert zoo.zoo_names("cifar10", "corruptions_3d") == zoo.zoo_names("cifar10", "corruptions")
    with pytest.raises(UserError, match=r"no cifar100/L2 model zoo; cifar100 has: Linf, corruptions"):
        zoo.zoo_names("cifar100", "L2")
    with pytest.raises(UserError, match=r"valid: cifar10, cifar100, imagenet"):
        zoo.zoo_names("mnist", "Linf")


def test_expected_checkpoint_paths(tmp_path: Path) -> None:
    assert zoo.expected_checkpoint_paths(tmp_path, "cifar10", "Linf", "Ding2020MMA") == [
        tmp_path / "cifar10" / "Linf" / "Ding2020MMA.pt"
    ]
    assert zoo.expected_checkpoint_paths(tmp_path, "cifar10", "Linf", "Chen2020Adversarial") == [
        tmp_path / "cifar10" / "Linf" / f"Chen2020Adversarial.pt_m{i}.pt" for i in range(3)
    ]
    assert zoo.expected_checkpoint_paths(tmp_path, "cifar10", "corruptions_3d", "Hendrycks2020AugMix_WRN") == [
        tmp_path / "cifar10" / "corruptions" / "Hendrycks2020AugMix_WRN.pt"
    ]


def test_zoo_teacher_loads_offline_and_matches_saved_weights(tmp_path: Path, no_network: None) -> None:
    name = "Ding2020MMA"  # WRN-28-4, the smallest real cifar10/Linf architecture
    paths = save_random_zoo_checkpoint(tmp_path, name, half=True, seed=3)
    assert paths == [tmp_path / "cifar10" / "Linf" / f"{name}.pt"]
    assert paths[0].stat().st_size < 15e6  # fp16: about half of the 23.5 MB fp32 file

    model = zoo.load_zoo_model(name, dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
    assert not model.training
    reference = _seeded(_zoo_factory(name), seed=3).eval()
    with torch.no_grad():  # the file holds fp16-rounded weights; round the reference the same way
        for tensor in [*reference.parameters(), *reference.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
        x = torch.rand(2, 3, 32, 32)
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    assert sha256_of(paths[0]) == hashlib.sha256(paths[0].read_bytes()).hexdigest()


def test_tiny_entry_and_ensemble_load_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    with tiny_zoo_entry("RbkdTinyTest", TinyNet):
        save_random_zoo_checkpoint(tmp_path, "RbkdTinyTest", half=False, seed=1)
        model = zoo.load_zoo_model("RbkdTinyTest", dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
        x = torch.rand(3, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), _seeded(TinyNet, seed=1).eval()(x))
    assert "RbkdTinyTest" not in zoo.zoo_names("cifar10", "Linf")

    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    entries = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    monkeypatch.setitem(entries, "RbkdTinyEnsemble", {"model": TinyEnsemble, "gdrive_id": ["a", "b"]})
    paths = save_random_zoo_checkpoint(tmp_path, "RbkdTinyEnsemble", half=False, seed=2)
    assert [p.name for p in paths] == ["RbkdTinyEnsemble.pt_m0.pt", "RbkdTinyEnsemble.pt_m1.pt"]
    model = zoo.load_zoo_model("RbkdTinyEnsemble", dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
    with torch.no_grad():
        assert torch.equal(model(x), _seeded(TinyEnsemble, seed=2).eval()(x))

    paths[1].unlink()
    with pytest.raises(UserError) as info:
        zoo.load_zoo_model("RbkdTinyEnsemble", dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
    assert str(paths[1]) in str(info.value) and str(paths[0]) not in str(info.value)


def test_missing_checkpoint_fails_before_any_network_call(tmp_path: Path, no_network: None) -> None:
    expected = tmp_path / "cifar10" / "Linf" / "Ding2020MMA.pt"
    with pytest.raises(UserError) as info:
        zoo.load_zoo_model("Ding2020MMA", dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
    message = str(info.value)
    assert str(expected) in message and "allow_download" in message and "\n" not in message
    # load_model was never reached: it would have created the directory before downloading.
    assert not (tmp_path / "cifar10").exists()


def test_failed_download_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gdown
    import requests

    def offline(*args: object, **kwargs: object) -> None:
        raise requests.exceptions.ConnectionError("Name or service not known")

    monkeypatch.setattr(gdown, "download", offline)
    with pytest.raises(UserError, match=r"downloading the checkpoint for cifar10/Linf/Ding2020MMA failed"):
        zoo.load_zoo_model(
            "Ding2020MMA", dataset="cifar10", threat_model="Linf", model_dir=tmp_path, allow_download=True
        )


def test_unknown_name_lists_close_matches(tmp_path: Path) -> None:
    count = len(zoo.zoo_names("cifar10", "Linf"))
    with pytest.raises(UserError, match=rf"did you mean: Ding2020MMA.*{count} names exist"):
        zoo.load_zoo_model("Ding2020MM", dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
    with pytest.raises(UserError, match=r"did you mean: L2"):
        zoo.load_zoo_model("Ding2020MMA", dataset="cifar10", threat_model="L3", model_dir=tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>", r"HTML page"),
        (b"", r"is empty"),
        (b"PK\x03\x04" + b"\x00" * 64, r"truncated or corrupt zip"),
        (b"\x80\x02" + b"garbage" * 20, r"cannot be unpickled"),
        (b"\x80\x02}q\x00.", r"cannot be loaded"),
    ],
)
def test_corrupt_checkpoint_is_a_clear_user_error(tmp_path: Path, no_network: None, content: bytes, match: str) -> None:
    with tiny_zoo_entry("RbkdTinyTest", TinyNet):
        path = zoo.expected_checkpoint_paths(tmp_path, "cifar10", "Linf", "RbkdTinyTest")[0]
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
        with pytest.raises(UserError, match=match) as info:
            zoo.load_zoo_model("RbkdTinyTest", dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
    assert str(path) in str(info.value) and "delete" in str(info.value)


def test_wrong_architecture_and_non_tensor_checkpoints(tmp_path: Path, no_network: None) -> None:
    with tiny_zoo_entry("RbkdTinyTest", TinyNet):
        path = zoo.expected_checkpoint_paths(tmp_path, "cifar10", "Linf", "RbkdTinyTest")[0]
        path.parent.mkdir(parents=True)
        torch.save(TinyNet(width=6).state_dict(), path)
        with pytest.raises(UserError, match=r"does not match the cifar10/Linf/RbkdTinyTest architecture"):
            zoo.load_zoo_model("RbkdTinyTest", dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
        torch.save({"state_dict": TinyNet().state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
        with pytest.raises(UserError, match=r"weights_only=True"):
            zoo.load_zoo_model("RbkdTinyTest", dataset="cifar10", threat_model="Linf", model_dir=tmp_path)


def test_timm_served_name_offline_names_the_hub_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    name = "Debenedetti2022Light_XCiT-S12"
    paths = zoo.expected_checkpoint_paths(tmp_path, "cifar10", "Linf", name)
    assert len(paths) == 1 and paths[0].parent == tmp_path / "torch_home" / "hub" / "checkpoints"
    with pytest.raises(UserError, match=r"hub weights file") as info:
        zoo.load_zoo_model(name, dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
    assert str(paths[0]) in str(info.value)
    with pytest.raises(UserError, match=r"loaded through timm"):
        save_random_zoo_checkpoint(tmp_path, name)
