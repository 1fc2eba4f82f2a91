"""A run's checkpoints: what they hold, writing them (``last.pt`` last: the commit point), resuming from one.

A step checkpoint (``checkpoint.every_steps``) also holds the position inside the epoch: batches done,
the epoch's metric sums and the global RNG state (:func:`step_position`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.scale.ema import StudentEMA
from robustbench_kd.storage.checkpoint import load_checkpoint, restore_plain, save_checkpoint
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


def resume_from(run: Run, path: Path) -> None:
    """Restore a run from a checkpoint written by :func:`write_checkpoints`."""
    data = load_checkpoint(path, map_location=run.device)
    saved = data.get("config", {})
    for key in ("method", "student"):
        if saved.get(key) != run.config.to_dict()[key]:
            raise UserError(
                f"cannot resume {path}: its [{key}] section {saved.get(key)} differs from the config's "
                f"{run.config.to_dict()[key]}"
            )
    # A different validation split would change the training set mid-run.
    saved_val = saved.get("data", {}).get("val_size", 0)
    if saved_val != run.config.data.val_size:
        raise UserError(
            f"cannot resume {path}: it was trained with data.val_size = {saved_val}, the config "
            f"has {run.config.data.val_size}; use the same value"
        )
    saved_data = saved.get("data", {})
    saved_extra = [saved_data.get("extra_path"), saved_data.get("extra_fraction", 0.0)]  # older runs: none
    if saved_extra != [run.config.data.extra_path, run.config.data.extra_fraction]:
        raise UserError(
            f"cannot resume {path}: it was trained with data.extra_path/extra_fraction = {saved_extra}, "
            f"the config has {[run.config.data.extra_path, run.config.data.extra_fraction]}; use the same"
        )
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
