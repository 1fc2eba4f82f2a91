"""Seed sweeps: one configuration trained once per training seed, resumably, with the spread over seeds.

``distill_seeds(config, [0, 1, 2])`` is ``robustbench-kd distill CONFIG --seeds 0,1,2``. The sweep directory
is the configuration's ``run.out_dir``; it holds::

    sweep.json       the manifest: the shared configuration, the base name, one entry per seed
    sweep.lock       held (flock) for the whole sweep, so two sweeps in one directory cannot interleave
    seed_<s>/        an ordinary run directory: run.seed = s, run.out_dir = <sweep>/seed_<s>,
                     run.name = <name>_seed<s> (the result files of two seeds never share a name)
    aggregate.json   per accuracy key: the value of each seed, mean, std, interval
    aggregate.md     the same as a small Markdown table, in percent

The *shared configuration* is the resolved configuration without the keys a sweep sets per seed
(``run.seed``, ``run.out_dir``, ``run.name``) and without ``run.progress``, which changes no result. A sweep
directory whose manifest records another shared configuration (or another base name) is refused before
anything runs, listing the differing keys with both values, as a resume refuses a changed configuration.
Adding seeds to an existing sweep is allowed; the manifest then lists the union.

Resuming is per seed: a seed whose ``results/<name>_seed<s>.json`` exists is finished and not rerun (its
accuracies are read back), one with ``checkpoints/last.pt`` but no results is resumed (the run's own resume,
which refuses a checkpoint trained with another configuration), any other is trained from the start.

Statistics (:func:`~robustbench_kd.analysis.comparison.statistics.seed_interval`): for the accuracies
``a_1..a_n`` of the ``n`` seeds of this call, the mean ``m = (1/n) sum a_i``, the sample standard deviation
``s = sqrt(sum (a_i - m)^2 / (n - 1))`` and the Student-t interval ``m +- t_{0.975, n-1} * s / sqrt(n)``. The
interval is not clipped to [0, 1]: it is the t interval as computed, so a reader can check it. With one seed
there is no spread: std and interval are ``null`` in ``aggregate.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustbench_kd.analysis.comparison.statistics import Interval, seed_interval
from robustbench_kd.api.runs import distill, resolve_config
from robustbench_kd.config import RunConfig
from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_text
from robustbench_kd.storage.bounded import MiB, load_json_bounded
from robustbench_kd.storage.run_lock import RunDirLock
from robustbench_kd.threat import SEED_MAX, check_seed

__all__ = [
    "MANIFEST_FORMAT",
    "SeedRun",
    "SweepResult",
    "aggregate_runs",
    "distill_seeds",
    "parse_seeds",
    "shared_config",
]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "robustbench_kd.sweep"
AGGREGATE_FORMAT = "robustbench_kd.sweep_aggregate"
FORMAT_VERSION = 1
MANIFEST_NAME = "sweep.json"
LOCK_NAME = "sweep.lock"
AGGREGATE_JSON = "aggregate.json"
AGGREGATE_MD = "aggregate.md"
CONFIDENCE = 0.95
#: More seeds than anyone trains; a bound, so that ``0-4294967295`` is refused instead of filling the memory.
MAX_SEEDS = 1000
#: A manifest of MAX_SEEDS entries and a large configuration is well under this; a results file too.
MANIFEST_LIMIT = 4 * MiB
RESULTS_LIMIT = 4 * MiB
#: The ``run`` keys a sweep sets per seed, and ``progress`` (bars on or off change no result).
NOT_SHARED = ("seed", "out_dir", "name", "progress")
#: What a manifest entry's status says about the last call that listed the seed.
STATUSES = ("pending", "finished", "resumed", "trained")
#: At most this many differing keys are named when a changed configuration is refused.
_SHOWN_DIFFERENCES = 4
_SEEDS_FORM = f"give seeds as 0,1,2 or a range 0-4 (integers in [0, {SEED_MAX}], each once)"
_ABSENT = "(absent)"


@dataclass(frozen=True)
class SeedRun:
    """One seed of a sweep.

    Attributes:
        seed: the training seed (``run.seed`` of this run).
        run_dir: its run directory, ``<sweep>/seed_<seed>``.
        model_id: its ``run.name``, ``<name>_seed<seed>``: the stem of its results and zoo files.
        status: ``"finished"`` (done before this call, not rerun), ``"resumed"`` (continued from its
            ``last.pt``) or ``"trained"`` (trained from the start in this call).
        metrics: its final test accuracies by attack key (``results/<model_id>.json`` ``"accuracy"``),
            fractions in [0, 1].
    """

    seed: int
    run_dir: Path
    model_id: str
    status: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class SweepResult:
    """What :func:`distill_seeds` made.

    Attributes:
        sweep_dir: the sweep directory (the configuration's ``run.out_dir``).
        runs: the seeds of this call, in seed order.
        aggregate: per accuracy key present in every seed's results (``"clean"``, ``"pgd-20"``,
            ``"autoattack"``, ...): the mean over the seeds with its Student-t interval.
        paths: ``manifest`` (``sweep.json``), ``aggregate_json``, ``aggregate_md``.
    """

    sweep_dir: Path
    runs: list[SeedRun]
    aggregate: dict[str, Interval]
    paths: dict[str, Path]


# -- seeds ----------------------------------------------------------------------------------------------
def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds``: ``"0,1,2"`` -> ``[0, 1, 2]``, ``"0-4"`` -> ``[0, 1, 2, 3, 4]`` (inclusive).

    Items are separated by commas; each is a seed or a range ``low-high``. Every seed is checked with
    :func:`~robustbench_kd.threat.check_seed`; an empty item, a duplicate, a backwards range, anything else,
    or more than :data:`MAX_SEEDS` seeds is a one-line UserError naming the value and the valid form.
    """
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--seeds is empty ({_short(text)}); {_SEEDS_FORM}")
    seeds: list[int] = []
    seen: set[int] = set()
    for item in text.split(","):
        part = item.strip()
        if not part:
            raise UserError(f"--seeds {_short(text)} has an empty item; {_SEEDS_FORM}")
        low, dash, high = (p.strip() for p in part.partition("-"))
        numbers = [low, high] if dash else [low]
        # At most 20 digits: more cannot be a seed, and int() of thousands of digits is refused by Python.
        if not all(re.fullmatch(r"[0-9]{1,20}", n) for n in numbers):
            raise UserError(f"--seeds item {_short(part)} is not a seed or a range; {_SEEDS_FORM}")
        first, last = (check_seed(int(n), what=f"--seeds item {part!r}: a seed") for n in (low, high if dash else low))
        if last < first:
            raise UserError(f"--seeds range {part!r} runs backwards; write it low-high, e.g. {last}-{first}")
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise UserError(f"--seeds {_short(text)} names more than {MAX_SEEDS} seeds; {_SEEDS_FORM}")
        for seed in range(first, last + 1):
            if seed in seen:
                raise UserError(f"--seeds {_short(text)} names seed {seed} twice; {_SEEDS_FORM}")
            seen.add(seed)
            seeds.append(seed)
    return seeds


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    """``seeds`` of :func:`distill_seeds`, checked, in increasing order."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence):
        raise UserError(
            f"seeds must be a list of integers, e.g. [0, 1, 2], got {_short(seeds)}; parse text with parse_seeds"
        )
    if not seeds:
        raise UserError("seeds is empty; give at least one seed, e.g. [0, 1, 2]")
    if len(seeds) > MAX_SEEDS:
        raise UserError(f"seeds names {len(seeds)} seeds, more than {MAX_SEEDS}")
    checked = [check_seed(seed, what=f"seeds[{i}]") for i, seed in enumerate(seeds)]
    repeated = sorted({seed for seed in checked if checked.count(seed) > 1})
    if repeated:
        raise UserError(f"seeds names seed {repeated[0]} more than once; give each seed once, e.g. [0, 1, 2]")
    return sorted(checked)


def _refuse_seed_override(overrides: Sequence[str] | None) -> None:
    for item in overrides or ():
        key = item.partition("=")[0]
        if [part.strip() for part in key.split(".")] == ["run", "seed"]:
            raise UserError(
                f"--seeds sets run.seed; drop --set {item.strip()} (each seed runs in <run.out_dir>/seed_<seed>)"
            )


# -- configurations -------------------------------------------------------------------------------------
def shared_config(config: RunConfig) -> dict[str, Any]:
    """The plain configuration every seed of a sweep shares: ``config`` less the ``run`` keys in :data:`NOT_SHARED`."""
    data = config.to_dict()
    data["run"] = {key: value for key, value in data["run"].items() if key not in NOT_SHARED}
    return data


def _seed_config(config: RunConfig, sweep_dir: Path, seed: int) -> RunConfig:
    """The configuration of seed ``seed``: run.seed, run.out_dir and run.name set (and checked) for it."""
    run = dataclasses.replace(
        config.run, seed=seed, out_dir=str(sweep_dir / f"seed_{seed}"), name=_model_id(config.run.name, seed)
    )
    return dataclasses.replace(config, run=run)


def _model_id(name: str, seed: int) -> str:
    return f"{name}_seed{seed}"


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two plain mappings, with both values (tables compared key by key)."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        return [] if old == new else [(prefix, old, new)]
    found = []
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}.{key}" if prefix else str(key)
        found += _differences(old.get(key, _ABSENT), new.get(key, _ABSENT), dotted)
    return found


# -- the manifest ---------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict[str, Any] | None:
    """The checked manifest at ``path``, or None when there is none; damage or a foreign file is one line."""
    if not os.path.lexists(path):
        return None
    data = load_json_bounded(path, limit=MANIFEST_LIMIT, what="sweep manifest")
    away = "move it away (and the seed_* directories with it), or choose another run.out_dir"
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a seed-sweep manifest (no format {MANIFEST_FORMAT!r}); {away}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(
            f"sweep manifest {path} has format_version {_short(version)}; this version reads {FORMAT_VERSION}: {away}"
        )
    name, config, runs = data.get("name"), data.get("config"), data.get("runs")
    if not isinstance(name, str) or not isinstance(config, dict) or not isinstance(runs, list):
        raise UserError(f"sweep manifest {path} is damaged (it needs a name, a config table and a runs list); {away}")
    seeds: set[int] = set()
    for entry in runs:
        seed = _entry_seed(entry, name)
        if seed is None or seed in seeds:
            raise UserError(f"sweep manifest {path} is damaged: its runs entry {_short(entry)} is not valid; {away}")
        seeds.add(seed)
    return data


def _entry_seed(entry: Any, name: str) -> int | None:
    """The seed of a manifest ``runs`` entry as :func:`_manifest` writes it, or None if it is not one."""
    seed = entry.get("seed") if isinstance(entry, dict) else None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        return None
    assert isinstance(entry, dict)
    written = {"seed": seed, "run_dir": f"seed_{seed}", "model_id": _model_id(name, seed)}
    if any(entry.get(key) != value for key, value in written.items()) or entry.get("status") not in STATUSES:
        return None
    return seed


def _manifest(name: str, config: Mapping[str, Any], entries: Mapping[int, str]) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": dict(config),
        "runs": [
            {"seed": seed, "run_dir": f"seed_{seed}", "model_id": _model_id(name, seed), "status": entries[seed]}
            for seed in sorted(entries)
        ],
    }


def _write_json(path: Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _refuse_changed(manifest: Mapping[str, Any], path: Path, name: str, shared: Mapping[str, Any]) -> None:
    """Refuse a sweep directory whose manifest records another shared configuration or base name."""
    changes = _differences({"run": {"name": manifest["name"]}}, {"run": {"name": name}})
    changes += _differences(manifest["config"], shared)
    if not changes:
        return
    shown = [f"{key} = {_short(old)} in the sweep, {_short(new)} now" for key, old, new in changes[:_SHOWN_DIFFERENCES]]
    more = f" and {len(changes) - _SHOWN_DIFFERENCES} more keys" if len(changes) > _SHOWN_DIFFERENCES else ""
    raise UserError(
        f"sweep directory {path.parent} was run with another configuration ({path}): {'; '.join(shown)}{more}; "
        "restore the sweep's values, or choose another run.out_dir for the new configuration"
    )


def _check_sweep_dir(sweep_dir: Path, manifest: Mapping[str, Any] | None) -> None:
    """Refuse what cannot be a sweep directory: a file, a single run's directory, seed runs of no manifest."""
    if os.path.lexists(sweep_dir) and not sweep_dir.is_dir():
        raise UserError(f"run.out_dir {sweep_dir} is not a directory; a seed sweep writes a directory there")
    if not sweep_dir.is_dir():
        return
    single = [part for part in ("config.yaml", "checkpoints") if os.path.lexists(sweep_dir / part)]
    if single:
        raise UserError(
            f"run.out_dir {sweep_dir} is the directory of a single run (it holds {' and '.join(single)}); a seed "
            "sweep needs a directory of its own: choose another run.out_dir"
        )
    if manifest is None:
        orphans = sorted(p.name for p in sweep_dir.iterdir() if re.fullmatch(r"seed_[0-9]+", p.name))
        if orphans:
            raise UserError(
                f"sweep directory {sweep_dir} holds {', '.join(orphans[:3])}{' ...' if len(orphans) > 3 else ''} "
                f"but no {MANIFEST_NAME} recording what they were trained with; move them away, or choose "
                "another run.out_dir"
            )


# -- the seeds' runs ------------------------------------------------------------------------------------
def _results_path(config: RunConfig) -> Path:
    return Path(config.run.out_dir) / "results" / f"{config.run.name}.json"


def _read_metrics(config: RunConfig) -> dict[str, float]:
    """The final accuracies a seed's run wrote (``results/<model_id>.json``), checked to be fractions."""
    path = _results_path(config)
    data = load_json_bounded(path, limit=RESULTS_LIMIT, what="results file")
    again = f"remove {path} to evaluate seed {config.run.seed} again"
    accuracy = data.get("accuracy") if isinstance(data, dict) else None
    if not isinstance(accuracy, dict) or not accuracy:
        raise UserError(f"results file {path} has no 'accuracy' table; {again}")
    if data.get("model") != config.run.name:
        raise UserError(f"results file {path} is for model {_short(data.get('model'))}, not {config.run.name}; {again}")
    for key, value in accuracy.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise UserError(f"results file {path}: accuracy {key!r} = {_short(value)} is not in [0, 1]; {again}")
    return {str(key): float(value) for key, value in accuracy.items()}


def _plan(config: RunConfig) -> str:
    """``"finished"``, ``"resumed"`` or ``"trained"``: what this call does with a seed (reads only)."""
    if os.path.lexists(_results_path(config)):
        return "finished"
    if os.path.lexists(Path(config.run.out_dir) / "checkpoints" / "last.pt"):
        return "resumed"
    return "trained"


# -- aggregate ------------------------------------------------------------------------------------------
def aggregate_runs(runs: Sequence[SeedRun], confidence: float = CONFIDENCE) -> dict[str, Interval]:
    """Per accuracy key present in every run's metrics (in the first run's order): the seed interval."""
    if not runs:
        return {}
    keys = [key for key in runs[0].metrics if all(key in run.metrics for run in runs)]
    missing = sorted({key for run in runs for key in run.metrics} - set(keys))
    if missing:
        log.info("not aggregated (missing from some seeds' results): %s", ", ".join(missing))
    return {key: seed_interval([run.metrics[key] for run in runs], confidence=confidence) for key in keys}


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined statistic (one seed) is written as null."""
    return value if math.isfinite(value) else None


def _aggregate_json(name: str, runs: Sequence[SeedRun], aggregate: Mapping[str, Interval]) -> dict[str, Any]:
    return {
        "format": AGGREGATE_FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "seeds": [run.seed for run in runs],
        "metrics": {
            key: {
                "per_seed": {str(run.seed): run.metrics[key] for run in runs},
                "mean": interval.estimate,
                "std": _number(interval.std),
                "low": _number(interval.low),
                "high": _number(interval.high),
                "n": interval.n,
                "confidence": interval.confidence,
                "method": interval.method,
            }
            for key, interval in aggregate.items()
        },
    }


def _percent(value: float) -> str:
    return f"{100 * value:.2f}" if math.isfinite(value) else "n/a"


def _aggregate_md(name: str, runs: Sequence[SeedRun], aggregate: Mapping[str, Interval]) -> str:
    level = f"{100 * CONFIDENCE:g}%"
    seeds = ", ".join(str(run.seed) for run in runs)
    lines = [
        f"# Seed sweep {name}",
        "",
        f"Final test accuracy (%) over seeds {seeds} (n = {len(runs)}): mean, sample standard deviation and "
        f"the {level} Student-t interval of the mean.",
        "",
        f"| metric | mean | std | {level} interval | per seed |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for key, interval in aggregate.items():
        bounds = f"[{_percent(interval.low)}, {_percent(interval.high)}]" if math.isfinite(interval.low) else "n/a"
        per_seed = ", ".join(f"{run.seed}: {_percent(run.metrics[key])}" for run in runs)
        lines.append(f"| {key} | {_percent(interval.estimate)} | {_percent(interval.std)} | {bounds} | {per_seed} |")
    return "\n".join(lines) + "\n"


# -- the sweep ------------------------------------------------------------------------------------------
class _SweepLock(RunDirLock):
    """:class:`RunDirLock` on ``<sweep>/sweep.lock``: the seeds' own ``run.lock`` files are one level down."""

    def __init__(self, sweep_dir: Path) -> None:
        super().__init__(sweep_dir)
        self.path = self.out_dir / LOCK_NAME


def distill_seeds(
    config: str | os.PathLike[str] | Mapping[str, Any] | RunConfig,
    seeds: Sequence[int],
    *,
    overrides: Sequence[str] | None = None,
    progress: bool = True,
    resume_changed: Sequence[str] = (),
) -> SweepResult:
    """Train ``config`` once per seed in ``<run.out_dir>/seed_<s>/`` and aggregate the final accuracies.

    Args:
        config: what :func:`~robustbench_kd.api.runs.distill` accepts (a run file, a mapping, a RunConfig).
        seeds: the training seeds of this call (``parse_seeds("0-4")``); run in increasing order.
        overrides: ``--set`` strings; ``run.seed`` is refused (the sweep sets it).
        progress: ``False`` switches the progress bars off.
        resume_changed: keys a resumed seed may change from its checkpoint (``--resume-changed``).

    Finished seeds are read back, interrupted ones resumed, the others trained (see the module docs); the
    aggregate is over the seeds of this call. Mistakes (bad seeds, a changed configuration in an existing
    sweep, a damaged manifest, no final evaluation) are one-line UserErrors raised before anything is written.
    """
    from robustbench_kd.scale import distributed
    from robustbench_kd.training.checkpoints import parse_resume_changed

    chosen = _check_seeds(seeds)
    resolved = resolve_config(config, overrides)
    _refuse_seed_override(overrides)
    if not resolved.eval.attacks:
        raise UserError(
            "a seed sweep aggregates the final evaluation, but eval.attacks is empty; set it, "
            'e.g. eval.attacks = ["clean", "pgd", "autoattack"]'
        )
    if distributed.from_environ().enabled:
        raise UserError("--seeds runs the seeds one after another in one process; under torchrun run one seed per job")
    parse_resume_changed(resume_changed, resume=True)  # the names now; each resumed seed uses them
    sweep_dir, name = Path(resolved.run.out_dir), resolved.run.name
    shared = shared_config(resolved)
    configs = {seed: _seed_config(resolved, sweep_dir, seed) for seed in chosen}  # every run.name checked
    manifest_path = sweep_dir / MANIFEST_NAME

    with _SweepLock(sweep_dir) as lock:
        if sweep_dir.is_dir():
            lock.claim_existing()  # before the manifest is read: another sweep may be writing it
        previous = _read_manifest(manifest_path) if sweep_dir.is_dir() else None
        _check_sweep_dir(sweep_dir, previous)
        if previous is not None:
            _refuse_changed(previous, manifest_path, name, shared)
        plan = {seed: _plan(configs[seed]) for seed in chosen}
        metrics = {seed: _read_metrics(configs[seed]) for seed in chosen if plan[seed] == "finished"}
        entries = {int(entry["seed"]): str(entry["status"]) for entry in (previous or {}).get("runs", [])}
        entries.update({seed: "finished" if plan[seed] == "finished" else "pending" for seed in chosen})

        lock.claim()  # the first write: everything above only read
        _write_json(manifest_path, _manifest(name, shared, entries))
        _log_plan(sweep_dir, plan)
        runs = []
        for seed in chosen:
            if plan[seed] != "finished":
                resume = plan[seed] == "resumed"
                log.info("seed %d: %s %s", seed, "resuming" if resume else "training", configs[seed].run.out_dir)
                distill(
                    configs[seed], resume=resume, progress=progress, resume_changed=resume_changed if resume else ()
                )
                metrics[seed] = _read_metrics(configs[seed])
                entries[seed] = plan[seed]
                _write_json(manifest_path, _manifest(name, shared, entries))
            run_dir = Path(configs[seed].run.out_dir)
            runs.append(SeedRun(seed, run_dir, configs[seed].run.name, plan[seed], metrics[seed]))

        aggregate = aggregate_runs(runs)
        paths = {
            "manifest": manifest_path,
            "aggregate_json": _write_json(sweep_dir / AGGREGATE_JSON, _aggregate_json(name, runs, aggregate)),
            "aggregate_md": atomic_write_text(sweep_dir / AGGREGATE_MD, _aggregate_md(name, runs, aggregate)),
        }
    log.info("seed sweep %s: %d seeds aggregated in %s", name, len(runs), paths["aggregate_md"])
    return SweepResult(sweep_dir=sweep_dir, runs=runs, aggregate=aggregate, paths=paths)


def _log_plan(sweep_dir: Path, plan: Mapping[int, str]) -> None:
    for status, words in (("finished", "finished, not rerun"), ("resumed", "resumed from last.pt"), ("trained", "new")):
        seeds = [str(seed) for seed, planned in plan.items() if planned == status]
        if seeds:
            log.info("seed sweep %s: seeds %s %s", sweep_dir, ", ".join(seeds), words)


def _short(value: Any) -> str:
    """``repr`` for a message, cut to one short line."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
