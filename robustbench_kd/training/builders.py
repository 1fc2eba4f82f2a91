"""Turning a validated config into objects: device, data, student, teachers, method."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_kd.config import RunConfig
from robustbench_kd.data.datasets import DataSplits, split_validation, take
from robustbench_kd.distiller import Distiller
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.teachers import (
    EnsembleTeacher,
    Teacher,
    TeacherLoadContext,
    TeacherSet,
    TeacherSpec,
    check_teacher_output,
)

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an unavailable cuda device is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"run.device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f'run.device is {name!r} but no CUDA device is available; use run.device="cpu"')
    return device


def load_data(host: PluginHost, config: RunConfig) -> DataSplits:
    """Load the configured dataset, hold out ``data.val_size`` training images, then apply ``n_train``.

    The validation split is drawn from the loader's whole training set before ``n_train`` truncates
    it, so it is the same images whatever ``n_train`` is. ``data.extra_path`` is memory-mapped and
    checked against the resulting training images (``data.extra``).
    """
    loader = host.datasets.get(config.data.dataset)
    data = loader(config.data)
    if data.missing_train:  # evaluation-only data (e.g. ImageNet val/ without train/)
        raise UserError(data.missing_train)
    if config.data.val_size:
        data = split_validation(data, config.data.val_size)
    if config.data.n_train is not None:
        n = config.data.n_train
        if n < 1:
            raise UserError(f"data.n_train must be >= 1, got {n}")
        data.train_x, data.train_y = take(data.train_x, slice(0, n)), data.train_y[:n]
    if config.data.extra_path is not None:
        from robustbench_kd.data.extra import open_extra

        data.extra = open_extra(
            config.data.extra_path, image_shape=tuple(data.train_x.shape[1:]), num_classes=data.num_classes
        )
    return data


def student_factory(host: PluginHost, config: RunConfig, data: DataSplits) -> Callable[[], nn.Module]:
    """A function building a freshly initialised ``student.arch`` with its options, shaped for the data."""
    factory = host.students.get(config.student.arch)
    options = dict(config.student.options)

    def build() -> nn.Module:
        return factory(
            num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size, **options
        )

    return build


def build_run_student(host: PluginHost, config: RunConfig, data: DataSplits) -> nn.Module:
    """The run's student: ``student.arch`` from the registry, shaped for the data, ``student.init_from`` loaded."""
    net = student_factory(host, config, data)()
    if config.student.init_from:
        from robustbench_kd.storage.checkpoint import load_checkpoint, load_weights, state_dict_of

        path = Path(config.student.init_from).expanduser()
        load_weights(net, state_dict_of(load_checkpoint(path)), source=f"student.init_from {path}")
    return net


def build_distiller(host: PluginHost, config: RunConfig, num_classes: int) -> Distiller:
    cls = host.methods.get(config.method_name)
    options = cls.config_from_mapping(config.method_options)
    return cls(options, num_classes=num_classes)


def load_teacher(host: PluginHost, text: str, ctx: TeacherLoadContext) -> Teacher:
    """Resolve one ``scheme:ref`` spec through the registered teacher sources."""
    spec = TeacherSpec.parse(text)
    loader = host.teacher_sources.get(spec.scheme)
    if spec.sha256 and not getattr(loader, "verifies_sha256", False):
        # A pin the source would ignore is worse than none: the user believes the file is checked.
        raise UserError(
            f"teacher source {spec.scheme!r} does not check sha256 pins; drop ?sha256= from {text!r} "
            "or use the file: or robustbench: source"
        )
    net = loader(spec, ctx)
    teacher = Teacher(net, spec=text).to(ctx.device)
    check_teacher_output(teacher, ctx, text)
    return teacher


def load_role(host: PluginHost, role_spec: Any, ctx: TeacherLoadContext) -> nn.Module:
    """A role is one spec string, a list of specs (uniform ensemble) or {specs, weights, combine, vectorize}."""
    if isinstance(role_spec, str):
        return load_teacher(host, role_spec, ctx)
    if isinstance(role_spec, list):
        role_spec = {"specs": role_spec}
    specs = list(role_spec["specs"])
    members = [load_teacher(host, s, ctx) for s in specs]
    if len(members) == 1 and role_spec.get("weights") is None:
        return members[0]
    return EnsembleTeacher(
        members,
        weights=role_spec.get("weights"),
        combine=role_spec.get("combine", "probs"),
        vectorize=role_spec.get("vectorize", "auto"),
    )


def load_teachers(
    host: PluginHost, config: RunConfig, data: DataSplits, distiller: Distiller, device: torch.device
) -> TeacherSet:
    """Load the configured roles, checking them against what the method needs."""
    roles: Mapping[str, Any] = config.teachers
    needed = set(distiller.teacher_roles)
    allowed = needed | set(distiller.optional_teacher_roles)
    missing = needed - set(roles)
    if missing:
        raise UserError(
            f"method {distiller.name!r} needs teacher role(s) {', '.join(sorted(missing))}; add e.g. "
            f'teachers.{sorted(missing)[0]} = "robustbench:cifar10/Linf/Carmon2019Unlabeled"'
        )
    extra = set(roles) - allowed
    if extra:
        valid = ", ".join(sorted(allowed)) or "none (it trains without a teacher)"
        raise UserError(
            f"method {distiller.name!r} does not use teacher role(s) {', '.join(sorted(extra))}; its roles: {valid}"
        )
    ctx = TeacherLoadContext(
        dataset=data.name,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        threat_model=config.threat.norm,
        model_dir=Path(config.zoo.model_dir),
        allow_download=config.zoo.allow_download,
        device=device,
        students=host.students,
    )
    return TeacherSet({role: load_role(host, spec, ctx) for role, spec in roles.items()})
