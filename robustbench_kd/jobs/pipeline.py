"""The jobs behind the CLI: ``distill`` (train + final evaluation) and ``evaluate`` (any model)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from robustbench_kd.config import DataSection, RunConfig, config_from_mapping, load_file
from robustbench_kd.data.datasets import to_float
from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.autoattack import autoattack_state
from robustbench_kd.evaluation.final_report import ModelReport, evaluate_and_write, final_students
from robustbench_kd.evaluation.shards import evaluate_shard, output_directory
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.scale.distributed import is_main
from robustbench_kd.storage.checkpoint import load_checkpoint, load_weights
from robustbench_kd.storage.run_lock import RunDirLock
from robustbench_kd.students.files import StudentRecord
from robustbench_kd.submission.bundle import distill_command
from robustbench_kd.submission.section import ModelInfoSection
from robustbench_kd.submission.zoo_entry import constructor_for_run, constructor_for_spec
from robustbench_kd.teachers import TeacherLoadContext, TeacherSpec
from robustbench_kd.threat import parse_number, validate_eps
from robustbench_kd.training import builders
from robustbench_kd.training.loop import train
from robustbench_kd.training.setup import Run, setup_run
from robustbench_kd.zoo.autoattack_resume import check_state_file
from robustbench_kd.zoo.models import parse_zoo_ref, zoo_preprocessing
from robustbench_kd.zoo.names import validate_model_id

log = logging.getLogger(__name__)


def distill(
    config: RunConfig,
    *,
    host: PluginHost | None = None,
    resume: bool = False,
    final_eval: bool = True,
    export_dir: Path | None = None,
    resume_changed: Sequence[str] = (),
) -> list[ModelReport]:
    """Train a student, then evaluate it (and its teachers) and write the RobustBench outputs.

    The reports of :func:`distill_run`, for callers that need no more than what was measured.
    """
    _, reports = distill_run(
        config, host=host, resume=resume, final_eval=final_eval, export_dir=export_dir, resume_changed=resume_changed
    )
    return reports


def distill_run(
    config: RunConfig,
    *,
    host: PluginHost | None = None,
    resume: bool = False,
    final_eval: bool = True,
    export_dir: Path | None = None,
    resume_changed: Sequence[str] = (),
) -> tuple[Run, list[ModelReport]]:
    """Train a student, evaluate it (and its teachers), write the RobustBench outputs; return the run and reports.

    The outputs go under ``export_dir`` (default: the run's ``out_dir``). The run directory is locked
    against other processes from start to finish (:class:`~robustbench_kd.storage.run_lock.RunDirLock`);
    ``resume_changed``: see :func:`~robustbench_kd.training.loop.train`. The reports are empty when the
    final evaluation is off (``final_eval=False`` or no ``eval.attacks``) and on torchrun ranks other
    than 0.
    """
    host = host or PluginHost.create()
    with RunDirLock(config.run.out_dir) as lock:
        run = train(config, host=host, resume=resume, resume_changed=resume_changed, lock=lock)
        if not final_eval or not config.eval.attacks or not is_main():  # torchrun: rank 0 evaluates
            return run, []
        reports = evaluate_run(run, export_dir=export_dir)
        if config.report.enabled:  # analyses and figures, after the final evaluation has read the test set
            from robustbench_kd.analysis.reports.run_report import write_run_report

            # The results are written already; a model the analyses cannot read loses only the report.
            try:
                log.info("report written to %s", write_run_report(run))
            except UserError as exc:
                log.warning("report not written: %s", exc)
    return run, reports


def evaluate_run(run: Any, *, export_dir: Path | None = None) -> list[ModelReport]:
    """Final evaluation of a finished run: its student model(s), then each teacher role (for comparison).

    The students are :func:`final_students`: the selected one under the model id ``run.name`` (the
    leaderboard entry), then the other under ``<name>_last``. This is the first read of the test set.
    """
    cfg = run.config
    n = cfg.eval.final_n_examples
    x, y = to_float(run.data.test_x[:n]), run.data.test_y[:n]
    common = dict(
        dataset=run.data.name,
        norm=cfg.threat.norm,
        eps=cfg.threat.eps,
        attacks=list(cfg.eval.attacks),
        out_dir=export_dir or run.out_dir,
        batch_size=cfg.eval.batch_size,
        seed=cfg.eval.seed,
        pgd_steps=cfg.eval.pgd_steps,
        device=run.device,
        progress=cfg.run.progress,
    )
    # Sanity suite: the 'robust' teacher, when there is one, drives its transfer-attack check.
    sanity = {"sanity": cfg.eval.sanity, "teacher": run.teachers.get("robust")}
    reports = [
        evaluate_and_write(
            net,
            x,
            y,
            label=label,
            model_id=model_id,
            meta=cfg.model_info,
            constructor=constructor_for_run(run),
            command=distill_command(run),
            student_record=student_record_of(run),
            host=run.host,
            run=run,
            **sanity,
            **common,
        )
        for model_id, label, net in final_students(run)
    ]
    if cfg.eval.teachers:
        for role, teacher in run.teachers.items():
            reports.append(
                evaluate_and_write(
                    teacher, x, y, label=f"teacher {role} ({teacher.spec})", model_id=None, sanity=False, **common
                )
            )
    return reports


def student_record_of(run: Run) -> StudentRecord:
    """How to rebuild the run's student: its architecture, options and the data shape (for ``.safetensors``)."""
    return StudentRecord(
        arch=run.config.student.arch,
        options=dict(run.config.student.options),
        num_classes=run.data.num_classes,
        in_channels=run.data.in_channels,
        image_size=run.data.image_size,
    )


def evaluate_spec(
    spec: str | nn.Module,
    *,
    dataset: str,
    data_dir: str,
    norm: str,
    eps: float,
    attacks: list[str],
    n_examples: int | None,
    batch_size: int,
    seed: int,
    pgd_steps: int,
    out_dir: str | Path,
    model_id: str | None,
    model_dir: str,
    allow_download: bool = False,
    download: bool = False,
    verify_md5: bool = True,
    device: str = "auto",
    meta: ModelInfoSection | None = None,
    host: PluginHost | None = None,
    progress: bool = True,
    sanity: bool = True,
    teacher: str | None = None,
    command: str | None = None,
    shard: tuple[int, int] | None = None,
    aa_state: str | Path | None = None,
    preprocessing: str | None = None,
) -> ModelReport:
    """Evaluate a model on a test set: a teacher spec (``file:...``, ``robustbench:...``), a checkpoint path, a
    run directory (:func:`model_spec`) or a network (evaluated as given, in eval mode on ``device``).

    The test examples are the first ``n_examples`` of the test split, unshuffled, as in
    ``robustbench.eval.benchmark``. ``sanity`` runs the evaluation sanity suite; ``teacher`` (a spec
    like the model's) adds its transfer-attack check. An eps in the wrong unit fails before loading.
    With ``model_id`` the submission bundle's zoo entry rebuilds the architecture the spec names;
    ``command`` (the command line) is recorded in the bundle's README.

    ``shard=(i, n)`` evaluates only shard i of n of the examples and writes its shard file instead of the
    outputs (:mod:`robustbench_kd.evaluation.shards`; needs ``model_id``; merge with ``merge-shards``).
    ``aa_state`` makes AutoAttack resumable through that state file (a shard has one by default).
    ``preprocessing`` (ImageNet only) names RobustBench's preprocessing; by default a ``robustbench:``
    zoo model gets the one RobustBench evaluates it with, any other model ``Res256Crop224``.
    """
    # Names that become paths and the files read back are checked before anything is loaded or created:
    # ``--name ../../x`` would otherwise write outside ``--out``, and a FIFO as state file would block.
    out_dir = output_directory(out_dir, what="--out")
    if model_id is not None:
        validate_model_id(model_id, what="--name")
    if aa_state is not None:
        check_state_file(aa_state)
    validate_eps(parse_number(eps, what="eps"), norm, what="eps")
    if shard is not None and model_id is None:
        raise UserError(
            "--shard needs --name ID: the shards are written to <out>/shards/ID and merged under that model id"
        )
    host = host or PluginHost.create()
    if n_examples is not None and n_examples < 1:
        raise UserError(f"--n-examples must be >= 1, got {n_examples}")
    torch_device = builders.resolve_device(device)
    module = spec if isinstance(spec, nn.Module) else None
    if isinstance(spec, str):
        spec = model_spec(spec)
    if dataset == "imagenet" and preprocessing is None:
        preprocessing = _zoo_preprocessing(spec) if isinstance(spec, str) else None
    data = host.datasets.get(dataset)(
        DataSection(
            dataset=dataset, data_dir=data_dir, download=download, verify_md5=verify_md5, preprocessing=preprocessing
        )
    )
    ctx = TeacherLoadContext(
        dataset=data.name,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        threat_model=norm,
        model_dir=Path(model_dir),
        allow_download=allow_download,
        device=torch_device,
        students=host.students,
    )
    if module is not None:  # a network from Python: evaluated as given (eval mode, on the device)
        model = module.to(torch_device).eval()
    else:
        model = builders.load_teacher(host, str(spec), ctx).net
    if teacher is not None and (":" not in teacher or Path(teacher).exists()):
        teacher = f"file:{teacher}"
    transfer_from = builders.load_teacher(host, teacher, ctx) if teacher is not None and sanity else None
    x, y = to_float(data.test_x[:n_examples]), data.test_y[:n_examples]
    if shard is not None:  # sharded evaluation: this shard's flags only, merged later by merge-shards
        assert model_id is not None  # a shard without --name was refused above
        if not isinstance(spec, str):
            raise UserError("a sharded evaluation needs the model as a spec (file:..., robustbench:...), not a network")
        constructor = constructor_for_spec(
            spec,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            image_size=data.image_size,
            dataset=data.name,
            preprocessing=preprocessing,
            students=host.students,
        )
        return evaluate_shard(
            model,
            x,
            y,
            shard=shard,
            spec=spec,
            model_id=model_id,
            dataset=data.name,
            norm=norm,
            eps=eps,
            attacks=attacks,
            out_dir=out_dir,
            batch_size=batch_size,
            seed=seed,
            pgd_steps=pgd_steps,
            device=torch_device,
            progress=progress,
            aa_state=aa_state,
            meta=meta,
            sanity=sanity,
            teacher=transfer_from,
            architecture=getattr(constructor, "architecture", None),
            constructor=constructor,
        )
    with autoattack_state(aa_state) if aa_state is not None else contextlib.nullcontext():
        return evaluate_and_write(
            model,
            x,
            y,
            label=model_id or (spec if isinstance(spec, str) else type(spec).__name__),
            model_id=model_id,
            dataset=data.name,
            norm=norm,
            eps=eps,
            attacks=attacks,
            out_dir=out_dir,
            meta=meta,
            batch_size=batch_size,
            seed=seed,
            pgd_steps=pgd_steps,
            device=torch_device,
            progress=progress,
            host=host,
            sanity=sanity,
            teacher=transfer_from,
            command=command,
            constructor=constructor_for_spec(
                spec,
                num_classes=data.num_classes,
                in_channels=data.in_channels,
                image_size=data.image_size,
                dataset=data.name,
                preprocessing=preprocessing,
                students=host.students,
            )
            if model_id and isinstance(spec, str)
            else None,
        )


def model_spec(model: str) -> str:
    """The teacher spec that loads ``model``: a spec as given, a path as ``file:``, a run directory as its student.

    A run directory (``config.yaml`` + ``checkpoints/last.pt``) gives the student its final evaluation
    reports under the run's name (:func:`run_student_checkpoint`).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return f"file:{run_student_checkpoint(path)}"
    if ":" not in model or path.exists():
        return f"file:{model}"
    return model


def run_student_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint of the student a finished run reports under its own name: ``best.pt`` or ``last.pt``.

    ``best.pt`` when the run kept a best epoch other than the last (a validation split with ``eval.every``),
    as :func:`~robustbench_kd.evaluation.final_report.final_students` selects; ``last.pt`` otherwise.
    """
    _, last = _run_files(run_dir)
    saved = load_checkpoint(last)
    best = saved.get("best")
    if isinstance(best, dict) and best.get("epoch") != saved.get("epoch"):
        return last.with_name("best.pt")
    return last


def _zoo_preprocessing(spec: str) -> str | None:
    """The preprocessing RobustBench evaluates a ``robustbench:imagenet/...`` spec with (None otherwise)."""
    if not spec.startswith("robustbench:"):
        return None
    dataset, threat_model, name = parse_zoo_ref(TeacherSpec.parse(spec).ref)
    return zoo_preprocessing(name, dataset=dataset, threat_model=threat_model) if dataset == "imagenet" else None


def load_finished_run(run_dir: str | Path) -> Any:
    """Rebuild a finished ``distill`` run from its directory (config.yaml + checkpoints/last.pt)."""
    run_dir = Path(run_dir)
    config_path, last = _run_files(run_dir)
    raw = load_file(config_path)
    raw.setdefault("run", {})["out_dir"] = str(run_dir)
    run = setup_run(config_from_mapping(raw))
    saved = load_checkpoint(last, map_location=run.device)
    load_weights(run.student, saved["student"], source=str(last))
    run.epoch, run.best = int(saved["epoch"]), saved.get("best")
    return run


def _run_files(run_dir: str | Path) -> tuple[Path, Path]:
    """``config.yaml`` and ``checkpoints/last.pt`` of a finished run, or a one-line UserError."""
    run_dir = Path(run_dir)
    config_path, last = run_dir / "config.yaml", run_dir / "checkpoints" / "last.pt"
    if not config_path.is_file() or not last.is_file():
        raise UserError(
            f"{run_dir} is not a run directory: it needs config.yaml and checkpoints/last.pt "
            "(the run.out_dir of a `distill` run)"
        )
    return config_path, last
