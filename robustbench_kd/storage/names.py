"""Names that become paths: model ids, run names, shard contents, output directories.

A model id is written as ``results/ID.json``, ``models/.../ID.pt`` and ``model_info/.../ID.json``; a name
that holds ``/``, ``..`` or a control character would write outside those folders or make file names a
terminal renders misleadingly. So a *path component* is checked with :func:`check_path_component` before
anything is created, wherever it came from (the command line, a run file, a shard file copied from
another machine). An output directory may be any path, but never empty and never with control
characters (:func:`check_output_dir`).
"""

from __future__ import annotations

import os
import unicodedata

from robustbench_kd.errors import UserError

__all__ = ["MAX_COMPONENT", "check_output_dir", "check_path_component"]

#: Longest name accepted: most filesystems allow 255 bytes per component, and ``.autoattack.log``,
#: ``.preview`` and temporary-file prefixes are appended to it.
MAX_COMPONENT = 150

_SAFE_HINT = "use letters, digits, '_', '-' and '.' (e.g. Smith2026Distilled_WRN-28-10)"


def _control_character(text: str) -> str | None:
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            return f"U+{ord(char):04X}"
    return None


def check_path_component(value: object, *, what: str) -> str:
    """Return ``value`` if it is safe as one file-name component, else raise a one-line UserError.

    Refused: non-strings, empty or blank names, ``.`` and ``..``, path separators (``/`` and the
    platform's own), control and invisible format characters, leading or trailing whitespace, a
    leading ``-`` (read as an option by shell tools), and names longer than :data:`MAX_COMPONENT`.
    """
    if not isinstance(value, str):
        raise UserError(f"{what} must be a string, got {value!r}")
    problem = None
    if not value.strip():
        problem = "is empty"
    elif value in (".", ".."):
        problem = "would name a directory, not a file"
    elif any(sep and sep in value for sep in ("/", os.sep, os.altsep)):
        problem = "contains a path separator (it must stay inside its directory)"
    elif (code := _control_character(value)) is not None:
        problem = f"contains the control character {code}"
    elif value != value.strip():
        problem = "starts or ends with whitespace"
    elif value.startswith("-"):
        problem = "starts with '-'"
    elif len(value) > MAX_COMPONENT:
        problem = f"is {len(value)} characters long (at most {MAX_COMPONENT})"
    if problem is not None:
        raise UserError(f"{what} {_show(value)} {problem}; {_SAFE_HINT}")
    return value


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
