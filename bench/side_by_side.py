"""Side by side: this library's training step against a reference-style loop, same data and models.

Runs, in one process, on the same synthetic data, student and teacher, per method:

* ``library``: robustbench_kd's trainer (``train_one_epoch``) for the method, with the ``[speed]``
  switches given on the command line (``--amp``, ``--channels-last``, ``--compile``; library only);
* ``reference``: the loop the methods' official scripts run (``bench/reference_loop.py``: teacher on
  clean x every batch, separate forward passes, ``loss.item()`` every step, a fresh attack per batch);
* ``minimal``: only the method's necessary forward/backward passes (``bench/train_throughput.py``).

Reported: images/s of library and reference and their ratio; the share of each one's wall time spent
outside the necessary passes, ``1 - t_minimal / t``; and the peak memory of one epoch (CUDA:
``torch.cuda.max_memory_allocated`` above what was allocated before; CPU: the peak resident set size
above the level before the epoch, after glibc's ``malloc_trim`` returned freed pages, sampled every
millisecond from ``/proc/self/statm`` in an untimed extra epoch, since CPU tensors are invisible to
``tracemalloc``).

Timing (``--interleave``): on CPU the three loops take turns batch by batch within each round
(``bench/lockstep.py``), so drifts of the machine's speed hit all of them alike, and each loop's
times are summed over the rounds; after every round a control round puts the minimal loop in the
library's slot, and its time there over its time in the others' slot (the last column) shows what the
harness cannot resolve (``--no-control`` skips it). Both ratios come with a 95% bootstrap interval
over the paired rounds (:func:`ratio_interval`). On CUDA whole epochs take turns (order rotating per round) and each
loop's time is the minimum over the rounds (``--statistic min``, the ``timeit`` convention: other
processes only ever add time) or their median.

    python bench/side_by_side.py                                   # rslad, ard, akd; small CNN; digits shape; CPU
    python bench/side_by_side.py --student resnet18 --teacher "resnet18" --dataset-shape 3,32,32 \\
        --device cuda --amp bf16 --channels-last --batch-size 128 --n 4096
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl

import torch
from lockstep import Lockstep, control_epoch
from reference_loop import REFERENCE_METHODS, reference_epoch, reference_steps
from train_throughput import SyntheticDataPlugin, minimal_epoch, minimal_steps

from robustbench_kd.config import config_from_mapping
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.students import build_student
from robustbench_kd.training.loop import train_one_epoch
from robustbench_kd.training.setup import setup_run

EPS, ALPHA, LR = 0.2, 0.05, 0.01
LOCKSTEP = Lockstep()  # registered on the benchmark's plugin host; idle outside lockstep rounds


def parse_arch(text: str) -> tuple[str, dict[str, float | str]]:
    """``small-cnn?width=2.0`` -> ("small-cnn", {"width": 2.0}) (the ``file:`` spec's query syntax)."""
    arch, _, query = text.partition("?")
    options: dict[str, float | str] = {}
    for key, value in parse_qsl(query):
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return arch, options


def speed_section(args: argparse.Namespace) -> dict[str, object]:
    """The ``[speed]`` keys the user asked for (absent flags leave the library's defaults alone)."""
    speed: dict[str, object] = {}
    if args.amp is not None:
        speed["amp"] = args.amp
    if args.channels_last:
        speed["channels_last"] = True
    if args.compile is not None:
        speed["compile"] = args.compile
    return speed


def make_run(method: str, args: argparse.Namespace, host: PluginHost, workdir: Path, speed: dict[str, object]):
    """A trainer Run for ``method``: random student, random teacher saved as a ``file:`` checkpoint."""
    data = host.datasets.get("synthetic")(None)
    t_arch, t_opts = parse_arch(args.teacher)
    s_arch, s_opts = parse_arch(args.student)
    teacher = build_student(t_arch, num_classes=10, in_channels=data.in_channels, image_size=data.image_size, **t_opts)
    teacher_file = workdir / "teacher.pt"
    torch.save({"state_dict": teacher.state_dict()}, teacher_file)
    query = "&".join([f"arch={t_arch}", *(f"{k}={v}" for k, v in t_opts.items())])
    raw = {
        "run": {"out_dir": str(workdir / method), "progress": False, "device": args.device},
        "data": {"dataset": "synthetic", "batch_size": args.batch_size, "augment": False},
        "threat": {"eps": EPS, "alpha": ALPHA, "steps": args.steps},
        "student": {"arch": s_arch, "options": s_opts},
        "method": {"name": method},
        "optim": {"epochs": 1000, "lr": LR, "schedule": "constant"},
    }
    if host.methods.get(method).teacher_roles:  # pgd-at trains without one
        raw["teachers"] = {"robust": f"file:{teacher_file}?{query}"}
    if speed:
        raw["speed"] = speed
    return setup_run(config_from_mapping(raw), host)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def steady_allocator() -> bool:
    """Stop glibc from handing freed memory back to the OS between batches (trim and mmap thresholds up).

    Left alone, glibc trims the heap and unmaps large blocks as the loops free their activations, so
    the next batch page-faults them back in: measured here, 0 to 7000 minor faults per epoch of the
    same loop, a few percent of its time, landing on whichever loop happened to follow a trim. With
    the memory kept, every loop runs on a warm heap after the first round. Returns whether it applied.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers (malloc.h)
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):  # not glibc
        return False


def _release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so RSS starts at what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline then includes freed-but-kept pages
        pass


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes of peak memory ``fn`` needs above what was in use before it (None if not measurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not os.path.exists("/proc/self/statm"):  # not Linux: the process high-water mark is all there is
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _release_free_heap()
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - before


def ratio_interval(
    numerators: list[float], denominators: list[float], *, level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``sum(numerators) / sum(denominators)``, resampling paired rounds.

    The rounds are the unit of repetition (each one's loops ran batch by batch together), so they are
    resampled whole, keeping every round's pair; the seed is fixed, so a table can be reproduced.
    """
    rounds = list(zip(numerators, denominators, strict=True))
    rng = random.Random(0)
    ratios = sorted(
        sum(n for n, _ in sample) / sum(d for _, d in sample)
        for sample in (rng.choices(rounds, k=len(rounds)) for _ in range(resamples))
    )
    tail = (1.0 - level) / 2
    return ratios[int(tail * (resamples - 1))], ratios[int((1.0 - tail) * (resamples - 1))]


def with_interval(ratio: float, interval: tuple[float, float] | None, fmt: str = "{:.2f}", unit: str = "") -> str:
    """``1.00x (0.99-1.01)``-style cell: the ratio and, where there are rounds to resample, its 95% interval."""
    text = fmt.format(ratio) + unit
    return text if interval is None else f"{text} ({fmt.format(interval[0])}-{fmt.format(interval[1])})"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def compare(
    method: str,
    args: argparse.Namespace,
    host: PluginHost,
    workdir: Path,
    speed: dict[str, object],
    device: torch.device,
) -> str:
    """Time library, reference and minimal epochs of ``method`` (interleaved) and return the table row."""
    library_note = None
    try:
        run = make_run(method, args, host, workdir, speed)
    except UserError as exc:
        if not speed:
            raise
        # This robustbench_kd may not know [speed] (or the value): still time the other loops.
        library_note = f"not run: {exc}"
        run = make_run(method, args, host, workdir, {})
    teacher = run.teachers.get("robust")
    data = run.data
    common = {"batch_size": args.batch_size, "eps": EPS, "alpha": ALPHA, "steps": args.steps, "lr": LR}

    def ref() -> None:
        reference_epoch(method, run.student, teacher, data.train_x, data.train_y, device=device, **common)

    def mini() -> None:
        minimal_epoch(method, run.student, teacher, data, device=device, **common)

    control = "n/a"
    if args.interleave == "batch":
        times = _lockstep_rounds(method, args, run, teacher, data, device, common, library_note)
        t_lib, t_ref, t_min = times["lib"], times["ref"], times["min"]
        if args.control:
            control = with_interval(
                sum(times["control"]) / sum(times["control_min"]),
                ratio_interval(times["control"], times["control_min"]),
                "{:.3f}",
            )
    else:
        t_lib, t_ref, t_min = _epoch_rounds(run, ref, mini, args, device, library_note)
    m_ref = peak_memory(ref, device)
    # Lockstep rounds are paired batch by batch: their sums compare like with like. Epoch rounds are not.
    pick = sum if args.interleave == "batch" else (min if args.statistic == "min" else statistics.median)
    re, mi = pick(t_ref), pick(t_min)
    n = len(data.train_y) * (len(t_ref) if args.interleave == "batch" else 1)
    if library_note is None:
        m_lib = peak_memory(partial(train_one_epoch, run, args.repeats + 1), device)
        lo = pick(t_lib)
        # Paired rounds (batch interleave) give the ratio an interval; epoch rounds are not paired.
        interval = ratio_interval(t_ref, t_lib) if args.interleave == "batch" and len(t_ref) > 1 else None
        ratio = with_interval(re / lo, interval, unit="x")
        lib_ips, lib_out, lib_mem = f"{n / lo:.0f}", f"{max(0.0, 1 - mi / lo):.1%}", mib(m_lib)
    else:
        lib_ips, ratio, lib_out, lib_mem = library_note, "n/a", "n/a", "n/a"
    return (
        f"| {method} | {lib_ips} | {n / re:.0f} | {ratio} | {n / mi:.0f} | {lib_out} "
        f"| {max(0.0, 1 - mi / re):.1%} | {lib_mem} | {mib(m_ref)} | {control} |"
    )


def _epoch_rounds(run, ref, mini, args, device, library_note):
    """Whole epochs, one loop after another, order rotating each round; per-round seconds per loop."""

    def lib(r: int) -> float:
        return timed(partial(train_one_epoch, run, r), device) if library_note is None else float("nan")

    loops = {"lib": lib, "ref": lambda r: timed(ref, device), "min": lambda r: timed(mini, device)}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for r in range(args.repeats + 1):
        names = list(loops)[r % 3 :] + list(loops)[: r % 3]
        for name in names:
            seconds = loops[name](r)
            if r:  # the first round warms up (and compiles, with --compile)
                times[name].append(seconds)
    return times["lib"], times["ref"], times["min"]


def _lockstep_rounds(method, args, run, teacher, data, device, common, library_note):
    """Epochs of the three loops interleaved batch by batch (bench/lockstep.py); per-round seconds per loop.

    With ``--control`` (the default) every round is followed by a control round, in which the minimal loop
    takes the library's slot; its sums are returned as a fourth and fifth list (slot, others' slot).
    """
    times: dict[str, list[float]] = {"lib": [], "ref": [], "min": [], "control": [], "control_min": []}

    def others() -> dict:
        return {
            "ref": reference_steps(method, run.student, teacher, data.train_x, data.train_y, device=device, **common),
            "min": minimal_steps(method, run.student, teacher, data, device=device, **common),
        }

    for r in range(args.repeats + 1):
        if library_note is None:
            spent = LOCKSTEP.epoch(run, r, others())
        else:  # no library loop to pair with: the other two take turns
            loops, spent = others(), {"library": float("nan"), "ref": 0.0, "min": 0.0}
            for name in [n for _ in range(-(-len(data.train_y) // args.batch_size) + 1) for n in loops]:
                start = time.perf_counter()
                next(loops[name], None)
                spent[name] += time.perf_counter() - start
        if args.control:  # the minimal loop in the library's slot: the harness measuring itself
            steps = partial(minimal_steps, method, run.student, teacher, data, device=device, **common)
            check = LOCKSTEP.epoch(run, r, others(), epoch_fn=control_epoch(steps))
        if r:  # the first round warms up
            times["lib"].append(spent["library"])
            times["ref"].append(spent["ref"])
            times["min"].append(spent["min"])
            if args.control:
                times["control"].append(check["library"])
                times["control_min"].append(check["min"])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="rslad,ard,akd", help=f"any of {', '.join(REFERENCE_METHODS)}")
    parser.add_argument("--student", default="small-cnn", help="student arch, options as ?key=value")
    parser.add_argument("--teacher", default="small-cnn?width=2.0", help="teacher arch, options as ?key=value")
    parser.add_argument("--dataset-shape", default="1,8,8", help="C,H,W of synthetic data (1,8,8 = digits)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=512, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps (AKD uses its own 7)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the harness control (--interleave batch): the minimal loop timed in the library's "
        "slot against itself, the resolution of the library/reference ratio",
    )
    parser.add_argument(
        "--no-steady-allocator",
        action="store_true",
        help="leave glibc's heap trimming on (by default it is turned off on CPU: see steady_allocator)",
    )
    parser.add_argument(
        "--interleave",
        choices=("batch", "epoch"),
        default=None,
        help="batch: the loops take turns batch by batch and their sums are compared (default on "
        "CPU); epoch: whole epochs in turn (default on CUDA, where per-batch timing would sync)",
    )
    parser.add_argument(
        "--statistic",
        choices=("min", "median"),
        default="min",
        help="--interleave epoch: how the repeats of each loop are summarised (min: timeit's)",
    )
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), default=None, help="library: speed.amp")
    parser.add_argument("--channels-last", action="store_true", help="library: speed.channels_last = true")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="student",
        default=None,
        help="library: speed.compile (student, teachers, both; bare flag = student)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steady = args.device == "cpu" and not args.no_steady_allocator and steady_allocator()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in REFERENCE_METHODS]
    if unknown:
        parser.error(f"no reference loop for {', '.join(unknown)}; choose from {', '.join(REFERENCE_METHODS)}")
    device = torch.device(args.device)
    if args.interleave is None:
        args.interleave = "epoch" if device.type == "cuda" else "batch"
    shape = tuple(int(s) for s in args.dataset_shape.split(","))
    host = PluginHost.create(autoload=False, extra=[SyntheticDataPlugin(shape, args.n), LOCKSTEP])
    speed = speed_section(args)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, data {shape} x {args.n}, "
        f"batch {args.batch_size}, PGD-{args.steps}, student {args.student}, teacher {args.teacher}, "
        f"library [speed] {speed or 'defaults'}, {args.repeats} rounds interleaved by {args.interleave}"
        + (f" ({args.statistic} per loop)" if args.interleave == "epoch" else " (sums per loop)")
        + (", glibc heap kept (no trimming)" if steady else "")
    )
    print(
        "| method | library img/s | reference img/s | library / reference (95% interval) | minimal img/s "
        "| outside necessary passes: library | reference | peak memory: library | reference "
        "| harness control (95% interval) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            print(compare(method, args, host, Path(tmp), speed, device))


if __name__ == "__main__":
    main()
