"""Memory-map the arrays of an uncompressed ``.npz`` file without reading them.

``np.load(path, mmap_mode="r")`` memory-maps plain ``.npy`` files only: for an ``.npz`` it ignores
``mmap_mode`` and reads a whole member into memory the first time it is accessed, which is not an
option for the 1M-20M-image generated-data files (tens of GB). An ``.npz`` written by ``np.savez`` is
a ZIP archive whose members are *stored* (not deflated) ``.npy`` files, so each array lies contiguously
at a fixed offset of the archive: :func:`memmap_npz` finds that offset (ZIP local file header, then the
``.npy`` header) and returns an ``np.memmap`` over it. Only the pages of the rows actually indexed are
ever read from disk.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

from robustbench_kd.errors import UserError
from robustbench_kd.storage.bounded import open_regular

__all__ = ["memmap_npz"]

# ZIP local file header: signature, version, flags, method, time, date, crc, sizes, name/extra lengths.
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"


def memmap_npz(path: str | Path, *, what: str = "npz file") -> dict[str, np.memmap]:
    """Return ``{member name without ".npy": read-only np.memmap}`` for every array in ``path``.

    Raises :class:`UserError` (one line) when the file is missing, is not a regular file (a FIFO or a
    device would block or never end), is not an ``.npz``, is compressed (``np.savez_compressed``:
    deflated members cannot be mapped), holds two members of one name, or holds object arrays (which
    only unpickling could read), empty ones, malformed ``.npy`` headers or arrays running past the end
    of the file. ``what`` names the file in the messages about its kind (``"data.extra_path"``).
    """
    path = Path(path).expanduser()
    with os.fdopen(open_regular(path, what=what), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            with zipfile.ZipFile(handle) as archive:
                infos = [info for info in archive.infolist() if info.filename.endswith(".npy")]
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError):
            raise UserError(
                f"{path} is not an .npz archive; write it with np.savez(path, image=..., label=...)"
            ) from None
        names = [info.filename for info in infos]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(
                f"{path} holds two members named {twice[0]}, so which one is meant is ambiguous; write it again"
            )
        compressed = [info.filename for info in infos if info.compress_type != zipfile.ZIP_STORED]
        if compressed:
            raise UserError(
                f"{path} is a compressed .npz (member {compressed[0]} is deflated) and cannot be "
                "memory-mapped; re-save it with np.savez(...) instead of np.savez_compressed(...)"
            )
        return {info.filename[:-4]: _map_member(path, handle, info, size) for info in infos}


def _map_member(path: Path, handle: BinaryIO, info: zipfile.ZipInfo, size: int) -> np.memmap:
    """np.memmap over one stored ``.npy`` member whose local header starts at ``info.header_offset``."""
    handle.seek(info.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    fields = _LOCAL_HEADER.unpack(header) if len(header) == _LOCAL_HEADER.size else (b"",)
    if fields[0] != _LOCAL_SIGNATURE:
        raise UserError(f"{path} is a damaged .npz (bad header of member {info.filename}); write it again")
    # The local header's name/extra lengths can differ from the central directory's (zip64 extras).
    start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    handle.seek(start)
    shape, fortran_order, dtype = _read_npy_header(path, handle, info.filename)
    if dtype.hasobject:
        raise UserError(
            f"{path}: member {info.filename} holds Python objects (pickled), which cannot be "
            "memory-mapped; store plain numeric arrays"
        )
    offset = handle.tell()
    count = 1
    for n in shape:  # Python ints: a hostile header cannot overflow the size checks below
        count *= n
    nbytes = count * dtype.itemsize
    if nbytes == 0:
        raise UserError(f"{path}: member {info.filename} is empty (shape {shape})")
    if offset - start + nbytes > info.file_size or offset + nbytes > size:
        raise UserError(f"{path}: member {info.filename} is truncated; write the file again")
    return np.memmap(handle, dtype=dtype, mode="r", shape=shape, order="F" if fortran_order else "C", offset=offset)


def _read_npy_header(path: Path, handle: BinaryIO, member: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, Fortran order and dtype from a member's ``.npy`` header (numpy parses it as a literal)."""
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(handle)
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        detail = " ".join(str(exc).split())[:160]
        raise UserError(f"{path}: member {member} is not a valid .npy array ({detail}); write the file again") from None
    raise UserError(
        f"{path}: member {member} uses .npy format {version}, which cannot be memory-mapped here; "
        "re-save it with np.savez"
    )
