"""The threat model: norm, radius, and the step budget of the training attack; the numbers of a run.

Radii are given in the input's [0,1] scale. ``"8/255"`` strings are accepted everywhere a number is,
and an L_inf radius above 1 is rejected because it is almost always "8" meant as "8/255".

The number checks every config section and command-line value uses live here too (:func:`check_int`,
:func:`check_seed`, :func:`check_real`), next to :func:`parse_number`: this module sits below every
section, and a NaN learning rate, a seed numpy refuses or ``epochs = 1e30`` must fail when the
configuration is read, not after the run directory exists or hours into training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from robustbench_kd.errors import UserError

NORMS = ("Linf", "L2")

#: The largest seed numpy's and torch's generators accept (seeds are 32-bit there).
SEED_MAX = 2**32 - 1
#: The largest count (epochs, batch size, examples, steps, every-N) a config or command line may give:
#: far above any real run, and small enough that products of counts stay inside a 64-bit integer.
COUNT_MAX = 2**31 - 1


def parse_number(value: object, *, what: str) -> float:
    """Parse ``0.03``, ``"0.03"`` or ``"8/255"`` into a finite float; raise UserError naming ``what`` otherwise.

    NaN and infinity are refused: every number of a run or an evaluation is a radius, a rate or a
    weight, and a NaN compares false with every bound that would have caught it later.
    """
    number: float | Fraction | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            number = None
    if number is None:
        raise UserError(f"{what} must be a number or a fraction like '8/255', got {_shown(value)}")
    try:
        result = float(number)
    except OverflowError:
        raise UserError(f"{what} must be a finite number, got {_shown(value)} (too large for a float)") from None
    if not math.isfinite(result):
        raise UserError(f"{what} must be a finite number, got {_shown(value)}")
    return result


def check_int(value: object, *, what: str, low: int = 0, high: int = COUNT_MAX) -> int:
    """Return ``value`` if it is an integer (not a bool) in ``[low, high]``, else raise a one-line UserError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{what} must be an integer, got {_shown(value)}")
    if value < low:
        raise UserError(f"{what} must be >= {low}, got {value}")
    if value > high:
        raise UserError(f"{what} must be <= {high} (a larger value is a typo), got {_shown(value)}")
    return value


def check_seed(value: object, *, what: str) -> int:
    """Return ``value`` if numpy and torch accept it as a seed (an integer in ``[0, 2**32 - 1]``)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise UserError(
            f"{what} must be an integer in [0, {SEED_MAX}] (a seed numpy and torch accept), got {_shown(value)}"
        )
    return value


def check_real(
    value: object,
    *,
    what: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    rule: str = "",
) -> float:
    """Return ``value`` as a float if it is a finite number in the interval, else raise a one-line UserError.

    The bounds are inclusive unless ``low_open`` / ``high_open``; ``rule`` replaces the interval in the
    message (``"in (0, 1), e.g. 0.3"``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{what} must be a number, got {_shown(value)}")
    number = parse_number(value, what=what)
    below = low is not None and (number <= low if low_open else number < low)
    above = high is not None and (number >= high if high_open else number > high)
    if below or above:
        raise UserError(f"{what} must be {rule or _interval(low, high, low_open, high_open)}, got {number:g}")
    return number


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return "positive" if low == 0 and low_open else f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def _shown(value: object) -> str:
    """``repr(value)`` for a message, cut short: a 5000-digit integer is not printed (nor printable)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
        return f"a {int(value.bit_length() * math.log10(2)) + 1}-digit number"
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


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
        # Python callers may give "8/255" like a run file does; stored as floats.
        object.__setattr__(self, "eps", parse_number(self.eps, what="threat.eps"))
        object.__setattr__(self, "alpha", parse_number(self.alpha, what="threat.alpha"))
        validate_eps(self.eps, self.norm, what="threat.eps")
        if self.alpha <= 0:
            raise UserError(f"threat.alpha must be positive, got {self.alpha}")
        if self.alpha > self.eps:
            raise UserError(
                f"threat.alpha ({self.alpha:.6g}) is larger than threat.eps ({self.eps:.6g}); "
                "the step size must not exceed the radius (did you swap them?)"
            )
        check_int(self.steps, what="threat.steps")

    @property
    def eps_str(self) -> str:
        return format_eps(self.eps)


def validate_eps(eps: float, norm: str, *, what: str = "eps") -> None:
    """Reject radii that cannot be meant: NaN, infinite, negative, or an L_inf radius > 1 (``8`` for ``8/255``)."""
    if not math.isfinite(eps):
        raise UserError(f"{what} must be a finite number, got {eps}")
    if eps < 0:
        raise UserError(f"{what} must be >= 0, got {eps}")
    if norm == "Linf" and eps > 1:
        raise UserError(
            f"{what}={eps:g} is larger than 1 for an Linf threat on [0,1] inputs; "
            f"write it as a fraction of 255, e.g. '{eps:g}/255'"
        )
