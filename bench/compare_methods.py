"""Every registered method, distilled from the same teachers on the embedded digits data, over several seeds.

    python bench/compare_methods.py                                  # all methods, seeds 0,1,2, 15 epochs
    python bench/compare_methods.py --methods rslad,akd --seeds 0 --epochs 5

1. Trains the teachers once (seed 0): a robust one (PGD-AT, 2x-wide small CNN, the quickstart's teacher)
   and a natural one (standard training, same architecture) for methods that also use a ``natural`` role.
2. For each method and each seed: a small-CNN student, the same epochs and schedule, the method's default
   options (the reference code's), teachers by role; run directories ``<out>/<row>/seed_<s>``, as
   ``robustbench-kd distill --seeds`` lays them out. GACD's linear probe (``gacd-linear``) and its
   adversarial fine-tuning (``pgd-at`` from the ``gacd`` weights, the paper's GACD+AFT) start from the
   ``gacd`` weights of the same seed. Then the ``VARIANTS`` (flags that the default run shows to matter)
   unless ``--no-variants``. A seed whose results exist is not trained again: an interrupted benchmark
   continues where it stopped.
3. Evaluates every model on the first ``--n-eval`` test digits (the same points for all): clean, PGD-20
   (step 0.05) and the original AutoAttack (standard), eps = 0.2 L_inf; each run writes its per-point
   results. The table gives each accuracy as the mean over seeds with its 95% interval (Student t over the
   seeds), and the paired verdict of every row against ``--reference`` on AutoAttack (two-level paired
   bootstrap over seeds and points; exact McNemar when both rows have one seed). Written to
   ``<out>/comparison.md`` and printed. The sanity suite and the end-of-run report are off in these runs:
   they change no number of the table and cost time on each of its ~70 runs.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from robustbench_kd.analysis.comparison.render import metric_name
from robustbench_kd.analysis.comparison.verdicts import ComparedModel, check_pairable, compare_pairs, model_interval
from robustbench_kd.api import distill
from robustbench_kd.api.sweep import parse_seeds
from robustbench_kd.evaluation.points import points_path, read_points

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

KEYS = ("clean", "pgd-20", "autoattack")


def base_config(run_dir: Path, name: str, *, epochs: int, n_eval: int, seed: int) -> dict[str, Any]:
    return {
        "run": {"name": name, "out_dir": str(run_dir), "seed": seed, "progress": False},
        "data": {"dataset": "digits", "batch_size": 64},
        "threat": {"norm": "Linf", "eps": 0.2, "alpha": 0.05, "steps": 10},
        "student": {"arch": "small-cnn", "options": {"width": 1.0}},
        "optim": {"epochs": epochs, "lr": 0.05, "schedule": "multistep", "milestones": [max(1, int(epochs * 0.75))]},
        "eval": {
            "attacks": ["clean", "pgd", "autoattack"],
            "pgd_steps": 20,
            "final_n_examples": n_eval,
            "teachers": False,
            "sanity": False,  # the gradient-masking suite changes no number of the table
        },
        "report": {"enabled": False},  # nor does the end-of-run report; both cost time on every run
    }


def _stage_depth(name: str) -> int:
    return 0 if name not in STAGE_OF else 1 + _stage_depth(STAGE_OF[name])


def _slug(label: str) -> str:
    return label.replace(" (", "_").replace("=", "-").replace(" ", "_").rstrip(")").replace("-", "_")


def run_seed(raw: dict[str, Any]) -> float:
    """Train and evaluate one seed unless its results exist; the training seconds (from its metrics log)."""
    run_dir = Path(raw["run"]["out_dir"])
    if not points_path(run_dir / "results", raw["run"]["name"]).is_file():
        has_last = (run_dir / "checkpoints" / "last.pt").is_file()
        distill(raw, resume=has_last, progress=False)
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line)["seconds"] for line in rows)


def _model(label: str, runs: list[tuple[int, Path, str]]) -> ComparedModel:
    files = [read_points(points_path(run_dir / "results", name)) for _, run_dir, name in runs]
    return ComparedModel(label, files, [seed for seed, _, _ in runs], str(runs[0][1].parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--methods", default="all", help="comma list of registry keys, or 'all'")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds of every student, e.g. 0,1,2 or 0-4")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--n-eval", type=int, default=150)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--reference", default="pgd-at", help="row every other row is tested against")
    parser.add_argument("--no-variants", action="store_true", help="only the methods' default options")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from robustbench_kd.plugin_host import PluginHost

    out = Path(args.out).resolve()
    seeds = parse_seeds(args.seeds)
    host = PluginHost.create()
    names = host.methods.names() if args.methods == "all" else args.methods.split(",")
    names = sorted(names, key=lambda n: (_stage_depth(n), n))  # a stage runs after the stage it starts from
    rows: list[tuple[str, str, ComparedModel, float]] = []

    teachers = {}
    for role, method in (("robust", "pgd-at"), ("natural", "standard")):
        run_dir = out / f"teacher_{role}"
        raw = base_config(run_dir, f"teacher_{role}", epochs=args.epochs, n_eval=args.n_eval, seed=0)
        raw["student"]["options"]["width"] = 2.0
        raw["method"] = {"name": method}
        secs = run_seed(raw)
        label = f"teacher ({role}: {method}, 2x width)"
        rows.append((label, "-", _model(label, [(0, run_dir, f"teacher_{role}")]), secs))
        teachers[role] = f"file:{run_dir / 'checkpoints' / 'last.pt'}"

    runs = [(name, name, {}) for name in names]
    runs += [(label, name, options) for label, (name, options, start) in FROM_WEIGHTS.items() if start in names]
    if not args.no_variants:
        runs += [(label, name, options) for label, (name, options) in VARIANTS.items() if name in names]
    for label, name, options in runs:
        cls = host.methods.get(name)
        seed_runs, seconds = [], []
        for seed in seeds:
            run_dir = out / _slug(label) / f"seed_{seed}"
            model_id = f"{_slug(label)}_seed{seed}"
            raw = base_config(run_dir, model_id, epochs=args.epochs, n_eval=args.n_eval, seed=seed)
            raw["method"] = {"name": name, **options}
            raw["teachers"] = {role: teachers[role] for role in cls.teacher_roles}
            start = FROM_WEIGHTS[label][2] if label in FROM_WEIGHTS else STAGE_OF.get(name)
            if start is not None:
                start_dir = out / _slug(start) / f"seed_{seed}"
                raw["student"]["init_from"] = str(start_dir / "checkpoints" / "last.pt")
            seconds.append(run_seed(raw))
            seed_runs.append((seed, run_dir, model_id))
        rows.append((label, ", ".join(cls.teacher_roles) or "-", _model(label, seed_runs), sum(seconds) / len(seconds)))

    table = render(rows, args, seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table + "\n")
    print(table)


def render(rows: list[tuple[str, str, ComparedModel, float]], args: argparse.Namespace, seeds: list[int]) -> str:
    models = [model for _, _, model, _ in rows]
    check_pairable(models, "autoattack")
    reference = next((m for m in models if m.label == args.reference), None)
    ref_name = reference.label if reference is not None else None
    lines = [
        f"Digits, L_inf eps = 0.2, {args.epochs} epochs, small-CNN students, first {args.n_eval} test images, "
        f"seeds {','.join(map(str, seeds))} (teachers: seed 0). Each cell: mean over seeds [95% interval].",
        "",
        "| model | teachers | " + " | ".join(metric_name(k) for k in KEYS) + f" | AutoAttack vs {ref_name} | train s |",
        "|---|---|" + "---|" * len(KEYS) + "---|---|",
    ]
    for label, roles, model, secs in rows:
        cells = []
        for key in KEYS:
            interval = model_interval(model, key)
            span = "" if interval.n < 2 else f" [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"
            cells.append(f"{100 * interval.estimate:.2f}{span}")
        versus = "-"
        if reference is not None and model is not reference:
            (verdict,) = compare_pairs([model, reference], "autoattack")
            sign = 1 if verdict.first == model.label else -1
            word = "distinguishable" if verdict.distinguishable else "within noise"
            low, high = sorted((sign * verdict.low, sign * verdict.high))
            versus = f"{100 * sign * verdict.difference:+.2f} ({100 * low:+.1f} to {100 * high:+.1f}): {word}"
        lines.append(f"| {label} | {roles} | " + " | ".join(cells) + f" | {versus} | {secs:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
