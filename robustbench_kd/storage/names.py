"""Output directories given by the user: any path, but never empty and never with control characters.

An empty ``--out`` would write into the current directory unasked; a newline or escape sequence in a
path makes the files a terminal lists misleading. Names that become file names inside an output
directory (model ids) are stricter and checked by :func:`robustbench_kd.zoo.names.validate_model_id`.
"""

from __future__ import annotations

import os
import unicodedata

from robustbench_kd.errors import UserError

__all__ = ["check_output_dir"]


def _control_character(text: str) -> str | None:
    """The first control or invisible formatting character of ``text`` (``U+001B``), or None."""
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            return f"U+{ord(char):04X}"
    return None


def check_output_dir(value: object, *, what: str) -> str:
    """Return ``value`` if it can name an output directory: a non-empty path without control characters."""
    if not isinstance(value, (str, os.PathLike)):
        raise UserError(f"{what} must be a path, got {value!r}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{what} is empty; give a directory to write into")
    code = _control_character(text)
    if code is not None:
        raise UserError(f"{what} {_show(text)} contains the control character {code}; give a plain directory path")
    return text


def _show(value: str) -> str:
    """``repr`` shows control characters escaped, so the error line stays one printable line."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "...'"
