"""Reading files that may be hostile: regular files only, a size limit, a bound on structure.

Every file the library reads that a user or another machine can hand it (run files, AutoAttack state,
shard, metrics and result files) is read through this module, so that

* a FIFO, a device (``/dev/zero``, ``/dev/stdin``) or a directory is refused in one line instead of
  blocking forever or reading without end: the file is opened with ``O_NONBLOCK`` (so opening a FIFO
  with no writer returns at once) and its kind is checked with ``fstat`` on the open descriptor, which
  also closes the window between a ``stat`` and the ``open``;
* at most ``limit`` bytes are read: a larger file is refused before it is held in memory;
* a parsed structure is walked with a budget on nodes and depth (:func:`check_structure`) before
  anything copies or expands it: YAML aliases make a 1 KB file describe a tree of billions of nodes
  that costs nothing until something (a JSON round trip, a deep copy) expands it.

Errors are :class:`~robustbench_kd.errors.UserError` naming the file and what was wrong.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from robustbench_kd.errors import UserError

__all__ = [
    "MiB",
    "check_structure",
    "load_json_bounded",
    "open_regular",
    "parse_json_object_line",
    "read_bytes_bounded",
    "read_text_bounded",
]

MiB = 1 << 20

#: Structure budget of :func:`check_structure`: far above any real result file (a 10 000-point shard file
#: holds ~100 000 list items), far below what exhausts memory, and walked in well under a second.
MAX_NODES = 2_000_000
MAX_DEPTH = 64


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], *, what: str) -> int:
    """Open ``path`` read-only and return its descriptor, or refuse it unless it is a regular file.

    ``what`` names the file in the message (``"AutoAttack state file"``). The caller closes the
    descriptor (``os.fdopen`` takes it over).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be opened ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UserError(f"{what} {path} is {_kind(mode)}, not a regular file; give the path of a file")
    return fd


def read_bytes_bounded(path: str | os.PathLike[str], *, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (else a one-line UserError)."""
    fd = open_regular(path, what=what)
    with os.fdopen(fd, "rb") as handle:
        # The recorded size refuses a large file unread; the bounded read still catches one that grows.
        too_large = os.fstat(fd).st_size > limit
        data = b"" if too_large else handle.read(limit + 1)
    if too_large or len(data) > limit:
        raise UserError(
            f"{what} {path} is larger than {_size(limit)}, more than such a file can hold; "
            "it is not the file you meant (or it is damaged)"
        )
    return data


def read_text_bounded(path: str | os.PathLike[str], *, limit: int, what: str, encoding: str = "utf-8") -> str:
    """:func:`read_bytes_bounded`, decoded; undecodable bytes are a one-line UserError."""
    data = read_bytes_bounded(path, limit=limit, what=what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not {encoding} text (byte {exc.start}: {exc.reason})") from None


def load_json_bounded(
    path: str | os.PathLike[str], *, limit: int, what: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH
) -> Any:
    """Parse a bounded JSON file; bad JSON, too deep or too large a structure is a one-line UserError.

    The ``what ... is not valid JSON`` message carries the parser's line and column. Non-standard
    constants (``NaN``, ``Infinity``) are refused: no file this library writes holds them, and a NaN
    accuracy read back would compare false with everything.
    """
    text = read_text_bounded(path, limit=limit, what=what)
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except _ConstantError as exc:
        raise UserError(f"{what} {path} holds {exc.args[0]}, which is not a number JSON allows") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise UserError(f"{what} {path} is nested too deeply to be a file this library wrote") from None
    check_structure(data, what=f"{what} {path}", max_nodes=max_nodes, max_depth=max_depth)
    return data


def parse_json_object_line(raw: bytes, *, max_depth: int, allow_nan: bool) -> tuple[dict[str, Any] | None, str]:
    """One line of a JSON-lines file: ``(object, "")``, or ``(None, what is wrong with the line)``.

    For files whose damaged lines are skipped with a warning rather than refused (the metrics log, the
    diagnostics tables): the line must be UTF-8, JSON, an object, and nested at most ``max_depth`` levels.
    ``allow_nan`` keeps ``NaN``/``Infinity`` (the trainer logs a diverged loss as NaN); without it they make
    the line damaged. The callers check the keys they need (``epoch``) themselves.
    """
    try:
        text = raw.decode("utf-8")
        row = json.loads(text) if allow_nan else json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    except _ConstantError as exc:
        return None, f"holds {exc.args[0]}, which is not a number JSON allows"
    except json.JSONDecodeError as exc:
        return None, f"is not JSON ({exc.msg})"
    except RecursionError:
        return None, "is nested too deeply"
    if not isinstance(row, dict):
        return None, f"is a JSON {type(row).__name__}, not an object"
    try:
        check_structure(row, what="row", max_depth=max_depth)
    except UserError:
        return None, f"is nested more than {max_depth} levels deep"
    return row, ""


class _ConstantError(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _ConstantError(name)


def check_structure(data: Any, *, what: str, max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> None:
    """Refuse ``data`` if, fully expanded, it has more than ``max_nodes`` values or ``max_depth`` levels.

    Shared references count once per place they appear, as an expanding copy would make them; the walk
    stops as soon as a budget is exceeded, so it costs at most ``max_nodes`` steps. A reference cycle (a
    recursive YAML alias) exceeds the depth budget.
    """
    if not isinstance(data, _CONTAINERS):
        return
    budget = max_nodes - 1
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth >= max_depth:
            raise UserError(f"{what} is nested more than {max_depth} levels deep (or refers to itself)")
        budget -= len(children)
        if budget < 0:
            raise UserError(
                f"{what} expands to more than {max_nodes:,} values (YAML aliases or a generated file?); "
                "write the values out or split the file"
            )
        # Only containers are walked further: leaves were counted with their parent, in one step.
        stack.extend((child, depth + 1) for child in children if isinstance(child, _CONTAINERS))


#: What JSON, TOML and YAML parsers build (concrete types: an ABC isinstance check is ~10x slower).
_CONTAINERS = (dict, list, tuple)


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n} bytes"
