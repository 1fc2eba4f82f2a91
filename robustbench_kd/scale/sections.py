"""The ``[speed]`` and ``[ema]`` config sections, defined by the subsystem that reads them.

Both are plain frozen dataclasses validated in ``__post_init__``; :mod:`robustbench_kd.config` lists them
among its sections, so unknown keys and wrong types are rejected there like everywhere else. What the
switches do lives in :mod:`robustbench_kd.scale.precision` and :mod:`robustbench_kd.scale.ema`; this module does not
import torch, so parsing a config stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.threat import check_int, check_real

AMP_MODES = ("off", "bf16", "fp16")
COMPILE_TARGETS = ("off", "student", "teachers", "both")


@dataclass(frozen=True, kw_only=True)
class SpeedSection:
    """Precision and compilation switches; all off by default (none of them speeds up a CPU run).

    ``amp`` runs the outer step (the method's loss and its backward) under ``torch.autocast`` on the run's
    device; ``fp16`` adds a ``GradScaler`` whose state is checkpointed. ``attack_fp32`` keeps the inner
    maximisation out of autocast. ``compile`` wraps the student and/or the teachers with
    ``torch.compile(backend=compile_backend)`` for training only; checkpoints, EMA, per-epoch and final
    evaluation use the plain modules.
    """

    amp: str = "off"  #: "off" | "bf16" | "fp16" (torch.autocast on the run's device)
    attack_fp32: bool = True  #: run the attack (inner maximisation) in fp32 even with amp on
    channels_last: bool = False  #: student, teachers and inputs in channels_last memory format
    compile: str = "off"  #: torch.compile the "student", the "teachers", "both" or "off"
    compile_backend: str = "inductor"  #: torch.compile backend ("eager"/"aot_eager" need no compiler)

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise UserError(
                f"speed.amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}{close_matches(self.amp, AMP_MODES)}"
            )
        if self.compile not in COMPILE_TARGETS:
            raise UserError(
                f"speed.compile must be one of {', '.join(COMPILE_TARGETS)}, got {self.compile!r}"
                f"{close_matches(self.compile, COMPILE_TARGETS)}"
            )
        if not isinstance(self.compile_backend, str) or not self.compile_backend.isidentifier():
            raise UserError(
                'speed.compile_backend must name a torch.compile backend, e.g. "inductor", '
                f"got {self.compile_backend!r}"
            )
        for key in ("attack_fp32", "channels_last"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"speed.{key} must be true or false, got {getattr(self, key)!r}")


@dataclass(frozen=True, kw_only=True)
class EmaSection:
    """Exponential moving average of the student's weights (off by default).

    After every ``every``-th optimiser step: ``ema = d * ema + (1 - d) * student`` for every floating-point
    parameter, with ``d = decay`` or, with ``warmup``, ``d = min(decay, (1 + n) / (10 + n))`` at the n-th
    update (TensorFlow's ``ExponentialMovingAverage(num_updates=n)`` rule). Buffers (BatchNorm running
    statistics) are copied from the student, not averaged.
    """

    decay: float = 0.0  #: 0 = no EMA; typical 0.999 (per update), must be < 1
    warmup: bool = False  #: d = min(decay, (1 + n) / (10 + n)) at the n-th update
    every: int = 1  #: update after every N-th optimiser step

    def __post_init__(self) -> None:
        check_real(self.decay, what="ema.decay", low=0, high=1, high_open=True, rule="0 (off) or in (0, 1), e.g. 0.999")
        check_int(self.every, what="ema.every", low=1)

    @property
    def enabled(self) -> bool:
        return self.decay > 0.0
