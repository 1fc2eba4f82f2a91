"""The training loop: :func:`train` runs the epochs, :func:`train_one_epoch` one epoch.

The path of one batch::

    train                       (here)        epochs: on_epoch_start, train_one_epoch, evaluation, checkpoints
      train_one_epoch           (here)        the epoch's batch source feeding one step per batch
        EpochBatches            (.batches)    order, extra-data mix, this process's share, resume skip
        train_step              (.step)       context, prepare, attack, loss, backward, optimiser,
                                              after_step, observers
          StepEngine            (.engine)     precision, compiled view, DDP, EMA
      (every checkpoint.every_steps steps)    a step checkpoint (.checkpoints.write_step_checkpoint)
      epoch end                               NaN check, epoch schedule, metrics summed over the processes

Exact resume: the data order, the augmentation and the attacks' random starts of epoch k come from
(run.seed, k) alone (:mod:`.batches`), and ``checkpoints/last.pt`` is written atomically after every epoch
with the student, optimiser, scheduler, method state, GradScaler and EMA copy. A run stopped after epoch k
and resumed therefore ends with the same weights as an uninterrupted run (bitwise on CPU with
``run.deterministic``). With ``checkpoint.every_steps = N``, ``last.pt`` is also rewritten every N optimiser
steps with the position inside the epoch (batches done, the epoch's metric sums, the global RNG state); a
resume from it draws the epoch's (seed, epoch) batches past the finished ones, restores the RNG, re-runs
``on_epoch_start`` and then puts the saved method state over it, so a kill at any instant resumes exactly
too. ``last.pt`` is always the last file written (the commit point): a crash between writes leaves a state
that resumes to the same result.

Checkpoint selection without test-set leakage: with ``eval.every = N`` the student is evaluated (clean and
PGD) every N epochs on the validation split held out of the training set (``data.val_size``), never on the
test set, which only the final evaluation reads. Whenever the ``eval.select`` metric improves,
``checkpoints/best.pt`` is written (before ``last.pt``, both atomically); the best-so-far record travels in
every checkpoint, so a resumed run never replaces ``best.pt`` with a worse epoch (:mod:`.selection`).

Under ``torchrun`` (:mod:`robustbench_kd.scale.distributed`) each process trains on its slice of every global
batch, only the outer loss goes through DistributedDataParallel, and rank 0 alone writes and evaluates.

One process writes a run directory: :func:`train` (and ``distill`` around it, through its final evaluation)
holds ``<out_dir>/run.lock`` (:mod:`robustbench_kd.storage.run_lock`); a second process is refused in one line
and writes nothing. A resume whose config differs from what ``last.pt`` was trained with is refused unless
``--resume-changed`` names the keys (:func:`.checkpoints.trained_with_changes`).

The run's set-up is :mod:`.setup`, its checkpoints and resume :mod:`.checkpoints`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from robustbench_kd.config import RunConfig
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.scale import distributed
from robustbench_kd.storage.atomic import atomic_write_text, remove_stale_temps
from robustbench_kd.storage.run_lock import RunDirLock
from robustbench_kd.training import checkpoints, selection
from robustbench_kd.training.batches import EpochBatches, seed_attack_rng
from robustbench_kd.training.engine import StepEngine
from robustbench_kd.training.metric_sums import MetricSums
from robustbench_kd.training.setup import Run, setup_run
from robustbench_kd.training.step import EpochAttacks, train_step

log = logging.getLogger(__name__)


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    """Train ``epoch`` (0-based) batch by batch; return its metrics (mean loss and terms, lr, timing)."""
    position, run.resume_position = run.resume_position, None  # set by a resume from a step checkpoint
    seed_attack_rng(run, epoch, position)
    batches = EpochBatches(run, epoch, position)
    sums = MetricSums() if position is None else MetricSums.from_position(position)
    seen = 0 if position is None else int(position["seen"])
    engine = StepEngine.for_run(run)
    attacks = EpochAttacks(run.host, run.distiller, engine.student)
    main = distributed.is_main()  # read once: the process's place does not change within an epoch
    every_steps = run.config.checkpoint.every_steps
    last = run.checkpoint_dir / "last.pt"
    start = time.perf_counter()
    engine.student.train()  # the whole student, once per epoch (an evaluation may have left it in eval)
    for batch in _progress(batches, f"epoch {epoch + 1}/{run.config.optim.epochs}", run.config.run.progress and main):
        names, values = train_step(run, engine, attacks, batch, epoch=epoch, observe=main)
        sums.add(names, values, len(batch.y))  # on the device; one host sync per epoch
        seen += len(batch.y)
        run.global_step += 1
        if run.guard.due():
            run.guard.check(last)
        # The epoch's last batch needs none: the epoch checkpoint follows at once.
        if every_steps and run.global_step % every_steps == 0 and batch.step + 1 < batches.total and main:
            checkpoints.write_step_checkpoint(
                run, checkpoints.step_position(run, epoch, batch.step + 1, batches.total, sums, seen)
            )
    return _end_epoch(run, epoch, sums, seen, time.perf_counter() - start)


def _end_epoch(run: Run, epoch: int, sums: MetricSums, seen: int, elapsed: float) -> dict[str, float]:
    """Check the epoch's record, step a per-epoch schedule, and reduce the sums to the epoch's metrics."""
    run.guard.check(run.checkpoint_dir / "last.pt")
    if run.scheduler is not None and not run.per_batch_schedule:
        run.scheduler.step()
    totals, seen = distributed.reduce_epoch_sums(sums.by_name(), seen)  # DDP: the global batch's numbers
    metrics = {name: float(value) / seen for name, value in totals.items()}
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise UserError(
            f"training diverged in epoch {epoch + 1}: non-finite {', '.join(bad)}; lower optim.lr or check "
            f"the method options (last good checkpoint: {run.checkpoint_dir / 'last.pt'})"
        )
    metrics.update(
        epoch=epoch + 1,
        lr=run.optimizer.param_groups[0]["lr"],
        seconds=round(elapsed, 3),
        images_per_s=round(seen / max(elapsed, 1e-9), 1),
    )
    return metrics


def _progress(batches: EpochBatches, desc: str, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=batches.total, initial=batches.first_step, desc=desc, leave=False, dynamic_ncols=True)


def write_metrics(run: Run) -> None:
    lines = "".join(json.dumps(row) + "\n" for row in run.history)
    atomic_write_text(run.out_dir / "metrics.jsonl", lines)


def train(
    config: RunConfig,
    *,
    host: PluginHost | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    resume_changed: Sequence[str] = (),
    lock: RunDirLock | None = None,
) -> Run:
    """Train (or resume) a run and return it; writes checkpoints, metrics and the resolved config.

    Args:
        resume: continue from ``<out_dir>/checkpoints/last.pt``.
        stop_after: return once this many epochs are complete (a time-limited job on a cluster); the
            schedule still spans ``optim.epochs`` and ``resume`` continues where it stopped.
        resume_changed: config keys (or whole sections) a resume may change from what the checkpoint was
            trained with (``--resume-changed``); any other change is refused (:mod:`.checkpoints`).
        lock: the run directory's lock when the caller holds it beyond training (``distill`` evaluates
            after); by default this call takes it and lets it go on return.
    """
    allowed = checkpoints.parse_resume_changed(resume_changed, resume=resume)
    main = distributed.from_environ().is_main  # under torchrun only rank 0 writes files and evaluates
    with contextlib.ExitStack() as stack:
        if lock is None:
            lock = stack.enter_context(RunDirLock(config.run.out_dir))
        if main:
            check_run_dir(Path(config.run.out_dir))
            lock.claim_existing()  # before last.pt is read: another process may be writing it
        run = _train(config, host, resume, stop_after, allowed, lock if main else None)
    return run


def _train(
    config: RunConfig,
    host: PluginHost | None,
    resume: bool,
    stop_after: int | None,
    allowed: tuple[str, ...],
    lock: RunDirLock | None,
) -> Run:
    run = setup_run(config, host)
    main = distributed.is_main()
    seen = _resume_or_refuse(run, resume=resume, allowed=allowed)
    run.distiller.on_train_start(run)
    # Only a run that has been set up completely (method hooks included) gets a directory.
    distributed.barrier()  # every rank has looked at last.pt before rank 0 writes anything
    if main:
        assert lock is not None
        _write_start(run, lock, resume=resume, seen=seen)
        run.host.train_start(run)
    last_epoch = config.optim.epochs if stop_after is None else min(stop_after, config.optim.epochs)
    for epoch in range(run.epoch, last_epoch):
        run.distiller.on_epoch_start(epoch, config.optim.epochs)
        if run.resume_position is not None:
            # Mid-epoch resume: on_epoch_start set the epoch's settings; the state accumulated in the
            # epoch's finished batches comes back from the step checkpoint.
            run.distiller.load_method_state(run.resume_position["method_state"])
        if main:
            run.host.epoch_start(run, epoch)
        metrics = train_one_epoch(run, epoch)
        metrics.update(run.distiller.on_epoch_end(epoch, config.optim.epochs))
        if main:
            _finish_epoch(run, epoch, metrics)
        else:  # rank 0 evaluates and writes; the others wait for it before the next epoch
            run.epoch = epoch + 1
        distributed.barrier()
    if main:
        run.host.train_end(run, run.history[-1] if run.history else {})
    return run


#: What a run directory holds, by relative path: True for a directory, False for a regular file.
_RUN_DIR_PARTS = {
    "checkpoints": True,
    "checkpoints/last.pt": False,
    "checkpoints/best.pt": False,
    "config.yaml": False,
    "metrics.jsonl": False,
}


def check_run_dir(out_dir: Path) -> None:
    """Refuse a run directory whose parts are not what a run writes there (a directory as ``last.pt``, ...).

    Checked before set-up, so the mistake costs nothing and nothing is written; a FIFO is never opened.
    """
    for relative, directory in {".": True, **_RUN_DIR_PARTS}.items():
        path = out_dir / relative
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):  # absent, or a part above it is reported
            continue
        if directory != stat.S_ISDIR(mode) or not (directory or stat.S_ISREG(mode)):
            kind = "a directory" if directory else "a regular file"
            raise UserError(
                f"{path} is {_kind_of(mode)}, not {kind}; run.out_dir {out_dir} must be a run directory or not "
                "exist: remove it, or choose another run.out_dir"
            )


def _kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a file"


def _resume_or_refuse(run: Run, *, resume: bool, allowed: tuple[str, ...]) -> tuple[int, int, int] | None:
    """Resume from ``last.pt``, or refuse to start over an existing run. Reads only.

    Returns the identity of the ``last.pt`` resumed from (see :func:`_claim_run_dir`), None for a new run.
    """
    last = run.checkpoint_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise UserError(f"--resume: no checkpoint at {last}; start the run without --resume")
        seen = _identity(last)
        checkpoints.resume_from(run, last, allowed=allowed)
        return seen
    if last.is_file():
        raise UserError(
            f"{run.out_dir} already holds a run ({last}); pass --resume to continue it, or choose another run.out_dir"
        )
    return None


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which file ``path`` is now: every atomic rewrite gives a new inode."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _claim_run_dir(run: Run, lock: RunDirLock, *, resume: bool, seen: tuple[int, int, int] | None) -> None:
    """Take the run directory's lock (creating both if new), then check ``last.pt`` is the one set up from.

    A directory without a lock file yet (a new one, or one from an older version) is locked only now; a
    process that started meanwhile and finished would have changed ``last.pt``.
    """
    lock.claim()
    last = run.checkpoint_dir / "last.pt"
    if _identity(last) == seen:
        return
    lock.release()
    if seen is None:
        raise UserError(
            f"{run.out_dir} got a run ({last}) from another process while this one was starting; pass --resume "
            "to continue it, or choose another run.out_dir"
        )
    raise UserError(
        f"{last} was rewritten by another process while this one was starting; run the command again to "
        "resume from the new one"
    )


def _write_start(run: Run, lock: RunDirLock, *, resume: bool, seen: tuple[int, int, int] | None) -> None:
    """Rank 0, once the run is set up: lock and create the run directory, clear a killed run's temp files, write
    the config."""
    _claim_run_dir(run, lock, resume=resume, seen=seen)
    # A killed run leaves its half-written temp files; the files they were replacing are intact. Only the
    # lock's holder may remove them: another process's temp files would be live.
    for directory in (run.out_dir, run.checkpoint_dir):
        if directory.is_dir():
            remove_stale_temps(directory)
    atomic_write_text(run.out_dir / "config.yaml", _yaml(run.config.to_dict()))
    if resume:  # a crash after last.pt but before metrics.jsonl: the history in last.pt is the truth
        write_metrics(run)


def _finish_epoch(run: Run, epoch: int, metrics: dict[str, Any]) -> None:
    """Rank 0 after an epoch: validation and best.pt when due, observers, checkpoints, metrics.jsonl, log."""
    every, epochs = run.config.eval.every, run.config.optim.epochs
    improved = False
    if every and ((epoch + 1) % every == 0 or epoch + 1 == epochs):
        metrics.update(selection.quick_eval(run))
        improved = selection.update_best(run, epoch + 1, metrics)
        best = run.best
        assert best is not None  # update_best has recorded this epoch or kept an earlier one
        metrics["best_epoch"] = best["epoch"]
        if improved:
            log.info(
                "epoch %d is the best so far (%s=%.4g): writing %s",
                epoch + 1,
                best["metric"],
                best[best["metric"]],
                run.checkpoint_dir / "best.pt",
            )
    run.host.epoch_end(run, epoch, metrics)
    run.epoch = epoch + 1
    run.history.append(metrics)
    checkpoints.write_checkpoints(run, improved=improved)
    write_metrics(run)
    log.info(
        "epoch %d/%d %s",
        epoch + 1,
        epochs,
        " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)),
    )


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
