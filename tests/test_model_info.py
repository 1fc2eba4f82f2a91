"""Leaderboard JSON entries, atomic writes and model-zoo checkpoints."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import pytest
import torch
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.evaluation import (
    LEADERBOARD_KEYS,
    build_model_info,
    save_zoo_checkpoint,
    validate_model_info,
    write_model_info,
)
from robustbench_kd.storage.atomic import atomic_torch_save, atomic_write_text
from robustbench_kd.testing.fixtures import CARMON2019_MODEL_INFO

CARMON = CARMON2019_MODEL_INFO


def _carmon(**overrides: object) -> dict:
    kwargs: dict = dict(
        dataset="cifar10",
        threat_model="Linf",
        eps=8 / 255,
        clean_acc=0.8969,
        autoattack_acc=0.5953,
        name=CARMON["name"],
        authors=["Yair Carmon", "Aditi Raghunathan", "Ludwig Schmidt", "Percy Liang", "John C. Duchi"],
        venue="NeurIPS 2019",
        link=CARMON["link"],
        architecture="WideResNet-28-10",
        additional_data=True,
        reported=0.625,
    )
    kwargs.update(overrides)
    return build_model_info(**kwargs)


def _type_signature(info: dict) -> dict:
    return {key: type(value) for key, value in info.items()}


# ------------------------------------------------------------------------------------ building


def test_build_reproduces_a_real_leaderboard_entry() -> None:
    info = _carmon()
    assert info == CARMON
    assert list(info) == list(CARMON)  # key order too
    assert _type_signature(info) == _type_signature(CARMON)
    assert list(info) == [k for k in LEADERBOARD_KEYS if k in info]
    validate_model_info(CARMON)


def test_build_variants_l2_corruptions_footnote_extra() -> None:
    l2 = _carmon(threat_model="L2", eps="0.5", footnote="Trained with robustbench_kd.")
    assert l2["eps"] == "0.5"
    assert list(l2)[-1] == "footnote" and l2["footnote"] == "Trained with robustbench_kd."

    corr = _carmon(threat_model="corruptions", eps=None, autoattack_acc=0.8)
    assert corr["eps"] is None and corr["corruptions_acc"] == "80.0"
    assert "autoattack_acc" not in corr

    extra = _carmon(extra={"external": 0.5811, "robustbench_kd": {"aa_seed": 0}})
    assert extra["external"] == "58.11" and extra["robustbench_kd"] == {"aa_seed": 0}
    assert list(extra)[-2:] == ["external", "robustbench_kd"]

    # update_json's rounding: str(round(acc * 100, 2)).
    assert _carmon(clean_acc=0.123456)["clean_acc"] == "12.35"
    assert _carmon(clean_acc=1.0)["clean_acc"] == "100.0"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"clean_acc": 89.69}, "fraction"),
        ({"autoattack_acc": -0.1}, "fraction"),
        ({"eps": None}, "eps is required"),
        ({"eps": 8}, "larger than 1"),
        ({"threat_model": "corruptions"}, "eps must be None"),
        ({"threat_model": "linf"}, "threat_model"),
        ({"additional_data": "yes"}, "additional_data"),
        ({"number_forward_passes": 0}, "number_forward_passes"),
        ({"dataset": "cifar/10"}, "dataset"),
        ({"extra": {"clean_acc": 0.5}}, "shadow"),
        ({"extra": {"autoatack_acc": "50.0"}}, "did you mean"),
    ],
)
def test_build_rejects_bad_arguments(overrides: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        _carmon(**overrides)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("clean_acc", 89.69, "percentage"),
        ("autoattack_acc", "n/a", "percentage"),
        ("reported", "162.5", "between 0 and 100"),
        ("additional_data", 1, "true or false"),
        ("unreliable", None, "true or false"),
        ("number_forward_passes", True, "positive integer"),
        ("eps", 0.03137, "string"),
        ("eps", None, "corruptions"),
        ("name", 3, "string or null"),
        ("footnote", ["a"], "footnote"),
    ],
)
def test_validate_rejects_wrong_types(key: str, value: object, match: str) -> None:
    info = dict(CARMON, **{key: value})
    with pytest.raises(ValueError, match=match):
        validate_model_info(info)


def test_validate_rejects_missing_and_misspelt_keys() -> None:
    missing = {k: v for k, v in CARMON.items() if k != "venue"}
    with pytest.raises(ValueError, match=r"missing key.*venue"):
        validate_model_info(missing)
    no_acc = {k: v for k, v in CARMON.items() if k != "autoattack_acc"}
    with pytest.raises(ValueError, match="autoattack_acc"):
        validate_model_info(no_acc)
    with pytest.raises(ValueError, match="did you mean 'footnote'"):
        validate_model_info(dict(CARMON, footnotes="x"))
    with pytest.raises(ValueError, match="JSON"):
        validate_model_info(dict(CARMON, robustbench_kd={1, 2}))


# ------------------------------------------------------------------------------------- writing


def test_write_model_info_layout_and_content(tmp_path) -> None:
    info = _carmon()
    path = write_model_info(tmp_path, info, dataset="cifar10", threat_model="Linf", model_id="Kd2026Tiny_R18")
    assert path == tmp_path / "model_info" / "cifar10" / "Linf" / "Kd2026Tiny_R18.json"
    text = path.read_text()
    assert json.loads(text) == CARMON
    assert text.startswith('{\n  "link": ')  # indent 2, key order kept
    assert sorted(os.listdir(path.parent)) == ["Kd2026Tiny_R18.json"]  # no temp files left


@pytest.mark.parametrize("model_id", ["", "has space", "../escape", "a/b", "name.json", "ünï"])
def test_write_model_info_rejects_bad_model_ids(tmp_path, model_id: str) -> None:
    with pytest.raises(UserError, match="model id"):
        write_model_info(tmp_path, _carmon(), dataset="cifar10", threat_model="Linf", model_id=model_id)


def test_write_model_info_checks_consistency(tmp_path) -> None:
    with pytest.raises(UserError, match="dataset"):
        write_model_info(tmp_path, _carmon(), dataset="cifar100", threat_model="Linf", model_id="X")
    with pytest.raises(UserError, match="threat_model"):
        write_model_info(tmp_path, _carmon(), dataset="cifar10", threat_model="corruptions", model_id="X")
    assert not list(tmp_path.rglob("*.json"))


class _ExplodesWhenPickled:
    def __reduce__(self) -> tuple:
        raise RuntimeError("cannot pickle this")


def test_atomic_torch_save_keeps_previous_file_when_serialisation_fails(tmp_path) -> None:
    path = tmp_path / "ckpt" / "model.pt"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    # The tensor is written first, then pickling fails part-way through.
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"w": torch.zeros(10_000), "bad": _ExplodesWhenPickled()}, path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["model.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))


def test_atomic_write_text_keeps_previous_file_on_error(tmp_path) -> None:
    path = tmp_path / "a.json"
    atomic_write_text(path, "old\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "new \udcff", encoding="utf-8")
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["a.json"]
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's owner-only 0o600


def test_atomic_torch_save_keeps_previous_file_when_a_write_fails_midway(tmp_path, monkeypatch) -> None:
    import robustbench_kd.storage.atomic as rio

    path = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(2)}, path)
    before = path.read_bytes()

    def disk_full(obj: object, handle) -> None:
        handle.write(b"PK\x03\x04 half a checkpoint")
        handle.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rio.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_torch_save({"w": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pt"]


# ------------------------------------------------------------------------------------- checkpoints


class TinyZooNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = TinyZooNet()  # the name robustbench's loader mangles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def test_save_zoo_checkpoint_round_trips_through_robustbench_load_model(tmp_path, monkeypatch) -> None:
    from robustbench_kd.zoo import compat

    compat.import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    torch.manual_seed(0)
    net = TinyZooNet()
    net.bn.running_mean.uniform_()  # buffers must travel too
    net.eval()
    path = save_zoo_checkpoint(
        nn.DataParallel(net), tmp_path, dataset="cifar10", threat_model="Linf", model_id="KdTiny2026Test"
    )
    assert path == tmp_path / "models" / "cifar10" / "Linf" / "KdTiny2026Test.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert list(checkpoint) == ["state_dict"]
    assert list(checkpoint["state_dict"]) == list(net.state_dict())  # DataParallel's 'module.' gone
    assert all(t.device.type == "cpu" for t in checkpoint["state_dict"].values())

    zoo = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]
    monkeypatch.setitem(zoo, "KdTiny2026Test", {"model": TinyZooNet, "gdrive_id": "offline"})
    loaded = load_model("KdTiny2026Test", model_dir=tmp_path / "models", dataset="cifar10", threat_model="Linf")
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x))


def test_save_zoo_checkpoint_refuses_keys_load_model_would_mangle(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'model\.conv\.weight' -> 'conv\.weight'.*rename"):
        save_zoo_checkpoint(Wrapped(), tmp_path, dataset="cifar10", threat_model="Linf", model_id="X")

    class Sub(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.submodel = nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"'submodel.weight' -> 'el.weight'"):
        save_zoo_checkpoint(Sub(), tmp_path, dataset="cifar10", threat_model="Linf", model_id="X")
    assert not list(tmp_path.rglob("*.pt"))

    # ImageNet: the loader prefixes every key with the zoo wrapper's 'model.', so the file holds the bare
    # network, whether the model is the network or already wrapped; mangled keys are refused all the same.
    bare = list(TinyZooNet().state_dict())
    for model in (TinyZooNet(), nn.Sequential(OrderedDict(model=TinyZooNet()))):
        path = save_zoo_checkpoint(model, tmp_path, dataset="imagenet", threat_model="Linf", model_id="X")
        assert list(torch.load(path, weights_only=True)["state_dict"]) == bare
    with pytest.raises(ValueError, match=r"'submodel.weight' -> 'model.el.weight'"):
        save_zoo_checkpoint(Sub(), tmp_path, dataset="imagenet", threat_model="Linf", model_id="Y")


def test_save_zoo_checkpoint_validates_names(tmp_path) -> None:
    with pytest.raises(UserError, match="model id"):
        save_zoo_checkpoint(TinyZooNet(), tmp_path, dataset="cifar10", threat_model="Linf", model_id="a b")
    with pytest.raises(UserError, match="threat_model"):
        save_zoo_checkpoint(TinyZooNet(), tmp_path, dataset="cifar10", threat_model="L1", model_id="X")
