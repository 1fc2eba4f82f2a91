"""The report of one finished run: analyses, figures and ``report/report.md`` under the run directory.

Written at the end of ``distill`` (``[report] enabled``) and by ``robustbench-kd report RUN_DIR``. The
analyses read the first ``report.n_examples`` test examples; the final evaluation has already read
the test set and nothing here selects a checkpoint. The student is the one the run reports (its
best checkpoint when there is one); the teacher is the ``robust`` role, else the first role.

A damaged run directory (see :mod:`.damage`): what the report cannot do without is the run itself,
``config.yaml`` and the checkpoints, which the caller loads before (a damaged one is a one-line
UserError there, exit 2). Every other file feeds one part of the report: ``metrics.jsonl`` the training
metrics, the ``diagnostics/`` files their figures. A damaged one (cut short, wrong types, ``NaN`` where
none belongs, a directory or FIFO in its place, too large, missing although the run recorded it) costs
that part only, and is one warning line naming the file and what is wrong, logged after the report is
in place. The report is built in a scratch directory and moved into ``out`` only once complete
(:mod:`.staging`): a report that fails leaves ``out`` as it was.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_kd.analysis.reports import analyses, figures
from robustbench_kd.analysis.reports.damage import Damage
from robustbench_kd.analysis.reports.diagnostics_report import TITLES as DIAGNOSTIC_TITLES
from robustbench_kd.analysis.reports.diagnostics_report import write_diagnostics_figures
from robustbench_kd.analysis.reports.document import Block, Figure, Heading, Paragraph, Table, write_documents
from robustbench_kd.analysis.reports.metrics import read_metric_series
from robustbench_kd.analysis.reports.section import ReportSection
from robustbench_kd.analysis.reports.staging import output_dir, staged
from robustbench_kd.analysis.reports.tsne import tsne_embedding
from robustbench_kd.data.datasets import to_float
from robustbench_kd.evaluation.final_report import final_students
from robustbench_kd.storage.atomic import atomic_write_text
from robustbench_kd.teachers import EnsembleTeacher

log = logging.getLogger(__name__)

#: The figure files of a run report (those whose inputs exist are written).
FIGURES = {
    "eps_curve": "accuracy_vs_eps.png",
    "correlation": "logit_correlation_diff.png",
    "embedding": "student_embedding.png",
    "cam": "cam_maps.png",
    "metrics": "training_metrics.png",
}


def pick_teacher(teachers: Any) -> tuple[str, nn.Module] | None:
    """``(role, teacher)``: the ``robust`` role when configured, else the first; None without teachers."""
    if not teachers:
        return None
    role = "robust" if "robust" in teachers else next(iter(teachers))
    return role, teachers[role]


def _single_network(model: nn.Module) -> bool:
    return not (isinstance(model, EnsembleTeacher) and len(model.members) > 1)


#: Panels of the training-metrics figure: a run writes ~10 keys; a plugin adding hundreds gets the first ones.
MAX_METRIC_PANELS = 48


def write_run_report(run: Any, *, section: ReportSection | None = None, out_dir: str | Path | None = None) -> Path:
    """Compute the analyses of a finished ``run`` and write the report; returns ``report.md``'s path.

    ``out_dir`` (``--out``) defaults to ``<run.out_dir>/report``. Damaged input files are logged as one
    warning line each once the report is in place (see the module docstring).
    """
    cfg = section or getattr(run.config, "report", None) or ReportSection()
    out = output_dir(Path(run.out_dir) / "report" if out_dir is None else out_dir, what="--out")
    damage = Damage()
    with staged(out, index="report.md") as scratch:
        _write_report(run, cfg, scratch, damage)
    damage.emit()
    return out / "report.md"


def _write_report(run: Any, cfg: ReportSection, out: Path, damage: Damage) -> None:
    _, student_label, student = final_students(run)[0]
    teacher = pick_teacher(run.teachers)
    models = [student] + ([teacher[1]] if teacher else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        torch.manual_seed(run.config.eval.seed)
        _write(run, cfg, out, student_label, student, teacher, damage)
    finally:
        for m, mode in zip(models, modes, strict=False):
            m.train(mode)


def _write(
    run: Any,
    cfg: ReportSection,
    out: Path,
    student_label: str,
    student: nn.Module,
    teacher: tuple[str, nn.Module] | None,
    damage: Damage,
) -> None:
    threat = run.config.threat
    x, y = to_float(run.data.test_x[: cfg.n_examples]), run.data.test_y[: cfg.n_examples]
    x_adv = analyses.adversarial(student, x, y, eps=threat.eps, norm=threat.norm, steps=cfg.pgd_steps)
    numbers: dict[str, Any] = {
        "n_examples": len(y),
        "student": student_label,
        "norm": threat.norm,
        "eps": threat.eps,
        "pgd_steps": cfg.pgd_steps,
        "teacher": None if teacher is None else f"{teacher[0]} ({getattr(teacher[1], 'spec', '')})",
    }
    written: dict[str, Path] = {}

    # Accuracy against the radius, teacher and student.
    eps_values = [float(f"{f * threat.eps:.6g}") for f in cfg.eps_factors]
    curves = {"student": analyses.accuracy_vs_eps(student, x, y, eps_values, norm=threat.norm, steps=cfg.pgd_steps)}
    if teacher is not None:
        curves[f"teacher ({teacher[0]})"] = analyses.accuracy_vs_eps(
            teacher[1], x, y, eps_values, norm=threat.norm, steps=cfg.pgd_steps
        )
    numbers["accuracy_vs_eps"] = {"eps": eps_values, **curves}
    written["eps_curve"] = figures.eps_curve_figure(out / FIGURES["eps_curve"], eps_values, curves, norm=threat.norm)

    # Student features: 2-D PCA or t-SNE of natural and adversarial examples together.
    s_nat, f_nat = analyses.logits_and_features(student, x)
    s_adv, f_adv = analyses.logits_and_features(student, x_adv)
    features = torch.cat([f_nat, f_adv])
    if cfg.embedding == "tsne":
        coords, kl = tsne_embedding(features, perplexity=cfg.tsne_perplexity, seed=run.config.eval.seed)
        numbers["embedding"] = {"method": "tsne", "perplexity": cfg.tsne_perplexity, "kl_divergence": kl}
        axis_labels = ("t-SNE 1", "t-SNE 2")
    else:
        coords, ratio = analyses.pca_embedding(features)
        numbers["embedding"] = {"method": "pca", "explained_variance_ratio": ratio.tolist()}
        axis_labels = (f"PC1 ({100 * float(ratio[0]):.1f}%)", f"PC2 ({100 * float(ratio[1]):.1f}%)")
    flags = torch.cat([torch.zeros(len(y), dtype=torch.bool), torch.ones(len(y), dtype=torch.bool)])
    written["embedding"] = figures.embedding_figure(
        out / FIGURES["embedding"], coords, torch.cat([y, y]), flags, axis_labels
    )

    # Teacher minus student logit correlations on natural and adversarial examples (GACD, Figs. 3-4).
    cams: dict[str, torch.Tensor] = {}
    k = min(cfg.n_cam, len(y))
    if teacher is not None:
        diffs = {
            "natural": analyses.correlation_difference(analyses.predict(teacher[1], x), s_nat),
            "adversarial": analyses.correlation_difference(analyses.predict(teacher[1], x_adv), s_adv),
        }
        numbers["logit_correlation_frobenius"] = {name: fro for name, (_, fro) in diffs.items()}
        written["correlation"] = figures.correlation_figure(out / FIGURES["correlation"], diffs)
        if k and _single_network(teacher[1]):
            cams["teacher clean"] = analyses.normalized_cams(teacher[1], x[:k], y[:k])
            cams["teacher adv"] = analyses.normalized_cams(teacher[1], x_adv[:k], y[:k])
    if k:
        cams["student clean"] = analyses.normalized_cams(student, x[:k], y[:k])
        cams["student adv"] = analyses.normalized_cams(student, x_adv[:k], y[:k])
        written["cam"] = figures.cam_figure(out / FIGURES["cam"], x[:k], x_adv[:k], cams, y[:k])

    run_dir = Path(run.out_dir)
    metrics = read_metric_series(run_dir / "metrics.jsonl", damage, required=True)
    epochs, series = metrics[0], {k: v for k, v in metrics[1].items() if not k.startswith("diag_")}  # own figure
    numbers["metrics_not_drawn"] = max(0, len(series) - MAX_METRIC_PANELS)
    if series:
        drawn = dict(list(series.items())[:MAX_METRIC_PANELS])
        written["metrics"] = figures.metrics_figure(out / FIGURES["metrics"], epochs, drawn)

    # What [diagnostics] recorded during training (nothing when it was off).
    diag_written, numbers["diagnostics"] = write_diagnostics_figures(
        run_dir,
        out,
        enabled=getattr(getattr(run.config, "diagnostics", None), "enabled", ()),
        num_classes=getattr(run.data, "num_classes", None),
        metrics=metrics,
        damage=damage,
    )

    atomic_write_text(out / "analyses.json", json.dumps(numbers, indent=2) + "\n")
    title = f"Report: {run.config.run.name}"
    write_documents(_blocks(run, numbers, written, diag_written), out, title)


SECTIONS = [
    ("eps_curve", "Accuracy against eps: student and teacher"),
    ("correlation", "Logit correlations: teacher minus student"),
    ("embedding", "Student features ({method}): natural and adversarial"),
    ("cam", "Class activation maps (label class)"),
    ("metrics", "Training metrics (metrics.jsonl)"),
]


def _blocks(run: Any, numbers: dict[str, Any], written: dict[str, Path], diag_written: dict[str, Path]) -> list[Block]:
    eps = numbers["accuracy_vs_eps"]
    models = [k for k in eps if k != "eps"]
    blocks: list[Block] = [
        Heading(f"Report: {run.config.run.name}", 1),
        Paragraph(
            f"Student: {numbers['student']}; teacher: {numbers['teacher'] or 'none'}; method "
            f"{run.config.method_name}; {numbers['n_examples']} test examples, PGD-{numbers['pgd_steps']} "
            f"{numbers['norm']} (adversarial examples against the student at eps = {numbers['eps']:g})."
        ),
        Heading("Accuracy (%) against eps"),
        Table(
            ["eps", *models],
            [[f"{value:.4g}", *(f"{100 * eps[k][i]:.1f}" for k in models)] for i, value in enumerate(eps["eps"])],
        ),
    ]
    if "logit_correlation_frobenius" in numbers:
        fro = numbers["logit_correlation_frobenius"]
        blocks.append(
            Paragraph("Frobenius norm of corr(T) - corr(S): " + ", ".join(f"{k} {v:.4f}" for k, v in fro.items()))
        )
    method = numbers["embedding"]["method"].upper().replace("TSNE", "t-SNE")
    for key, title in SECTIONS:
        if key in written:
            title = title.format(method=method)
            blocks += [Heading(title), Figure(title, written[key])]
        if key == "metrics" and numbers["metrics_not_drawn"]:
            blocks.append(Paragraph(f"{numbers['metrics_not_drawn']} more metrics are in metrics.jsonl, not drawn."))
    if diag_written:
        blocks.append(Heading("Diagnostics recorded during training"))
        for key, path in diag_written.items():
            blocks += [Heading(DIAGNOSTIC_TITLES[key], 3), Figure(DIAGNOSTIC_TITLES[key], path)]
    else:
        blocks.append(
            Paragraph(
                "No per-epoch diagnostics were recorded ([diagnostics] enabled = [] ); "
                "switch them on to get entropy, calibration, agreement, per-class and "
                "trajectory figures here."
            )
        )
    return blocks
