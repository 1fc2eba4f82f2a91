"""RobustBench leaderboard entries (``model_info/<dataset>/<threat_model>/<model_id>.json``).

The files follow the hand-curated leaderboard files of RobustBench (the JSON files under ``model_info/``
in RobustBench's repository), not the bare file ``benchmark(to_disk=True)`` writes. Where those files
disagree among themselves, this module writes what most of them do (measured over the 236 files of
RobustBench's repository at commit 78fcc9e; a sample is in ``tests/fixtures/robustbench_model_info``):

* accuracies are percentage strings with two decimals, ``"93.60"`` (235 of 236 ``clean_acc`` values,
  185 of 188 ``autoattack_acc``; robustbench's own ``update_json`` writes ``str(round(x, 2))``, i.e.
  ``"93.6"``, which only a handful of files show);
* keys in :data:`KEY_ORDER`: the order that agrees with the majority of the files for every pair of keys
  (e.g. ``footnote`` before ``unreliable`` in 81 of 85 files with both, after ``autoattack_acc`` in 66 of
  103); a paper that reports no robust accuracy has ``"reported": ""`` (20 files; one has null);
* JSON indented by two spaces (234 files), ``", "``/``": "`` separators, one trailing newline (156 files,
  the rest have none), UTF-8 text as is (every file added since 2022; eleven older files escape it as
  ``\\u00e9``, ten of them in the same copied footnote, which :func:`json.loads` reads the same);
* ``eps`` is the string the leaderboard uses (``"8/255"``, ``"0.5"``; null for corruptions), booleans
  for ``additional_data`` / ``unreliable`` and an integer ``number_forward_passes``; corruption entries
  have no ``unreliable`` key (none of the 52 has one).

:func:`validate_model_info` accepts every one of those files and refuses what RobustBench's leaderboard,
BibTeX, LaTeX and HTML generators cannot use:
a null ``link``, ``name``, ``authors``, ``venue`` or ``architecture`` (they print ``None`` or crash on
``None.replace``/``None.split``), and an empty one except ``authors``, which RobustBench's own baseline
entries leave empty.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_text
from robustbench_kd.threat import format_eps, parse_number, validate_eps
from robustbench_kd.zoo.leaderboard_additional_data import leaderboard_additional_data
from robustbench_kd.zoo.names import validate_dataset_name, validate_model_id

__all__ = [
    "KEY_ORDER",
    "LEADERBOARD_KEYS",
    "METADATA_KEYS",
    "THREAT_MODELS",
    "build_model_info",
    "compose_footnote",
    "format_model_info",
    "model_info_path",
    "resolve_additional_data",
    "validate_model_info",
    "write_model_info",
]

log = logging.getLogger(__name__)

# Every key RobustBench's files use, in the order that agrees with the majority of the files for each pair
# of keys that occur together (the corruption keys and ``autoattack_acc`` never do).
KEY_ORDER = (
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
    "corruptions_acc_3d",
    "corruptions_mce_3d",
    "corruptions_acc",
    "autoattack_acc",
    "external",
    "footnote",
    "corruptions_mce",
    "unreliable",
)
# The keys this project writes for an entry, in that order. For corruptions the accuracy key is
# ``corruptions_acc`` instead of ``autoattack_acc``; ``footnote`` is written only when there is one, and
# ``unreliable`` for corruptions only when true, as in the hand-curated files.
LEADERBOARD_KEYS = tuple(
    key
    for key in KEY_ORDER
    if key not in ("corruptions_acc_3d", "corruptions_mce_3d", "corruptions_acc", "external", "corruptions_mce")
)
# Present in every one of the 236 leaderboard files.
_ALWAYS_KEYS = LEADERBOARD_KEYS[:11]
# Paper metadata RobustBench's generators read as text, with what they do with it and an example value.
_METADATA = {
    "link": ("the leaderboard links the paper title to it", "the paper's URL"),
    "name": ("the leaderboard and the BibTeX export print it as the paper title", "the paper title"),
    "authors": ("the BibTeX export splits it into authors", "'A. Author, B. Author'"),
    "venue": ("the leaderboard prints it and the BibTeX export takes the year from it", "'ICML 2024'"),
    "architecture": ("the leaderboard prints it and the LaTeX export abbreviates it", "'WideResNet-28-10'"),
}
METADATA_KEYS = tuple(_METADATA)
# RobustBench's baseline entries (``Standard``) have no authors; nothing else is empty in its files.
_MAY_BE_EMPTY = ("authors",)
# Optional leaderboard fields that hold percentages (``external``: best adaptive/external attack).
PERCENT_EXTRA_KEYS = (
    "external",
    "corruptions_acc",
    "corruptions_acc_3d",
    "corruptions_mce",
    "corruptions_mce_3d",
)
# ``reported`` when the paper gives no number: "" in RobustBench's files (one writes null, one the string
# "null"); its generators never read the field.
_NO_REPORTED = ("", "null")
THREAT_MODELS = ("Linf", "L2", "corruptions")
_KNOWN_KEYS = KEY_ORDER


def _check_threat_model(threat_model: object) -> str:
    if threat_model not in THREAT_MODELS:
        raise UserError(f"threat_model must be one of {', '.join(THREAT_MODELS)}, got {threat_model!r}")
    return threat_model  # type: ignore[return-value]


def _percent(value: object, *, what: str) -> str:
    # Accuracies come in as fractions, as benchmark() returns them; a value > 1 is almost surely a
    # percentage passed by mistake, and would silently become e.g. "8969.00".
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a fraction in [0,1], got {value!r}")
    if not (0.0 <= float(value) <= 1.0):
        raise UserError(f"{what} must be a fraction in [0,1] (e.g. 0.5953 for 59.53%), got {value!r}")
    return f"{float(value) * 100:.2f}"


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


def _ordered(info: Mapping[str, Any]) -> dict[str, Any]:
    """``info`` with the known keys in :data:`KEY_ORDER`, then any other keys in their own order."""
    return {
        **{key: info[key] for key in KEY_ORDER if key in info},
        **{key: value for key, value in info.items() if key not in KEY_ORDER},
    }


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
        clean_acc, autoattack_acc: fractions in [0,1], written as two-decimal percentage strings. For
            corruptions ``autoattack_acc`` is the corruption accuracy and is written as
            ``corruptions_acc``, the key the leaderboard reads there.
        name, authors, venue, link, architecture: the paper metadata. None leaves the field null: the
            entry is then a draft that RobustBench's generators cannot read yet (the submission bundle
            lists what is missing); an empty string is refused. ``authors`` may be a list, joined
            with ", ".
        reported: the robust accuracy claimed in the paper, as a fraction; None writes ``""``, as
            RobustBench's files do for a paper without one.
        additional_data: whether training used data beyond the dataset's training set.
        number_forward_passes: forward passes per prediction (1 for a single network).
        footnote: free text; the key is omitted when None.
        unreliable: mark an AutoAttack number known to be unreliable (e.g. AA flagged masking). For
            corruptions the key is written only when true.
        extra: further keys. ``external`` and the ``corruptions_*`` keys take fractions (converted to
            percentage strings) or percentage strings and take their place in :data:`KEY_ORDER`; other
            keys go last, must be JSON-serialisable and may not shadow a standard key.

    Returns:
        the entry as an ordered dict, already checked by :func:`validate_model_info` (as a draft).
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
    metadata = {"link": link, "name": name, "authors": authors, "venue": venue, "architecture": architecture}
    for key, value in metadata.items():
        if value is None:
            continue
        if not isinstance(value, str):
            raise UserError(f"{key} must be a string or None, got {value!r}")
        if not value.strip():
            raise UserError(f"{key} is empty: give {_METADATA[key][1]}, or leave it unset until it is known")
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
        "reported": "" if reported is None else _percent(reported, what="reported"),
        robust_key: _percent(autoattack_acc, what=robust_key),
    }
    if footnote is not None:
        info["footnote"] = footnote
    if threat != "corruptions" or unreliable:
        info["unreliable"] = unreliable
    for key, value in (extra or {}).items():
        if key in info or key in LEADERBOARD_KEYS:
            raise UserError(f"extra key {key!r} would shadow a standard leaderboard field; pass it as an argument")
        info[key] = _percent_or_string(value, what=key) if key in PERCENT_EXTRA_KEYS else value
    info = _ordered(info)
    validate_model_info(info, draft=True)
    return info


def validate_model_info(info: Mapping[str, Any], *, draft: bool = False) -> None:
    """Raise ValueError (UserError) unless ``info`` is a leaderboard entry RobustBench's code can use.

    Accepted: every file of RobustBench's leaderboard. Required: the 11 keys every one of its files
    has, plus ``autoattack_acc`` or ``corruptions_acc``; ``link``, ``name``, ``venue`` and
    ``architecture`` non-empty strings and ``authors`` a string (RobustBench's generators print them
    or split them: null prints ``None`` or crashes); ``reported`` a percentage string, ``""`` or null
    (its generators never read it). Optional: ``unreliable`` (bool), ``footnote`` (str or null),
    ``external`` and the ``corruptions_*`` percentages. Other keys are allowed (the generators ignore
    them) if JSON-serialisable, unless they look like a misspelt standard key.

    ``draft=True`` also accepts null paper metadata (the five fields above): an entry this project
    writes before the run's ``[model_info]`` is complete. Everything else is checked the same.
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

    for key, (use, example) in _METADATA.items():
        value = info[key]
        if value is None:
            if draft:
                continue
            raise UserError(f"model info {key!r} is null, but {use}: give {example}")
        if not isinstance(value, str):
            raise UserError(f"model info {key!r} must be a string such as {example}, got {value!r}")
        if not value.strip() and key not in _MAY_BE_EMPTY:
            raise UserError(f"model info {key!r} is empty, but {use}: give {example}")
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
    if info["reported"] is not None and info["reported"] not in _NO_REPORTED:
        _check_percent_string(info["reported"], what="model info 'reported' (or '' when the paper gives none)")
    for key in ("autoattack_acc", *PERCENT_EXTRA_KEYS):
        if key in info:
            _check_percent_string(info[key], what=f"model info {key!r}")
    if "footnote" in info and info["footnote"] is not None and not isinstance(info["footnote"], str):
        raise UserError(f"model info 'footnote' must be a string or null, got {info['footnote']!r}")
    try:
        json.dumps(info, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UserError(f"model info is not JSON-serialisable: {exc}") from None


def format_model_info(info: Mapping[str, Any]) -> str:
    """The text of a leaderboard file for ``info``, in the format most of RobustBench's files share.

    Keys in :data:`KEY_ORDER` (others last, in their own order), two-space indentation, UTF-8 as is
    (no ``\\u`` escapes) and one trailing newline. Values are written as given.
    """
    return json.dumps(_ordered(info), indent=2, ensure_ascii=False) + "\n"


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

    The file is written atomically (temporary file in the same directory, fsync, ``os.replace``) as
    :func:`format_model_info` gives it, replacing any previous file as a whole (unlike robustbench's
    ``update_json``, nothing is merged). Null paper metadata is allowed (a draft, see
    :func:`validate_model_info`). ``dataset`` must match ``info["dataset"]`` and the threat model must
    match the entry (``corruptions`` <-> ``corruptions_acc`` and null eps). Returns the path written.
    """
    path = model_info_path(out_dir, dataset=dataset, threat_model=threat_model, model_id=model_id)
    validate_model_info(info, draft=True)
    if info["dataset"] != dataset:
        raise UserError(f"info['dataset'] is {info['dataset']!r} but the file goes under dataset {dataset!r}")
    is_corruptions = "autoattack_acc" not in info
    if is_corruptions != (threat_model == "corruptions"):
        raise UserError(
            f"threat_model {threat_model!r} does not match the entry, which has "
            f"{'corruptions_acc' if is_corruptions else 'autoattack_acc'}"
        )
    atomic_write_text(path, format_model_info(info))
    return path


# ----------------------------------------------------------------------------------- additional data


def _role_specs(teachers: Mapping[str, Any] | None) -> list[str]:
    """Every teacher spec string of a run's ``[teachers]`` table (a spec, a list, or ``{specs = [...]}``)."""
    specs: list[str] = []
    for role_spec in (teachers or {}).values():
        if isinstance(role_spec, str):
            specs.append(role_spec)
        elif isinstance(role_spec, Mapping):
            specs.extend(str(spec) for spec in role_spec.get("specs", ()))
        elif isinstance(role_spec, Sequence):
            specs.extend(str(spec) for spec in role_spec)
    return specs


def resolve_additional_data(
    explicit: bool | None, teachers: Mapping[str, Any] | None = None, *, model_id: str = "the student"
) -> bool:
    """The entry's ``additional_data``: ``explicit`` when the run set it, else what the zoo teachers pass on.

    A student distilled from a teacher that was trained with additional data learns from that data too,
    so an unset (None) ``[model_info] additional_data`` becomes true when the leaderboard entry of any
    ``robustbench:`` teacher in ``teachers`` (the run's ``[teachers]`` table) says true, looked up in
    :mod:`robustbench_kd.zoo.leaderboard_additional_data`, and is logged in one line naming the
    teacher(s); otherwise it is false. Teachers from other sources say nothing about their training
    data (set the option for them); a zoo teacher missing from the table is logged as unknown.
    """
    if explicit is not None:
        if not isinstance(explicit, bool):
            raise UserError(f"model_info.additional_data must be true, false or unset, got {explicit!r}")
        return explicit
    from robustbench_kd.teachers import TeacherSpec  # imports torch: only when there are teachers
    from robustbench_kd.zoo.models import parse_zoo_ref

    with_extra, unknown = [], []
    for text in _role_specs(teachers):
        spec = TeacherSpec.parse(text)
        if spec.scheme != "robustbench":
            continue
        value = leaderboard_additional_data(*parse_zoo_ref(spec.ref))
        if value is None:
            unknown.append(text)
        elif value:
            with_extra.append(text)
    if with_extra:
        log.info(
            "model_info of %s: additional_data = true, inherited from teacher %s, whose leaderboard entry has "
            "additional_data true (set model_info.additional_data to override)",
            model_id,
            ", ".join(with_extra),
        )
        return True
    if unknown:
        log.warning(
            "model_info of %s: additional_data = false, but the leaderboard entry of teacher %s is unknown to "
            "robustbench_kd; set model_info.additional_data if it was trained with additional data",
            model_id,
            ", ".join(unknown),
        )
    return False


# ------------------------------------------------------------------------------------------ footnote

# What each evaluation sanity check (``SanityReport.checks`` names) found when it failed, as a phrase. A failed
# ``autoattack`` check is said in AutoAttack's own terms instead (its flags, described), when they are known.
_CHECK_FINDINGS = {
    "eval_mode": "layers that stay in training mode",
    "deterministic": "a random or batch-dependent forward pass",
    "logits": "probability outputs instead of logits",
    "gradients": "zero or non-finite input gradients",
    "monotone": "PGD accuracy rising with eps",
    "unbounded": "accuracy surviving an unbounded attack",
    "single_step": "FGSM beating PGD",
    "transfer": "a transfer attack beating the white-box attacks",
    "autoattack": "warnings from AutoAttack's own checks",
}
_UNRELIABLE = "Potentially unreliable AutoAttack evaluation"
# Findings named in the footnote; the others are counted. Real footnotes are a sentence or two.
_MAX_NAMED = 3


def _findings_text(findings: Sequence[str]) -> str:
    named, others = list(findings[:_MAX_NAMED]), len(findings) - _MAX_NAMED
    if others > 0:
        named.append(f"{others} other problem{'s' if others > 1 else ''}")
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def compose_footnote(
    footnote: str | None,
    *,
    autoattack_flags: Sequence[str] = (),
    sanity: Mapping[str, Any] | None = None,
) -> str | None:
    """The entry's footnote: the run's own ``footnote``, then one sentence on why its number may be unreliable.

    The leaderboard shows the footnote under the paper title, so it stays short prose, like the
    hand-written footnotes of RobustBench's files: at most three findings are named and the rest
    counted; the full reasons are in ``results/<id>.json`` and the log. ``sanity`` is a failed sanity
    verdict as the results file holds it (``SanityReport.to_dict()``, or a merged verdict with one
    report per shard under ``"shards"``): the sentence names what its failed checks found, AutoAttack's
    flags among them in AutoAttack's terms. Without one, ``autoattack_flags`` (AutoAttack's own
    warnings) give the sentence. Returns None when there is nothing to say.
    """
    from robustbench_kd.evaluation.autoattack import describe_autoattack_flag  # imports torch

    def described(flags: Sequence[str]) -> list[str]:
        # AutoAttack's descriptions end in a gloss such as "(gradient masking)"; the footnote keeps the finding.
        return [describe_autoattack_flag(flag).split(" (")[0] for flag in flags]

    note = None
    if sanity is not None and not sanity.get("reliable", True):
        reports = sanity.get("shards") or [sanity]
        failed = [name for r in reports for name, ok in (r.get("checks") or {}).items() if ok is False]
        flags = [flag for r in reports for flag in r.get("autoattack_flags") or ()] or list(autoattack_flags)
        findings = [_CHECK_FINDINGS.get(name, name.replace("_", " ")) for name in failed if name != "autoattack"]
        if "autoattack" in failed and not flags:
            findings.append(_CHECK_FINDINGS["autoattack"])
        elif "autoattack" in failed:
            # AutoAttack's zero-gradient warning repeats the gradient check's finding: say it once.
            said = [set(finding.split()) for finding in findings]
            findings += [f for f in described(flags) if not any(set(f.split()) <= words for words in said)]
        findings = list(dict.fromkeys(findings)) or ["problems"]
        note = f"{_UNRELIABLE}: the sanity checks found {_findings_text(findings)}."
    elif autoattack_flags:
        flagged = list(dict.fromkeys(described(autoattack_flags)))
        note = f"{_UNRELIABLE}: AutoAttack's own checks found {_findings_text(flagged)}."
    own = footnote.strip() if footnote else ""
    if own and note and own[-1] not in ".!?":
        own += "."
    return " ".join(part for part in (own, note) if part) or footnote
