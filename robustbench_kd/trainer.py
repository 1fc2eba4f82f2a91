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

Under ``torchrun`` (:mod:`robustbench_kd.distributed`) each process trains on its slice of every global
batch, only the outer loss goes through DistributedDataParallel, and rank 0 alone writes and evaluates.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import builders, distributed
from .checkpoint import load_checkpoint, restore_plain, save_checkpoint
from .config import RunConfig
from .context import BatchContext
from .data import DataSplits, epoch_generator, to_float, iterate_batches, num_batches
from .distiller import AttackSpec, Distiller
from .ema import StudentEMA
from .errors import UserError
from .extra_data import batch_split, check_extra_supported, mix_extra
from .finite import FiniteGuard, check_finite_weights
from .metric_sums import MetricSums
from .io import atomic_write_text, remove_stale_temps
from .plugin_host import PluginHost
from .speed import SpeedPlan
from .speed_config import SpeedSection
from .teachers import TeacherSet

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything about one training run; passed to observer hooks."""

    config: RunConfig
    host: PluginHost
    out_dir: Path
    device: torch.device
    data: DataSplits
    student: nn.Module
    teachers: TeacherSet
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_batch_schedule: bool
    epoch: int = 0            #: epochs completed
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    #: best validation epoch so far: {"epoch", "metric", <val metrics>, "protocol"}; None before any
    best: dict[str, Any] | None = None
    #: the DDP wrapper of ``student`` used for the outer loss under torchrun; None in one process
    ddp_student: nn.Module | None = None
    #: [speed]: autocast/GradScaler/channels_last/compile seam; None = everything off
    speed: SpeedPlan | None = None
    #: [ema]: the averaged student, None when ema.decay = 0
    ema: StudentEMA | None = None
    #: on-device NaN/inf record, checked every few steps and before every checkpoint
    guard: FiniteGuard = field(default_factory=FiniteGuard)
    #: where a step checkpoint stopped inside an epoch (see :func:`step_position`); consumed by that epoch
    resume_position: dict[str, Any] | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"


# -- setup ---------------------------------------------------------------------------------------
def build_optimizer(config: RunConfig, student: nn.Module, distiller: Distiller) -> torch.optim.Optimizer:
    params = list(student.parameters()) + [p for p in distiller.trainable_parameters() if p.requires_grad]
    o = config.optim
    # foreach: the multi-tensor update on every device (PyTorch picks it on CUDA only). Same arithmetic
    # per tensor, bitwise equal to the per-parameter loop; on CPU it spares that loop's Python overhead.
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov and o.momentum > 0, foreach=True)


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> tuple[Any, bool]:
    """Return (scheduler or None, whether it steps per batch)."""
    o = config.optim
    sched = torch.optim.lr_scheduler
    if o.schedule == "multistep":
        return sched.MultiStepLR(optimizer, milestones=list(o.milestones), gamma=o.gamma), False
    if o.schedule == "exponential":
        return sched.ExponentialLR(optimizer, gamma=o.gamma), False
    if o.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=o.epochs * steps_per_epoch), True
    if o.schedule == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=o.max_lr or o.lr, total_steps=o.epochs * steps_per_epoch,
                                pct_start=o.pct_start), True
    return None, False


def setup_run(config: RunConfig, host: PluginHost | None = None) -> Run:
    """Build data, student, method, teachers, optimiser and scheduler from a config."""
    host = host or PluginHost.create()
    if config.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(config.run.seed)
    # torchrun (DDP): checks that need no other process come first, so a mistake fails every rank alike.
    dist_env = distributed.from_environ()
    device = distributed.resolve_device(config.run.device, dist_env)
    distributed.check_batch_size(config.data.batch_size, dist_env)
    if dist_env.enabled and config.checkpoint.every_steps:
        # Each process has its own attack RNG stream and metric sums; rank 0 alone would save them.
        raise UserError("checkpoint.every_steps is not supported under torchrun yet; use checkpoint.every_steps "
                        "= 0 (last.pt every epoch)")
    data = builders.load_data(host, config)
    check_validation(config, data)
    distiller = builders.build_distiller(host, config, data.num_classes).to(device)
    check_extra_supported(distiller, data.extra)
    distributed.check_method(distiller, dist_env)
    if dist_env.enabled and data.extra is not None:
        # Mixed batches would be sliced real-first across processes (per-process BN statistics of
        # different populations); not supported until the mix is split per process.
        raise UserError("data.extra_path is not supported under torchrun yet; train in one process or "
                        "drop data.extra_path")
    distributed.init_process_group(dist_env, device)
    student = builders.build_student(host, config, data).to(device)
    student = distributed.prepare_student(student, device, sync_bn=config.run.sync_bn)
    teachers = builders.load_teachers(host, config, data, distiller, device)
    optimizer = build_optimizer(config, student, distiller)
    steps = num_batches(len(data.train_y), _real_batch_size(config), _drop_last(config, data))
    scheduler, per_batch = build_scheduler(config, optimizer, steps)
    # Issue 5: precision/compile switches, then the EMA copy (after channels_last, so it shares the layout).
    speed = SpeedPlan(config.speed, device, student, teachers)
    ema = StudentEMA(student, config.ema) if config.ema.enabled else None
    return Run(config=config, host=host, out_dir=Path(config.run.out_dir), device=device, data=data,
               student=student, teachers=teachers, distiller=distiller, optimizer=optimizer,
               scheduler=scheduler, per_batch_schedule=per_batch, speed=speed, ema=ema,
               ddp_student=distributed.wrap(student, device, sync_bn=config.run.sync_bn))


def check_validation(config: RunConfig, data: DataSplits) -> None:
    """Per-epoch evaluation needs a validation split, and a validation split needs evaluating.

    The first rule keeps the test set out of checkpoint selection; the second stops a run from quietly
    training on fewer images for nothing.
    """
    if config.eval.every > 0 and not data.has_validation:
        raise UserError(
            f"eval.every = {config.eval.every} evaluates during training on a validation split, and there is "
            "none: set data.val_size (e.g. 0.1, or 1000 training images); the test set is kept for the final "
            "evaluation"
        )
    if data.has_validation and config.eval.every == 0:
        raise UserError(
            f"data.val_size holds out {len(data.val_y)} training images but eval.every = 0 never evaluates "
            "them; set eval.every (e.g. 1) to select best.pt on them, or data.val_size = 0"
        )


def _drop_last(config: RunConfig, data: DataSplits) -> bool:
    # A final batch of one sample (per process) breaks train-mode BatchNorm, and under DDP a final
    # batch must split evenly over the processes; drop only those cases.
    return distributed.drop_last(len(data.train_y), _real_batch_size(config), distributed.from_environ().world_size)


def _real_batch_size(config: RunConfig) -> int:
    # Real images per batch: data.extra_fraction of each batch comes from data.extra_path instead.
    return batch_split(config.data.batch_size, config.data.extra_fraction)[0]


# -- checkpoints ---------------------------------------------------------------------------------
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
        # Issue 5: GradScaler state (fp16 only) and the averaged student (ema.decay > 0), else None.
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
    return {"epoch": epoch, "step": step, "batches": total, "seen": seen,
            **sums.position_entries(), "rng": rng}


def _restore_rng(run: Run, rng: dict[str, Any]) -> None:
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
        raise UserError(f"cannot resume {path}: it was trained with data.val_size = {saved_val}, the config "
                        f"has {run.config.data.val_size}; use the same value")
    saved_data = saved.get("data", {})
    saved_extra = [saved_data.get("extra_path"), saved_data.get("extra_fraction", 0.0)]  # older runs: none
    if saved_extra != [run.config.data.extra_path, run.config.data.extra_fraction]:
        raise UserError(f"cannot resume {path}: it was trained with data.extra_path/extra_fraction = {saved_extra}, "
                        f"the config has {[run.config.data.extra_path, run.config.data.extra_fraction]}; use the same")
    best = data.get("best")
    if best is not None and best.get("protocol") != selection_protocol(run):
        raise UserError(
            f"cannot resume {path}: its best.pt was chosen by {best.get('protocol')}, the config now ranks by "
            f"{selection_protocol(run)}; restore the [eval] settings (select, n_examples, pgd_steps, seed) "
            "or start a new run"
        )
    run.student.load_state_dict(data["student"])
    run.optimizer.load_state_dict(restore_plain(data["optimizer"]))
    if run.scheduler is not None and data.get("scheduler") is not None:
        run.scheduler.load_state_dict(restore_plain(data["scheduler"]))
    run.distiller.load_state_dict(data["distiller"])
    run.distiller.load_method_state(data.get("method_state", {}))
    run.epoch = int(data["epoch"])
    run.global_step = int(data["global_step"])
    run.history = list(data.get("history", []))
    run.best = best
    position = data.get("position")
    # Mid-epoch (a step checkpoint): train() re-runs on_epoch_start, then puts this method state back.
    run.resume_position = None if position is None else {**position, "method_state": data.get("method_state", {})}
    _resume_speed_and_ema(run, data, path)
    if best is not None and not (run.checkpoint_dir / "best.pt").is_file():
        log.warning("resuming %s: the record says epoch %d was best but %s is missing; it is rewritten when "
                    "a later epoch beats that record", path, best["epoch"], run.checkpoint_dir / "best.pt")
    if position is None:
        log.info("resumed from %s after epoch %d", path, run.epoch)
    else:
        log.info("resumed from %s in epoch %d after batch %d", path, run.epoch + 1, position["step"])


def _resume_speed_and_ema(run: Run, data: dict[str, Any], path: Path) -> None:
    """Issue 5: restore the GradScaler and the EMA copy; the [speed] switches may change between runs."""
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


# -- the loop ------------------------------------------------------------------------------------
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
        _restore_rng(run, position["rng"])
    order_gen = epoch_generator(cfg.run.seed, epoch, stream=1)
    augment = run.data.augment_default if cfg.data.augment is None else cfg.data.augment
    batches = iterate_batches(run.data.train_x, run.data.train_y, batch_size=_real_batch_size(cfg),
                              shuffle=True, generator=order_gen, augment=augment, device="cpu",
                              drop_last=_drop_last(cfg, run.data))
    if run.data.extra is not None:  # data.extra_fraction of every batch from the memory-mapped extra file
        batches = mix_extra(batches, run.data.extra, count=cfg.data.batch_size - _real_batch_size(cfg),
                            offset=len(run.data.train_y), generator=epoch_generator(cfg.run.seed, epoch, stream=3),
                            augment=augment)
    # Every rank builds the same global batches and keeps its slice (one process: just the move to the device).
    batches = distributed.shard_batches(batches, run.device)
    total = num_batches(len(run.data.train_y), _real_batch_size(cfg), _drop_last(cfg, run.data))
    sums = MetricSums()
    seen = skip = 0
    if position is not None:
        if position["batches"] != total:
            raise UserError(f"cannot resume mid-epoch: the step checkpoint was written with {position['batches']} "
                            f"batches per epoch, the config gives {total}; keep data.batch_size and data.n_train")
        sums, seen, skip = MetricSums.from_position(position), int(position["seen"]), int(position["step"])
    every_steps = cfg.checkpoint.every_steps
    start = time.perf_counter()
    progress = _progress(batches, total, f"epoch {epoch + 1}/{cfg.optim.epochs}",
                         cfg.run.progress and distributed.is_main())
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
        if distributed.is_main():
            host.step_end(run, ctx, out)
        # Accumulate on-device (the guard's vector of this step's values); one host sync per epoch.
        batch = len(y)
        sums.add(names, values, batch)
        seen += batch
        run.global_step += 1
        if run.guard.due():
            run.guard.check(run.checkpoint_dir / "last.pt")
        # The epoch's last batch needs none: the epoch checkpoint follows at once.
        if every_steps and run.global_step % every_steps == 0 and step + 1 < total and distributed.is_main():
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


def quick_eval(run: Run) -> dict[str, float]:
    """Clean and PGD accuracy on the first ``eval.n_examples`` validation points (RNG isolated).

    Keys ``val_clean_acc`` and ``val_pgd<steps>_acc``, plus ``val_ema_clean_acc`` and ``val_ema_pgd<steps>_acc``
    for the EMA student when ``[ema]`` is on. The validation split is held out of the training set and never
    augmented; the test set is never read here (UserError without a validation split).
    """
    from .evaluation import evaluate_model

    cfg = run.config
    if not run.data.has_validation:
        raise UserError("evaluation during training needs a validation split: set data.val_size")
    n = cfg.eval.n_examples
    # EMA (issue 5): the averaged student is checked on the same points, as val_ema_*; best.pt still ranks
    # the raw student.
    models = [("val", run.student)] + ([("val_ema", run.ema.module)] if run.ema is not None else [])
    metrics: dict[str, float] = {}
    for prefix, model in models:
        result = evaluate_model(model, to_float(run.data.val_x[:n]), run.data.val_y[:n], norm=cfg.threat.norm,
                                eps=cfg.threat.eps, attacks=("clean", "pgd"), batch_size=cfg.eval.batch_size,
                                seed=cfg.eval.seed, pgd_steps=cfg.eval.pgd_steps, device=run.device,
                                progress=False)
        metrics.update({f"{prefix}_{k.replace('-', '')}_acc": v for k, v in result.accuracy.items()})
    return metrics


def selection_metrics(config: RunConfig) -> tuple[str, str]:
    """(ranking key, tie-break key) among :func:`quick_eval`'s metrics for ``eval.select``.

    ``pgd`` ranks by ``val_pgd<steps>_acc`` and breaks ties by clean accuracy; ``clean`` the reverse.
    """
    pgd, clean = f"val_pgd{config.eval.pgd_steps}_acc", "val_clean_acc"
    return (clean, pgd) if config.eval.select == "clean" else (pgd, clean)


def selection_protocol(run: Run) -> dict[str, Any]:
    """What makes two epochs' validation numbers comparable; stored with the best record."""
    cfg = run.config
    n_val = len(run.data.val_y) if run.data.has_validation else 0
    return {"metric": selection_metrics(cfg)[0], "n_examples": min(cfg.eval.n_examples, n_val),
            "eps": float(cfg.threat.eps), "norm": cfg.threat.norm, "seed": cfg.eval.seed}


def update_best(run: Run, epoch: int, metrics: dict[str, Any]) -> bool:
    """Record ``epoch`` (1-based) as the best so far if it beats the record; return whether it did.

    Strictly better only: on a full tie the earlier epoch stays best.
    """
    key, tie = selection_metrics(run.config)
    score = (metrics[key], metrics[tie])
    if run.best is not None and score <= (run.best[key], run.best[tie]):
        return False
    run.best = {"epoch": epoch, "metric": key, key: float(metrics[key]), tie: float(metrics[tie]),
                "protocol": selection_protocol(run)}
    return True


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
