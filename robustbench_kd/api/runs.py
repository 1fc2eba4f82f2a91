"""``distill()``: train a student from a run file, a mapping or a config, and hand back what was made."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from robustbench_kd.config import RunConfig, apply_overrides, config_from_mapping, load_config
from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.final_report import ModelReport

__all__ = ["RunResult", "distill", "resolve_config"]


@dataclass(frozen=True)
class RunResult:
    """What :func:`distill` made.

    Attributes:
        run_dir: the run directory (``run.out_dir``): checkpoints, ``metrics.jsonl``, ``config.yaml`` and
            the RobustBench outputs (``model_info/``, ``models/``, ``results/``, ``submission/``).
        student: the student the run reports under its name (the selected epoch when a validation split
            chose one, else the last), in eval mode, on the training device.
        metrics: that student's final test accuracies by attack (``{"clean": 0.97, "autoattack": 0.58}``),
            fractions in [0, 1]; empty when the final evaluation was off.
        history: one row per epoch, as in ``metrics.jsonl`` (losses, validation accuracies, learning rate).
        paths: what was written, by role: ``config``, ``last_checkpoint``, ``best_checkpoint``,
            ``metrics``, ``results``, ``points`` (per-point outcomes), ``model_info``, ``zoo_checkpoint``,
            ``safetensors``, ``bundle`` (only those that exist).
        reports: every model the final evaluation measured (the students, then the teachers).
    """

    run_dir: Path
    student: nn.Module
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    paths: dict[str, Path]
    reports: list[ModelReport] = field(default_factory=list, repr=False)


def resolve_config(
    config: str | os.PathLike[str] | Mapping[str, Any] | RunConfig, overrides: Sequence[str] | None = None
) -> RunConfig:
    """A validated :class:`RunConfig` from a run file path, a mapping (a parsed run file) or a config.

    ``overrides`` are ``--set`` strings (``"optim.epochs=5"``), applied in order.
    """
    if isinstance(overrides, str) or not all(isinstance(item, str) for item in overrides or []):
        raise UserError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
    overrides = list(overrides or [])
    if isinstance(config, RunConfig):
        return config_from_mapping(apply_overrides(config.to_dict(), overrides)) if overrides else config
    if isinstance(config, Mapping):
        return load_config(None, overrides, base=config)
    if isinstance(config, (str, os.PathLike)):
        return load_config(os.fspath(config), overrides)
    raise UserError(
        f"config must be a run file path, a mapping or a RunConfig, got {type(config).__name__}; "
        "e.g. distill('run.toml') or distill({'method': {'name': 'rslad'}, ...})"
    )


def distill(
    config: str | os.PathLike[str] | Mapping[str, Any] | RunConfig,
    *,
    overrides: Sequence[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    evaluate: bool = True,
    resume_changed: Sequence[str] = (),
) -> RunResult:
    """Train a student and run the leaderboard's final evaluation: ``robustbench-kd distill`` as a function.

    Args:
        config: a run file (``.toml``/``.yaml``), a mapping of sections (``{"method": {"name": "rslad"}}``)
            or a :class:`~robustbench_kd.config.RunConfig`.
        overrides: ``--set`` strings applied on top (``["optim.epochs=5", "run.out_dir=runs/try"]``).
        resume: continue from ``<out_dir>/checkpoints/last.pt`` (``--resume``).
        progress: ``False`` switches the progress bars off; ``True`` keeps the run file's ``run.progress``.
        evaluate: ``False`` skips the final evaluation (``--no-eval``).
        resume_changed: keys a resume may change (``--resume-changed``).

    Returns:
        A :class:`RunResult`. Raises :class:`~robustbench_kd.errors.UserError` for the mistakes the command
        reports in one line, before anything is written.
    """
    from robustbench_kd.jobs.pipeline import distill_run

    resolved = resolve_config(config, overrides)
    if not progress:
        resolved = resolve_config(resolved, ["run.progress=false"])
    run, reports = distill_run(resolved, resume=resume, final_eval=evaluate, resume_changed=resume_changed)
    from robustbench_kd.evaluation.final_report import final_students

    student = final_students(run)[0][2].eval()
    selected = reports[0] if reports else None
    return RunResult(
        run_dir=Path(run.out_dir),
        student=student,
        metrics=dict(selected.accuracy) if selected is not None else {},
        history=[dict(row) for row in run.history],
        paths=_written(Path(run.out_dir), selected),
        reports=reports,
    )


def _written(run_dir: Path, report: ModelReport | None) -> dict[str, Path]:
    candidates: dict[str, Path | None] = {
        "config": run_dir / "config.yaml",
        "last_checkpoint": run_dir / "checkpoints" / "last.pt",
        "best_checkpoint": run_dir / "checkpoints" / "best.pt",
        "metrics": run_dir / "metrics.jsonl",
    }
    if report is not None:
        candidates.update(
            results=report.results_path,
            points=report.points_path,
            model_info=report.model_info_path,
            zoo_checkpoint=report.checkpoint_path,
            safetensors=report.safetensors_path,
            bundle=report.bundle_path,
        )
    return {role: path for role, path in candidates.items() if path is not None and path.exists()}
