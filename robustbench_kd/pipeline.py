"""The jobs behind the CLI: ``distill`` (train + final evaluation) and ``evaluate`` (any model)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any


from . import builders
from .config import ModelInfoSection, RunConfig
from .data import to_float
from .errors import UserError
from .plugin_host import PluginHost
from .report import ModelReport, evaluate_and_write
from .teachers import TeacherLoadContext

log = logging.getLogger(__name__)


def distill(config: RunConfig, *, host: PluginHost | None = None, resume: bool = False,
            final_eval: bool = True, export_dir: Path | None = None) -> list[ModelReport]:
    """Train a student, then evaluate it (and its teachers) and write the RobustBench outputs.

    The outputs go under ``export_dir`` (default: the run's ``out_dir``).
    """
    from .trainer import train

    host = host or PluginHost.create()
    run = train(config, host=host, resume=resume)
    if not final_eval or not config.eval.attacks:
        return []
    return evaluate_run(run, export_dir=export_dir)


def evaluate_run(run: Any, *, export_dir: Path | None = None) -> list[ModelReport]:
    """Final evaluation of a finished run: the student, then each teacher role (for comparison)."""
    cfg = run.config
    n = cfg.eval.final_n_examples
    x, y = to_float(run.data.test_x[:n]), run.data.test_y[:n]
    common = dict(dataset=run.data.name, norm=cfg.threat.norm, eps=cfg.threat.eps, attacks=list(cfg.eval.attacks),
                  out_dir=export_dir or run.out_dir, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed,
                  pgd_steps=cfg.eval.pgd_steps, device=run.device, progress=cfg.run.progress)
    reports = [evaluate_and_write(run.student, x, y, label=f"student {cfg.run.name}", model_id=cfg.run.name,
                                  meta=cfg.model_info, architecture=cfg.student.arch, host=run.host, run=run,
                                  **common)]
    if cfg.eval.teachers:
        for role, teacher in run.teachers.items():
            reports.append(evaluate_and_write(teacher, x, y, label=f"teacher {role} ({teacher.spec})",
                                              model_id=None, **common))
    return reports


def evaluate_spec(spec: str, *, dataset: str, data_dir: str, norm: str, eps: float, attacks: list[str],
                  n_examples: int | None, batch_size: int, seed: int, pgd_steps: int, out_dir: Path,
                  model_id: str | None, model_dir: str, allow_download: bool = False, download: bool = False,
                  verify_md5: bool = True, device: str = "auto", meta: ModelInfoSection | None = None,
                  host: PluginHost | None = None, progress: bool = True) -> ModelReport:
    """Evaluate a model given as a teacher spec (``file:...``, ``robustbench:...``) on a test set.

    The test examples are the first ``n_examples`` of the test split, unshuffled, as in
    ``robustbench.eval.benchmark``.
    """
    from .config import DataSection

    host = host or PluginHost.create()
    if n_examples is not None and n_examples < 1:
        raise UserError(f"--n-examples must be >= 1, got {n_examples}")
    torch_device = builders.resolve_device(device)
    data = host.datasets.get(dataset)(DataSection(dataset=dataset, data_dir=data_dir, download=download,
                                                  verify_md5=verify_md5))
    ctx = TeacherLoadContext(dataset=data.name, num_classes=data.num_classes, in_channels=data.in_channels,
                             image_size=data.image_size, threat_model=norm, model_dir=Path(model_dir),
                             allow_download=allow_download, device=torch_device, students=host.students)
    if ":" not in spec or Path(spec).exists():
        spec = f"file:{spec}"
    model = builders.load_teacher(host, spec, ctx).net
    x, y = to_float(data.test_x[:n_examples]), data.test_y[:n_examples]
    return evaluate_and_write(model, x, y, label=model_id or spec, model_id=model_id, dataset=data.name, norm=norm,
                              eps=eps, attacks=attacks, out_dir=out_dir, meta=meta, batch_size=batch_size,
                              seed=seed, pgd_steps=pgd_steps, device=torch_device, progress=progress, host=host)
