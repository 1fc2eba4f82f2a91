"""Read pickled data files (CIFAR's python batches) without ever running code from them.

``pickle.load`` calls whatever a file names: a CIFAR batch whose pickle says "call ``os.system``" runs
it, whatever checksum flag the caller set. Every pickle this library reads from disk goes through
:func:`load_pickle` / :func:`loads_pickle` instead, which

* read at most ``limit`` bytes of a regular file (:mod:`.bounded`: FIFOs, devices and huge files are
  refused before anything is parsed);
* count the pickle's operations before unpickling (:func:`_check_operations`), so a small file cannot
  describe millions of objects or a memo table of billions of slots;
* resolve no name from the file: :class:`_DataUnpickler` maps an explicit allow-list of the globals
  that numpy arrays pickle to (``_reconstruct``, ``ndarray``, ``dtype``, and ``_codecs.encode`` for
  bytes in protocol-2 pickles written by Python 3) onto small checked stand-ins, and refuses every other
  global in one line naming it. Lists, dicts, tuples, strings and numbers are pickle opcodes, not
  globals, so they need no entry.

The stand-ins check what numpy's own pickling writes and nothing more: ``_reconstruct`` only makes the
empty placeholder array numpy always asks for; a dtype is one of a fixed set of numeric types and its
pickled state may set the byte order only (numpy trusts the pickled ``flags`` of a dtype, and a flag
claiming "holds objects" on an integer dtype makes numpy treat raw bytes as object pointers); an
array's state must carry exactly the bytes its shape and dtype need.

torch's ``weights_only`` unpickler is not reused: it is private API (``torch._weights_only_unpickler``),
numpy arrays pass it only after registering numpy functions in torch's process-wide allow-list, and it
would apply a pickled dtype state unchecked. The allow-list here is four names, small enough to audit.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
from typing import Any

import numpy as np

from robustbench_kd.errors import UserError
from robustbench_kd.storage.bounded import read_bytes_bounded

__all__ = ["MAX_OPERATIONS", "load_pickle", "loads_pickle"]

#: Operations a data pickle may hold: a CIFAR-100 training file (the largest file read) has ~300 000;
#: the bound keeps what a hostile file can make the unpickler build to a few hundred MB of objects.
MAX_OPERATIONS = 2_000_000

#: The dtypes a data array may have (numpy's pickled names): booleans, integers and floats.
_NUMERIC_DTYPES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})

#: What numpy's ``dtype.__reduce__`` passes as the dtype's pickled state: version, byte order, then
#: fields and sizes that numeric dtypes do not have.
_BYTE_ORDERS = ("<", ">", "|", "=")

#: Exceptions that unpickling a malformed (not hostile: those are refused by name) file raises.
_MALFORMED = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    OverflowError,
    struct.error,
    MemoryError,
    RecursionError,
)


class _Refused(Exception):
    """Raised inside the unpickler; turned into a one-line UserError naming the file by the caller."""


class _NdarrayMarker:
    """Stands for ``numpy.ndarray`` as the first argument of ``_reconstruct``; not callable, no state."""

    __slots__ = ()


class _PickledArray(np.ndarray):
    """The array ``_reconstruct`` makes: its ``__setstate__`` checks the state before numpy sees it.

    A pickle's BUILD calls ``__setstate__`` when an object has one, so it never assigns attributes
    (``dtype``, ``shape``) directly. Pickled again, the array is a plain ``np.ndarray``.
    """

    def __reduce_ex__(self, protocol: Any) -> Any:
        return np.asarray(self).__reduce_ex__(protocol)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("an array's pickled state is not numpy's (version, shape, dtype, ...)")
        if len(state) == 5:
            if state[0] != 1:
                raise pickle.UnpicklingError(f"unknown numpy array state version {state[0]!r}")
            state = state[1:]
        shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DtypeSpec):
            raise pickle.UnpicklingError("an array's pickled dtype is not a numpy dtype")
        if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"an array's pickled shape {shape!r:.80} is not a tuple of sizes")
        if isinstance(raw, str):  # Python 2 pickles (the official CIFAR files) hold the bytes as a str
            raw = raw.encode("latin1")
        if not isinstance(raw, bytes):
            raise pickle.UnpicklingError("an array's pickled data is not bytes")
        real = dtype.resolve()
        count = 1
        for n in shape:  # Python ints: a hostile shape cannot overflow the size check
            count *= n
        if count * real.itemsize != len(raw):
            raise pickle.UnpicklingError(
                f"an array of shape {shape} and dtype {real} needs {count * real.itemsize} bytes, "
                f"the file holds {len(raw)}"
            )
        # numpy parses the flag as a C int: a Python bool, not the np.bool_ its stub asks for.
        np.ndarray.__setstate__(self, (1, shape, real, bool(fortran), raw))  # type: ignore[arg-type]


class _DtypeSpec:
    """A numeric dtype as pickled: its name, and the byte order its state sets."""

    __slots__ = ("byteorder", "code")

    def __init__(self, code: str) -> None:
        self.code = code
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata]): a numeric
        # dtype has no subarray, names or fields; sizes and flags are ignored (numpy derives them).
        if not isinstance(state, tuple) or len(state) < 5 or state[1] not in _BYTE_ORDERS:
            raise pickle.UnpicklingError("a dtype's pickled state is not numpy's")
        if any(part is not None for part in state[2:5]):
            raise pickle.UnpicklingError(f"dtype {self.code} cannot have sub-arrays or fields")
        self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        base = np.dtype(self.code)
        if self.byteorder == "<":
            return base.newbyteorder("<")
        return base.newbyteorder(">") if self.byteorder == ">" else base


class _Reconstruct:
    """``numpy.core.multiarray._reconstruct``, limited to the empty placeholder array numpy pickles."""

    __slots__ = ()

    def __call__(self, subtype: Any, shape: Any, typecode: Any) -> _PickledArray:
        if not isinstance(subtype, _NdarrayMarker) or shape != (0,) or typecode not in (b"b", "b"):
            raise pickle.UnpicklingError("numpy array reconstruction with arguments numpy never writes")
        return np.ndarray.__new__(_PickledArray, (0,), np.uint8)


class _Dtype:
    """``numpy.dtype``, limited to the numeric types of :data:`_NUMERIC_DTYPES`."""

    __slots__ = ()

    def __call__(self, code: Any, align: Any = False, copy: Any = False) -> _DtypeSpec:
        if not isinstance(code, str) or code not in _NUMERIC_DTYPES:
            kind = "Python objects" if isinstance(code, str) and code.startswith("O") else f"dtype {_printable(code)}"
            raise _Refused(f"holds a numpy array of {kind}, not of plain numbers")
        return _DtypeSpec(code)


class _LatinEncode:
    """``_codecs.encode``, limited to what protocol-2 pickles written by Python 3 use it for: str -> bytes."""

    __slots__ = ()

    def __call__(self, text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError("_codecs.encode is only accepted as Python 3's latin1 bytes encoding")
        return text.encode("latin1")


_RECONSTRUCT, _NDARRAY, _DTYPE = _Reconstruct(), _NdarrayMarker(), _Dtype()

#: (module, name) -> what the unpickler gets instead of the real object: the whole allow-list.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1.x and the official CIFAR files
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2.x
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("_codecs", "encode"): _LatinEncode(),
}


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that resolves no name from the file: only :data:`_ALLOWED`'s stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise _Refused(f"holds a pickled reference to {_printable(f'{module}.{name}')}, which could run code")
        return allowed


def _printable(value: Any, limit: int = 80) -> str:
    """``value`` as it may appear in a one-line message: names from a file may hold newlines or escapes."""
    text = str(value)
    if not text.isprintable() or not text.isascii():
        text = ascii(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_operations(data: bytes) -> None:
    """Refuse a pickle with more than :data:`MAX_OPERATIONS` operations or a memo index beyond them.

    Each operation builds at most one object, so this bounds the objects unpickling can make; a memo
    index is checked because the unpickler sizes its memo table by the largest index it is given.
    """
    for count, (opcode, arg, _) in enumerate(pickletools.genops(io.BytesIO(data)), start=1):
        if count > MAX_OPERATIONS:
            raise _Refused(f"holds more than {MAX_OPERATIONS:,} pickle operations, far more than a data file has")
        if "PUT" in opcode.name and isinstance(arg, int) and arg > MAX_OPERATIONS:
            raise pickle.UnpicklingError(f"memo index {arg} is beyond what a data file uses")


def loads_pickle(data: bytes, *, source: str, fix: str, kind: str = "a pickle", encoding: str = "latin1") -> Any:
    """Unpickle ``data`` (read from ``source``) without running code; see the module docstring.

    ``source`` names the file in messages (``"cifar10 file data/test_batch"``), ``fix`` says what to do
    about it, ``kind`` what the file should have been (``"CIFAR pickles"``). ``encoding`` decodes
    Python 2 strings (``latin1`` keeps their bytes, as numpy's array state needs). Arrays come back as
    a subclass of ``np.ndarray``; ``np.asarray`` gives the plain class. A refused global is the
    one-line UserError ``<source> holds a pickled reference to <module.name>, which could run code;
    ...``; a malformed pickle ``<source> cannot be read as <kind> (<error>); <fix>``.
    """
    try:
        _check_operations(data)
        return _DataUnpickler(io.BytesIO(data), encoding=encoding).load()
    except _Refused as exc:
        raise UserError(
            f"{source} {exc}; nothing was run: only lists, dicts, strings, numbers and numeric numpy "
            f"arrays are read from data files; {fix}"
        ) from None
    except _MALFORMED as exc:
        detail = _printable(" ".join(str(exc).split()), limit=200)
        raise UserError(f"{source} cannot be read as {kind} ({type(exc).__name__}: {detail}); {fix}") from None


def load_pickle(
    path: str | os.PathLike[str], *, limit: int, what: str, fix: str, kind: str = "a pickle", encoding: str = "latin1"
) -> Any:
    """:func:`loads_pickle` of a regular file of at most ``limit`` bytes; ``what`` names it (``"cifar10 file"``)."""
    data = read_bytes_bounded(path, limit=limit, what=what)
    return loads_pickle(data, source=f"{what} {path}", fix=fix, kind=kind, encoding=encoding)
