"""Distil, evaluate and compare from Python, with the public API only (no command line).

On the embedded 8x8 digits, offline, on a CPU:

1. ``distill`` a robust teacher (PGD-AT, a 2x-wide small CNN), then ``distill`` it into a small CNN with
   AKD (the teacher given as ``file:<teacher run>/checkpoints/last.pt``), with the quickstart's recipe;
2. ``evaluate`` student and teacher on the same test points (clean, PGD-20, AutoAttack), and compare;
3. ``load_student`` the student back from its ``.safetensors`` file and check it predicts the same;
4. plot accuracy against the radius for both, under PGD-20 (``accuracy_vs_eps.png``).

    python examples/from_python.py --out from-python-out            # about ten minutes on 2 CPU cores
    python examples/from_python.py --epochs 1 --n-train 256 --n-examples 40   # a smoke test
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import robustbench_kd as rbkd

EPS = 0.2  # the digits radius (L_inf on [0, 1] pixels)
EPS_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def run_config(out: Path, name: str, *, epochs: int, n_train: int, n_examples: int, **sections: dict) -> dict:
    """A run on digits as a plain mapping: the same sections a run file has."""
    return {
        "run": {"name": name, "out_dir": str(out / name), "progress": False},
        "data": {"dataset": "digits", "n_train": n_train},
        "threat": {"norm": "Linf", "eps": EPS, "alpha": 0.05, "steps": 10},
        "optim": {
            "epochs": epochs,
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "multistep",
            "milestones": [max(1, int(0.75 * epochs))],
        },
        "eval": {"attacks": ["clean"], "final_n_examples": n_examples, "teachers": False, "sanity": False},
        **sections,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("from-python-out"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-examples", type=int, default=150, help="test points evaluated")
    args = parser.parse_args(argv)
    sizes = {"epochs": args.epochs, "n_train": args.n_train, "n_examples": args.n_examples}

    # 1. A robust teacher, then the student distilled from it.
    teacher_run = rbkd.distill(
        run_config(args.out, "Teacher_PGDAT", student={"arch": "small-cnn", "options": {"width": 2.0}}, **sizes)
        | {"method": {"name": "pgd-at"}}
    )
    student_run = rbkd.distill(
        run_config(args.out, "Student_AKD", **sizes)
        | {
            "method": {"name": "akd", "alpha": 0.75},
            "teachers": {"robust": f"file:{teacher_run.paths['last_checkpoint']}"},
            "eval": {
                "attacks": ["clean", "autoattack"],
                "final_n_examples": args.n_examples,
                "teachers": False,
                "sanity": False,
            },
        }
    )
    print(f"student trained for {len(student_run.history)} epochs in {student_run.run_dir}")
    print(f"its final evaluation: {student_run.metrics}")

    # 2. Both models on the same test points, as the leaderboard evaluates them.
    common = {"dataset": "digits", "eps": EPS, "n_examples": args.n_examples, "device": "cpu", "progress": False}
    results = {
        "teacher": rbkd.evaluate(teacher_run.student, attacks=["clean", "pgd", "autoattack"], **common),
        "student": rbkd.evaluate(student_run.student, attacks=["clean", "pgd", "autoattack"], **common),
    }
    print(f"\n{'model':<8} {'clean':>6} {'PGD-20':>7} {'AutoAttack':>10}")
    for label, result in results.items():
        acc = result.accuracy
        print(f"{label:<8} {acc['clean']:>6.1%} {acc['pgd-20']:>7.1%} {acc['autoattack']:>10.1%}")
    teacher_aa, student_aa = results["teacher"].robust_accuracy, results["student"].robust_accuracy
    print(f"AutoAttack accuracy, student minus teacher: {100 * (student_aa - teacher_aa):+.1f} points")

    # 3. The student back from its .safetensors file (weights, with the architecture in the metadata).
    reloaded = rbkd.load_student(student_run.paths["safetensors"])
    x = torch.rand(8, 1, 8, 8)
    same = torch.equal(reloaded(x), student_run.student.cpu()(x))
    print(f"\nload_student({student_run.paths['safetensors'].name}) predicts the same: {same}")

    # 4. Accuracy against the radius, under PGD-20 (clean accuracy at eps = 0); the sanity suite ran above.
    def accuracy_at(model: torch.nn.Module, eps: float) -> float:
        quick = {**common, "sanity": False}
        if eps == 0:
            return rbkd.evaluate(model, attacks=["clean"], **quick).accuracy["clean"]
        return rbkd.evaluate(model, attacks=["pgd"], **{**quick, "eps": eps}).accuracy["pgd-20"]

    curves = {
        label: [accuracy_at(run.student, eps) for eps in EPS_GRID]
        for label, run in (("teacher", teacher_run), ("student", student_run))
    }
    figure = plot(curves, args.out / "accuracy_vs_eps.png")
    print(f"accuracy against eps (PGD-20) drawn in {figure}")


def plot(curves: dict[str, list[float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for label, values in curves.items():
        ax.plot(EPS_GRID, [100 * v for v in values], marker="o", label=label)
    ax.axvline(EPS, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="L_inf radius eps (PGD-20)", ylabel="accuracy (%)", ylim=(0, 100))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
