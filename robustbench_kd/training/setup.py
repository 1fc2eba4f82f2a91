"""One training run's objects and how they are built from a config: :class:`Run` and :func:`setup_run`.

:func:`setup_run` builds, in this order, the data, the method (options only), the student, the teachers,
then (:func:`assemble_run`) calls the method's ``on_setup`` with them and builds the optimiser and
scheduler, the ``[speed]`` plan and the EMA copy. It checks first what can fail without the other
processes under torchrun, so a mistake fails every rank alike. Nothing is written here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_kd.config import RunConfig
from robustbench_kd.context import SetupContext
from robustbench_kd.data.datasets import DataSplits, num_batches
from robustbench_kd.data.extra import batch_split, check_extra_supported
from robustbench_kd.distiller import Distiller
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.scale import distributed
from robustbench_kd.scale.ema import StudentEMA
from robustbench_kd.scale.precision import SpeedPlan
from robustbench_kd.teachers import TeacherSet, role_identity
from robustbench_kd.training import builders
from robustbench_kd.training.nan_guard import FiniteGuard


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
    epoch: int = 0  #: epochs completed
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
    #: where a step checkpoint stopped inside an epoch (:func:`~robustbench_kd.training.checkpoints.step_position`);
    #: consumed by that epoch
    resume_position: dict[str, Any] | None = None
    #: each teacher role as what it computes (:func:`~robustbench_kd.teachers.role_identity`), recorded in every
    #: checkpoint so that a resume notices a teacher swapped under the same spec; None outside :func:`setup_run`
    teacher_identity: dict[str, Any] | None = None
    #: the config changes a resume was allowed to make (``--resume-changed``): {"epoch", "key", "checkpoint",
    #: "config"} each, carried from checkpoint to checkpoint so the run's history stays honest
    config_changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def optimised_parameters(student: nn.Module, distiller: Distiller) -> list[nn.Parameter]:
    """What the optimiser updates: every student parameter, then the method's trainable ones."""
    return list(student.parameters()) + [p for p in distiller.trainable_parameters() if p.requires_grad]


def build_optimizer(config: RunConfig, student: nn.Module, distiller: Distiller) -> torch.optim.Optimizer:
    params = optimised_parameters(student, distiller)
    o = config.optim
    # foreach: the multi-tensor update on every device (PyTorch picks it on CUDA only). Same arithmetic
    # per tensor, bitwise equal to the per-parameter loop; on CPU it spares that loop's Python overhead.
    return torch.optim.SGD(
        params,
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov and o.momentum > 0,
        foreach=True,
    )


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
        return sched.OneCycleLR(
            optimizer,
            max_lr=o.max_lr or o.lr,
            total_steps=o.epochs * steps_per_epoch,
            pct_start=o.pct_start,
            div_factor=o.div_factor,
        ), True
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
    device = distributed.process_device(builders.resolve_device(config.run.device), dist_env)
    distributed.check_batch_size(config.data.batch_size, dist_env)
    if dist_env.enabled and config.checkpoint.every_steps:
        # Each process has its own attack RNG stream and metric sums; rank 0 alone would save them.
        raise UserError(
            "checkpoint.every_steps is not supported under torchrun yet; use checkpoint.every_steps "
            "= 0 (last.pt every epoch)"
        )
    data = builders.load_data(host, config)
    check_validation(config, data)
    distiller = builders.build_distiller(host, config, data.num_classes).to(device)
    check_extra_supported(distiller, data.extra)
    distributed.check_method(distiller, dist_env)
    if data.extra is not None:  # each process gets its share of the real and of the extra images
        distributed.check_extra_split(*batch_split(config.data.batch_size, config.data.extra_fraction), dist_env)
    distributed.init_process_group(dist_env, device)
    student = builders.build_run_student(host, config, data).to(device)
    student = distributed.prepare_student(student, device, sync_bn=config.run.sync_bn)
    teachers = builders.load_teachers(host, config, data, distiller, device)
    run = assemble_run(
        config, host, data, distiller, student, teachers, device, builders.student_factory(host, config, data)
    )
    run.teacher_identity = {role: role_identity(spec) for role, spec in config.teachers.items()}
    return run


def assemble_run(
    config: RunConfig,
    host: PluginHost,
    data: DataSplits,
    distiller: Distiller,
    student: nn.Module,
    teachers: TeacherSet,
    device: torch.device,
    student_factory: Callable[[], nn.Module],
) -> Run:
    """The set-up every run shares with the plugin contract, from built networks to a :class:`Run`.

    In this order: ``distiller.on_setup`` with the real student and teachers (a network the method
    creates there is moved to ``device`` with it), the optimiser over the student's and the method's
    trainable parameters, the scheduler, the ``[speed]`` plan, then the EMA copy (after channels_last, so
    it shares the layout). A resume loads its state into this run afterwards.
    """
    distiller.on_setup(
        SetupContext(
            student=student,
            teachers=teachers,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            image_size=data.image_size,
            device=device,
            student_factory=student_factory,
            seed=config.run.seed,
        )
    )
    distiller.to(device)
    if distributed.from_environ().enabled and any(p.requires_grad for p in distiller.trainable_parameters()):
        # DDP all-reduces the student's gradients only: each process would train its own copy.
        raise UserError(
            f"method {distiller.name!r} trains parameters of its own, which multi-process (torchrun/DDP) "
            "training does not synchronise; run it in one process"
        )
    optimizer = build_optimizer(config, student, distiller)
    steps = num_batches(len(data.train_y), real_batch_size(config), drop_last_batch(config, data))
    scheduler, per_batch = build_scheduler(config, optimizer, steps)
    speed = SpeedPlan(config.speed, device, student, teachers)
    ema = StudentEMA(student, config.ema) if config.ema.enabled else None
    return Run(
        config=config,
        host=host,
        out_dir=Path(config.run.out_dir),
        device=device,
        data=data,
        student=student,
        teachers=teachers,
        distiller=distiller,
        optimizer=optimizer,
        scheduler=scheduler,
        per_batch_schedule=per_batch,
        speed=speed,
        ema=ema,
        ddp_student=distributed.wrap(student, device, sync_bn=config.run.sync_bn),
    )


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
        held_out = len(data.val_y) if data.val_y is not None else 0
        raise UserError(
            f"data.val_size holds out {held_out} training images but eval.every = 0 never evaluates "
            "them; set eval.every (e.g. 1) to select best.pt on them, or data.val_size = 0"
        )


def drop_last_batch(config: RunConfig, data: DataSplits) -> bool:
    """Whether the epoch drops its last, short batch: only when it would hold one sample per process
    (train-mode BatchNorm breaks on it) or, under DDP, would not split evenly over the processes."""
    return distributed.drop_last(len(data.train_y), real_batch_size(config), distributed.from_environ().world_size)


def real_batch_size(config: RunConfig) -> int:
    """Training-set images per batch: ``data.extra_fraction`` of each batch comes from ``data.extra_path``."""
    return batch_split(config.data.batch_size, config.data.extra_fraction)[0]
