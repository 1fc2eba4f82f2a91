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
import time

import torch
import torch.nn.functional as F

from robustbench_kd.config import config_from_mapping
from robustbench_kd.data import DataSplits
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.students import build_student
from robustbench_kd.trainer import setup_run, train_one_epoch


def synthetic_data(shape: tuple[int, int, int], n: int) -> DataSplits:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return DataSplits("synthetic", x, y, x[:64], y[:64], num_classes=10)


def minimal_epoch(method: str, student, teacher, data: DataSplits, *, batch_size: int, eps: float, alpha: float,
                  steps: int, lr: float) -> float:
    """The necessary passes only, hand-written; returns seconds."""
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        x, y = data.train_x[idx].float(), data.train_y[idx]
        if method == "rslad":
            with torch.no_grad():
                p_t = teacher(x).softmax(1)
        student.eval()
        if method == "rslad":
            x_adv = x + 0.001 * torch.randn_like(x)
        else:
            x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            out = student(x_adv)
            if method == "rslad":
                loss = F.kl_div(out.log_softmax(1), p_t, reduction="sum")
            else:
                loss = F.cross_entropy(out, y, reduction="sum")
            (g,) = torch.autograd.grad(loss, x_adv)
            x_adv = (x + (x_adv.detach() + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
        student.train()
        if method == "rslad":
            kl_adv = F.kl_div(student(x_adv).log_softmax(1), p_t, reduction="batchmean")
            kl_nat = F.kl_div(student(x).log_softmax(1), p_t, reduction="batchmean")
            loss = (5 / 6 * kl_adv + 1 / 6 * kl_nat) / p_t.shape[1]
        else:
            loss = F.cross_entropy(student(x_adv), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="rslad,pgd-at")
    parser.add_argument("--dataset-shape", default="1,8,8", help="C,H,W of synthetic data (1,8,8 = digits)")
    parser.add_argument("--n", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.dataset_shape.split(","))
    data = synthetic_data(shape, args.n)
    host = PluginHost.create(autoload=False)
    eps, alpha = 0.2, 0.05
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, data {shape} x {args.n}, "
          f"batch {args.batch_size}, PGD-{args.steps}")
    print(f"{'method':8} {'library img/s':>14} {'minimal img/s':>14} {'overhead':>9}")
    for method in args.methods.split(","):
        raw = {"run": {"out_dir": "/tmp/rbkd-bench", "progress": False},
               "data": {"dataset": "digits", "batch_size": args.batch_size},
               "threat": {"eps": eps, "alpha": alpha, "steps": args.steps},
               "method": {"name": method}, "optim": {"epochs": 1000}}
        if method != "pgd-at":
            raw["teachers"] = {"robust": "file:/dev/null"}
        cfg = config_from_mapping({k: v for k, v in raw.items() if k != "teachers"} | {"method": {"name": "pgd-at"}})
        run = setup_run(cfg, host)  # builds optimiser/scheduler; we swap in our data, method and teacher
        run.data = data
        student = build_student("small-cnn", num_classes=10, in_channels=shape[0], image_size=shape[1])
        teacher = build_student("small-cnn", num_classes=10, in_channels=shape[0], image_size=shape[1], width=2.0)
        from robustbench_kd.teachers import Teacher, TeacherSet

        run.student = student
        run.teachers = TeacherSet({"robust": Teacher(teacher)} if method != "pgd-at" else {})
        run.distiller = host.methods.get(method)(num_classes=10)
        run.config = config_from_mapping({k: v for k, v in raw.items() if k != "teachers"})
        from robustbench_kd.trainer import build_optimizer, build_scheduler

        run.optimizer = build_optimizer(run.config, student, run.distiller)
        run.scheduler, run.per_batch_schedule = build_scheduler(run.config, run.optimizer, 1)
        lib, mini = [], []
        for r in range(args.repeats + 1):
            t = time.perf_counter()
            train_one_epoch(run, r)
            t_lib = time.perf_counter() - t
            t_min = minimal_epoch(method, student, run.teachers.get("robust"), data, batch_size=args.batch_size,
                                  eps=eps, alpha=alpha, steps=args.steps, lr=0.01)
            if r:  # first round is warm-up
                lib.append(t_lib)
                mini.append(t_min)
        t_lib, t_min = statistics.median(lib), statistics.median(mini)
        print(f"{method:8} {args.n / t_lib:14.1f} {args.n / t_min:14.1f} {1 - t_min / t_lib:8.1%}")


if __name__ == "__main__":
    main()
