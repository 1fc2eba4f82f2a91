"""Sharded evaluation: split the test examples over processes or devices, then merge.

``robustbench-kd evaluate MODEL --name ID --shard I/N`` evaluates shard ``I`` (0-based) of ``N`` of the
selected test examples and writes ``OUT/shards/ID/shard_I_of_N.json``: the per-example flags of every
attack on that shard, plus everything the numbers depend on (model weights' SHA-256, data SHA-256,
dataset, eps, attacks, seed, batch size, AutoAttack backend, shard bounds). ``robustbench-kd merge-shards
OUT/shards/ID`` checks that all ``N`` shards are there, were made with the same settings and tile the
examples exactly, concatenates their flags into the :class:`EvalResult` an unsharded run returns, and
writes ``results/ID.json`` and (when standard AutoAttack ran) ``model_info/<dataset>/<threat>/ID.json``.

Shards are contiguous and balanced: shard ``i`` of ``N`` over ``n`` examples is
``[i*n//N, (i+1)*n//N)``, so every example is in exactly one shard and sizes differ by at most one.
Contiguous rather than strided so that the merged flags are a plain concatenation in example order and a
shard is a readable range ("examples 5000-7499").

AutoAttack in a shard is resumable: it keeps its state in ``OUT/shards/ID/aa_state_I_of_N.json`` (or
``--aa-state PATH``), so re-running an interrupted shard's command continues where it stopped.

Caveat: every shard starts each attack from the same seed, but randomised attacks draw their random
starts per batch (PGD's random start, APGD's restarts, Square's proposals), and sharding changes which
points share a batch. Per-example results can therefore differ from an unsharded run for points whose
outcome depends on the random start; models whose points are clearly robust or clearly not give the
same flags (tested), and the accuracy of a real model typically moves by a few such points.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import math
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_kd import __version__
from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.autoattack import MISMATCH_FLAG_PREFIX, autoattack_state
from robustbench_kd.evaluation.export import save_zoo_checkpoint, zoo_checkpoint_path
from robustbench_kd.evaluation.final_report import ModelReport, write_model_info_entry
from robustbench_kd.evaluation.points import points_from_result, points_path, write_points
from robustbench_kd.evaluation.runner import VALID_ATTACKS, EvalResult, evaluate_model
from robustbench_kd.evaluation.sanity import check_eps_units, check_evaluation
from robustbench_kd.storage.atomic import atomic_write_text
from robustbench_kd.storage.bounded import MiB, load_json_bounded
from robustbench_kd.storage.names import check_output_dir
from robustbench_kd.submission.autoattack_log import LOG_LIMIT, check_log_file
from robustbench_kd.submission.bundle import write_submission_bundle
from robustbench_kd.submission.section import ModelInfoSection
from robustbench_kd.submission.zoo_entry import ZooConstructor
from robustbench_kd.threat import NORMS, format_eps, parse_number
from robustbench_kd.zoo.autoattack_resume import check_state_file, data_fingerprint, model_fingerprint
from robustbench_kd.zoo.names import validate_dataset_name, validate_model_id

__all__ = [
    "SHARD_FORMAT",
    "MergedSanity",
    "MergedShards",
    "ShardRecord",
    "default_autoattack_state",
    "evaluate_shard",
    "merge_and_write",
    "merge_shards",
    "output_directory",
    "parse_shard",
    "read_shard",
    "shard_bounds",
    "shard_directory",
    "shard_file",
    "write_merged_outputs",
]

log = logging.getLogger(__name__)

SHARD_FORMAT = "robustbench_kd.eval-shard"
SHARD_FORMAT_VERSION = 1
_SHARD_NAME = re.compile(r"shard_(\d+)_of_(\d+)\.json")
_SHARD_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")

# Settings that may legitimately differ between shards (paths differ between machines, a patch release
# of this package changes no number); shard 0's values are reported, differences are logged.
_INFORMATIONAL = ("model", "robustbench_kd_version")


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"I/N"`` (0-based shard I of N, ``0 <= I < N``) into ``(I, N)``; UserError otherwise."""
    match = _SHARD_SPEC.fullmatch(str(text))
    if match:
        index, count = int(match.group(1)), int(match.group(2))
        if count >= 1 and 0 <= index < count:
            return index, count
    raise UserError(
        f"--shard must be I/N with 0 <= I < N (shards are numbered from 0), e.g. --shard 0/4 "
        f"... --shard 3/4; got {text!r}"
    )


def shard_bounds(n_examples: int, index: int, count: int) -> tuple[int, int]:
    """``(start, stop)`` of shard ``index`` of ``count`` over ``n_examples``: ``[i*n//N, (i+1)*n//N)``."""
    if not 0 <= index < count:
        raise UserError(f"shard index must be in 0..{count - 1}, got {index}")
    return index * n_examples // count, (index + 1) * n_examples // count


def shard_directory(out_dir: str | Path, model_id: str) -> Path:
    """Where the shards of model ``model_id`` go: ``<out_dir>/shards/<model_id>``."""
    return Path(out_dir) / "shards" / model_id


def shard_file(directory: str | Path, index: int, count: int) -> Path:
    """``<directory>/shard_<index>_of_<count>.json``."""
    return Path(directory) / f"shard_{index}_of_{count}.json"


def default_autoattack_state(directory: str | Path, index: int, count: int) -> Path:
    """The AutoAttack state file a shard uses unless given one: ``<directory>/aa_state_<i>_of_<n>.json``."""
    return Path(directory) / f"aa_state_{index}_of_{count}.json"


def shard_autoattack_log(directory: str | Path, index: int, count: int) -> Path:
    """AutoAttack's log of shard ``index`` of ``count``, beside its shard file; the merge bundles them in order."""
    return Path(directory) / f"shard_{index}_of_{count}.autoattack.log"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def evaluate_shard(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    shard: tuple[int, int],
    spec: str,
    model_id: str,
    dataset: str,
    norm: str,
    eps: float | str,
    attacks: list[str],
    out_dir: str | Path,
    batch_size: int = 256,
    seed: int = 0,
    pgd_steps: int = 20,
    device: torch.device | None = None,
    progress: bool = True,
    aa_state: str | Path | None = None,
    meta: Any = None,
    architecture: str | None = None,
    sanity: bool = False,
    teacher: nn.Module | None = None,
    constructor: ZooConstructor | None = None,
) -> Any:
    """Evaluate shard ``shard = (i, n)`` of the examples ``(x, y)`` and write its shard file.

    ``(x, y)`` is the *whole* selection (every shard process loads the same one); only
    ``x[start:stop]`` is attacked, with :func:`evaluate_model` and the usual arguments. AutoAttack runs
    resumably through ``aa_state`` (default :func:`default_autoattack_state`). The shard file
    (:func:`shard_file` under :func:`shard_directory`) is written atomically at the end; shard 0 also
    writes the model-zoo checkpoint ``models/<dataset>/<threat>/<model_id>.pt`` under ``out_dir``, as an
    unsharded ``evaluate --name`` does. ``meta`` (a ``ModelInfoSection``) and ``architecture`` (the
    entry's default architecture name) are stored for the merge, which writes the leaderboard entry.
    ``sanity`` runs the evaluation sanity suite (``teacher``: its transfer check) on this shard's points
    and stores its verdict; the merge marks the entry unreliable if any shard's verdict failed. An eps
    in pixel units is refused first, as in an unsharded evaluation. AutoAttack's log of the shard goes to
    :func:`shard_autoattack_log` (appended to when AutoAttack resumes from its state file, restarted
    otherwise), and ``constructor`` (how the zoo entry rebuilds the model) is stored, so the merge can
    write the submission bundle. Returns a ``ModelReport`` for the shard (its ``results_path`` is the
    shard file).
    """
    model_id = validate_model_id(model_id, what="--name")
    out_dir = output_directory(out_dir, what="--out")
    index, count = shard
    n = int(x.shape[0])
    if count > n:
        raise UserError(f"--shard {index}/{count}: {count} shards for {n} examples; use at most {n} shards")
    start, stop = shard_bounds(n, index, count)
    directory = shard_directory(out_dir, model_id)
    state = Path(aa_state) if aa_state is not None else default_autoattack_state(directory, index, count)
    check_state_file(state)  # a FIFO or damaged file fails now, not after the clean pass
    eps_value = parse_number(eps, what="eps")
    check_eps_units(eps_value, norm, x)
    log.info("shard %d/%d of %s: examples %d-%d of %d", index, count, model_id, start, stop - 1, n)

    runs_autoattack = any(attack.startswith("autoattack") for attack in attacks)
    aa_log = shard_autoattack_log(directory, index, count) if runs_autoattack else None
    if aa_log is not None and not state.exists():  # a fresh AutoAttack run: the log describes this one only
        aa_log.unlink(missing_ok=True)
    began = time.perf_counter()
    with autoattack_state(state):
        result = evaluate_model(
            model,
            x[start:stop],
            y[start:stop],
            norm=norm,
            eps=eps_value,
            attacks=attacks,
            batch_size=batch_size,
            seed=seed,
            pgd_steps=pgd_steps,
            device=device,
            progress=progress,
            autoattack_log=aa_log,
        )
    sanity_report = None
    if sanity:
        sanity_report = check_evaluation(
            model, x[start:stop], y[start:stop], result, teacher=teacher, device=device, batch_size=batch_size
        )
    seconds = time.perf_counter() - began

    settings = {
        "model_id": model_id,
        "model": spec,
        "model_sha256": model_fingerprint(model),
        "dataset": dataset,
        "n_examples": n,
        "data_sha256": data_fingerprint(x, y),
        "norm": norm,
        "eps": eps_value,
        "attacks": list(attacks),
        "result_keys": list(result.accuracy),
        "pgd_steps": int(result.pgd_steps),
        "pgd_alpha": float(result.pgd_alpha),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "autoattack_version": result.autoattack_version,
        "model_info": dataclasses.asdict(meta) if isinstance(meta, ModelInfoSection) else None,
        "architecture": architecture,
        "zoo_entry": dataclasses.asdict(constructor) if constructor is not None else None,
        "sanity": bool(sanity),
        "robustbench_kd_version": __version__,
    }
    record = {
        "format": SHARD_FORMAT,
        "format_version": SHARD_FORMAT_VERSION,
        "shard": {"index": index, "count": count, "start": start, "stop": stop},
        "settings": settings,
        "run": {
            "device": str(device) if device is not None else None,
            "host": socket.gethostname(),
            "autoattack_state": str(state) if any(k.startswith("autoattack") for k in result.accuracy) else None,
            "autoattack_log": aa_log.name if aa_log is not None and aa_log.is_file() else None,
            "seconds": round(seconds, 3),
            "finished": _now(),
        },
        "accuracy": {key: float(value) for key, value in result.accuracy.items()},
        "autoattack_flags": list(result.autoattack_flags),
        "sanity": sanity_report.to_dict() if sanity_report is not None else None,
        "per_example": {key: [int(v) for v in flags.tolist()] for key, flags in result.per_example.items()},
        # Still robust after each AutoAttack stage ("autoattack/apgd-ce", ...), for the per-point file.
        "autoattack_stages": {key: [int(v) for v in flags.tolist()] for key, flags in result.autoattack_stages.items()},
    }
    path = atomic_write_text(shard_file(directory, index, count), json.dumps(record, indent=1) + "\n")
    report = ModelReport(
        label=f"{model_id} shard {index}/{count} (examples {start}-{stop - 1})",
        accuracy=dict(result.accuracy),
        pgd_alpha=result.pgd_alpha,
        pgd_steps=result.pgd_steps,
        n_examples=result.n_examples,
        flags=list(result.autoattack_flags),
        results_path=path,
        sanity=sanity_report,
    )
    if index == 0:
        report.checkpoint_path = save_zoo_checkpoint(
            model, out_dir, dataset=dataset, threat_model=norm, model_id=model_id
        )
    return report


@dataclass
class ShardRecord:
    """One shard file, read back (see :func:`read_shard`)."""

    path: Path
    index: int
    count: int
    start: int
    stop: int
    settings: dict[str, Any]
    run: dict[str, Any]
    accuracy: dict[str, float]
    autoattack_flags: list[str]
    per_example: dict[str, Tensor]
    sanity: dict[str, Any] | None = None
    autoattack_stages: dict[str, Tensor] = field(default_factory=dict)


def _bad_shard(path: Path, why: str) -> UserError:
    return UserError(f"shard file {path} {why}; re-run that shard's evaluate command to rewrite it")


#: A shard file holds a few bytes per example and attack (plus the sanity report): 64 MiB is far above a
#: shard of the largest test set, while a larger file (or a device such as /dev/zero) is refused unread.
SHARD_LIMIT = 64 * MiB
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SLUG = re.compile(r"[A-Za-z0-9_]+")
_SLUG_DASH = re.compile(r"[a-z0-9][a-z0-9_-]*")


class _ShardChecker:
    """Type, range and consistency checks of one shard file; each failure is a one-line UserError naming it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, why: str) -> UserError:
        return _bad_shard(self.path, why)

    def field(self, raw: Any, key: str, where: str = "") -> Any:
        if not isinstance(raw, dict):
            raise self.fail(f"has {where or 'a top level'} that is not a JSON object")
        if key not in raw:
            raise self.fail(f"has no {where + '.' if where else ''}{key}")
        return raw[key]

    def mapping(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"has {key} = {_short(value)}, expected a JSON object")
        return value

    def integer(self, value: Any, key: str, *, low: int | None = None) -> int:
        # bool is an int in Python, but true/false in a count or an index is a damaged file.
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            bound = f" >= {low}" if low is not None else ""
            raise self.fail(f"has {key} = {_short(value)}, expected an integer{bound}")
        return value

    def number(self, value: Any, key: str, *, low: float = 0.0, high: float = math.inf) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            span = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
            raise self.fail(f"has {key} = {_short(value)}, expected a number {span}")
        return float(value)

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"has {key} = {_short(value)}, expected true or false")
        return value

    def text(self, value: Any, key: str, *, optional: bool = False, one_line: bool = False) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(f"has {key} = {_short(value)}, expected a string")
        if one_line and any(not char.isprintable() for char in value):
            raise self.fail(f"has {key} = {_short(value)}, which is not one printable line")
        return value

    def texts(self, value: Any, key: str, *, one_line: bool = False) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(f"has {key} = {_short(value)}, expected a list of strings")
        return [self.text(item, key, one_line=one_line) for item in value]


def read_shard(path: str | Path) -> ShardRecord:
    """Read and validate one shard file; a damaged, forged or foreign file raises a one-line UserError.

    Shard files travel between machines, so nothing in one is trusted: only a regular file of at most
    :data:`SHARD_LIMIT` bytes is read; the model id must be a safe file stem (it names the merged
    outputs); every field has its type and range checked; and the file must agree with itself (its range
    is the one its index, count and number of examples give; one 0/1 flag per example and result; each
    accuracy the mean of its flags; no point robust under AutoAttack that is wrong on clean inputs).
    """
    path = Path(path)
    raw = load_json_bounded(path, limit=SHARD_LIMIT, what="shard file")
    check = _ShardChecker(path)
    if not isinstance(raw, dict) or raw.get("format") != SHARD_FORMAT:
        raise check.fail("is not a robustbench-kd shard file")
    version = raw.get("format_version")
    if version != SHARD_FORMAT_VERSION or isinstance(version, bool):
        raise check.fail(f"has format version {_short(version)}; this version reads {SHARD_FORMAT_VERSION}")
    settings = _check_settings(check.mapping(check.field(raw, "settings"), "settings"), check)
    index, count, start, stop = _check_range(check.mapping(check.field(raw, "shard"), "shard"), settings, check)
    keys = settings["result_keys"]
    per_example = _check_flags(check.mapping(check.field(raw, "per_example"), "per_example"), keys, stop - start, check)
    accuracy = _check_accuracy(check.mapping(check.field(raw, "accuracy"), "accuracy"), per_example, check)
    flags = check.texts(raw.get("autoattack_flags", []), "autoattack_flags")
    _check_clean_covers_robust(per_example, flags, start, check)
    stages = _check_stages(
        check.mapping(raw.get("autoattack_stages", {}), "autoattack_stages"), keys, stop - start, check
    )
    run = check.mapping(raw.get("run", {}), "run")
    expected_log = shard_autoattack_log(path.parent, index, count).name
    if run.get("autoattack_log") not in (None, expected_log):
        raise check.fail(f"names the AutoAttack log {_short(run['autoattack_log'])}; a shard's log is {expected_log}")
    return ShardRecord(
        path=path,
        index=index,
        count=count,
        start=start,
        stop=stop,
        settings=settings,
        run=dict(run),
        accuracy=accuracy,
        autoattack_flags=flags,
        per_example=per_example,
        sanity=_check_sanity(raw.get("sanity"), settings["sanity"], stop - start, check),
        autoattack_stages=stages,
    )


def _check_settings(settings: dict[str, Any], check: _ShardChecker) -> dict[str, Any]:
    """The settings every shard of a run shares, each of the type and range the writer gives it."""

    def get(key: str) -> Any:
        return check.field(settings, key, "settings")

    validate_model_id(get("model_id"), what=f"the model id in shard file {check.path}")
    validate_dataset_name(get("dataset"))
    check.text(get("model"), "settings.model")
    for key in ("model_sha256", "data_sha256"):
        if not isinstance(get(key), str) or not _SHA256.fullmatch(get(key)):
            raise check.fail(f"has settings.{key} = {_short(get(key))}, expected a SHA-256 in hex")
    check.integer(get("n_examples"), "settings.n_examples", low=1)
    if get("norm") not in NORMS:
        raise check.fail(f"has settings.norm = {_short(get('norm'))}, expected one of {', '.join(NORMS)}")
    eps = check.number(get("eps"), "settings.eps", low=0.0)
    if get("norm") == "Linf" and eps > 1:
        raise check.fail(f"has settings.eps = {eps:g}, larger than 1 for an Linf threat on [0,1] inputs")
    attacks = check.texts(get("attacks"), "settings.attacks")
    unknown = [name for name in attacks if name not in VALID_ATTACKS]
    if unknown or not attacks:
        raise check.fail(f"has settings.attacks = {_short(attacks)}; valid attacks: {', '.join(VALID_ATTACKS)}")
    steps = check.integer(get("pgd_steps"), "settings.pgd_steps", low=1)
    expected_keys = _result_keys(attacks, steps)
    if check.texts(get("result_keys"), "settings.result_keys") != expected_keys:
        raise check.fail(
            f"has settings.result_keys = {_short(get('result_keys'))} where its attacks give {_short(expected_keys)}"
        )
    check.number(get("pgd_alpha"), "settings.pgd_alpha", low=0.0)
    check.integer(get("seed"), "settings.seed")
    check.integer(get("batch_size"), "settings.batch_size", low=1)
    version = check.text(get("autoattack_version"), "settings.autoattack_version", optional=True, one_line=True)
    if version is None and any(key.startswith("autoattack") for key in expected_keys):
        raise check.fail("ran AutoAttack but has no settings.autoattack_version")
    check.text(get("architecture"), "settings.architecture", optional=True, one_line=True)
    check.boolean(get("sanity"), "settings.sanity")
    check.text(settings.get("robustbench_kd_version"), "settings.robustbench_kd_version", optional=True)
    _check_model_info(get("model_info"), check)
    _check_zoo_entry(get("zoo_entry"), check)
    return dict(settings)


def _result_keys(attacks: list[str], pgd_steps: int) -> list[str]:
    """The result keys :func:`evaluate_model` gives ``attacks`` (standard AutoAttack), in order, once each."""
    rename = {"pgd": f"pgd-{pgd_steps}", "cw": f"cw-{pgd_steps}"}
    keys: list[str] = []
    for name in attacks:
        key = rename.get(name, name)
        if key not in keys:
            keys.append(key)
    return keys


def _check_model_info(value: Any, check: _ShardChecker) -> None:
    """``settings.model_info``: null, or the fields of a ``ModelInfoSection`` the merge builds from it."""
    if value is None:
        return
    fields = {f.name for f in dataclasses.fields(ModelInfoSection)}
    info = check.mapping(value, "settings.model_info")
    unknown = sorted(set(info) - fields)
    if unknown:
        raise check.fail(f"has unknown settings.model_info field(s) {', '.join(map(repr, unknown))}")
    for key, item in info.items():
        if key not in ("additional_data", "number_forward_passes"):
            check.text(item, f"settings.model_info.{key}", optional=True, one_line=True)
    try:
        ModelInfoSection(**info)
    except UserError as exc:
        raise check.fail(f"has settings.model_info that is not valid ({exc})") from None


def _check_zoo_entry(value: Any, check: _ShardChecker) -> None:
    """``settings.zoo_entry``: null, or a constructor whose text the merge writes into ``zoo_entry.py``.

    Its one-line fields become lines of that file, so each must be one printable line (a newline would
    add lines of the attacker's choosing), the expression one Python expression and each import one
    import statement; the architecture module's name stem (``slug``) names a file of the bundle.
    """
    if value is None:
        return
    entry = check.mapping(value, "settings.zoo_entry")
    fields = {f.name for f in dataclasses.fields(ZooConstructor)}
    unknown = sorted(set(entry) - fields)
    if unknown or "expression" not in entry:
        problem = f"unknown field(s) {', '.join(map(repr, unknown))}" if unknown else "no expression"
        raise check.fail(f"has a settings.zoo_entry with {problem}")
    expression = check.text(entry["expression"], "settings.zoo_entry.expression", one_line=True)
    if not _parses(expression, "eval"):
        raise check.fail(f"has settings.zoo_entry.expression = {_short(expression)}, not a Python expression")
    for line in check.texts(entry.get("imports", []), "settings.zoo_entry.imports", one_line=True):
        if not _is_import(line):
            raise check.fail(f"has settings.zoo_entry.imports entry {_short(line)}, not one import statement")
    for key in ("architecture", "note", "preprocessing", "not_standalone"):
        check.text(entry.get(key), f"settings.zoo_entry.{key}", optional=True, one_line=True)
    for key in ("in_robustbench", "placeholder"):
        check.boolean(entry.get(key, False), f"settings.zoo_entry.{key}")
    source = entry.get("architecture_source")
    if source is not None:
        source = check.mapping(source, "settings.zoo_entry.architecture_source")
        if set(source) != {"slug", "text", "names"}:
            raise check.fail("has a settings.zoo_entry.architecture_source without exactly slug, text and names")
        slug = check.text(source["slug"], "settings.zoo_entry.architecture_source.slug")
        if not _SLUG.fullmatch(slug):
            raise check.fail(f"has architecture_source.slug = {_short(slug)}, expected letters, digits and '_'")
        if not _parses(check.text(source["text"], "settings.zoo_entry.architecture_source.text"), "exec"):
            raise check.fail("has an architecture_source.text that is not Python source")
        names = check.texts(source["names"], "settings.zoo_entry.architecture_source.names")
        if not all(name.isidentifier() for name in names):
            raise check.fail(f"has architecture_source.names = {_short(names)}, expected Python names")


def _parses(source: str, mode: str) -> bool:
    try:
        ast.parse(source, mode=mode)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def _is_import(line: str) -> bool:
    try:
        body = ast.parse(line).body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return len(body) == 1 and isinstance(body[0], (ast.Import, ast.ImportFrom))


def _check_range(shard: dict[str, Any], settings: dict[str, Any], check: _ShardChecker) -> tuple[int, int, int, int]:
    """``(index, count, start, stop)``, consistent with each other, the number of examples and the file name."""
    index, count, start, stop = (check.integer(check.field(shard, k, "shard"), f"shard.{k}") for k in _RANGE_KEYS)
    n = settings["n_examples"]
    if not 0 <= index < count or count > n:
        raise check.fail(f"claims shard {index}/{count} of {n} examples, which does not exist")
    match = _SHARD_NAME.fullmatch(check.path.name)
    if match and (int(match.group(1)), int(match.group(2))) != (index, count):
        raise check.fail(f"holds shard {index}/{count}, not the one its name says")
    expected = shard_bounds(n, index, count)
    if (start, stop) != expected:
        raise check.fail(
            f"covers examples {start}-{stop - 1} but shard {index}/{count} of {n} examples is "
            f"{expected[0]}-{expected[1] - 1} (shards would overlap or leave a gap)"
        )
    return index, count, start, stop


_RANGE_KEYS = ("index", "count", "start", "stop")


def _check_flags(raw: dict[str, Any], keys: list[str], size: int, check: _ShardChecker) -> dict[str, Tensor]:
    """One list of ``size`` 0/1 integers per result key, in the order of ``keys``."""
    if list(raw) != keys:
        raise check.fail(f"has flags for {_short(list(raw))} but results {_short(keys)}")
    per_example = {}
    for key, values in raw.items():
        if not isinstance(values, list) or len(values) != size:
            got = f"{len(values)} flags" if isinstance(values, list) else f"{_short(values)} as flags"
            raise check.fail(f"has {got} for {key!r} where its range needs {size}")
        # type() rather than isinstance: true/false or "1" in place of 1 is a damaged file.
        bad = next((i for i, v in enumerate(values) if type(v) is not int or v not in (0, 1)), None)
        if bad is not None:
            raise check.fail(f"has the flag {_short(values[bad])} for {key!r}; flags are the integers 0 and 1")
        per_example[key] = torch.tensor(values, dtype=torch.bool)
    return per_example


def _check_stages(raw: dict[str, Any], keys: list[str], size: int, check: _ShardChecker) -> dict[str, Tensor]:
    """The AutoAttack stage flags: keys ``<AutoAttack result key>/<attack>``, each ``size`` 0/1 integers.

    Optional (a run that could not tell which attack fooled a point has none).
    """
    for key in raw:
        if (
            not isinstance(key, str)
            or key.partition("/")[0] not in keys
            or not _SLUG_DASH.fullmatch(key.partition("/")[2])
        ):
            raise check.fail(f"has the AutoAttack stage {_short(key)}; stages are <AutoAttack result>/<attack name>")
    return _check_flags(raw, list(raw), size, check) if raw else {}


def _check_accuracy(raw: dict[str, Any], per_example: dict[str, Tensor], check: _ShardChecker) -> dict[str, float]:
    """Each accuracy is a number in [0, 1] and the mean of its flags (as the writer computed it)."""
    if list(raw) != list(per_example):
        raise check.fail(f"has accuracies for {_short(list(raw))} but flags for {_short(list(per_example))}")
    accuracy = {}
    for key, flags in per_example.items():
        value = check.number(raw[key], f"accuracy[{key!r}]", high=1.0)
        mean = float(flags.sum().item()) / flags.numel()
        if abs(value - mean) > 1e-9:
            raise check.fail(f"says {key} accuracy {value:.6g} but its flags give {mean:.6g}")
        accuracy[key] = value
    return accuracy


def _check_clean_covers_robust(
    per_example: dict[str, Tensor], flags: list[str], start: int, check: _ShardChecker
) -> None:
    """No point robust under AutoAttack yet wrong on the clean input.

    AutoAttack attacks only the points the model classifies correctly and counts every other one as not
    robust, so for a deterministic model its robust points are a subset of the clean-correct ones. A
    random or batch-dependent forward pass can break that, and AutoAttack's run then carries our
    disagreement flag; without it, such a point means the flags were edited. (PGD, FGSM and CW report
    the final iterate, which can be right where the clean input was wrong, so they are not checked.)
    """
    clean = per_example.get("clean")
    if clean is None or any(flag.startswith(MISMATCH_FLAG_PREFIX) for flag in flags):
        return
    for key, robust in per_example.items():
        if key.startswith("autoattack"):
            impossible = (robust & ~clean).nonzero().flatten()
            if impossible.numel():
                raise check.fail(
                    f"marks example {start + int(impossible[0])} robust under {key} but wrong on clean inputs, "
                    "which AutoAttack cannot give"
                )


def _check_sanity(value: Any, ran: bool, size: int, check: _ShardChecker) -> dict[str, Any] | None:
    """The shard's sanity verdict: present exactly when the suite ran, its verdict a bool and reasons strings."""
    if value is None:
        if ran:
            raise check.fail("ran with sanity checks but saved no verdict")
        return None
    report = check.mapping(value, "sanity")
    check.boolean(check.field(report, "reliable", "sanity"), "sanity.reliable")
    check.texts(report.get("reasons", []), "sanity.reasons")
    if "n_examples" in report and check.integer(report["n_examples"], "sanity.n_examples") != size:
        raise check.fail(f"has a sanity report on {report['n_examples']} examples for its {size}")
    return dict(report)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class MergedSanity:
    """The sanity verdicts of all shards: reliable only if every shard's is (see ``evaluation.sanity``)."""

    reliable: bool
    reasons: list[str]
    shards: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """``{"reliable", "reasons", "shards": [each shard's report]}``."""
        return {"reliable": self.reliable, "reasons": list(self.reasons), "shards": list(self.shards)}


@dataclass
class MergedShards:
    """The merge of a complete, consistent set of shards.

    Attributes:
        result: the :class:`EvalResult` over all examples, per-example flags in example order.
        settings: the common settings (those of shard 0 for the informational ones).
        shards: the shard files, in index order.
        sanity: the merged sanity verdict, None when the shards ran no sanity suite.
    """

    result: EvalResult
    settings: dict[str, Any]
    shards: list[ShardRecord] = field(default_factory=list)
    sanity: MergedSanity | None = None

    @property
    def model_id(self) -> str:
        return str(self.settings["model_id"])


def merge_shards(directory: str | Path) -> MergedShards:
    """Check and merge the shard files ``shard_<i>_of_<n>.json`` in ``directory``.

    Raises a one-line UserError when the directory holds no shards, mixes shard counts, misses a
    shard, holds a damaged one, or when two shards were made with different settings (model weights,
    data, eps, attacks, seed, batch size, AutoAttack backend, ...) or cover other ranges than the
    contiguous split (:func:`shard_bounds`) says, i.e. overlap or leave a gap.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(
            f"shard directory {directory} does not exist; it is <out>/shards/<name> of the "
            "`robustbench-kd evaluate --name NAME --shard I/N` runs"
        )
    count, files = _shard_files(directory)
    missing = _first_missing(files, count)
    if missing:
        names = ", ".join(shard_file(directory, i, count).name for i in missing)
        left = count - len(files)
        more = f" and {left - len(missing)} more" if left > len(missing) else ""
        raise UserError(
            f"{left} of {count} shards missing in {directory}: {names}{more}; run the same "
            f"evaluate command with --shard {missing[0]}/{count}" + (" etc." if left > 1 else "")
        )
    records = [read_shard(files[i]) for i in range(count)]
    first = records[0]
    for record in records[1:]:
        _compare_settings(first, record)
    _check_autoattack_logs(records)
    settings = first.settings
    n = int(settings["n_examples"])
    per_example = {key: torch.cat([r.per_example[key] for r in records]) for key in settings["result_keys"]}
    stage_keys = list(first.autoattack_stages)
    if any(list(r.autoattack_stages) != stage_keys for r in records[1:]):
        log.warning(
            "a shard of %s could not tell which AutoAttack stage fooled each point: no stage outcomes", directory
        )
        stage_keys = []
    stages = {key: torch.cat([r.autoattack_stages[key] for r in records]) for key in stage_keys}
    flags: list[str] = []
    for record in records:
        flags.extend(f for f in record.autoattack_flags if f not in flags)
    result = EvalResult(
        n_examples=n,
        norm=str(settings["norm"]),
        eps=float(settings["eps"]),
        accuracy={key: float(value.sum().item()) / n for key, value in per_example.items()},
        pgd_alpha=float(settings["pgd_alpha"]),
        pgd_steps=int(settings["pgd_steps"]),
        per_example=per_example,
        autoattack_stages=stages,
        autoattack_flags=flags,
        autoattack_version=settings["autoattack_version"],
        seed=int(settings["seed"]),
    )
    sanity = None
    if settings["sanity"]:  # every shard has a verdict then (read_shard checked)
        reports = [r.sanity for r in records if r.sanity is not None]
        reasons: list[str] = []
        for index, report in enumerate(reports):
            reasons.extend(f"shard {index}/{count}: {reason}" for reason in report.get("reasons", []))
        sanity = MergedSanity(reliable=all(bool(r["reliable"]) for r in reports), reasons=reasons, shards=reports)
    return MergedShards(result=result, settings=settings, shards=records, sanity=sanity)


def _shard_files(directory: Path) -> tuple[int, dict[int, Path]]:
    """The shard count of ``directory``'s shard files and the file of each index.

    Two names for one shard (``shard_1_of_2.json`` and ``shard_01_of_2.json``, a copy under another name)
    are refused rather than one of them picked silently; so are files of several splits.
    """
    found: dict[int, dict[int, Path]] = {}
    for path in sorted(directory.iterdir()):
        match = _SHARD_NAME.fullmatch(path.name)
        if not match:
            continue
        index, count = int(match.group(1)), int(match.group(2))
        other = found.setdefault(count, {}).get(index)
        if other is not None:
            raise UserError(
                f"{other.name} and {path.name} in {directory} are both shard {index}/{count}; keep one of them"
            )
        found[count][index] = path
    if not found:
        raise UserError(
            f"no shard files (shard_<i>_of_<n>.json) in {directory}; run "
            "`robustbench-kd evaluate ... --name NAME --shard I/N` first"
        )
    if len(found) > 1:
        counts = ", ".join(str(c) for c in sorted(found))
        raise UserError(f"{directory} mixes shard files of runs split {counts} ways; keep the files of one split only")
    ((count, files),) = found.items()
    return count, files


def _first_missing(files: dict[int, Path], count: int, *, show: int = 5) -> list[int]:
    """Up to ``show`` shard indices below ``count`` without a file, found in at most ``len(files) + show`` steps.

    A forged name such as ``shard_0_of_999999999999.json`` must not make the merge count to a trillion.
    """
    missing: list[int] = []
    index = 0
    while index < count and len(missing) < show:
        if index not in files:
            missing.append(index)
        index += 1
    return missing


def _compare_settings(first: ShardRecord, record: ShardRecord) -> None:
    """Refuse two shards made with different settings (the informational ones only log a warning)."""
    for key in sorted(set(first.settings) | set(record.settings)):
        mine, theirs = record.settings.get(key), first.settings.get(key)
        if mine == theirs and type(mine) is type(theirs):
            continue
        if key in _INFORMATIONAL:
            log.warning(
                "shards differ in %s: %s has %s, %s has %s",
                key,
                first.path.name,
                _short(theirs),
                record.path.name,
                _short(mine),
            )
            continue
        what = "model ids" if key == "model_id" else f"settings: {key} is"
        raise UserError(
            f"shards were made with different {what} {_short(theirs)} in "
            f"{first.path.name} but {_short(mine)} in {record.path.name}; re-run the "
            "shards with the same arguments"
        )


def _check_autoattack_logs(records: list[ShardRecord]) -> None:
    """The shards' AutoAttack logs are regular files that fit, together, in one bundle log.

    Checked before anything is written, so that a FIFO, a device or an oversized log stops the merge
    instead of the bundle after the results and the leaderboard entry were written.
    """
    total = 0
    for record in records:
        name = record.run.get("autoattack_log")
        path = record.path.parent / name if isinstance(name, str) else None
        if path is not None and (path.exists() or path.is_symlink()):
            total += check_log_file(path)
    if total > LOG_LIMIT:
        raise UserError(
            f"the AutoAttack logs of the shards in {records[0].path.parent} hold {total / MiB:.0f} MiB together, "
            f"more than the {LOG_LIMIT // MiB} MiB a bundle's autoattack.log may hold (a leaderboard evaluation "
            "logs a few MiB); check those .autoattack.log files"
        )


def write_merged_outputs(merged: MergedShards, out_dir: str | Path, *, host: Any = None) -> Any:
    """Write ``results/<id>.json`` and, when standard AutoAttack ran, the leaderboard entry.

    The results file has the keys an unsharded ``evaluate --name`` writes, plus ``"shards"`` (how many
    were merged); its ``"sanity"`` holds every shard's sanity report. The leaderboard entry goes through
    the same writer (``model_info`` metadata from the shards; AutoAttack's warnings and failed sanity
    checks marking it unreliable; the ``rbkd_model_info`` hook of ``host``), then the submission bundle with
    every shard's AutoAttack log in shard order (ready or preview, as for an unsharded evaluation).
    Returns a ``ModelReport``.
    """
    result, settings, model_id = merged.result, merged.settings, merged.model_id
    out_dir = Path(out_dir)
    dataset, norm, eps = str(settings["dataset"]), result.norm, result.eps
    report = ModelReport(
        label=f"{model_id} ({len(merged.shards)} shards)",
        accuracy=dict(result.accuracy),
        pgd_alpha=result.pgd_alpha,
        pgd_steps=result.pgd_steps,
        n_examples=result.n_examples,
        flags=list(result.autoattack_flags),
        sanity=merged.sanity,
    )
    results = {
        "model": model_id,
        "dataset": dataset,
        "threat_model": norm,
        "eps": format_eps(eps),
        **result.to_dict(),
        "batch_size": settings["batch_size"],
        "sanity": merged.sanity.to_dict() if merged.sanity is not None else None,
        "shards": len(merged.shards),
    }
    points = points_from_result(
        result,
        model_id=model_id,
        dataset=dataset,
        data_sha256=str(settings["data_sha256"]),
        batch_size=int(settings["batch_size"]),
    )
    report.points_path = points_path(out_dir / "results", model_id)
    results["points"] = report.points_path.name
    write_points(report.points_path, points)  # first: the results JSON never names a missing file
    report.results_path = atomic_write_text(
        out_dir / "results" / f"{model_id}.json", json.dumps(results, indent=2) + "\n"
    )
    if "autoattack" in result.accuracy and "clean" in result.accuracy:
        known = {f.name for f in dataclasses.fields(ModelInfoSection)}
        meta = ModelInfoSection(**{k: v for k, v in (settings.get("model_info") or {}).items() if k in known})
        report.model_info_path = write_model_info_entry(
            result,
            model_id=model_id,
            dataset=dataset,
            norm=norm,
            eps=eps,
            out_dir=out_dir,
            meta=meta,
            architecture=settings.get("architecture"),
            host=host,
            run=None,
            sanity=merged.sanity,
        )
        _write_merged_bundle(merged, report, results, out_dir)
    else:
        log.warning(
            "the shards ran no 'clean' + standard 'autoattack': model_info JSON for %s not written "
            "(leaderboard entries need both)",
            model_id,
        )
    return report


def _write_merged_bundle(merged: MergedShards, report: Any, results: dict[str, Any], out_dir: Path) -> None:
    """The submission bundle of merged shards: shard 0's zoo checkpoint, every shard's AutoAttack log in order."""
    settings, model_id = merged.settings, merged.model_id
    checkpoint = zoo_checkpoint_path(
        out_dir, dataset=str(settings["dataset"]), threat_model=merged.result.norm, model_id=model_id
    )
    if report.model_info_path is None or not checkpoint.is_file():
        log.warning(
            "no submission bundle for %s: the zoo checkpoint %s (written by shard 0) is missing", model_id, checkpoint
        )
        return
    directory = merged.shards[0].path.parent
    names = [record.run.get("autoattack_log") for record in merged.shards]
    logs = [directory / name for name in names if isinstance(name, str)]
    if len(logs) != len(merged.shards) or not all(path.is_file() for path in logs):
        log.warning("a shard of %s has no AutoAttack log: the bundle has none (re-run that shard)", model_id)
        logs = []
    zoo_entry = settings.get("zoo_entry")
    bundle = write_submission_bundle(
        out_dir,
        model_id=model_id,
        threat_model=merged.result.norm,
        info_path=report.model_info_path,
        checkpoint_path=checkpoint,
        results=results,
        constructor=ZooConstructor(**zoo_entry) if isinstance(zoo_entry, dict) else None,
        autoattack_log=logs or None,
        keep_logs=True,  # the shards' own logs stay: merging again must give the same bundle
        command=shlex.join(["robustbench-kd", "merge-shards", str(directory)]),
        batch_size=int(settings["batch_size"]),
    )
    report.bundle_path, report.bundle_status = bundle.directory, bundle.status_line()


def merge_and_write(directory: str | Path, out_dir: str | Path | None = None, *, host: Any = None) -> Any:
    """:func:`merge_shards` then :func:`write_merged_outputs`; the CLI's ``merge-shards``.

    ``out_dir`` defaults to the ``--out`` of the shard runs, i.e. ``directory/../..`` when ``directory`` is
    ``<out>/shards/<name>``; elsewhere it must be given. Every shard is read and checked, and the output
    directory too, before anything is written: a bad shard leaves no output behind.
    """
    directory = Path(directory)
    if out_dir is not None:
        out_dir = output_directory(out_dir, what="--out")
    merged = merge_shards(directory)
    if out_dir is None:
        if directory.resolve().parent.name != "shards":
            raise UserError(f"{directory} is not <out>/shards/<name>; pass --out DIR for the merged results")
        out_dir = directory.resolve().parent.parent
    return write_merged_outputs(merged, out_dir, host=host)


def output_directory(value: str | os.PathLike[str], *, what: str) -> Path:
    """``value`` as the directory outputs go to: a plain path (``check_output_dir``) that is not a file.

    A file there would fail the first write with an OS error after the work was done; saying so first
    makes it the user's one-line mistake.
    """
    path = Path(check_output_dir(value, what=what))
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory; give a directory to write the outputs into")
    return path
