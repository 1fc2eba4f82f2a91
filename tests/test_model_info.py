"""Leaderboard JSON entries, atomic writes and model-zoo checkpoints."""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from robustbench_kd.config import RunConfig, config_from_mapping
from robustbench_kd.errors import UserError
from robustbench_kd.evaluation import (
    LEADERBOARD_KEYS,
    build_model_info,
    save_zoo_checkpoint,
    validate_model_info,
    write_model_info,
)
from robustbench_kd.evaluation.final_report import write_model_info_entry
from robustbench_kd.evaluation.model_info import (
    KEY_ORDER,
    compose_footnote,
    format_model_info,
    resolve_additional_data,
)
from robustbench_kd.storage.atomic import atomic_torch_save, atomic_write_text
from robustbench_kd.submission.section import ModelInfoSection
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
    # The file has "62.5": one of the few percentages not written with two decimals.
    assert info == dict(CARMON, reported="62.50")
    assert list(info) == list(CARMON)  # key order too
    assert _type_signature(info) == _type_signature(CARMON)
    assert list(info) == [k for k in LEADERBOARD_KEYS if k in info]
    validate_model_info(CARMON)


def test_build_variants_l2_corruptions_footnote_extra() -> None:
    l2 = _carmon(threat_model="L2", eps="0.5", footnote="Trained with robustbench_kd.")
    assert l2["eps"] == "0.5"
    assert list(l2)[-3:] == ["autoattack_acc", "footnote", "unreliable"]  # footnote before unreliable
    assert l2["footnote"] == "Trained with robustbench_kd."

    # Corruption entries: corruptions_acc, and no unreliable key unless it is true.
    corr = _carmon(threat_model="corruptions", eps=None, autoattack_acc=0.8)
    assert corr["eps"] is None and corr["corruptions_acc"] == "80.00"
    assert "autoattack_acc" not in corr and "unreliable" not in corr
    assert _carmon(threat_model="corruptions", eps=None, autoattack_acc=0.8, unreliable=True)["unreliable"] is True

    extra = _carmon(footnote="x", extra={"robustbench_kd": {"aa_seed": 0}, "external": 0.5811})
    assert extra["external"] == "58.11" and extra["robustbench_kd"] == {"aa_seed": 0}
    assert list(extra)[-5:] == ["autoattack_acc", "external", "footnote", "unreliable", "robustbench_kd"]

    # Two decimals, always: "93.60", not "93.6".
    assert _carmon(clean_acc=0.936)["clean_acc"] == "93.60"
    assert _carmon(clean_acc=0.123456)["clean_acc"] == "12.35"
    assert _carmon(clean_acc=1.0)["clean_acc"] == "100.00"
    assert _carmon(autoattack_acc=0.0)["autoattack_acc"] == "0.00"
    # No reported number: "", as RobustBench's files write it.
    assert _carmon(reported=None)["reported"] == ""


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
        ({"name": ""}, "name is empty"),
        ({"authors": "  "}, "authors is empty"),
        ({"venue": 2024}, "venue must be a string"),
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
        ("name", 3, "'name' must be a string"),
        ("footnote", ["a"], "footnote"),
        ("reported", "n/a", "reported"),
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


@pytest.mark.parametrize("key", ["link", "name", "authors", "venue", "architecture"])
def test_validate_refuses_null_paper_metadata_in_one_line(key: str) -> None:
    # RobustBench's generators print these fields or call str methods on them: null shows "None" or crashes.
    with pytest.raises(UserError, match=rf"model info '{key}' is null, but ") as raised:
        validate_model_info(dict(CARMON, **{key: None}))
    assert "\n" not in str(raised.value)
    validate_model_info(dict(CARMON, **{key: None}), draft=True)  # a draft may leave them unset


@pytest.mark.parametrize("key", ["link", "name", "venue", "architecture"])
@pytest.mark.parametrize("value", ["", "  "])
def test_validate_refuses_empty_paper_metadata(key: str, value: str) -> None:
    for draft in (False, True):
        with pytest.raises(UserError, match=rf"model info '{key}' is empty, but "):
            validate_model_info(dict(CARMON, **{key: value}), draft=draft)


def test_validate_accepts_what_robustbench_files_hold() -> None:
    # Empty authors (RobustBench's own baselines) and a paper without a reported number.
    validate_model_info(dict(CARMON, authors=""))
    for reported in ("", None, "null", "62.5"):
        validate_model_info(dict(CARMON, reported=reported))
    validate_model_info({k: v for k, v in CARMON.items() if k != "unreliable"})


def test_build_leaves_unknown_metadata_null_as_a_draft() -> None:
    info = build_model_info(dataset="cifar10", threat_model="L2", eps=0.5, clean_acc=0.9, autoattack_acc=0.5)
    assert [info[k] for k in ("link", "name", "authors", "venue", "architecture")] == [None] * 5
    validate_model_info(info, draft=True)
    with pytest.raises(UserError, match="'link' is null"):
        validate_model_info(info)


# ------------------------------------------------------------------------------------- writing


def test_write_model_info_layout_and_content(tmp_path) -> None:
    info = _carmon()
    path = write_model_info(tmp_path, info, dataset="cifar10", threat_model="Linf", model_id="Kd2026Tiny_R18")
    assert path == tmp_path / "model_info" / "cifar10" / "Linf" / "Kd2026Tiny_R18.json"
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == dict(CARMON, reported="62.50")
    assert text.startswith('{\n  "link": ')  # indent 2, key order kept
    assert text.endswith('"unreliable": false\n}\n')  # one trailing newline
    assert text == format_model_info(info)
    assert sorted(os.listdir(path.parent)) == ["Kd2026Tiny_R18.json"]  # no temp files left


def test_write_model_info_writes_utf8_as_is_in_dominant_key_order(tmp_path) -> None:
    info = _carmon(authors="Jérôme Rony, Luiz G. Hafemann", footnote="Uses ε ≈ 7.9/255.")
    # A hook may add keys in any order; the file has them in the leaderboard's order.
    shuffled = {"footnote": info["footnote"], **{k: v for k, v in info.items() if k != "footnote"}}
    path = write_model_info(tmp_path, shuffled, dataset="cifar10", threat_model="Linf", model_id="Utf2026")
    raw = path.read_bytes()
    assert "Jérôme Rony".encode() in raw and b"\\u" not in raw
    assert list(json.loads(raw)) == [k for k in KEY_ORDER if k in info]


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


# ------------------------------------------------------------------ [model_info] options and inheritance


def test_model_info_section_options() -> None:
    section = config_from_mapping({"model_info": {"number_forward_passes": 2}}).model_info
    assert section.number_forward_passes == 2
    assert section.additional_data is None  # unset, not false: it may be inherited
    assert ModelInfoSection().number_forward_passes == 1
    explicit = config_from_mapping({"model_info": {"additional_data": False}}).model_info
    assert explicit.additional_data is False
    # The saved config keeps "unset" unset.
    assert config_from_mapping(RunConfig().to_dict()).model_info.additional_data is None
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(UserError, match="number_forward_passes") as raised:
            config_from_mapping({"model_info": {"number_forward_passes": bad}})
        assert "\n" not in str(raised.value)


class _Result:
    def __init__(self, flags: tuple[str, ...] = ()) -> None:
        self.autoattack_flags = list(flags)
        self.accuracy = {"clean": 0.9, "autoattack": 0.5}


def _entry(tmp_path, meta: ModelInfoSection, teachers: dict | None = None, **kwargs: object) -> dict:
    run = SimpleNamespace(config=SimpleNamespace(teachers=teachers or {}))
    path = write_model_info_entry(
        _Result(**kwargs.pop("result", {})),  # type: ignore[arg-type]
        model_id="Kd2026Entry",
        dataset="cifar10",
        norm="Linf",
        eps=8 / 255,
        out_dir=tmp_path,
        meta=meta,
        architecture="ResNet-18",
        host=None,
        run=run,
        **kwargs,  # type: ignore[arg-type]
    )
    return json.loads(path.read_text(encoding="utf-8"))


def test_number_forward_passes_reaches_the_file(tmp_path) -> None:
    assert _entry(tmp_path, ModelInfoSection())["number_forward_passes"] == 1
    assert _entry(tmp_path, ModelInfoSection(number_forward_passes=2))["number_forward_passes"] == 2
    info = _entry(tmp_path, ModelInfoSection(number_forward_passes=2), number_forward_passes=3)
    assert info["number_forward_passes"] == 3  # a caller's explicit value wins


CARMON_SPEC = "robustbench:cifar10/Linf/Carmon2019Unlabeled"


def test_additional_data_is_inherited_from_a_zoo_teacher(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="robustbench_kd.evaluation.model_info"):
        info = _entry(tmp_path, ModelInfoSection(), {"robust": CARMON_SPEC})
    assert info["additional_data"] is True
    inherited = [r.getMessage() for r in caplog.records if "inherited" in r.getMessage()]
    assert len(inherited) == 1 and CARMON_SPEC in inherited[0] and "Kd2026Entry" in inherited[0]
    # Set explicitly, the run's value wins, either way, without a word.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="robustbench_kd.evaluation.model_info"):
        assert (
            _entry(tmp_path, ModelInfoSection(additional_data=False), {"robust": CARMON_SPEC})["additional_data"]
            is False
        )
    assert not caplog.records
    assert _entry(tmp_path, ModelInfoSection(additional_data=True))["additional_data"] is True


@pytest.mark.parametrize(
    ("teachers", "expected"),
    [
        ({}, False),
        ({"robust": "robustbench:cifar10/Linf/Rice2020Overfitting"}, False),
        ({"robust": "file:teacher.pt"}, False),
        ({"robust": ["robustbench:cifar10/Linf/Rice2020Overfitting", CARMON_SPEC]}, True),
        ({"robust": {"specs": [CARMON_SPEC], "weights": [1.0]}, "natural": "file:n.pt"}, True),
        ({"robust": "robustbench:cifar10/Linf/Carmon2019Unlabeled?sha256=" + "0" * 64}, True),
        ({"robust": "robustbench:cifar100/Linf/Gowal2020Uncovering_extra"}, True),
        ({"robust": "robustbench:imagenet/corruptions_3d/Standard_R50"}, False),
    ],
)
def test_resolve_additional_data(teachers: dict, expected: bool) -> None:
    assert resolve_additional_data(None, teachers) is expected
    assert resolve_additional_data(not expected, teachers) is (not expected)


def test_resolve_additional_data_warns_about_unknown_zoo_teachers(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="robustbench_kd.evaluation.model_info"):
        assert resolve_additional_data(None, {"robust": "robustbench:cifar10/Linf/NotOnTheBoard2030"}) is False
    assert len(caplog.records) == 1 and "NotOnTheBoard2030" in caplog.records[0].getMessage()


# ------------------------------------------------------------------------------------------ footnotes


ZERO_GRADIENT = "there are 3 points with zero gradient!"  # AutoAttack's wording
SQUARE = "Square Attack has decreased the robust accuracy of 0.5%."
UNRELIABLE = "Potentially unreliable AutoAttack evaluation: "


def test_footnote_is_one_short_sentence() -> None:
    failed = {"reliable": False, "checks": {"gradients": False, "transfer": False, "monotone": True, "x": None}}
    assert compose_footnote(None, sanity=failed) == (
        UNRELIABLE + "the sanity checks found zero or non-finite input gradients and a transfer attack beating "
        "the white-box attacks."
    )
    # A merged verdict: each shard's failed checks, AutoAttack's flags in its own terms, each named once.
    merged = {
        "reliable": False,
        "shards": [
            {"checks": {"autoattack": False}, "autoattack_flags": [ZERO_GRADIENT] * 4},
            {"checks": {"autoattack": False, "single_step": False}, "autoattack_flags": [ZERO_GRADIENT]},
        ],
    }
    assert compose_footnote(None, sanity=merged) == (
        UNRELIABLE + "the sanity checks found FGSM beating PGD and zero input gradients."
    )
    # Many findings: three are named, the others counted.
    many = {
        "reliable": False,
        "checks": dict.fromkeys(("gradients", "monotone", "unbounded", "single_step", "autoattack"), False),
        "autoattack_flags": [ZERO_GRADIENT, SQUARE],
    }
    note = compose_footnote(None, sanity=many)
    assert note == (
        UNRELIABLE + "the sanity checks found zero or non-finite input gradients, PGD accuracy rising with eps, "
        "accuracy surviving an unbounded attack and 2 other problems."
    )
    assert note is not None and len(note) < 200
    flags = [ZERO_GRADIENT] * 9  # repeated per target class
    assert compose_footnote(None, autoattack_flags=flags) == (
        UNRELIABLE + "AutoAttack's own checks found zero input gradients."
    )
    # The run's own footnote comes first, as a sentence of its own.
    assert compose_footnote("Uses 1M synthetic images", autoattack_flags=[*flags, SQUARE]) == (
        "Uses 1M synthetic images. "
        + UNRELIABLE
        + "AutoAttack's own checks found zero input gradients and the black-box Square attack beat the "
        "white-box attacks."
    )
    assert compose_footnote("Own note.", sanity={"reliable": True, "checks": {}}) == "Own note."
    assert compose_footnote(None) is None
    assert compose_footnote(None, sanity={"reliable": False, "checks": {"autoattack": False}}) == (
        UNRELIABLE + "the sanity checks found warnings from AutoAttack's own checks."
    )


def test_every_sanity_check_has_a_finding_for_the_footnote() -> None:
    from robustbench_kd.evaluation.model_info import _CHECK_FINDINGS
    from robustbench_kd.evaluation.sanity import SANITY_CHECKS

    assert set(_CHECK_FINDINGS) == set(SANITY_CHECKS)


def test_entry_footnote_from_flags_and_sanity(tmp_path) -> None:
    flags = (ZERO_GRADIENT,) * 5
    info = _entry(tmp_path, ModelInfoSection(footnote="Distilled."), result={"flags": flags})
    assert info["unreliable"] is True
    assert info["footnote"] == "Distilled. " + UNRELIABLE + "AutoAttack's own checks found zero input gradients."
    verdict = {
        "reliable": False,
        "reasons": ["a long reason " * 20],
        "checks": {"gradients": False, "autoattack": False},
        "autoattack_flags": list(flags),
    }
    sanity = SimpleNamespace(reliable=False, reasons=verdict["reasons"], to_dict=lambda: verdict)
    info = _entry(tmp_path, ModelInfoSection(), result={"flags": flags}, sanity=sanity)
    assert info["unreliable"] is True and "a long reason" not in info["footnote"]
    assert info["footnote"] == (UNRELIABLE + "the sanity checks found zero or non-finite input gradients.")
    assert "footnote" not in _entry(tmp_path, ModelInfoSection())


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
