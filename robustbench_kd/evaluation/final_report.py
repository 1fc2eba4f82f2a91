"""Final evaluation of a model and everything written for it.

For a model (a trained student, a teacher, or any checkpoint) this runs the configured attacks on the
test set and writes, under the output directory:

* ``model_info/<dataset>/<threat_model>/<name>.json`` - the RobustBench leaderboard entry (exact key
  set and types of RobustBench's ``model_info`` files);
* ``models/<dataset>/<threat_model>/<name>.pt`` - the weights in the model-zoo layout that
  ``robustbench.utils.load_model`` reads;
* ``results/<name>.json`` - every number measured (FGSM/PGD/CW too, with PGD's step size), the
  AutoAttack version, seed, batch size and flags;
* ``results/<name>.points.safetensors`` - per test point, correct or not under each attack and after each
  AutoAttack stage (:mod:`robustbench_kd.evaluation.points`), for paired comparisons;
* ``submission/<name>/`` - the submission bundle (:mod:`robustbench_kd.submission.bundle`): a copy of the
  leaderboard entry, AutoAttack's log, the checkpoint's SHA-256, the model-zoo entry and the filled-in
  "New Model" issue, with a README. Written when standard AutoAttack ran and the checkpoint was saved.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.export import save_zoo_checkpoint
from robustbench_kd.evaluation.model_info import (
    build_model_info,
    compose_footnote,
    resolve_additional_data,
    write_model_info,
)
from robustbench_kd.evaluation.points import points_from_result, points_path, write_points
from robustbench_kd.evaluation.runner import evaluate_model
from robustbench_kd.evaluation.sanity import check_eps_units, check_evaluation
from robustbench_kd.storage.atomic import atomic_write_text
from robustbench_kd.storage.checkpoint import load_checkpoint, load_weights
from robustbench_kd.students.files import StudentRecord, write_student_safetensors
from robustbench_kd.submission.autoattack_log import autoattack_log_partial
from robustbench_kd.submission.bundle import write_submission_bundle
from robustbench_kd.submission.section import ModelInfoSection
from robustbench_kd.submission.zoo_entry import ZooConstructor
from robustbench_kd.threat import format_eps, parse_number
from robustbench_kd.zoo.autoattack_resume import data_fingerprint
from robustbench_kd.zoo.names import validate_model_id

log = logging.getLogger(__name__)


@dataclass
class ModelReport:
    """What was measured and written for one model."""

    label: str
    accuracy: dict[str, float]
    pgd_alpha: float | None
    pgd_steps: int | None
    n_examples: int
    flags: list[str]
    model_info_path: Path | None = None
    checkpoint_path: Path | None = None
    results_path: Path | None = None
    points_path: Path | None = None  #: results/<name>.points.safetensors: the per-point outcomes
    bundle_path: Path | None = None  #: the submission bundle directory (submission/<name>/ or <name>.preview/)
    bundle_status: str | None = None  #: one line: ready or preview, and why
    #: the same weights as ``checkpoint_path`` in safetensors, with the architecture in its metadata
    safetensors_path: Path | None = None
    sanity: Any = None  #: the SanityReport of the evaluation sanity suite, None when it did not run


def evaluate_and_write(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    label: str,
    model_id: str | None,
    dataset: str,
    norm: str,
    eps: float,
    attacks: list[str],
    out_dir: Path,
    meta: ModelInfoSection | None = None,
    architecture: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    pgd_steps: int = 20,
    device: torch.device | None = None,
    progress: bool = True,
    host: Any = None,
    run: Any = None,
    save_model: bool = True,
    teacher: nn.Module | None = None,
    sanity: bool = True,
    constructor: ZooConstructor | None = None,
    student_record: StudentRecord | None = None,
    command: str | None = None,
    number_forward_passes: int | None = None,
) -> ModelReport:
    """Evaluate ``model`` on ``(x, y)``; when ``model_id`` is given write the three outputs above.

    With ``sanity`` the evaluation sanity suite (:mod:`robustbench_kd.evaluation.sanity`; ``teacher``
    enables its transfer check) runs before anything is written: its verdict goes to
    ``results/<id>.json`` under ``"sanity"`` and a failure marks the model_info entry unreliable.

    Submission bundle: ``constructor`` (how to rebuild the architecture) goes into the bundle's
    model-zoo entry and names the entry's ``architecture`` when neither ``meta.architecture`` nor
    ``architecture`` does; ``command`` (the command line that ran this) goes into its README;
    ``number_forward_passes`` (default: ``meta.number_forward_passes``) into the leaderboard entry.

    ``student_record`` (how to rebuild a student of this project's registry): the weights are also written
    as ``<id>.safetensors`` beside the zoo checkpoint, with the architecture in its metadata.
    """
    # The model id becomes file names under out_dir: refused before anything is evaluated or written.
    if model_id is not None:
        validate_model_id(model_id)
    # Sanity suite: an eps in the wrong unit fails here, before any attack runs.
    check_eps_units(parse_number(eps, what="eps"), norm, x)
    # Submission bundle: AutoAttack's log goes to a hidden file in the bundle directory while it runs and
    # is moved into place only once the whole evaluation has succeeded.
    aa_log = (
        autoattack_log_partial(out_dir, model_id)
        if model_id is not None and save_model and "autoattack" in attacks
        else None
    )
    result = evaluate_model(
        model,
        x,
        y,
        norm=norm,
        eps=eps,
        attacks=attacks,
        batch_size=batch_size,
        seed=seed,
        pgd_steps=pgd_steps,
        device=device,
        progress=progress,
        autoattack_log=aa_log,
    )
    report = ModelReport(
        label=label,
        accuracy=dict(result.accuracy),
        pgd_alpha=result.pgd_alpha,
        pgd_steps=result.pgd_steps,
        n_examples=result.n_examples,
        flags=list(result.autoattack_flags),
    )
    # --- evaluation sanity suite: before any result is written -------------------------------------------
    if sanity:
        report.sanity = check_evaluation(model, x, y, result, teacher=teacher, device=device, batch_size=batch_size)
    # --- end sanity suite ---
    if model_id is None:
        return report
    out_dir = Path(out_dir)
    results = {
        "model": model_id,
        "dataset": dataset,
        "threat_model": norm,
        "eps": format_eps(eps),
        **result.to_dict(),
        "batch_size": batch_size,
    }
    results["sanity"] = report.sanity.to_dict() if report.sanity is not None else None  # the sanity suite's verdict
    points = points_from_result(
        result, model_id=model_id, dataset=dataset, data_sha256=data_fingerprint(x, y), batch_size=batch_size
    )
    report.points_path = points_path(out_dir / "results", model_id)
    results["points"] = report.points_path.name
    # The points file first: a results JSON never names a points file that is not there.
    write_points(report.points_path, points)
    report.results_path = out_dir / "results" / f"{model_id}.json"
    atomic_write_text(report.results_path, json.dumps(results, indent=2) + "\n")
    if "autoattack" in result.accuracy:
        report.model_info_path = write_model_info_entry(
            result,
            model_id=model_id,
            dataset=dataset,
            norm=norm,
            eps=eps,
            out_dir=out_dir,
            meta=meta or ModelInfoSection(),
            architecture=architecture or getattr(constructor, "architecture", None),
            host=host,
            run=run,
            sanity=report.sanity,
            number_forward_passes=number_forward_passes,
        )
    else:
        log.warning(
            "no standard AutoAttack in eval.attacks: model_info JSON for %s not written "
            "(leaderboard entries need 'autoattack')",
            model_id,
        )
    if save_model:
        report.checkpoint_path = save_zoo_checkpoint(
            model, out_dir, dataset=dataset, threat_model=norm, model_id=model_id
        )
        if student_record is not None:  # loadable without the leaderboard's constructor: load_student()
            report.safetensors_path = write_student_safetensors(
                model, report.checkpoint_path.with_suffix(".safetensors"), student_record
            )
    if report.model_info_path is not None and report.checkpoint_path is not None:
        bundle = write_submission_bundle(
            out_dir,
            model_id=model_id,
            threat_model=norm,
            info_path=report.model_info_path,
            checkpoint_path=report.checkpoint_path,
            results=results,
            constructor=constructor,
            autoattack_log=aa_log,
            command=command,
            batch_size=batch_size,
        )
        report.bundle_path, report.bundle_status = bundle.directory, bundle.status_line()
    elif aa_log is not None:
        aa_log.unlink(missing_ok=True)
    return report


def final_students(run: Any) -> list[tuple[str, str, Any]]:
    """The student networks a finished run reports, as ``(model_id, label, network)``, selected first.

    * With a best record (a validation split and ``eval.every``): ``checkpoints/best.pt`` as ``<name>``,
      then the last epoch's weights as ``<name>_last``; when the best epoch is the last one, a single
      entry ``<name>`` (the same weights: one evaluation, not two).
    * Without one: the last epoch's weights as ``<name>``.
    * With ``[ema]`` on, the averaged weights at the end of training follow as ``<name>_ema``.

    A best record whose ``best.pt`` is missing or holds another epoch is a UserError, not a silent
    fallback to the last epoch.
    """
    name, best = run.config.run.name, getattr(run, "best", None)
    ema = getattr(run, "ema", None)
    extra = (
        []
        if ema is None
        else [
            (f"{name}_ema", f"student {name}_ema (EMA decay {run.config.ema.decay:g}, epoch {run.epoch})", ema.module)
        ]
    )
    if best is None:
        return [(name, f"student {name}", run.student), *extra]
    if best["epoch"] == run.epoch:
        return [(name, f"student {name} (best = last, epoch {run.epoch})", run.student), *extra]
    path = run.checkpoint_dir / "best.pt"
    saved = load_checkpoint(path, map_location=run.device)
    if saved.get("epoch") != best["epoch"]:
        raise UserError(
            f"{path} holds epoch {saved.get('epoch')} but the run recorded epoch {best['epoch']} as best; "
            "restore that file or evaluate checkpoints/last.pt with `robustbench-kd evaluate`"
        )
    selected = load_weights(copy.deepcopy(run.student), saved["student"], source=str(path)).eval()
    return [
        (name, f"student {name} (best, epoch {best['epoch']})", selected),
        (f"{name}_last", f"student {name}_last (last, epoch {run.epoch})", run.student),
        *extra,
    ]


def write_model_info_entry(
    result: Any,
    *,
    model_id: str,
    dataset: str,
    norm: str,
    eps: float,
    out_dir: Path,
    meta: ModelInfoSection,
    architecture: str | None,
    host: Any,
    run: Any,
    sanity: Any = None,
    number_forward_passes: int | None = None,
) -> Path:
    """Write the leaderboard entry of ``result`` (``model_info/<dataset>/<norm>/<model_id>.json``).

    AutoAttack's flags and the sanity suite's verdict mark the entry unreliable, with one sentence in the
    footnote saying why (:func:`compose_footnote`); the plugins' ``model_info`` hook sees the entry before
    it is written. ``number_forward_passes`` overrides ``meta.number_forward_passes``; an unset
    ``meta.additional_data`` is inherited from the run's ``robustbench:`` teachers
    (:func:`resolve_additional_data`).
    """
    flags = list(result.autoattack_flags)
    if flags and sanity is None:
        # AutoAttack's own checks fired (zero gradients, randomness, probability outputs, Square beating
        # the gradient attacks): the number may be an overestimate, so the entry says so.
        log.warning("AutoAttack flagged %s as possibly unreliable: %s", model_id, "; ".join(flags))
    # --- evaluation sanity suite ---------------------------------------------------------------------------
    # Its reasons include AutoAttack's flags, so its verdict replaces them in the footnote; the suite has
    # already logged each reason as a warning.
    if sanity is not None and sanity.reasons:
        log.warning(
            "%s is marked unreliable in its model_info entry (%d sanity reason(s))", model_id, len(sanity.reasons)
        )
    unreliable = bool(flags) or (sanity is not None and not sanity.reliable)
    # --- end sanity suite ---
    # The footnote stays one short sentence; the full reasons are in results/<id>.json and the log.
    footnote = compose_footnote(
        meta.footnote,
        autoattack_flags=flags if sanity is None else (),
        sanity=sanity.to_dict() if sanity is not None and sanity.reasons else None,
    )
    info = build_model_info(
        dataset=dataset,
        threat_model=norm,
        eps=eps,
        clean_acc=result.accuracy["clean"],
        autoattack_acc=result.accuracy["autoattack"],
        name=meta.title,
        authors=meta.authors,
        venue=meta.venue,
        link=meta.link,
        architecture=meta.architecture or architecture,
        additional_data=resolve_additional_data(
            meta.additional_data, getattr(getattr(run, "config", None), "teachers", None), model_id=model_id
        ),
        number_forward_passes=meta.number_forward_passes if number_forward_passes is None else number_forward_passes,
        reported=_reported_fraction(meta.reported),
        footnote=footnote,
        unreliable=unreliable,
    )
    if host is not None:
        host.model_info(info, run)
    return write_model_info(out_dir, info, dataset=dataset, threat_model=norm, model_id=model_id)


def _reported_fraction(reported: str | float | None) -> float | None:
    """``[model_info] reported`` (the paper's robust accuracy) as the fraction build_model_info takes.

    It is written like the leaderboard's own field, a percentage such as ``"62.5"`` (a trailing ``%``
    is accepted).
    """
    if reported is None:
        return None
    text = str(reported).strip().removesuffix("%").strip()
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 100.0:  # false for NaN too
        raise UserError(f'model_info.reported must be a percentage between 0 and 100 such as "62.5", got {reported!r}')
    return value / 100


def format_table(reports: list[ModelReport]) -> str:
    """A plain-text table: model | clean | FGSM | PGD-k (step) | CW | AutoAttack, in percent."""
    columns: list[tuple[str, str]] = []
    for rep in reports:
        for key in rep.accuracy:
            if key not in [c[0] for c in columns]:
                columns.append((key, _header(key, rep)))
    header = ["model", *[h for _, h in columns]]
    rows = [
        [rep.label, *[f"{100 * rep.accuracy[k]:.2f}" if k in rep.accuracy else "-" for k, _ in columns]]
        for rep in reports
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


def _header(key: str, rep: ModelReport) -> str:
    if key.startswith("pgd") and rep.pgd_alpha is not None:
        return f"{key.upper()} (step {format_eps(rep.pgd_alpha)})"
    return {"clean": "clean", "autoattack": "AutoAttack", "autoattack-quick": "AA-quick"}.get(key, key.upper())
