"""The leaderboard entries against real RobustBench files (``tests/fixtures/robustbench_model_info``).

The validator must accept every file RobustBench publishes, and what this project writes must look like
what most of them look like, byte for byte.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.model_info import (
    KEY_ORDER,
    METADATA_KEYS,
    PERCENT_EXTRA_KEYS,
    build_model_info,
    format_model_info,
    validate_model_info,
)
from robustbench_kd.zoo.leaderboard_additional_data import LEADERBOARD_ADDITIONAL_DATA, leaderboard_additional_data

FIXTURES = Path(__file__).parent / "fixtures" / "robustbench_model_info"
FILES = sorted(FIXTURES.glob("*/*/*.json"))
IDS = [path.relative_to(FIXTURES).with_suffix("").as_posix() for path in FILES]
PERCENT_KEYS = ("clean_acc", "reported", "autoattack_acc", *PERCENT_EXTRA_KEYS)

# The fixtures that do not follow the files' common format, and how they differ. Every other fixture must
# come out of format_model_info byte for byte.
NOT_IN_COMMON_FORMAT = {
    "cifar10/L2/Rony2019Decoupling": ["escaped non-ASCII"],
    "cifar10/Linf/Bai2024MixedNUTS": ["no trailing newline"],
    "cifar10/Linf/Chen2020Adversarial": ["key order"],
    "cifar10/Linf/Chen2021LTD_WRN34_10": ["key order"],
    "cifar10/Linf/Cui2023Decoupled_WRN-28-10": ["no trailing newline", "key order"],
    "cifar10/Linf/Sehwag2021Proxy_ResNest152": ["no trailing newline", "indented by 4"],
    "cifar10/Linf/Wang2023Better_WRN-70-16": ["no trailing newline"],
    "cifar10/Linf/Xiao2020Enhancing": ["escaped non-ASCII", "key order"],
    "cifar10/Linf/Zhang2019Theoretically": ["escaped non-ASCII", "key order"],
    "cifar10/corruptions/Calian2021Defending": ["no trailing newline"],
    "cifar10/corruptions/Diffenderfer2021Winning_LRR_CARD_Deck": ["no trailing newline"],
    "cifar10/corruptions/Modas2021PRIMEResNet18": ["no trailing newline"],
    "cifar100/Linf/Bai2024MixedNUTS": ["no trailing newline"],
    "cifar100/Linf/Cui2020Learnable_34_10_LBGAT6": ["no trailing newline", "escaped non-ASCII"],
    "cifar100/Linf/Sehwag2021Proxy": ["no trailing newline", "indented by 4"],
    "cifar100/corruptions/Modas2021PRIMEResNet18": ["no trailing newline"],
    "imagenet/Linf/Bai2024MixedNUTS": ["no trailing newline"],
    "imagenet/Linf/Wong2020Fast": ["key order"],
    "imagenet/corruptions/AlexNet": ["no trailing newline", "key order"],
    "imagenet/corruptions/Erichson2022NoisyMix_new": ["no trailing newline", "key order"],
    "imagenet/corruptions/Geirhos2018_SIN": ["no trailing newline", "key order"],
    "imagenet/corruptions/Standard_R50": ["no trailing newline"],
}


def _raw(path: Path) -> str:
    return path.read_bytes().decode("utf-8")


def _entries() -> list[tuple[str, str, dict[str, Any]]]:
    return [(ident, _raw(path), json.loads(_raw(path))) for ident, path in zip(IDS, FILES, strict=True)]


def _format_deviations(raw: str, info: dict[str, Any]) -> list[str]:
    """How a file's text departs from the common format, judged on the text itself."""
    found = []
    if not raw.endswith("}\n"):
        found.append("no trailing newline")
    if re.search(r'^ {3,}"', raw, re.MULTILINE):
        found.append("indented by 4")
    if "\\u" in raw:
        found.append("escaped non-ASCII")
    if list(info) != [key for key in KEY_ORDER if key in info]:
        found.append("key order")
    return found


def test_the_fixtures_cover_the_leaderboards_and_their_oddities() -> None:
    assert len(FILES) >= 30 and (FIXTURES / "README.md").is_file()
    boards = {tuple(ident.split("/")[:2]) for ident in IDS}
    assert boards == {
        ("cifar10", "Linf"),
        ("cifar10", "L2"),
        ("cifar10", "corruptions"),
        ("cifar100", "Linf"),
        ("cifar100", "corruptions"),
        ("imagenet", "Linf"),
        ("imagenet", "corruptions"),
    }
    entries = [info for _, _, info in _entries()]
    assert sum(info["reported"] == "" for info in entries) >= 5
    assert any(info["reported"] is None for info in entries) and any(info["reported"] == "null" for info in entries)
    assert any(info.get("unreliable") is True for info in entries)
    assert any("unreliable" not in info and "autoattack_acc" in info for info in entries)
    assert {type(info.get("footnote", 0)) for info in entries} == {str, type(None), int}
    assert any(info.get("footnote") == "" for info in entries)
    assert sum("external" in info for info in entries) >= 5
    assert any("corruptions_acc_3d" in info for info in entries)
    assert {info["number_forward_passes"] for info in entries} >= {1, 2, 3, 6}


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_validator_accepts_every_real_file(path: Path) -> None:
    validate_model_info(json.loads(_raw(path)))


@pytest.mark.parametrize("key", METADATA_KEYS)
def test_validator_refuses_real_files_with_null_metadata(key: str) -> None:
    for _, _, info in _entries():
        with pytest.raises(UserError, match=rf"'{key}' is null"):
            validate_model_info(dict(info, **{key: None}))
        validate_model_info(dict(info, **{key: None}), draft=True)


def test_key_order_agrees_with_the_majority_of_the_files() -> None:
    """For every pair of keys found together, KEY_ORDER puts them as most fixtures do."""
    before: Counter[tuple[str, str]] = Counter()
    for _, _, info in _entries():
        assert set(info) <= set(KEY_ORDER)
        before.update(itertools.combinations(info, 2))
    rank = {key: i for i, key in enumerate(KEY_ORDER)}
    for first, second in {tuple(sorted(pair, key=rank.__getitem__)) for pair in before}:
        assert before[first, second] > before[second, first], (first, second)


def test_percentages_have_two_decimals_in_most_files() -> None:
    decimals: Counter[int] = Counter()
    for _, _, info in _entries():
        for key in PERCENT_KEYS:
            if isinstance(info.get(key), str) and re.fullmatch(r"\d+(\.\d+)?", info[key]):
                decimals[len(info[key].partition(".")[2])] += 1
    # The sample leans towards the odd files on purpose; over all 236 files the share is higher still.
    assert decimals[2] >= 0.8 * sum(decimals.values())


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_our_serialisation_reproduces_files_in_the_common_format(path: Path) -> None:
    ident = path.relative_to(FIXTURES).with_suffix("").as_posix()
    raw = _raw(path)
    info = json.loads(raw)
    deviations = _format_deviations(raw, info)
    assert deviations == NOT_IN_COMMON_FORMAT.get(ident, [])
    if not deviations:
        assert format_model_info(info).encode("utf-8") == path.read_bytes()
    assert json.loads(format_model_info(info)) == info  # the content never changes


def test_most_fixtures_are_in_the_common_format() -> None:
    assert len(FILES) - len(NOT_IN_COMMON_FORMAT) > len(FILES) // 2
    assert set(NOT_IN_COMMON_FORMAT) <= set(IDS)
    # Raw UTF-8 is among those reproduced.
    assert "imagenet/Linf/RodriguezMunoz2024Characterizing_Swin-B" not in NOT_IN_COMMON_FORMAT
    assert "ñ" in _raw(FIXTURES / "imagenet/Linf/RodriguezMunoz2024Characterizing_Swin-B.json")


def _rebuild(ident: str, info: dict[str, Any]) -> dict[str, Any] | None:
    """build_model_info's entry for the values of ``info``, or None when it holds values the writer never writes."""
    dataset, threat, _ = ident.split("/")
    corruptions = threat == "corruptions"
    robust_key = "corruptions_acc" if corruptions else "autoattack_acc"
    standard = {*KEY_ORDER[:11], robust_key, "footnote", "unreliable"}
    percents = [info[key] for key in PERCENT_KEYS if info.get(key) not in ("", None)]
    if (
        not info["authors"]  # the writer refuses empty authors (only RobustBench's baselines have them)
        or any(not re.fullmatch(r"\d+\.\d\d", value) for value in percents)  # written with two decimals
        or info["reported"] in (None, "null")  # written as ""
        or info.get("footnote", "x") in ("", None)  # left out
        or (corruptions and (info["eps"] is not None or "unreliable" in info))
        or (not corruptions and "unreliable" not in info)
        or set(info) - standard - {"external"}
    ):
        return None
    return build_model_info(
        dataset=dataset,
        threat_model=threat,
        eps=info["eps"],
        clean_acc=float(info["clean_acc"]) / 100,
        autoattack_acc=float(info[robust_key]) / 100,
        name=info["name"],
        authors=info["authors"],
        venue=info["venue"],
        link=info["link"],
        architecture=info["architecture"],
        additional_data=info["additional_data"],
        number_forward_passes=info["number_forward_passes"],
        reported=float(info["reported"]) / 100 if info["reported"] else None,
        footnote=info.get("footnote"),
        unreliable=info.get("unreliable", False),
        extra={"external": float(info["external"]) / 100} if "external" in info else None,
    )


def test_what_we_write_for_a_comparable_entry_matches_the_files_byte_for_byte() -> None:
    compared = 0
    for ident, raw, info in _entries():
        if ident in NOT_IN_COMMON_FORMAT:
            continue
        built = _rebuild(ident, info)
        if built is None:
            continue
        assert format_model_info(built) == raw, ident
        compared += 1
    assert compared >= 12


def test_additional_data_table_agrees_with_the_files() -> None:
    assert len(LEADERBOARD_ADDITIONAL_DATA) == 236
    for ident, _, info in _entries():
        assert LEADERBOARD_ADDITIONAL_DATA[ident] is info["additional_data"], ident
        dataset, threat, model_id = ident.split("/")
        assert leaderboard_additional_data(dataset, threat, model_id) is info["additional_data"]
    assert leaderboard_additional_data("imagenet", "corruptions_3d", "AlexNet") is False
    assert leaderboard_additional_data("cifar10", "Linf", "NoSuchModel") is None
