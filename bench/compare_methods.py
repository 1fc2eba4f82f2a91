"""Every registered method, distilled from the same teachers on the embedded digits data, side by side.

    python bench/compare_methods.py                      # all methods, 15 epochs, 150 test digits
    python bench/compare_methods.py --methods rslad,akd --epochs 5

1. Trains the teachers once: a robust one (PGD-AT, 2x-wide small CNN, the quickstart's teacher) and a
   natural one (standard training, same architecture) for methods that also use a ``natural`` role.
2. For each method: a small-CNN student, the same epochs, schedule and seed, the method's default
   options (the reference code's), teachers by role. GACD's linear probe (``gacd-linear``) and its
   adversarial fine-tuning (``pgd-at`` from the ``gacd`` weights, the paper's GACD+AFT) start from the
   distilled ``gacd`` weights. Then the ``VARIANTS`` (flags that the default run shows to matter) unless
   ``--no-variants``.
3. Evaluates every model on the first ``--n-eval`` test digits: clean, PGD-20 (step 0.05) and the
   original AutoAttack (standard), eps = 0.2 L_inf, and prints a Markdown table (also written to
   ``<out>/comparison.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from robustbench_kd.config import config_from_mapping
from robustbench_kd.jobs.pipeline import distill
from robustbench_kd.plugin_host import PluginHost

#: stage methods and the method whose final weights they start from
STAGE_OF = {"gacd-linear": "gacd"}

#: rows of a method started from another run's final weights: label -> (method, options, the run it starts from)
FROM_WEIGHTS = {
    "pgd-at from gacd (GACD+AFT)": ("pgd-at", {}, "gacd"),  # GACD's adversarial fine-tuning (paper)
}

#: extra rows: label -> (method, options). Why each is here: README "All methods side by side".
VARIANTS = {
    "ard (kl_reduction=batchmean)": ("ard", {"kl_reduction": "batchmean"}),
    "rslad (kl_reduction=batchmean)": ("rslad", {"kl_reduction": "batchmean"}),
    "adaad (kl_reduction=batchmean)": ("adaad", {"kl_reduction": "batchmean"}),
    "mtard (kl_reduction=batchmean)": ("mtard", {"kl_reduction": "batchmean"}),
    "smaraad (gamma=100)": ("smaraad", {"gamma": 100.0}),
    "smaraad-plus (gamma=100)": ("smaraad-plus", {"gamma": 100.0}),
}


def base_config(out_dir: Path, name: str, *, epochs: int, n_eval: int, seed: int) -> dict[str, Any]:
    return {
        "run": {"name": name.replace("-", "_"), "out_dir": str(out_dir / name), "seed": seed, "progress": False},
        "data": {"dataset": "digits", "batch_size": 64},
        "threat": {"norm": "Linf", "eps": 0.2, "alpha": 0.05, "steps": 10},
        "student": {"arch": "small-cnn", "options": {"width": 1.0}},
        "optim": {"epochs": epochs, "lr": 0.05, "schedule": "multistep", "milestones": [max(1, int(epochs * 0.75))]},
        "eval": {
            "attacks": ["clean", "pgd", "autoattack"],
            "pgd_steps": 20,
            "final_n_examples": n_eval,
            "teachers": False,
        },
    }


def _stage_depth(name: str) -> int:
    return 0 if name not in STAGE_OF else 1 + _stage_depth(STAGE_OF[name])


def reuse_or_run(raw: dict[str, Any], host: PluginHost, reuse: bool) -> tuple[dict[str, float], float]:
    """With --reuse, read a finished run's results instead of training it again."""
    run_dir = Path(raw["run"]["out_dir"])
    results = run_dir / "results" / f"{raw['run']['name']}.json"
    if reuse and results.is_file():
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return json.loads(results.read_text())["accuracy"], sum(r["seconds"] for r in rows)
    shutil.rmtree(run_dir, ignore_errors=True)  # this script owns --out; teachers are reused
    return run_one(raw, host)


def run_one(raw: dict[str, Any], host: PluginHost) -> tuple[dict[str, float], float]:
    """Train and evaluate; return the accuracies and the training time (from the metrics log)."""
    reports = distill(config_from_mapping(raw), host=host)
    rows = (Path(raw["run"]["out_dir"]) / "metrics.jsonl").read_text().splitlines()
    return reports[0].accuracy, sum(json.loads(line)["seconds"] for line in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all", help="comma list of registry keys, or 'all'")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--n-eval", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--reuse", action="store_true", help="reuse methods whose results already exist in --out")
    parser.add_argument("--no-variants", action="store_true", help="only the methods' default options")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    host = PluginHost.create()
    names = host.methods.names() if args.methods == "all" else args.methods.split(",")
    # A stage runs after the stage it starts from.
    names = sorted(names, key=lambda n: (_stage_depth(n), n))
    rows: list[tuple[str, str, dict[str, float], float]] = []

    teachers = {}
    for role, method in (("robust", "pgd-at"), ("natural", "standard")):
        raw = base_config(out, f"teacher_{role}", epochs=args.epochs, n_eval=args.n_eval, seed=args.seed)
        raw["student"]["options"]["width"] = 2.0
        raw["method"] = {"name": method}
        acc, secs = reuse_or_run(raw, host, reuse=True)  # teachers are always reused when present
        rows.append((f"teacher ({role}: {method}, 2x width)", "-", acc, secs))
        teachers[role] = f"file:{out / f'teacher_{role}' / 'checkpoints' / 'last.pt'}"

    runs = [(name, name, {}) for name in names]
    runs += [(label, name, options) for label, (name, options, start) in FROM_WEIGHTS.items() if start in names]
    if not args.no_variants:
        runs += [(label, name, options) for label, (name, options) in VARIANTS.items() if name in names]
    for label, name, options in runs:
        cls = host.methods.get(name)
        slug = label.replace(" (", "_").replace("=", "-").rstrip(")")
        raw = base_config(out, slug, epochs=args.epochs, n_eval=args.n_eval, seed=args.seed)
        raw["method"] = {"name": name, **options}
        raw["teachers"] = {role: teachers[role] for role in cls.teacher_roles}
        start = FROM_WEIGHTS[label][2] if label in FROM_WEIGHTS else STAGE_OF.get(name)
        if start is not None:
            raw["student"]["init_from"] = str(out / start / "checkpoints" / "last.pt")
        acc, secs = reuse_or_run(raw, host, args.reuse)
        rows.append((label, ", ".join(cls.teacher_roles) or "-", acc, secs))

    lines = [
        f"Digits, L_inf eps = 0.2, {args.epochs} epochs, small-CNN students, first {args.n_eval} test images",
        "",
        "| model | teachers | clean | PGD-20 | AutoAttack | train s |",
        "|---|---|---|---|---|---|",
    ]
    for label, roles, acc, secs in rows:
        pgd = next((v for k, v in acc.items() if k.startswith("pgd")), float("nan"))
        lines.append(
            f"| {label} | {roles} | {100 * acc['clean']:.2f} | {100 * pgd:.2f} | "
            f"{100 * acc['autoattack']:.2f} | {secs:.0f} |"
        )
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
