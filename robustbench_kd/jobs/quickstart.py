"""``robustbench-kd quickstart``: the whole pipeline offline, in minutes, on the embedded digits data.

1. Train a robust teacher on the spot: PGD-AT, a 2x-wide small CNN, L_inf eps = 0.2 (on the 8x8
   digits a standard model keeps 0% under AutoAttack at that radius, an adversarially trained one
   about 40%).
2. Distil it into a half-width student with AKD (Maroto et al.: cross-entropy at the student's
   adversarial example against the teacher's probabilities there, mixed with the label,
   alpha = 0.75); the teacher is ``file:<out>/teacher/checkpoints/last.pt``.
3. Evaluate teacher and student on the first 150 test digits: clean, PGD-20 and the original
   AutoAttack (standard), and write the RobustBench ``model_info`` JSON, the student in the zoo
   layout, the resolved config and the metrics log under ``<out>``. (AutoAttack's cost grows with
   the number of points that stay robust: 150 points keep the whole job at a few minutes on 2 cores.)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from robustbench_kd.config import config_from_mapping
from robustbench_kd.evaluation.final_report import ModelReport
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.storage.names import check_output_dir

log = logging.getLogger(__name__)

TEACHER_ID = "Quickstart2026PGDAT_SmallCNNx2"
STUDENT_ID = "Quickstart2026AKD_SmallCNN"
EVAL_EXAMPLES = 150


def quickstart_configs(
    out_dir: Path, *, epochs: int = 15, seed: int = 0, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two embedded run configurations (teacher, student) as plain mappings."""
    threat = {"norm": "Linf", "eps": 0.2, "alpha": 0.05, "steps": 10}
    common = {
        "data": {"dataset": "digits", "batch_size": 64},
        "threat": threat,
        "optim": {
            "epochs": epochs,
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "multistep",
            "milestones": [max(1, int(epochs * 0.75))],
            "gamma": 0.1,
        },
        "eval": {
            "attacks": ["clean", "pgd", "autoattack"],
            "pgd_steps": 20,
            "teachers": False,
            "final_n_examples": EVAL_EXAMPLES,
        },
    }
    teacher = {
        **common,
        "run": {"name": TEACHER_ID, "out_dir": str(out_dir / "teacher"), "seed": seed, "progress": progress},
        "student": {"arch": "small-cnn", "options": {"width": 2.0}},
        "method": {"name": "pgd-at"},
        "model_info": {"title": "robustbench-kd quickstart teacher (PGD-AT)", "architecture": "SmallCNN-x2"},
    }
    student = {
        **common,
        "run": {"name": STUDENT_ID, "out_dir": str(out_dir / "student"), "seed": seed, "progress": progress},
        "student": {"arch": "small-cnn", "options": {"width": 1.0}},
        "teachers": {"robust": f"file:{out_dir / 'teacher' / 'checkpoints' / 'last.pt'}"},
        "method": {"name": "akd", "alpha": 0.75},
        "model_info": {
            "title": "robustbench-kd quickstart student (AKD from a PGD-AT teacher)",
            "architecture": "SmallCNN",
        },
    }
    return teacher, student


def run_quickstart(
    out_dir: str | Path = "quickstart-out",
    *,
    epochs: int = 15,
    seed: int = 0,
    progress: bool = True,
    host: PluginHost | None = None,
) -> list[ModelReport]:
    """Teacher -> student -> evaluation; returns the reports (teacher first)."""
    from robustbench_kd.jobs.pipeline import distill

    out_dir = Path(check_output_dir(out_dir, what="--out")).resolve()  # "" would resolve to the current directory
    host = host or PluginHost.create()
    teacher_raw, student_raw = quickstart_configs(out_dir, epochs=epochs, seed=seed, progress=progress)
    # Both configurations are checked before the teacher trains: a bad --epochs fails in the first second.
    stages = [("teacher", config_from_mapping(teacher_raw)), ("student", config_from_mapping(student_raw))]
    reports: list[ModelReport] = []
    for stage, config in stages:
        log.info(
            "quickstart: training the %s (%s, %d epochs) into %s",
            stage,
            config.method_name,
            config.optim.epochs,
            config.run.out_dir,
        )
        # Both runs write their leaderboard files into the shared <out>/model_info and <out>/models.
        stage_reports = distill(config, host=host, export_dir=out_dir)
        for rep in stage_reports:
            rep.label = f"{stage} ({config.method_name}, {config.run.name})"
        reports.extend(stage_reports)
    return reports
