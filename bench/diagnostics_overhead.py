"""Wall-clock cost of the issue-7 diagnostics: the same digits run with them off, and with all of them on.

    python bench/diagnostics_overhead.py                       # 3 epochs, 600 training digits, 256-point subset
    python bench/diagnostics_overhead.py --epochs 5 --n-examples 512 --repeats 3

Trains a robust teacher once, then an ``akd`` student (one robust teacher) three ways with the same seed:
the ``diagnostics`` plugin blocked, diagnostics off (the default), and every diagnostic on (clean + PGD
inputs). Prints the median seconds of each and the overhead relative to the blocked run. Off should cost
nothing measurable; on costs a PGD attack plus a few forwards on the subset per recorded epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from robustbench_kd.config import config_from_mapping
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.training.loop import train

ALL = ["entropy", "calibration", "agreement", "per_class", "trajectories"]


def config(out: Path, args: argparse.Namespace, **extra):
    raw = {
        "run": {"out_dir": str(out), "progress": False, "seed": 0, "device": args.device},
        "data": {"dataset": "digits", "batch_size": 64, "n_train": args.n_train, "val_size": 300},
        "eval": {"every": args.epochs, "n_examples": 64, "pgd_steps": 2},
        "student": {"arch": "small-cnn"},
        "optim": {"epochs": args.epochs, "lr": 0.05},
    }
    raw.update(extra)
    return config_from_mapping(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-examples", type=int, default=256)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="rbkd_diag_bench_"))
    train(config(root / "teacher", args, method={"name": "pgd-at"}), host=PluginHost.create(autoload=False))
    student = {"method": {"name": "akd"}, "teachers": {"robust": f"file:{root / 'teacher/checkpoints/last.pt'}"}}
    variants = {
        "plugin blocked": ((("diagnostics",)), {}),
        "diagnostics off": ((), {}),
        "all diagnostics on": (
            (),
            {"diagnostics": {"enabled": ALL, "n_examples": args.n_examples, "pgd_steps": args.pgd_steps}},
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        for name, (blocked, extra) in variants.items():
            out = root / f"{name.replace(' ', '_')}_{repeat}"
            start = time.perf_counter()
            train(config(out, args, **student, **extra), host=PluginHost.create(autoload=False, blocked=blocked))
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plugin blocked"])
    print(
        f"{args.epochs} epochs, {args.n_train} training digits, subset {args.n_examples}, "
        f"PGD-{args.pgd_steps}, {args.repeats} repeats (median)"
    )
    for name, values in times.items():
        med = statistics.median(values)
        print(f"{name:20s} {med:8.3f} s  {100 * (med / base - 1):+6.1f} %")


if __name__ == "__main__":
    main()
