"""Evaluate the enabled diagnostics on the fixed subset at the end of an epoch.

Subsets (never the test set): ``val`` = the first ``diagnostics.n_examples`` points of the validation split
when the run has one; ``train`` = ``n_examples`` training points drawn once with ``diagnostics.seed``. The
*eval split* is ``val`` when present, else ``train``. Adversarial inputs are PGD against the student
(threat eps, step threat.alpha, ``diagnostics.pgd_steps`` steps, random start from ``diagnostics.seed`` with
the RNG isolated); teachers are scored on the same adversarial inputs (transfer).

Scalar keys written to the epoch's row of metrics.jsonl (``<model>`` = ``student``, ``student_ema`` with
``[ema]``, or ``teacher_<role>``,
``<in>`` = ``clean`` or ``adv``, ``<split>`` = ``val`` or ``train``):

* entropy:      ``diag_<split>_<model>_<in>_entropy`` mean prediction entropy (nats); on the eval split and,
  clean only, on the training subset (``diag_train_...``) as well
* calibration:  ``diag_<split>_<model>_<in>_ece``
* agreement:    ``diag_<split>_agree_<role>_<in>`` student-teacher top-1 agreement
* per_class:    ``diag_<split>_student_<in>_acc``, ``..._worst_class_acc``, ``..._worst_class`` (class id)
* trajectories: ``diag_<split>_traj_cos_<role>_<in>_{mean,easy,hard}``: mean cosine similarity of the
  student's and the teacher's correct-class-probability trajectories over all, the easier and the harder
  half of the subset by difficulty (AKD eq. 6 on the student's CE)

Tables (lists) go to ``OUT/diagnostics/tables.jsonl`` instead: ``..._reliability`` (reliability-diagram
bins) and ``..._class_acc`` (per-class accuracy, NaN for absent classes, written as null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from robustbench_kd.analysis.diagnostics import metrics as M
from robustbench_kd.analysis.diagnostics import trajectories
from robustbench_kd.data.datasets import to_float


@dataclass
class Subset:
    name: str
    x: Tensor
    y: Tensor
    index: Tensor


def subsets(run: Any) -> tuple[Subset, Subset | None]:
    """(eval split, extra clean-only training subset or None)."""
    section, data = run.config.diagnostics, run.data
    n = section.n_examples
    gen = torch.Generator().manual_seed(section.seed)
    train_index = torch.randperm(len(data.train_y), generator=gen)[:n]
    train = Subset("train", to_float(data.train_x[train_index]), data.train_y[train_index], train_index)
    if data.has_validation:
        k = min(n, len(data.val_y))
        return Subset("val", to_float(data.val_x[:k]), data.val_y[:k], torch.arange(k)), train
    return train, None


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """CPU float64 logits of ``model`` in eval mode (its mode restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        out = [model(x[i : i + batch_size].to(device)).double().cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def adversarial(run: Any, x: Tensor, y: Tensor) -> Tensor:
    """PGD inputs against the student (eval mode), RNG isolated and seeded with diagnostics.seed."""
    from robustbench_kd.evaluation.attacks import pgd

    section, threat, student = run.config.diagnostics, run.config.threat, run.student
    devices = [run.device.index or 0] if run.device.type == "cuda" else []
    was_training = student.training
    student.eval()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(section.seed)
            parts = [
                pgd(
                    student,
                    x[i : i + section.batch_size].to(run.device),
                    y[i : i + section.batch_size].to(run.device),
                    eps=float(threat.eps),
                    alpha=float(threat.alpha),
                    steps=section.pgd_steps,
                    norm=threat.norm,
                ).cpu()
                for i in range(0, len(x), section.batch_size)
            ]
    finally:
        student.train(was_training)
    return torch.cat(parts)


def collect(run: Any, epoch: int) -> tuple[dict[str, float], dict[str, Any]]:
    """(scalars for metrics.jsonl, tables for tables.jsonl) of 0-based ``epoch``; writes trajectories.npz."""
    section = run.config.diagnostics
    on = set(section.enabled)
    bs, dev = section.batch_size, run.device
    main, extra = subsets(run)
    models = {"student": run.student}
    if getattr(run, "ema", None) is not None:  # the weight average is evaluated and exported too: diagnose it
        models["student_ema"] = run.ema.module
    models.update({f"teacher_{role}": run.teachers[role] for role in run.teachers})
    inputs = {"clean": main.x}
    if section.adversarial:
        inputs["adv"] = adversarial(run, main.x, main.y)
    scalars: dict[str, float] = {}
    tables: dict[str, Any] = {}
    columns: dict[str, np.ndarray] = {}
    s = main.name
    for kind, x in inputs.items():
        logits = {name: logits_of(model, x, bs, dev) for name, model in models.items()}
        for name, z in logits.items():
            probs = z.softmax(dim=1)
            if "entropy" in on:
                scalars[f"diag_{s}_{name}_{kind}_entropy"] = M.entropy(probs).mean().item()
            if "calibration" in on:
                table = M.reliability_bins(probs, main.y, section.bins)
                scalars[f"diag_{s}_{name}_{kind}_ece"] = M.expected_calibration_error(table)
                tables[f"diag_{s}_{name}_{kind}_reliability"] = table
            if "trajectories" in on:
                columns[f"{name}_{kind}_p"] = M.correct_class_prob(probs, main.y).numpy()
        student = logits["student"]
        if "agreement" in on:
            for role in run.teachers:
                scalars[f"diag_{s}_agree_{role}_{kind}"] = M.agreement(student, logits[f"teacher_{role}"])
        if "per_class" in on:
            pred = student.argmax(dim=1)
            acc = M.per_class_accuracy(pred, main.y, run.data.num_classes)
            worst, worst_acc = M.worst_class(acc)
            scalars[f"diag_{s}_student_{kind}_acc"] = (pred == main.y).double().mean().item()
            scalars[f"diag_{s}_student_{kind}_worst_class_acc"] = worst_acc
            scalars[f"diag_{s}_student_{kind}_worst_class"] = float(worst)
            tables[f"diag_{s}_student_{kind}_class_acc"] = [None if math.isnan(v) else v for v in acc.tolist()]
        if "trajectories" in on:
            columns[f"student_{kind}_ce"] = M.cross_entropy_from_logits(student, main.y).numpy()
    if "entropy" in on and extra is not None:
        for name, model in models.items():
            probs = logits_of(model, extra.x, bs, dev).softmax(dim=1)
            scalars[f"diag_train_{name}_clean_entropy"] = M.entropy(probs).mean().item()
    if "trajectories" in on:
        scalars.update(_trajectories(run, epoch, main, columns, list(inputs), list(run.teachers)))
    return scalars, tables


def _trajectories(
    run: Any, epoch: int, main: Subset, columns: dict[str, np.ndarray], kinds: list[str], roles: list[str]
) -> dict[str, float]:
    path = run.out_dir / trajectories.FILE
    arrays = trajectories.append(
        path, epoch=epoch + 1, split=main.name, index=main.index.numpy(), y=main.y.numpy(), columns=columns
    )
    scalars: dict[str, float] = {}
    for kind in kinds:
        score = M.difficulty(torch.from_numpy(arrays[f"student_{kind}_ce"]))
        arrays[f"difficulty_{kind}"] = score.numpy()
        easy, hard = M.easy_hard_split(score)
        for role in roles:
            cos = M.trajectory_cosine(
                torch.from_numpy(arrays[f"student_{kind}_p"]), torch.from_numpy(arrays[f"teacher_{role}_{kind}_p"])
            )
            arrays[f"cosine_{role}_{kind}"] = cos.numpy()
            key = f"diag_{main.name}_traj_cos_{role}_{kind}"
            scalars[f"{key}_mean"] = cos.mean().item()
            scalars[f"{key}_easy"] = cos[easy].mean().item()
            if len(hard):
                scalars[f"{key}_hard"] = cos[hard].mean().item()
    trajectories.write(path, arrays)
    return scalars
