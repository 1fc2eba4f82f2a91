"""RobustBench leaderboard entries (``model_info/<dataset>/<threat_model>/<model_id>.json``).

The files follow the hand-curated leaderboard files of RobustBench (the JSON files under ``model_info/``
in RobustBench's repository), not the bare file ``benchmark(to_disk=True)`` writes: accuracies are
percentage *strings* rounded to two decimals exactly like robustbench's ``update_json``
(``str(round(acc * 100, 2))``), ``eps`` is the string the leaderboard uses (``"8/255"``, ``"0.5"``;
``null`` for corruptions), booleans for ``additional_data`` / ``unreliable`` and an integer
``number_forward_passes``.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_text
from robustbench_kd.threat import format_eps, parse_number, validate_eps
from robustbench_kd.zoo.names import validate_dataset_name, validate_model_id

__all__ = [
    "LEADERBOARD_KEYS",
    "THREAT_MODELS",
    "build_model_info",
    "model_info_path",
    "validate_model_info",
    "write_model_info",
]

# Key order of the leaderboard files. For corruptions the accuracy key is ``corruptions_acc``
# instead of ``autoattack_acc`` (same position); ``footnote`` is written only when there is one,
# as in the hand-curated files.
LEADERBOARD_KEYS = (
    "link",
    "name",
    "authors",
    "additional_data",
    "number_forward_passes",
    "dataset",
    "venue",
    "architecture",
    "eps",
    "clean_acc",
    "reported",
    "autoattack_acc",
    "unreliable",
    "footnote",
)
# Present in every one of the 236 leaderboard files.
_ALWAYS_KEYS = LEADERBOARD_KEYS[:11]
_OPTIONAL_STR_KEYS = ("link", "name", "authors", "venue", "architecture")
# Optional leaderboard fields that hold percentages (``external``: best adaptive/external attack).
PERCENT_EXTRA_KEYS = (
    "external",
    "corruptions_acc",
    "corruptions_acc_3d",
    "corruptions_mce",
    "corruptions_mce_3d",
)
THREAT_MODELS = ("Linf", "L2", "corruptions")
_KNOWN_KEYS = (*LEADERBOARD_KEYS, *PERCENT_EXTRA_KEYS)


def _check_threat_model(threat_model: object) -> str:
    if threat_model not in THREAT_MODELS:
        raise UserError(f"threat_model must be one of {', '.join(THREAT_MODELS)}, got {threat_model!r}")
    return threat_model  # type: ignore[return-value]


def _percent(value: object, *, what: str) -> str:
    # Accuracies come in as fractions, as benchmark() returns them; a value > 1 is almost surely a
    # percentage passed by mistake, and would silently become e.g. "8969.0".
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a fraction in [0,1], got {value!r}")
    if not (0.0 <= float(value) <= 1.0):
        raise UserError(f"{what} must be a fraction in [0,1] (e.g. 0.5953 for 59.53%), got {value!r}")
    return str(round(float(value) * 100, 2))


def _percent_or_string(value: object, *, what: str) -> str:
    if isinstance(value, str):
        _check_percent_string(value, what=what)
        return value
    return _percent(value, what=what)


def _check_percent_string(value: object, *, what: str) -> None:
    if not isinstance(value, str):
        raise UserError(f"{what} must be a percentage string such as '59.53', got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{what} must be a percentage string such as '59.53', got {value!r}") from None
    if not (0.0 <= number <= 100.0):  # false for NaN too
        raise UserError(f"{what} must be a percentage between 0 and 100, got {value!r}")


def build_model_info(
    *,
    dataset: str,
    threat_model: str,
    eps: float | str | None,
    clean_acc: float,
    autoattack_acc: float,
    name: str | None = None,
    authors: str | Sequence[str] | None = None,
    venue: str | None = None,
    link: str | None = None,
    architecture: str | None = None,
    additional_data: bool = False,
    number_forward_passes: int = 1,
    reported: float | None = None,
    footnote: str | None = None,
    unreliable: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a leaderboard entry with the key set, key order and value types of RobustBench's files.

    Args:
        dataset: e.g. ``"cifar10"``. threat_model: ``"Linf"``, ``"L2"`` or ``"corruptions"``.
        eps: the radius (number or ``"8/255"``), written as ``"8/255"`` / ``"0.5"``; must be None
            for corruptions.
        clean_acc, autoattack_acc: fractions in [0,1], written as percentage strings. For
            corruptions ``autoattack_acc`` is the corruption accuracy and is written as
            ``corruptions_acc``, the key the leaderboard reads there.
        reported: the robust accuracy claimed in the paper, as a fraction, or None.
        authors: a string, or a list joined with ", ".
        additional_data: whether training used data beyond the dataset's training set.
        number_forward_passes: forward passes per prediction (1 for a single student).
        footnote: free text; the key is omitted when None.
        unreliable: mark an AutoAttack number known to be unreliable (e.g. AA flagged masking).
        extra: further keys appended after the standard ones. ``external`` and the
            ``corruptions_*`` keys take fractions (converted to percentage strings) or percentage
            strings; other keys must be JSON-serialisable and may not shadow a standard key.

    Returns:
        the entry as an ordered dict, already checked by :func:`validate_model_info`.
    """
    validate_dataset_name(dataset)
    threat = _check_threat_model(threat_model)
    if threat == "corruptions":
        if eps is not None:
            raise UserError(f"eps must be None for the corruptions threat model, got {eps!r}")
        eps_str = None
    else:
        if eps is None:
            raise UserError(f"eps is required for the {threat} threat model")
        eps_value = parse_number(eps, what="eps")
        validate_eps(eps_value, threat, what="eps")
        if eps_value <= 0:
            raise UserError(f"eps must be positive for the {threat} threat model, got {eps_value}")
        eps_str = format_eps(eps_value)
    if not isinstance(additional_data, bool):
        raise UserError(f"additional_data must be True or False, got {additional_data!r}")
    if not isinstance(unreliable, bool):
        raise UserError(f"unreliable must be True or False, got {unreliable!r}")
    if (
        isinstance(number_forward_passes, bool)
        or not isinstance(number_forward_passes, int)
        or number_forward_passes < 1
    ):
        raise UserError(f"number_forward_passes must be a positive integer, got {number_forward_passes!r}")
    if authors is not None and not isinstance(authors, str):
        authors = ", ".join(str(a) for a in authors)
    for key, value in (("name", name), ("venue", venue), ("link", link), ("architecture", architecture)):
        if value is not None and not isinstance(value, str):
            raise UserError(f"{key} must be a string or None, got {value!r}")
    if footnote is not None and not isinstance(footnote, str):
        raise UserError(f"footnote must be a string or None, got {footnote!r}")

    robust_key = "corruptions_acc" if threat == "corruptions" else "autoattack_acc"
    info: dict[str, Any] = {
        "link": link,
        "name": name,
        "authors": authors,
        "additional_data": additional_data,
        "number_forward_passes": number_forward_passes,
        "dataset": dataset,
        "venue": venue,
        "architecture": architecture,
        "eps": eps_str,
        "clean_acc": _percent(clean_acc, what="clean_acc"),
        "reported": None if reported is None else _percent(reported, what="reported"),
        robust_key: _percent(autoattack_acc, what=robust_key),
        "unreliable": unreliable,
    }
    if footnote is not None:
        info["footnote"] = footnote
    for key, value in (extra or {}).items():
        if key in info or key in LEADERBOARD_KEYS:
            raise UserError(f"extra key {key!r} would shadow a standard leaderboard field; pass it as an argument")
        info[key] = _percent_or_string(value, what=key) if key in PERCENT_EXTRA_KEYS else value
    validate_model_info(info)
    return info


def validate_model_info(info: Mapping[str, Any]) -> None:
    """Raise ValueError (UserError) unless ``info`` has the leaderboard's keys and value types.

    Required: the 11 keys every leaderboard file has, plus ``autoattack_acc`` or
    ``corruptions_acc``. Optional: ``unreliable`` (bool), ``footnote`` (str or null), ``external``
    and the ``corruptions_*`` percentages. Other keys are allowed (the leaderboard tools ignore
    them) if JSON-serialisable, unless they look like a misspelt standard key.
    """
    if not isinstance(info, Mapping):
        raise UserError(f"model info must be a mapping, got {type(info).__name__}")
    missing = [key for key in _ALWAYS_KEYS if key not in info]
    if "autoattack_acc" not in info and "corruptions_acc" not in info:
        missing.append("autoattack_acc (or corruptions_acc)")
    if missing:
        raise UserError(f"model info is missing key(s): {', '.join(missing)}")
    for key in info:
        if not isinstance(key, str):
            raise UserError(f"model info keys must be strings, got {key!r}")
        if key not in _KNOWN_KEYS:
            near = difflib.get_close_matches(key, _KNOWN_KEYS, n=1, cutoff=0.8)
            if near:
                raise UserError(f"unexpected model info key {key!r} (did you mean {near[0]!r}?)")

    for key in _OPTIONAL_STR_KEYS:
        if info[key] is not None and not isinstance(info[key], str):
            raise UserError(f"model info {key!r} must be a string or null, got {info[key]!r}")
    for key in ("additional_data", "unreliable"):
        if key in info and not isinstance(info[key], bool):
            raise UserError(f"model info {key!r} must be true or false, got {info[key]!r}")
    passes = info["number_forward_passes"]
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise UserError(f"model info 'number_forward_passes' must be a positive integer, got {passes!r}")
    if not isinstance(info["dataset"], str) or not info["dataset"]:
        raise UserError(f"model info 'dataset' must be a non-empty string, got {info['dataset']!r}")
    eps = info["eps"]
    if eps is None:
        if "autoattack_acc" in info:
            raise UserError("model info 'eps' is null, which only a corruptions entry may have")
    else:
        if not isinstance(eps, str):
            raise UserError(f"model info 'eps' must be a string such as '8/255' or '0.5', got {eps!r}")
        eps_value = parse_number(eps, what="model info 'eps'")
        if not (math.isfinite(eps_value) and eps_value > 0):
            raise UserError(f"model info 'eps' must be a positive radius, got {eps!r}")
    _check_percent_string(info["clean_acc"], what="model info 'clean_acc'")
    if info["reported"] is not None:
        _check_percent_string(info["reported"], what="model info 'reported'")
    for key in ("autoattack_acc", *PERCENT_EXTRA_KEYS):
        if key in info:
            _check_percent_string(info[key], what=f"model info {key!r}")
    if "footnote" in info and info["footnote"] is not None and not isinstance(info["footnote"], str):
        raise UserError(f"model info 'footnote' must be a string or null, got {info['footnote']!r}")
    try:
        json.dumps(info, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model info is not JSON-serialisable: {exc}") from None


def model_info_path(out_dir: str | os.PathLike[str], *, dataset: str, threat_model: str, model_id: str) -> Path:
    """``out_dir/model_info/<dataset>/<threat_model>/<model_id>.json`` (arguments validated)."""
    validate_dataset_name(dataset)
    _check_threat_model(threat_model)
    validate_model_id(model_id)
    return Path(out_dir) / "model_info" / dataset / threat_model / f"{model_id}.json"


def write_model_info(
    out_dir: str | os.PathLike[str],
    info: Mapping[str, Any],
    *,
    dataset: str,
    threat_model: str,
    model_id: str,
) -> Path:
    """Validate ``info`` and write it to ``out_dir/model_info/<dataset>/<threat_model>/<model_id>.json``.

    The file is written atomically (temporary file in the same directory, fsync, ``os.replace``),
    JSON with indent 2, replacing any previous file as a whole (unlike robustbench's
    ``update_json``, nothing is merged). ``dataset`` must match ``info["dataset"]`` and the
    threat model must match the entry (``corruptions`` <-> ``corruptions_acc`` and null eps).
    Returns the path written.
    """
    path = model_info_path(out_dir, dataset=dataset, threat_model=threat_model, model_id=model_id)
    validate_model_info(info)
    if info["dataset"] != dataset:
        raise UserError(f"info['dataset'] is {info['dataset']!r} but the file goes under dataset {dataset!r}")
    is_corruptions = "autoattack_acc" not in info
    if is_corruptions != (threat_model == "corruptions"):
        raise UserError(
            f"threat_model {threat_model!r} does not match the entry, which has "
            f"{'corruptions_acc' if is_corruptions else 'autoattack_acc'}"
        )
    atomic_write_text(path, json.dumps(dict(info), indent=2) + "\n")
    return path
