"""The training loop: one readable loop for every method.

Per batch (the trainer never branches on a method's name)::

    ctx = BatchContext(x, y, index, student, teachers, threat, counters)
    distiller.prepare(ctx)
    spec = distiller.attack_spec(threat)                      # None: clean training
    ctx.x_adv = attack(x, y)   # host.make_attack(...), once per spec per epoch; maximises distiller.attack_loss
    (student in train mode); out = distiller.loss(ctx)
    out.total.backward(); optimiser.step(); per-batch scheduler step
    distiller.after_step(ctx, out); host.step_end(run, ctx, out)

``[speed]`` (:mod:`.speed`) wraps the attack (fp32 by default) and the loss (autocast) in contexts and does
the backward/step through a GradScaler for fp16; ``[ema]`` (:mod:`.ema`) updates the averaged student after
the optimiser step. Both are stored in every checkpoint.

Exact resume: the data order, the augmentation and the global torch RNG (attack starts) of epoch k
are seeded from (run.seed, k) alone, and ``checkpoints/last.pt`` is written atomically after every
epoch with the student, optimiser, scheduler and method state. A run stopped after epoch k and
resumed therefore ends with the same weights as an uninterrupted run (bitwise on CPU with
``run.deterministic``). With ``checkpoint.every_steps = N``, ``last.pt`` is also rewritten every N
optimiser steps with the position inside the epoch (batches done, the epoch's metric sums, the global
RNG state); a resume from it replays the epoch's (seed, epoch) generators past the finished batches,
restores the RNG, re-runs ``on_epoch_start`` and then the saved method state over it, so a kill at any
instant resumes exactly too. ``last.pt`` is always the last file written (the commit point): a crash
between writes leaves a state that resumes to the same result.

Checkpoint selection without test-set leakage: with ``eval.every = N`` the student is evaluated (clean
and PGD) every N epochs on the validation split held out of the training set (``data.val_size``),
never on the test set, which only the final evaluation reads. Whenever the ``eval.select`` metric
improves, ``checkpoints/best.pt`` is written (before ``last.pt``, both atomically); the best-so-far
record travels in every checkpoint, so a resumed run never replaces ``best.pt`` with a worse epoch.

Under ``torchrun`` (:mod:`robustbench_kd.scale.distributed`) each process trains on its slice of every global
batch, only the outer loss goes through DistributedDataParallel, and rank 0 alone writes and evaluates.

This module holds the loop and :func:`train`; the run's set-up is :mod:`.run_setup`, its checkpoints and
resume :mod:`.run_checkpoints`, checkpoint selection :mod:`.selection`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import torch
from torch import nn

from robustbench_kd.config import RunConfig
from robustbench_kd.context import BatchContext
from robustbench_kd.data.datasets import epoch_generator, iterate_batches, num_batches
from robustbench_kd.data.extra import batch_split, mix_extra
from robustbench_kd.distiller import AttackSpec, Distiller
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.scale import distributed
from robustbench_kd.scale.precision import SpeedPlan
from robustbench_kd.scale.sections import SpeedSection
from robustbench_kd.storage.atomic import atomic_write_text, remove_stale_temps
from robustbench_kd.storage.checkpoint import save_checkpoint
from robustbench_kd.training.checkpoints import (
    checkpoint_payload,
    restore_rng,
    resume_from,
    step_position,
    write_checkpoints,
)
from robustbench_kd.training.metric_sums import MetricSums
from robustbench_kd.training.selection import quick_eval, update_best
from robustbench_kd.training.setup import Run, build_optimizer, build_scheduler, drop_last_batch, setup_run

log = logging.getLogger(__name__)

# The run's set-up, checkpoints and selection live in their own modules; these names stay importable from here.
__all__ = ["Run", "build_optimizer", "build_scheduler", "checkpoint_payload", "quick_eval", "resume_from",
           "setup_run", "step_position", "train", "train_one_epoch", "update_best", "write_checkpoints"]


def train_one_epoch(run: Run, epoch: int) -> dict[str, float]:
    cfg, distiller, host = run.config, run.distiller, run.host
    # Issue 5: the loop calls the compiled view when speed.compile asks for one; run.student stays plain.
    speed = run.speed if run.speed is not None else SpeedPlan(SpeedSection(), run.device, run.student, run.teachers)
    student = speed.student
    # Everything random in this epoch derives from (seed, epoch): exact resume at epoch boundaries.
    # Under DDP each rank draws its own attack noise (distributed.rank_seed; rank 0's is a single run's).
    torch.manual_seed(distributed.rank_seed(epoch_generator(cfg.run.seed, epoch, stream=2).initial_seed()))
    position, run.resume_position = run.resume_position, None
    if position is not None:  # a step checkpoint: continue with the attack RNG where it stopped
        restore_rng(run, position["rng"])
    order_gen = epoch_generator(cfg.run.seed, epoch, stream=1)
    augment = run.data.augment_default if cfg.data.augment is None else cfg.data.augment
    real, extra = batch_split(cfg.data.batch_size, cfg.data.extra_fraction)  # extra > 0 only with data.extra_path
    batches = iterate_batches(run.data.train_x, run.data.train_y, batch_size=real,
                              shuffle=True, generator=order_gen, augment=augment, device="cpu",
                              drop_last=drop_last_batch(cfg, run.data))
    if extra:  # data.extra_fraction of every batch from the memory-mapped extra file
        batches = mix_extra(batches, run.data.extra, count=extra, offset=len(run.data.train_y),
                            generator=epoch_generator(cfg.run.seed, epoch, stream=3), augment=augment)
    # Every rank builds the same global batches and keeps its share of the real and of the extra images
    # (one process: just the move to the device).
    batches = distributed.shard_batches(batches, run.device, extra=extra)
    total = num_batches(len(run.data.train_y), real, drop_last_batch(cfg, run.data))
    sums = MetricSums()
    seen = skip = 0
    if position is not None:
        if position["batches"] != total:
            raise UserError(f"cannot resume mid-epoch: the step checkpoint was written with {position['batches']} "
                            f"batches per epoch, the config gives {total}; keep data.batch_size and data.n_train")
        sums, seen, skip = MetricSums.from_position(position), int(position["seen"]), int(position["step"])
    every_steps = cfg.checkpoint.every_steps
    main = distributed.is_main()  # read once: the process's place does not change within an epoch
    start = time.perf_counter()
    progress = _progress(batches, total, f"epoch {epoch + 1}/{cfg.optim.epochs}", cfg.run.progress and main)
    student.train()  # the whole student, once per epoch (an evaluation may have left it in eval)
    attacks = _EpochAttacks(host, distiller, student)
    for step, (x, y, index) in enumerate(progress):
        if step < skip:  # done before the step checkpoint; drawing it keeps the epoch's generators in step
            continue
        x = speed.inputs(x)
        _ensure_training(student)
        ctx = BatchContext(x=x, y=y, index=index, student=student, teachers=run.teachers, threat=cfg.threat,
                           epoch=epoch, num_epochs=cfg.optim.epochs, step=step, global_step=run.global_step)
        distiller.prepare(ctx)
        spec = distiller.attack_spec(cfg.threat)
        if spec is not None:
            attack = attacks.get(spec, ctx)
            with speed.attack_precision():
                ctx.x_adv = attack(x, y)
        _ensure_training(student)
        # DDP: only the outer loss goes through the wrapper (its backward averages the gradients); the
        # attack above ran on the unwrapped student, with input gradients only.
        ctx.student = student if run.ddp_student is None else run.ddp_student
        with speed.autocast():
            out = distiller.loss(ctx)
        run.optimizer.zero_grad(set_to_none=True)
        # Issue 6: NaN/inf loss terms and gradient norm are recorded on the device, looked at every few steps.
        names, values = run.guard.note_loss(out.total, out.terms, epoch=epoch, step=step,
                                            global_step=run.global_step)
        speed.backward_step(out.total, run.optimizer,
                            before_step=lambda: _before_step(run, speed, distiller))
        ctx.student = student
        if run.ema is not None:
            run.ema.maybe_update(run.student, run.global_step + 1)
        if run.per_batch_schedule:
            run.scheduler.step()
        distiller.after_step(ctx, out)
        if main:
            host.step_end(run, ctx, out)
        # Accumulate on-device (the guard's vector of this step's values); one host sync per epoch.
        batch = len(y)
        sums.add(names, values, batch)
        seen += batch
        run.global_step += 1
        if run.guard.due():
            run.guard.check(run.checkpoint_dir / "last.pt")
        # The epoch's last batch needs none: the epoch checkpoint follows at once.
        if every_steps and run.global_step % every_steps == 0 and step + 1 < total and main:
            save_checkpoint(run.checkpoint_dir / "last.pt",
                            checkpoint_payload(run, step_position(run, epoch, step + 1, total, sums, seen)))
    run.guard.check(run.checkpoint_dir / "last.pt")
    if run.scheduler is not None and not run.per_batch_schedule:
        run.scheduler.step()
    totals, seen = distributed.reduce_epoch_sums(sums.by_name(), seen)  # DDP: the global batch's numbers
    elapsed = time.perf_counter() - start
    metrics = {name: float(value) / seen for name, value in totals.items()}
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise UserError(
            f"training diverged in epoch {epoch + 1}: non-finite {', '.join(bad)}; lower optim.lr or check "
            f"the method options (last good checkpoint: {run.checkpoint_dir / 'last.pt'})"
        )
    metrics.update(epoch=epoch + 1, lr=run.optimizer.param_groups[0]["lr"], seconds=round(elapsed, 3),
                   images_per_s=round(seen / max(elapsed, 1e-9), 1))
    return metrics


class _EpochAttacks:
    """The epoch's attacks: built through ``rbkd_make_attack`` once per distinct spec, not once per batch.

    Building one (the hook call and the ``torchattacks.Attack`` set-up) cost ~0.15 ms per batch in the
    loop of a small model. The loss closure handed to the hook reads the batch the trainer is on
    (:meth:`get` sets it), so a cached attack always maximises the current batch's loss.
    """

    def __init__(self, host: PluginHost, distiller: Distiller, student: nn.Module) -> None:
        self._host, self._distiller, self._student = host, distiller, student
        self._built: dict[AttackSpec, Any] = {}
        self._ctx: BatchContext | None = None

    def _loss(self, x_adv: torch.Tensor) -> torch.Tensor:
        return self._distiller.attack_loss(self._ctx, x_adv)

    def get(self, spec: AttackSpec, ctx: BatchContext) -> Any:
        self._ctx = ctx
        attack = self._built.get(spec)
        if attack is None:
            attack = self._built[spec] = self._host.make_attack(distiller=self._distiller, student=self._student,
                                                                spec=spec, loss_fn=self._loss)
        return attack


def _ensure_training(student: nn.Module) -> None:
    """Put the student back in train mode if something (a plugin's attack or observer) left it in eval.

    Reads the root flag only: ``train()`` walks every submodule, a cost that showed in the per-batch
    bookkeeping of small models, and the built-in attack restores every flag itself (``module_mode``).
    """
    if not student.training:
        student.train()


def _before_step(run: Run, speed: SpeedPlan, distiller: Distiller) -> None:
    """Between backward and the optimiser step: DDP-average the method's gradients, record the gradient norm."""
    distributed.average_gradients(distiller.trainable_parameters())
    if speed.scaler is None:  # fp16's scaled gradients overflow by design; the scaler skips those steps
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        run.guard.note_gradients(params, global_step=run.global_step)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def write_metrics(run: Run) -> None:
    lines = "".join(json.dumps(row) + "\n" for row in run.history)
    atomic_write_text(run.out_dir / "metrics.jsonl", lines)


def train(config: RunConfig, *, host: PluginHost | None = None, resume: bool = False,
          stop_after: int | None = None) -> Run:
    """Train (or resume) a run and return it; writes checkpoints, metrics and the resolved config.

    Args:
        resume: continue from ``<out_dir>/checkpoints/last.pt``.
        stop_after: return once this many epochs are complete (a time-limited job on a cluster); the
            schedule still spans ``optim.epochs`` and ``resume`` continues where it stopped.
    """
    run = setup_run(config, host)
    main = distributed.is_main()  # under torchrun only rank 0 writes files and evaluates
    last = run.checkpoint_dir / "last.pt"
    if resume:
        if not last.is_file():
            raise UserError(f"--resume: no checkpoint at {last}; start the run without --resume")
        resume_from(run, last)
    elif last.is_file():
        raise UserError(f"{run.out_dir} already holds a run ({last}); pass --resume to continue it, "
                        "or choose another run.out_dir")
    distributed.barrier()  # every rank has looked at last.pt before rank 0 writes anything
    if main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        # A killed run leaves its half-written temp files; the files they were replacing are intact.
        for directory in (run.out_dir, run.checkpoint_dir):
            if directory.is_dir():
                remove_stale_temps(directory)
        atomic_write_text(run.out_dir / "config.yaml", _yaml(config.to_dict()))
        if resume:  # a crash after last.pt but before metrics.jsonl: the history in last.pt is the truth
            write_metrics(run)
    run.distiller.on_train_start(run)
    if main:
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
        every = config.eval.every
        improved = False
        if not main:  # rank 0 evaluates and writes; the others wait for it before the next epoch
            run.epoch = epoch + 1
            distributed.barrier()
            continue
        if every and ((epoch + 1) % every == 0 or epoch + 1 == config.optim.epochs):
            metrics.update(quick_eval(run))
            improved = update_best(run, epoch + 1, metrics)
            metrics["best_epoch"] = run.best["epoch"]
            if improved:
                log.info("epoch %d is the best so far (%s=%.4g): writing %s", epoch + 1, run.best["metric"],
                         run.best[run.best["metric"]], run.checkpoint_dir / "best.pt")
        run.host.epoch_end(run, epoch, metrics)
        run.epoch = epoch + 1
        run.history.append(metrics)
        write_checkpoints(run, improved=improved)
        write_metrics(run)
        log.info("epoch %d/%d %s", epoch + 1, config.optim.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
        distributed.barrier()
    if main:
        run.host.train_end(run, run.history[-1] if run.history else {})
    return run


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
