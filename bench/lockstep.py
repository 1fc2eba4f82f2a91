"""Batch-by-batch interleaved timing of the library's loop against other loops ("lockstep").

Why: on a shared or virtual machine the speed of the CPU drifts by tens of percent over seconds
(measured here: the same epoch took 0.96 s and 1.47 s a few seconds apart, CPU time equal to wall
time, so the host, not this process, was the cause). Timing whole epochs one loop after another
lets such a phase land on one loop and not the other. Running the loops one batch each in turn puts
every loop through the same phases, so their summed times compare like with like.

How: the other loops are iterators doing one batch per ``next()``. :class:`Lockstep` is an
``rbkd_step_end`` observer plugin: while the library's ``train_one_epoch`` runs (in this thread, as
in real use), after each of its optimiser steps the hook advances every other loop by one batch,
in an order that rotates every batch, and times each. The library's time is the epoch's wall time
minus the time spent inside the hook (the other loops and this bookkeeping), so it covers everything
the trainer does around the passes (its epoch set-up and close included). A worker-thread design was
tried first and dropped: handing control between threads made the library's batches measurably slower on this VM.

The harness control (``control_epoch``): the minimal loop run in the library's slot measured 0.990x to
1.008x itself in the others' slot (RSLAD, ARD, AKD; 10 rounds of 1024 images, two runs), so ratios
within about 1% of 1 are within what this harness can resolve on this machine.

Per-batch interleaving on an asynchronous device would need a synchronisation per batch, the very
cost the library avoids, so CUDA runs time whole epochs instead (``bench/side_by_side.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from robustbench_kd import hookimpl
from robustbench_kd.training.loop import train_one_epoch


class Lockstep:
    """Observer plugin pairing every library batch with one batch of each other loop."""

    def __init__(self) -> None:
        self._others: dict[str, Iterator[None]] = {}
        self._spent: dict[str, float] = {}
        self._in_hook = 0.0
        self._turn = 0

    @hookimpl
    def rbkd_step_end(self, run, ctx, out) -> None:
        if self._others:
            start = time.perf_counter()
            self._advance()
            self._in_hook += time.perf_counter() - start  # the others' batches and this bookkeeping

    def _advance(self) -> None:
        names = list(self._others)
        k = self._turn % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            try:
                next(self._others[name])
            except StopIteration:
                del self._others[name]
            self._spent[name] += time.perf_counter() - start
        self._turn += 1

    def epoch(
        self,
        run,
        epoch: int,
        others: dict[str, Iterator[None]],
        epoch_fn: Callable[[Any, int], object] = train_one_epoch,
    ) -> dict[str, float]:
        """One library epoch with ``others`` interleaved; seconds per loop, the library's as ``"library"``.

        ``epoch_fn`` replaces the library's epoch for the harness control (:func:`control_epoch`).
        """
        self._others, self._spent, self._in_hook = dict(others), dict.fromkeys(others, 0.0), 0.0
        start = time.perf_counter()
        try:
            epoch_fn(run, epoch)
            library = time.perf_counter() - start - self._in_hook
            while self._others:  # loops with more batches than the library's finish outside its time
                self._advance()
        finally:
            self._others = {}
        return {"library": library, **self._spent}


def control_epoch(steps: Callable[[], Iterator[None]]) -> Callable[[Any, int], None]:
    """An ``epoch_fn`` that runs another loop in the library's slot, calling the step hook after each batch.

    With the minimal loop there, the ratio of its time to the same loop's time in the others' slot is
    the harness's own bias and noise: library/reference ratios that close to 1 cannot be told apart.
    """

    def run_epoch(run, epoch: int) -> None:
        for _ in steps():
            run.host.step_end(run, None, None)

    return run_epoch
