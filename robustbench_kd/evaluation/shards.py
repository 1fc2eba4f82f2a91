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

import dataclasses
import json
import logging
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
from robustbench_kd.evaluation.autoattack import autoattack_state
from robustbench_kd.evaluation.export import save_zoo_checkpoint, zoo_checkpoint_path
from robustbench_kd.evaluation.final_report import ModelReport, write_model_info_entry
from robustbench_kd.evaluation.runner import EvalResult, evaluate_model
from robustbench_kd.evaluation.sanity import check_eps_units, check_evaluation
from robustbench_kd.storage.atomic import atomic_write_text
from robustbench_kd.submission.bundle import write_submission_bundle
from robustbench_kd.submission.section import ModelInfoSection
from robustbench_kd.submission.zoo_entry import ZooConstructor
from robustbench_kd.threat import format_eps, parse_number
from robustbench_kd.zoo.autoattack_resume import data_fingerprint, model_fingerprint
from robustbench_kd.zoo.names import validate_model_id

__all__ = [
    "SHARD_FORMAT",
    "MergedSanity",
    "MergedShards",
    "ShardRecord",
    "default_autoattack_state",
    "evaluate_shard",
    "merge_and_write",
    "merge_shards",
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
    model_id = validate_model_id(model_id)
    index, count = shard
    n = int(x.shape[0])
    if count > n:
        raise UserError(f"--shard {index}/{count}: {count} shards for {n} examples; use at most {n} shards")
    start, stop = shard_bounds(n, index, count)
    directory = shard_directory(out_dir, model_id)
    state = Path(aa_state) if aa_state is not None else default_autoattack_state(directory, index, count)
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


def _bad_shard(path: Path, why: str) -> UserError:
    return UserError(f"shard file {path} {why}; re-run that shard's evaluate command to rewrite it")


def read_shard(path: str | Path) -> ShardRecord:
    """Read and validate one shard file; a damaged or foreign file raises a one-line UserError."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad_shard(path, f"cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != SHARD_FORMAT:
        raise _bad_shard(path, "is not a robustbench-kd shard file")
    if raw.get("format_version") != SHARD_FORMAT_VERSION:
        raise _bad_shard(
            path, f"has format version {raw.get('format_version')!r}; this version reads {SHARD_FORMAT_VERSION}"
        )
    try:
        shard = raw["shard"]
        index, count, start, stop = (int(shard[k]) for k in ("index", "count", "start", "stop"))
        settings = dict(raw["settings"])
        per_example = {}
        for key, values in dict(raw["per_example"]).items():
            if len(values) != stop - start or any(v not in (0, 1) for v in values):
                raise _bad_shard(
                    path,
                    f"has {len(values)} flags for {key!r} where its range {start}-{stop} "
                    f"needs {stop - start} zeros and ones",
                )
            per_example[str(key)] = torch.tensor(values, dtype=torch.bool)
        if list(per_example) != list(settings["result_keys"]):
            raise _bad_shard(path, f"has flags for {list(per_example)} but results {settings['result_keys']}")
        return ShardRecord(
            path=path,
            index=index,
            count=count,
            start=start,
            stop=stop,
            settings=settings,
            run=dict(raw.get("run", {})),
            accuracy={str(k): float(v) for k, v in dict(raw["accuracy"]).items()},
            autoattack_flags=[str(f) for f in raw.get("autoattack_flags", [])],
            per_example=per_example,
            sanity=raw.get("sanity"),
        )
    except UserError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise _bad_shard(path, f"is damaged ({type(exc).__name__}: {exc})") from None


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
    found: dict[int, dict[int, Path]] = {}
    for path in sorted(directory.iterdir()):
        match = _SHARD_NAME.fullmatch(path.name)
        if match and path.is_file():
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if not found:
        raise UserError(
            f"no shard files (shard_<i>_of_<n>.json) in {directory}; run "
            "`robustbench-kd evaluate ... --name NAME --shard I/N` first"
        )
    if len(found) > 1:
        counts = ", ".join(str(c) for c in sorted(found))
        raise UserError(f"{directory} mixes shard files of runs split {counts} ways; keep the files of one split only")
    ((count, files),) = found.items()
    missing = [i for i in range(count) if i not in files]
    if missing:
        names = ", ".join(shard_file(directory, i, count).name for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(
            f"{len(missing)} of {count} shards missing in {directory}: {names}{more}; run the same "
            f"evaluate command with --shard {missing[0]}/{count}" + (" etc." if len(missing) > 1 else "")
        )
    records = [read_shard(files[i]) for i in range(count)]
    first = records[0]
    for record in records:
        if (record.index, record.count) != (_index_from(record.path), count):
            raise _bad_shard(record.path, f"holds shard {record.index}/{record.count}, not the one its name says")
        for key in sorted(set(first.settings) | set(record.settings)):
            mine, theirs = record.settings.get(key), first.settings.get(key)
            if mine == theirs:
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
            raise UserError(
                f"shards were made with different settings: {key} is {_short(theirs)} in "
                f"{first.path.name} but {_short(mine)} in {record.path.name}; re-run the "
                "shards with the same arguments"
            )
    settings = first.settings
    n = int(settings["n_examples"])
    for record in records:
        expected = shard_bounds(n, record.index, count)
        if (record.start, record.stop) != expected:
            raise UserError(
                f"{record.path.name} covers examples {record.start}-{record.stop - 1} but shard "
                f"{record.index}/{count} of {n} examples is {expected[0]}-{expected[1] - 1} (shards "
                "would overlap or leave a gap); re-run it"
            )

    per_example = {key: torch.cat([r.per_example[key] for r in records]) for key in settings["result_keys"]}
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
        autoattack_flags=flags,
        autoattack_version=settings["autoattack_version"],
        seed=int(settings["seed"]),
    )
    sanity = None
    if settings.get("sanity"):
        reports = [r.sanity for r in records if isinstance(r.sanity, dict)]
        if len(reports) != len(records):
            raise UserError(f"a shard in {directory} ran with sanity checks but saved no verdict; re-run it")
        reasons: list[str] = []
        for index, report in enumerate(reports):
            reasons.extend(f"shard {index}/{count}: {reason}" for reason in report.get("reasons", []))
        sanity = MergedSanity(reliable=all(bool(r.get("reliable")) for r in reports), reasons=reasons, shards=reports)
    return MergedShards(result=result, settings=settings, shards=records, sanity=sanity)


def _index_from(path: Path) -> int:
    match = _SHARD_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else -1


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
    ``<out>/shards/<name>``; elsewhere it must be given.
    """
    directory = Path(directory)
    merged = merge_shards(directory)
    if out_dir is None:
        if directory.resolve().parent.name != "shards":
            raise UserError(f"{directory} is not <out>/shards/<name>; pass --out DIR for the merged results")
        out_dir = directory.resolve().parent.parent
    return write_merged_outputs(merged, out_dir, host=host)
