"""Teacher-ensemble speed: one vectorised call (vmap over stacked weights) against the member loop.

Times ``EnsembleTeacher(vectorize=True)`` and ``EnsembleTeacher(vectorize=False)`` on the same M
members and inputs, for the forward alone (under ``no_grad``, as the per-batch teacher memo runs it)
and for forward + input gradient (what a teacher-in-the-loop attack such as AdaAD needs every step).
Interleaved repeats, medians reported; the two outputs are checked equal first. Speed lives here,
never in tests.

    python bench/ensemble_speed.py                                     # 4 small CNNs, 1x8x8, CPU
    python bench/ensemble_speed.py --arch resnet18 --image-shape 3,32,32 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustbench_kd.students import build_student
from robustbench_kd.teachers import EnsembleTeacher, Teacher


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small-cnn", help="member architecture (a student name)")
    parser.add_argument("--width", type=float, default=None, help="small-cnn/mobilenetv2 width option")
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-shape", default="1,8,8", help="C,H,W")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=20, help="calls per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    c, h, w = (int(s) for s in args.image_shape.split(","))
    options = {} if args.width is None else {"width": args.width}
    torch.manual_seed(0)
    members = [
        Teacher(build_student(args.arch, num_classes=10, in_channels=c, image_size=h, **options)).to(device)
        for _ in range(args.members)
    ]
    vec = EnsembleTeacher(members, vectorize=True)
    loop = EnsembleTeacher(members, vectorize=False)
    x = torch.rand(args.batch, c, h, w, device=device)
    with torch.no_grad():
        diff = (vec(x) - loop(x)).abs().max().item()

    def forward(model):
        def run():
            with torch.no_grad():
                for _ in range(args.iters):
                    model(x)

        return run

    def forward_backward(model):
        def run():
            for _ in range(args.iters):
                xg = x.detach().requires_grad_(True)
                torch.autograd.grad(model(xg).sum(), xg)

        return run

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.members} x "
        f"{args.arch}{'' if args.width is None else f' width {args.width}'}, batch {args.batch}, input {c}x{h}x{w}; "
        f"max |vectorised - loop| = {diff:.1e}"
    )
    print("| pass | loop img/s | vectorised img/s | speed-up |")
    print("|---|---|---|---|")
    for name, make in (("forward (no grad)", forward), ("forward + input gradient", forward_backward)):
        t_loop, t_vec = [], []
        for r in range(args.repeats + 1):
            a, b = timed(make(loop), device), timed(make(vec), device)
            if r:  # the first round warms up (and builds the stacks)
                t_loop.append(a)
                t_vec.append(b)
        n = args.batch * args.iters
        lo, ve = statistics.median(t_loop), statistics.median(t_vec)
        print(f"| {name} | {n / lo:.0f} | {n / ve:.0f} | {lo / ve:.2f}x |")


if __name__ == "__main__":
    main()
