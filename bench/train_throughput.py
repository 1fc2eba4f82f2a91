"""Training throughput of a method, and the share of wall time spent outside the necessary passes.

Runs, in one process on the same data and models:

* ``library``: robustbench_kd's trainer (``train_one_epoch``) for the method;
* ``minimal``: a hand-written loop doing exactly the method's necessary work and nothing else (the
  teacher forward on the clean batch, K attack steps of student forward + input gradient, the outer
  student forwards, backward and the SGD step), with no framework around it.

``overhead = 1 - t_minimal / t_library`` is the share of the library's wall time that goes to
everything except those passes (context, memo, hooks, bookkeeping, progress bars). Interleaved
repeats, medians reported. Speed lives here, never in tests.

    python bench/train_throughput.py                          # rslad + pgd-at, small CNN, digits, CPU
    python bench/train_throughput.py --methods rslad --dataset-shape 3,32,32 --batch-size 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from robustbench_kd import hookimpl
from robustbench_kd.config import config_from_mapping
from robustbench_kd.data.datasets import DataSplits
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.students import build_student
from robustbench_kd.training.loop import train_one_epoch
from robustbench_kd.training.setup import setup_run


def synthetic_data(shape: tuple[int, int, int], n: int) -> DataSplits:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataSplits("synthetic", x, y, x[:64], y[:64], num_classes=10)


MINIMAL_LOOPS = ("pgd-at", "rslad", "ard", "akd")


def minimal_epoch(
    method: str,
    student,
    teacher,
    data: DataSplits,
    *,
    batch_size: int,
    eps: float,
    alpha: float,
    steps: int,
    lr: float,
    device: torch.device | None = None,
) -> float:
    """One epoch of :func:`minimal_steps`; returns wall seconds."""
    device = device or torch.device("cpu")
    start = time.perf_counter()
    for _ in minimal_steps(
        method, student, teacher, data, batch_size=batch_size, eps=eps, alpha=alpha, steps=steps, lr=lr, device=device
    ):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def minimal_steps(
    method: str,
    student,
    teacher,
    data: DataSplits,
    *,
    batch_size: int,
    eps: float,
    alpha: float,
    steps: int,
    lr: float,
    device: torch.device | None = None,
) -> Iterator[None]:
    """The method's necessary passes only, hand-written in the reference scripts' style; yields after each batch.

    pgd-at: K CE steps (eval BN), student(x'). rslad: teacher(x), K KL steps (eval BN), student(x'),
    student(x). ard: teacher(x), K CE steps in train mode, student(x'), student(x) without grad (the
    reference's clean pass at alpha = 1). akd: 7 CE steps (eval BN), teacher(x'), student(x').
    """
    device = device or torch.device("cpu")
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1))
    k = 7 if method == "akd" else steps
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        x, y = data.train_x[idx].float().to(device), data.train_y[idx].to(device)
        if method in ("rslad", "ard"):
            with torch.no_grad():
                z_t = teacher(x)
        student.train(method == "ard")
        if method == "rslad":
            x_adv = x + 0.001 * torch.randn_like(x)
        else:
            x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(k):
            x_adv.requires_grad_(True)
            out = student(x_adv)
            if method == "rslad":
                loss = F.kl_div(out.log_softmax(1), z_t.softmax(1), reduction="sum")
            else:
                loss = F.cross_entropy(out, y, reduction="sum")
            (g,) = torch.autograd.grad(loss, x_adv)
            x_adv = (x + (x_adv.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
        student.train()
        if method == "rslad":
            p_t = z_t.softmax(1)
            kl_adv = F.kl_div(student(x_adv).log_softmax(1), p_t, reduction="batchmean")
            kl_nat = F.kl_div(student(x).log_softmax(1), p_t, reduction="batchmean")
            loss = (5 / 6 * kl_adv + 1 / 6 * kl_nat) / p_t.shape[1]
        elif method == "ard":
            tau = 30.0
            kl = F.kl_div((student(x_adv) / tau).log_softmax(1), (z_t / tau).softmax(1), reduction="batchmean")
            with torch.no_grad():
                student(x)
            loss = tau * tau * kl / z_t.shape[1]
        elif method == "akd":
            with torch.no_grad():
                p_t = teacher(x_adv).softmax(1)
            q = 0.75 * p_t + 0.25 * F.one_hot(y, p_t.shape[1]).float()
            loss = -(q * student(x_adv).log_softmax(1)).sum(1).mean()
        else:
            loss = F.cross_entropy(student(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        yield


class SyntheticDataPlugin:
    """Registers a synthetic dataset of a given shape (the plugin system doing what it is for)."""

    def __init__(self, shape: tuple[int, int, int], n: int) -> None:
        self.data = synthetic_data(shape, n)

    @hookimpl
    def rbkd_register_datasets(self, registry):
        registry.add("synthetic", lambda config: self.data, description="benchmark data")


def make_run(method: str, args: argparse.Namespace, host: PluginHost, workdir: Path):
    """A trainer Run for ``method`` with a random small-cnn student and a 2x-wide teacher."""
    data = host.datasets.get("synthetic")(None)
    teacher = build_student(
        "small-cnn", num_classes=10, in_channels=data.in_channels, image_size=data.image_size, width=2.0
    )
    teacher_file = workdir / "teacher.pt"
    torch.save({"state_dict": teacher.state_dict()}, teacher_file)
    cls = host.methods.get(method)
    raw = {
        "run": {"out_dir": str(workdir / method), "progress": False},
        "data": {"dataset": "synthetic", "batch_size": args.batch_size, "augment": False},
        "threat": {"eps": 0.2, "alpha": 0.05, "steps": args.steps},
        "method": {"name": method},
        "optim": {"epochs": 1000, "lr": 0.01, "schedule": "constant"},
    }
    if cls.teacher_roles:
        raw["teachers"] = {role: f"file:{teacher_file}?arch=small-cnn&width=2.0" for role in cls.teacher_roles}
    return setup_run(config_from_mapping(raw), host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(MINIMAL_LOOPS), help=f"any of {', '.join(MINIMAL_LOOPS)}")
    parser.add_argument("--dataset-shape", default="1,8,8", help="C,H,W of synthetic data (1,8,8 = digits)")
    parser.add_argument("--n", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [m for m in args.methods.split(",") if m not in MINIMAL_LOOPS]
    if unknown:
        parser.error(f"no minimal loop for {', '.join(unknown)}; choose from {', '.join(MINIMAL_LOOPS)}")
    shape = tuple(int(s) for s in args.dataset_shape.split(","))
    host = PluginHost.create(autoload=False, extra=[SyntheticDataPlugin(shape, args.n)])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, data {shape} x {args.n}, "
        f"batch {args.batch_size}, PGD-{args.steps}, small-cnn student, 2x small-cnn teacher"
    )
    print("| method | library img/s | minimal loop img/s | time outside the necessary passes |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            run = make_run(method, args, host, Path(tmp))
            teacher = run.teachers.get("robust")
            lib, mini = [], []
            for r in range(args.repeats + 1):
                t = time.perf_counter()
                train_one_epoch(run, r)
                t_lib = time.perf_counter() - t
                t_min = minimal_epoch(
                    method,
                    run.student,
                    teacher,
                    run.data,
                    batch_size=args.batch_size,
                    eps=0.2,
                    alpha=0.05,
                    steps=args.steps,
                    lr=0.01,
                )
                if r:  # the first round warms up
                    lib.append(t_lib)
                    mini.append(t_min)
            t_lib, t_min = statistics.median(lib), statistics.median(mini)
            print(f"| {method} | {args.n / t_lib:.0f} | {args.n / t_min:.0f} | {max(0.0, 1 - t_min / t_lib):.1%} |")


if __name__ == "__main__":
    main()
