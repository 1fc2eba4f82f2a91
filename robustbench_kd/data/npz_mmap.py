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

import struct
import zipfile
from pathlib import Path

import numpy as np

from robustbench_kd.errors import UserError

__all__ = ["memmap_npz"]

# ZIP local file header: signature, version, flags, method, time, date, crc, sizes, name/extra lengths.
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"


def memmap_npz(path: str | Path) -> dict[str, np.memmap]:
    """Return ``{member name without ".npy": read-only np.memmap}`` for every array in ``path``.

    Raises :class:`UserError` (one line) when the file is missing, is not an ``.npz``, is compressed
    (``np.savez_compressed``: deflated members cannot be mapped), or holds object arrays or empty ones.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{path} does not exist (expected an .npz written by np.savez)")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if info.filename.endswith(".npy")]
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not an .npz archive; write it with np.savez(path, image=..., label=...)") from None
    compressed = [info.filename for info in infos if info.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise UserError(
            f"{path} is a compressed .npz (member {compressed[0]} is deflated) and cannot be "
            "memory-mapped; re-save it with np.savez(...) instead of np.savez_compressed(...)"
        )
    with open(path, "rb") as handle:
        return {info.filename[:-4]: _map_member(path, handle, info) for info in infos}


def _map_member(path: Path, handle, info: zipfile.ZipInfo) -> np.memmap:
    """np.memmap over one stored ``.npy`` member whose local header starts at ``info.header_offset``."""
    handle.seek(info.header_offset)
    fields = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
    if fields[0] != _LOCAL_SIGNATURE:
        raise UserError(f"{path} is a damaged .npz (bad header of member {info.filename}); write it again")
    # The local header's name/extra lengths can differ from the central directory's (zip64 extras).
    start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
    handle.seek(start)
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        raise UserError(
            f"{path}: member {info.filename} uses .npy format {version}, which cannot be "
            "memory-mapped here; re-save it with np.savez"
        )
    if dtype.hasobject:
        raise UserError(
            f"{path}: member {info.filename} holds Python objects (pickled), which cannot be "
            "memory-mapped; store plain numeric arrays"
        )
    offset = handle.tell()
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        raise UserError(f"{path}: member {info.filename} is empty (shape {shape})")
    if offset - start + nbytes > info.file_size:
        raise UserError(f"{path}: member {info.filename} is truncated; write the file again")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran_order else "C", offset=offset)
