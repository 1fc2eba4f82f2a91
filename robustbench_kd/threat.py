"""The threat model: norm, radius, and the step budget of the training attack.

Radii are given in the input's [0,1] scale. ``"8/255"`` strings are accepted everywhere a number is,
and an L_inf radius above 1 is rejected because it is almost always "8" meant as "8/255".
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from robustbench_kd.errors import UserError

NORMS = ("Linf", "L2")


def parse_number(value: object, *, what: str) -> float:
    """Parse ``0.03``, ``"0.03"`` or ``"8/255"`` into a float; raise UserError naming ``what`` otherwise."""
    if isinstance(value, bool):
        raise UserError(f"{what} must be a number or a fraction like '8/255', got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            pass
    raise UserError(f"{what} must be a number or a fraction like '8/255', got {value!r}")


def format_eps(eps: float) -> str:
    """Write eps the way RobustBench's leaderboard files do: ``"8/255"`` when it is k/255, else ``"0.5"``.

    Short decimals stay decimals (0.2 is also 51/255, but nobody writes it that way).
    """
    k = eps * 255
    if eps == round(eps, 3):
        return f"{eps:g}"
    if abs(k - round(k)) < 1e-6 and round(k) != 0 and eps < 1:
        return f"{round(k)}/255"
    return f"{eps:g}"


@dataclass(frozen=True, kw_only=True)
class ThreatSpec:
    """Threat model and default training-attack budget.

    Attributes:
        norm: ``"Linf"`` or ``"L2"``.
        eps: radius of the perturbation ball, in [0,1] input units.
        alpha: step size of the training attack (must not exceed eps).
        steps: number of steps of the training attack.
    """

    norm: str = "Linf"
    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise UserError(f"threat.norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        validate_eps(self.eps, self.norm, what="threat.eps")
        if self.alpha <= 0:
            raise UserError(f"threat.alpha must be positive, got {self.alpha}")
        if self.alpha > self.eps:
            raise UserError(
                f"threat.alpha ({self.alpha:.6g}) is larger than threat.eps ({self.eps:.6g}); "
                "the step size must not exceed the radius (did you swap them?)"
            )
        if self.steps < 0:
            raise UserError(f"threat.steps must be >= 0, got {self.steps}")

    @property
    def eps_str(self) -> str:
        return format_eps(self.eps)


def validate_eps(eps: float, norm: str, *, what: str = "eps") -> None:
    """Reject radii that cannot be meant: negative, or an L_inf radius > 1 (``8`` instead of ``8/255``)."""
    if eps < 0:
        raise UserError(f"{what} must be >= 0, got {eps}")
    if norm == "Linf" and eps > 1:
        raise UserError(
            f"{what}={eps:g} is larger than 1 for an Linf threat on [0,1] inputs; "
            f"write it as a fraction of 255, e.g. '{eps:g}/255'"
        )
