"""A run's checkpoints: what they hold, writing them (``last.pt`` last: the commit point), resuming from one.

A step checkpoint (``checkpoint.every_steps``) also holds the position inside the epoch: batches done,
the epoch's metric sums and the global RNG state (:func:`step_position`).

A resume reads only checkpoints of a known format, and compares what the checkpoint was trained with
(:data:`TRAINED_WITH`, the method with its options, the teachers by content) with the config: a change is
refused in one line naming every key with both values, unless ``--resume-changed`` allows it; an allowed
change is recorded in every later checkpoint (``config_changes``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.scale.ema import StudentEMA
from robustbench_kd.storage.checkpoint import check_format, load_checkpoint, restore_plain, save_checkpoint
from robustbench_kd.training.metric_sums import MetricSums
from robustbench_kd.training.nan_guard import check_finite_weights
from robustbench_kd.training.selection import selection_protocol
from robustbench_kd.training.setup import Run

log = logging.getLogger(__name__)


def checkpoint_payload(run: Run, position: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything a resume needs; ``position`` is set in a mid-epoch step checkpoint, None at epoch end.

    Refuses (UserError) if training went non-finite: no NaN reaches a file.
    """
    cfg = run.config
    last_good = run.checkpoint_dir / "last.pt"
    run.guard.check(last_good, collective=False)  # rank 0 alone writes: no collective here
    student = {k: v.detach().cpu() for k, v in run.student.state_dict().items()}
    check_finite_weights(student, epoch=run.epoch, last_good=last_good)
    return {
        "epoch": run.epoch,
        "global_step": run.global_step,
        "student": student,
        "student_arch": {"name": cfg.student.arch, "options": dict(cfg.student.options)},
        "num_classes": run.data.num_classes,
        "in_channels": run.data.in_channels,
        "image_size": run.data.image_size,
        "dataset": run.data.name,
        "method": cfg.method_name,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "distiller": run.distiller.state_dict(),
        "method_state": run.distiller.method_state(),
        "config": cfg.to_dict(),
        "history": run.history,
        "best": run.best,
        # The GradScaler state (speed.amp = "fp16" only) and the averaged student (ema.decay > 0), else None.
        "scaler": run.speed.state_dict() if run.speed is not None else None,
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "position": position,
        "teacher_identity": run.teacher_identity,
        "config_changes": run.config_changes,
    }


def step_position(run: Run, epoch: int, step: int, total: int, sums: MetricSums, seen: int) -> dict[str, Any]:
    """Where a step checkpoint stands in ``epoch``: ``step`` batches of ``total`` done.

    ``epoch``/``global_step`` in the payload count completed epochs and all steps; the data order and
    augmentation are re-derived from (seed, epoch), so only the global RNG (attack starts) and the
    epoch's running metric sums need saving.
    """
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    return {"epoch": epoch, "step": step, "batches": total, "seen": seen, **sums.position_entries(), "rng": rng}


def write_step_checkpoint(run: Run, position: dict[str, Any]) -> None:
    """Rewrite ``last.pt`` inside an epoch (``checkpoint.every_steps``), with the :func:`step_position`."""
    save_checkpoint(run.checkpoint_dir / "last.pt", checkpoint_payload(run, position))


def restore_rng(run: Run, rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["cpu"].cpu())
    if "cuda" in rng and run.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), run.device)


def write_checkpoints(run: Run, *, improved: bool = False) -> None:
    """``last.pt`` (every epoch), ``best.pt`` when this epoch improved, ``epoch_NNN.pt`` every N epochs.

    ``last.pt`` goes last: it is the commit point a resume starts from. A crash before it leaves
    ``last.pt`` at an earlier position whose best record is older, so the resumed epoch re-evaluates and
    rewrites ``best.pt`` and ``epoch_NNN.pt`` with the same content.
    """
    payload = checkpoint_payload(run)
    if improved:
        save_checkpoint(run.checkpoint_dir / "best.pt", payload)
    every = run.config.checkpoint.every
    if every and run.epoch % every == 0:
        save_checkpoint(run.checkpoint_dir / f"epoch_{run.epoch:03d}.pt", payload)
    save_checkpoint(run.checkpoint_dir / "last.pt", payload)


def resume_from(run: Run, path: Path, *, allowed: Collection[str] = ()) -> None:
    """Restore a run from a checkpoint written by :func:`write_checkpoints`.

    Refused in one line: a checkpoint of another format (:func:`check_format`) or without a training state,
    and one trained with another config (:func:`trained_with_changes`) unless each changed key is in
    ``allowed`` (``--resume-changed``; see :func:`parse_resume_changed`).
    """
    data = load_checkpoint(path, map_location=run.device)
    check_format(data, path)
    _check_entries(data, path, {"config": dict})  # first what it was trained with: the most useful refusal
    identity = data.get("teacher_identity")
    changes = trained_with_changes(run, data["config"], identity if isinstance(identity, Mapping) else None)
    accepted = accept_changes(changes, allowed, path)
    _check_entries(data, path, _RESUME_ENTRIES)
    run.config_changes = [*_recorded_changes(data), *({"epoch": int(data["epoch"]), **c} for c in accepted)]
    best = data.get("best")
    if best is not None and best.get("protocol") != selection_protocol(run):
        raise UserError(
            f"cannot resume {path}: its best.pt was chosen by {best.get('protocol')}, the config now ranks by "
            f"{selection_protocol(run)}; restore the [eval] settings (select, n_examples, pgd_steps, seed) "
            "or start a new run"
        )
    load_module_state(run.student, data["student"], what=f"the student ({run.config.student.arch})", source=path)
    restore_method(run, data["distiller"], data.get("method_state", {}), source=path)
    try:
        run.optimizer.load_state_dict(restore_plain(data["optimizer"]))
    except (ValueError, KeyError) as exc:  # another parameter layout: the method's networks changed
        raise UserError(
            f"cannot resume {path}: its optimiser state does not fit {method_origin(run)} ({exc}); resume with the "
            "plugin version that wrote it, or start a new run"
        ) from exc
    if run.scheduler is not None and data.get("scheduler") is not None:
        run.scheduler.load_state_dict(restore_plain(data["scheduler"]))
    run.epoch = int(data["epoch"])
    run.global_step = int(data["global_step"])
    run.history = list(data.get("history", []))
    run.best = best
    position = data.get("position")
    # Mid-epoch (a step checkpoint): train() re-runs on_epoch_start, then puts this method state back.
    run.resume_position = None if position is None else {**position, "method_state": data.get("method_state", {})}
    _resume_speed_and_ema(run, data, path)
    if best is not None and not (run.checkpoint_dir / "best.pt").is_file():
        log.warning(
            "resuming %s: the record says epoch %d was best but %s is missing; it is rewritten when "
            "a later epoch beats that record",
            path,
            best["epoch"],
            run.checkpoint_dir / "best.pt",
        )
    if position is None:
        log.info("resumed from %s after epoch %d", path, run.epoch)
    else:
        log.info("resumed from %s in epoch %d after batch %d", path, run.epoch + 1, position["step"])


def method_origin(run: Run) -> str:
    """``method 'name' (plugin 'p' from dist version)``: where the run's method comes from."""
    name = run.distiller.name
    plugin = run.host.methods.entry(name).plugin if name in run.host.methods else "(registered in code)"
    return f"method {name!r} (plugin {plugin!r} from {run.host.distribution_of(plugin)})"


def load_module_state(module: nn.Module, state: Mapping[str, Any], *, what: str, source: object) -> None:
    """``module.load_state_dict(state)`` strictly, refusing a mismatch in one line that names the keys."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        detail = " ".join(str(exc).split())
        raise UserError(f"cannot resume {source}: its state does not fit {what}: {detail}") from exc
    problems = []
    for label, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
        if keys:
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            problems.append(f"{label} key(s) {shown}")
    if problems:
        raise UserError(
            f"cannot resume {source}: its state does not fit {what}: {'; '.join(problems)}; resume with the "
            "version that wrote it, or start a new run"
        )


def restore_method(run: Run, state: Mapping[str, Any], method_state: Mapping[str, Any], *, source: object) -> None:
    """Load a checkpoint's ``distiller`` state and ``method_state`` into the run's method (after ``on_setup``).

    The same code serves ``--resume`` and the plugin contract's round trip. A method that no longer
    matches its checkpoint (a plugin upgrade, other options) fails in one line naming the method, its
    distribution and the keys.
    """
    origin = method_origin(run)
    load_module_state(run.distiller, state, what=origin, source=source)
    try:
        run.distiller.load_method_state(method_state)
    except UserError:
        raise
    except Exception as exc:  # plugin code: name it, keep the cause for --debug
        detail = " ".join(str(exc).split())
        raise UserError(
            f"cannot resume {source}: {origin} could not restore its method_state ({type(exc).__name__}: {detail})"
        ) from exc


def _resume_speed_and_ema(run: Run, data: dict[str, Any], path: Path) -> None:
    """Restore the GradScaler and the EMA copy; the [speed] switches may change between runs."""
    if run.speed is not None:
        run.speed.load_state_dict(data.get("scaler"))
    if run.ema is not None:
        if data.get("ema") is not None:
            run.ema.load_state_dict(data["ema"])
        else:
            # The copy made at setup holds the initial weights: restart the average from the resumed ones.
            log.warning("resuming %s without EMA state: the average starts from the resumed weights", path)
            run.ema = StudentEMA(run.student, run.config.ema)
    elif data.get("ema") is not None:
        log.warning("resuming %s with ema.decay = 0: its averaged weights are dropped", path)


# -- what a checkpoint was trained with ------------------------------------------------------------------
#: The keys of the config's sections that define what a checkpoint was trained with; [method] (its name and
#: every option, defaults included) and [teachers] (each role, by :attr:`Run.teacher_identity`) are compared
#: whole. The rest (zoo, eval, checkpoint, speed, ema, reports, ...) may change on resume.
TRAINED_WITH: dict[str, tuple[str, ...]] = {
    "student": ("arch", "options"),
    "threat": ("norm", "eps", "alpha", "steps"),
    "data": (
        "dataset",
        "n_train",
        "val_size",
        "extra_path",
        "extra_fraction",
        "augment",
        "batch_size",
        "preprocessing",
    ),
    "run": ("seed",),
    "optim": (
        "epochs",
        "lr",
        "momentum",
        "weight_decay",
        "nesterov",
        "schedule",
        "milestones",
        "gamma",
        "max_lr",
        "pct_start",
        "div_factor",
    ),
}
#: Read from the checkpoint's optimiser and scheduler state on resume, so a new value would not take effect.
_STATE_OWNED = frozenset(f"optim.{key}" for key in TRAINED_WITH["optim"] if key != "epochs")
#: Keys that change the number of optimiser steps, which a per-batch schedule (cosine, onecycle) fixed at the start.
_STEP_COUNT = frozenset(
    [
        "optim.epochs",
        *(f"data.{k}" for k in ("dataset", "n_train", "val_size", "extra_path", "extra_fraction", "batch_size")),
    ]
)
_ABSENT = "(absent)"


@dataclass(frozen=True)
class ConfigChange:
    """One key whose value in the config differs from the checkpoint's."""

    key: str  #: dotted, as ``--resume-changed`` names it: ``threat.eps``, ``method.beta``, ``teachers.robust``
    checkpoint: Any
    config: Any
    fixed: str | None = None  #: why it cannot change on resume even when allowed, or None

    def describe(self) -> str:
        text = f"{self.key} = {_show(self.checkpoint)} in the checkpoint, {_show(self.config)} in the config"
        return f"{text} (cannot change on resume: {self.fixed})" if self.fixed else text


def trained_with_changes(
    run: Run, saved: Mapping[str, Any], saved_teachers: Mapping[str, Any] | None
) -> list[ConfigChange]:
    """Every :data:`TRAINED_WITH` key, method option and teacher role whose value differs from the checkpoint's.

    A key an older checkpoint does not record is compared with the default it was trained with. Teachers
    are compared only when the checkpoint records their identity (checkpoints of this version do).
    """
    changes = _method_changes(run, saved.get("method", {}))  # what is trained first, then how
    for section, keys in TRAINED_WITH.items():
        if section == "threat":
            changes += _teacher_changes(run, saved.get("teachers", {}), saved_teachers)
        old, new = _section_values(saved, section), run.config.to_dict()[section]
        for key in keys:
            if key == "epochs" and not run.per_batch_schedule:
                continue  # more (or fewer) epochs of a per-epoch schedule: training on, as `stop_after` does
            if _plain_value(old.get(key)) != _plain_value(new.get(key)):
                changes.append(
                    ConfigChange(f"{section}.{key}", old.get(key), new.get(key), _why_fixed(run, f"{section}.{key}"))
                )
    return changes


def _section_values(saved: Mapping[str, Any], section: str) -> dict[str, Any]:
    """A checkpoint's config section with the defaults filled in for keys an older version did not write."""
    from robustbench_kd.config import SECTIONS, default_threat

    values = saved.get(section, {})
    if section == "threat":
        dataset = saved.get("data", {}).get("dataset", "digits")
        defaults = dataclasses.asdict(default_threat(str(dataset)))
    else:
        defaults = dataclasses.asdict(SECTIONS[section]())
    return {**defaults, **values}


def _why_fixed(run: Run, key: str) -> str | None:
    if key in _STATE_OWNED:
        return "the optimiser and learning-rate schedule continue from the checkpoint's state"
    if key in _STEP_COUNT and run.per_batch_schedule:
        return f"optim.schedule = {run.config.optim.schedule!r} spans the checkpoint's number of steps"
    return None


def _method_changes(run: Run, saved: Mapping[str, Any]) -> list[ConfigChange]:
    """The method's name, or its options with the defaults filled in (a default spelt out is no change)."""
    current = run.config.method
    if saved.get("name") != current["name"]:
        return [ConfigChange("method.name", saved.get("name"), current["name"])]
    old = {k: v for k, v in saved.items() if k != "name"}
    new = run.config.method_options
    try:
        old = _plain_value(dataclasses.asdict(type(run.distiller).config_from_mapping(old)))
        new = _plain_value(dataclasses.asdict(run.distiller.config))
    except (UserError, TypeError):  # an option this version of the method no longer has: compare as written
        pass
    keys = sorted(set(old) | set(new))
    return [
        ConfigChange(f"method.{k}", old.get(k, _ABSENT), new.get(k, _ABSENT))
        for k in keys
        if _plain_value(old.get(k, _ABSENT)) != _plain_value(new.get(k, _ABSENT))
    ]


def _teacher_changes(run: Run, saved_specs: Mapping[str, Any], saved: Mapping[str, Any] | None) -> list[ConfigChange]:
    """Roles added, removed, or computing something else (another file content, zoo entry, weights)."""
    current = run.teacher_identity
    if saved is None or current is None:
        return []
    changes = []
    for role in sorted(set(saved) | set(current)):
        if _plain_value(saved.get(role)) == _plain_value(current.get(role)):
            continue
        old, new = saved_specs.get(role, _ABSENT), run.config.teachers.get(role, _ABSENT)
        if _plain_value(old) == _plain_value(new):  # the same spec, another file behind it: show what differs
            old, new = saved.get(role, _ABSENT), current.get(role, _ABSENT)
        changes.append(ConfigChange(f"teachers.{role}", old, new))
    return changes


def accept_changes(changes: list[ConfigChange], allowed: Collection[str], path: Path) -> list[dict[str, Any]]:
    """Refuse the changes ``allowed`` does not name (or that cannot take effect); log and return the others.

    The one-line refusal lists every refused key with both values, grouped by section.
    """
    refused = [c for c in changes if c.fixed or not _allowed(c.key, allowed)]
    if refused:
        raise UserError(_refusal(refused, path))
    for change in changes:
        log.warning("resuming %s with %s (--resume-changed)", path, change.describe())
    return [{"key": c.key, "checkpoint": _plain_value(c.checkpoint), "config": _plain_value(c.config)} for c in changes]


def _refusal(refused: list[ConfigChange], path: Path) -> str:
    by_section: dict[str, list[str]] = {}
    for change in refused:
        by_section.setdefault(change.key.split(".")[0], []).append(change.describe())
    parts = [f"its [{section}] section differs: {', '.join(items)}" for section, items in by_section.items()]
    movable = [c.key for c in refused if not c.fixed]
    hint = f"pass --resume-changed {','.join(movable)} to train on with the config's values, " if movable else ""
    return (
        f"cannot resume {path}: {'; '.join(parts)}; {hint}restore the checkpoint's values, or choose another "
        "run.out_dir for a new run"
    )


def _allowed(key: str, allowed: Collection[str]) -> bool:
    """``key`` is named in ``allowed`` itself or by its section (``threat`` allows ``threat.eps``)."""
    return key in allowed or key.split(".")[0] in allowed


def parse_resume_changed(values: Sequence[str], *, resume: bool) -> tuple[str, ...]:
    """Check ``--resume-changed`` (comma-separated keys, repeatable) before anything is loaded.

    Valid names: a section (``threat``, ``method``, ``teachers``, ...) or one of its compared keys
    (``threat.eps``, ``method.<option>``, ``teachers.<role>``).
    """
    keys = tuple(k.strip() for value in values for k in str(value).split(","))
    if not keys:
        return ()
    if not resume:
        raise UserError("--resume-changed applies to --resume only; add --resume, or drop --resume-changed")
    valid = [*TRAINED_WITH, "method", "teachers", *(f"{s}.{k}" for s, ks in TRAINED_WITH.items() for k in ks)]
    for key in keys:
        section, dot, rest = key.partition(".")
        free = section in ("method", "teachers") and dot and rest
        if not free and key not in valid:
            raise UserError(
                f"--resume-changed: unknown key {key!r}{close_matches(key, valid)}; valid: "
                f"{', '.join(valid)}, method.<option>, teachers.<role>"
            )
    return keys


def _recorded_changes(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    recorded = data.get("config_changes")
    return list(recorded) if isinstance(recorded, list) else []


#: Entries a resume reads, with their types: anything else is not a checkpoint `distill` wrote.
_RESUME_ENTRIES: dict[str, type] = {
    "epoch": int,
    "global_step": int,
    "student": dict,
    "distiller": dict,
    "optimizer": dict,
}
#: Entries that may be absent (older checkpoints) or None, else of this type.
_OPTIONAL_ENTRIES: dict[str, type] = {"history": list, "best": dict, "position": dict, "method_state": dict}


def _check_entries(data: Mapping[str, Any], path: Path, required: Mapping[str, type]) -> None:
    """One line for a checkpoint that lacks the training state a resume reads (a teacher file as last.pt)."""
    kinds: dict[str, type | tuple[type, ...]] = dict(required)
    kinds.update({k: (kind, type(None)) for k, kind in _OPTIONAL_ENTRIES.items() if k in data})
    for key, kind in kinds.items():
        value = data.get(key)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
            raise UserError(
                f"cannot resume {path}: its {key!r} entry is {'missing' if value is None else type(value).__name__}; "
                "a checkpoint `robustbench-kd distill` wrote holds the whole training state (is it a teacher or "
                "an exported model?)"
            )
    config = data.get("config", {})
    for section in (*TRAINED_WITH, "method", "teachers"):
        if not isinstance(config.get(section, {}), Mapping):
            raise UserError(f"cannot resume {path}: its config's [{section}] is not a table")


def _plain_value(value: Any) -> Any:
    """JSON's view of a value: tuples and lists compare equal, as in the saved config."""
    return json.loads(json.dumps(value, default=str))


def _show(value: Any) -> str:
    text = value if value is _ABSENT else repr(_plain_value(value))
    return text if len(text) <= 120 else text[:117] + "..."
