"""Shared checks for method options: one message format for every plugin's Config."""

from __future__ import annotations

from collections.abc import Iterable

from .errors import UserError


def check_choice(option: str, value: object, choices: Iterable[str]) -> None:
    """Raise ``UserError("method.<option> must be one of a, b, got 'x'")`` unless ``value`` is a choice."""
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"method.{option} must be one of {', '.join(choices)}, got {value!r}")
