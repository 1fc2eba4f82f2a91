"""The ``[diagnostics]`` config section; no torch import, so parsing a config stays cheap.

Off by default (``enabled = []``): the observer plugin then returns at once and the trainer does no extra
forward pass. Example::

    [diagnostics]
    enabled = ["entropy", "calibration", "agreement", "per_class", "trajectories"]
    n_examples = 256      # fixed subset: the validation split's first n, else n training images (seeded)
    adversarial = true    # also on PGD inputs against the student (threat eps/alpha, pgd_steps steps)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.threat import check_int, check_seed

#: the diagnostics a run may switch on; see robustbench_kd.analysis.diagnostics.collect for what each writes
DIAGNOSTICS = ("entropy", "calibration", "agreement", "per_class", "trajectories")


@dataclass(frozen=True, kw_only=True)
class DiagnosticsSection:
    """Which per-epoch diagnostics to compute, on how many points, and where to log them."""

    enabled: list[str] = field(default_factory=list)  #: any of DIAGNOSTICS; [] = off (no cost)
    n_examples: int = 256  #: size of the fixed subset the diagnostics are computed on
    every: int = 1  #: compute them every N epochs (the last epoch always)
    adversarial: bool = True  #: also on PGD inputs (attacking the student) besides clean ones
    pgd_steps: int = 10  #: PGD steps for the adversarial inputs (step size threat.alpha)
    bins: int = 15  #: equal-width confidence bins of the ECE / reliability diagram
    batch_size: int = 256
    seed: int = 0  #: the training-subset draw and the PGD random start
    tensorboard: bool = False  #: also write the scalars to OUT/diagnostics/tensorboard (needs tensorboard)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, (list, tuple)):
            raise UserError(f"diagnostics.enabled must be a list of diagnostic names, got {self.enabled!r}")
        for name in self.enabled:
            if name not in DIAGNOSTICS:
                raise UserError(
                    f"unknown diagnostic {name!r} in diagnostics.enabled"
                    f"{close_matches(str(name), DIAGNOSTICS)}; valid: {', '.join(DIAGNOSTICS)}"
                )
        for key in ("n_examples", "every", "pgd_steps", "bins", "batch_size"):
            check_int(getattr(self, key), what=f"diagnostics.{key}", low=1)
        check_seed(self.seed, what="diagnostics.seed")

    @property
    def on(self) -> bool:
        return bool(self.enabled)
