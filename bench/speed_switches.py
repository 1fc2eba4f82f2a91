"""Training throughput of the [speed] switches (amp, channels_last, torch.compile) against the default.

Runs robustbench_kd's trainer (``train_one_epoch``) for one method on synthetic data, once per switch
setting, with interleaved repeats (the first round of each setting warms up, which also absorbs
torch.compile's compilation), and prints median images/s. Speed lives here, never in tests.

    python bench/speed_switches.py                                   # rslad, digits-shaped data, CPU
    python bench/speed_switches.py --dataset-shape 3,32,32 --width 1 --n 512
    python bench/speed_switches.py --device cuda --switches off,bf16,fp16,compile-student
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from robustbench_kd import hookimpl
from robustbench_kd.config import config_from_mapping
from robustbench_kd.data.datasets import DataSplits
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.students import build_student
from robustbench_kd.training.loop import train_one_epoch
from robustbench_kd.training.setup import setup_run

SWITCHES = {
    "off": {},
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "bf16-attack-bf16": {"amp": "bf16", "attack_fp32": False},
    "channels_last": {"channels_last": True},
    "compile-student": {"compile": "student"},
    "compile-both": {"compile": "both"},
}


class SyntheticData:
    """A synthetic dataset plugin of a given shape."""

    def __init__(self, shape: tuple[int, int, int], n: int) -> None:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(n, *shape, generator=gen)
        y = torch.randint(0, 10, (n,), generator=gen)
        self.data = DataSplits("synthetic", x, y, x[:64], y[:64], num_classes=10)

    @hookimpl
    def rbkd_register_datasets(self, registry):
        registry.add("synthetic", lambda config: self.data, description="benchmark data")


def make_run(args: argparse.Namespace, speed: dict, host: PluginHost, workdir: Path, tag: str):
    data = host.datasets.get("synthetic")(None)
    torch.manual_seed(0)
    teacher = build_student(
        "small-cnn", num_classes=10, in_channels=data.in_channels, image_size=data.image_size, width=2 * args.width
    )
    teacher_file = workdir / "teacher.pt"
    torch.save({"state_dict": teacher.state_dict()}, teacher_file)
    cls = host.methods.get(args.method)
    raw = {
        "run": {"out_dir": str(workdir / tag), "progress": False, "device": args.device},
        "data": {"dataset": "synthetic", "batch_size": args.batch_size, "augment": False},
        "threat": {"eps": 0.2, "alpha": 0.05, "steps": args.steps},
        "student": {"arch": "small-cnn", "options": {"width": args.width}},
        "method": {"name": args.method},
        "optim": {"epochs": 1000, "lr": 0.01, "schedule": "constant"},
        "speed": {**speed, "compile_backend": args.backend} if "compile" in speed else speed,
    }
    if cls.teacher_roles:
        raw["teachers"] = {
            role: f"file:{teacher_file}?arch=small-cnn&width={2 * args.width}" for role in cls.teacher_roles
        }
    return setup_run(config_from_mapping(raw), host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="rslad")
    parser.add_argument(
        "--switches",
        default="off,bf16,fp16,channels_last,compile-student",
        help=f"comma-separated, from {', '.join(SWITCHES)}",
    )
    parser.add_argument("--dataset-shape", default="1,8,8", help="C,H,W of synthetic data (1,8,8 = digits)")
    parser.add_argument("--n", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.5, help="small-cnn student width (teacher: 2x)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for the compile-* rows")
    args = parser.parse_args()
    names = args.switches.split(",")
    unknown = [s for s in names if s not in SWITCHES]
    if unknown:
        parser.error(f"unknown switch {', '.join(unknown)}; choose from {', '.join(SWITCHES)}")
    shape = tuple(int(s) for s in args.dataset_shape.split(","))
    host = PluginHost.create(autoload=False, extra=[SyntheticData(shape, args.n)])
    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, data {shape} x {args.n}, "
        f"batch {args.batch_size}, {args.method}, PGD-{args.steps}, small-cnn width {args.width} "
        f"(teacher {2 * args.width}), compile backend {args.backend}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: make_run(args, SWITCHES[name], host, Path(tmp), name) for name in names}
        times: dict[str, list[float]] = {name: [] for name in names}
        warmup: dict[str, float] = {}
        for r in range(args.repeats + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                train_one_epoch(run, r)
                if run.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                if r:
                    times[name].append(elapsed)
                else:
                    warmup[name] = elapsed
    base = statistics.median(times[names[0]])
    print(f"| switch | img/s | vs {names[0]} | first epoch (s, incl. compile) |")
    print("|---|---|---|---|")
    for name in names:
        t = statistics.median(times[name])
        print(f"| {name} | {args.n / t:.0f} | {base / t:.2f}x | {warmup[name]:.1f} |")


if __name__ == "__main__":
    main()
