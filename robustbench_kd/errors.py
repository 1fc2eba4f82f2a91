"""User-facing errors.

Everything a user can get wrong (a config key, a teacher name, an eps in the wrong unit) raises
:class:`UserError`. The CLI prints its one-line message and exits non-zero without a traceback
(``--debug`` shows it); library callers can catch it like any ``ValueError``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """A mistake in the user's input, with a one-line message saying what is wrong and what is valid."""


def close_matches(word: str, candidates: Iterable[str], n: int = 5) -> str:
    """Return ``" (did you mean: a, b?)"`` for the candidates closest to ``word``, or ``""``."""
    pool = list(candidates)
    lowered = {c.lower(): c for c in pool}
    found = difflib.get_close_matches(word.lower(), list(lowered), n=n, cutoff=0.5)
    if not found:
        found = [c.lower() for c in pool if word.lower() in c.lower()][:n]
    return f" (did you mean: {', '.join(lowered[f] for f in found)}?)" if found else ""


def check_choice(option: str, value: object, choices: Iterable[str]) -> None:
    """Raise ``UserError("method.<option> must be one of a, b, got 'x'")`` unless ``value`` is a choice."""
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"method.{option} must be one of {', '.join(choices)}, got {value!r}")
