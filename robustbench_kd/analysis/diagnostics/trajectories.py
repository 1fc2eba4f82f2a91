"""The per-sample trajectory file ``OUT/diagnostics/trajectories.npz``: how the
correct-class probability of each sample evolves over training, for the student and each teacher, as
in the sample-difficulty analysis of the AKD paper (Maroto et al.).

One column per epoch. Arrays (N samples of the fixed subset, K recorded epochs):

* ``epochs`` (K,) 1-based epoch numbers; ``index`` (N,) positions in the split; ``y`` (N,) labels;
  ``split`` the split name ("val" or "train").
* ``<model>_<input>_p`` (N, K): correct-class probability p_y(x) of ``student`` or ``teacher_<role>`` on
  ``clean`` or ``adv`` inputs; ``student_<input>_ce`` (N, K): the student's cross-entropy.
* ``difficulty_<input>`` (N,): AKD eq. (6), the student's CE averaged over the K epochs so far.
* ``cosine_<role>_<input>`` (N,): cosine similarity of the student's and the teacher's p trajectories.

The file is rewritten atomically at every recorded epoch; columns of epochs >= the one being written are
dropped first, so a resumed run that repeats an epoch does not record it twice.
"""

from __future__ import annotations

import io
import logging
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_bytes
from robustbench_kd.storage.bounded import MiB, read_bytes_bounded

log = logging.getLogger(__name__)

FILE = Path("diagnostics") / "trajectories.npz"

#: Largest trajectory file read, on disk and once its arrays are expanded: a 300-epoch run on 1000 samples
#: with a handful of models writes ~10 MiB.
LIMIT = 256 * MiB
#: Most arrays a trajectory file holds: four per model and input kind, a few models.
MAX_ARRAYS = 256


def load(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of an existing trajectory file, or {} when there is none.

    Bounded: a directory or FIFO in its place, a file larger than :data:`LIMIT`, one that is not an
    ``.npz`` archive of plain numeric arrays, or whose arrays claim more data than it holds (a small
    archive declaring a huge array would be allocated before being read) is a one-line UserError.
    """
    if not os.path.lexists(path):
        return {}
    data = read_bytes_bounded(path, limit=LIMIT, what="trajectory file")
    try:
        return _arrays(data, path)
    except UserError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, EOFError, OSError, KeyError, NotImplementedError) as exc:
        raise UserError(f"trajectory file {path} is not an .npz archive of arrays ({_describe(exc)})") from None


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


def _arrays(data: bytes, path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every ``<name>.npy`` member of the archive ``data``, its header checked before anything is allocated."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
        if len(members) > MAX_ARRAYS:
            raise UserError(f"trajectory file {path} holds {len(members)} members, more than {MAX_ARRAYS}")
        if sum(m.file_size for m in members) > LIMIT:
            raise UserError(f"trajectory file {path} expands to more than {LIMIT // MiB} MiB")
        arrays: dict[str, np.ndarray] = {}
        for member in members:
            if not member.filename.endswith(".npy"):
                raise UserError(f"trajectory file {path} holds {member.filename!r}, which is not an array (.npy)")
            with archive.open(member) as handle:
                _check_header(handle, member, path)
            with archive.open(member) as handle:
                arrays[member.filename.removesuffix(".npy")] = np.lib.format.read_array(handle, allow_pickle=False)
    return arrays


def _check_header(handle: IO[bytes], member: zipfile.ZipInfo, path: str | os.PathLike[str]) -> None:
    """Refuse an array of objects, or one whose header declares more bytes than the member holds."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        raise ValueError(f"{member.filename}: .npy format version {version} is not one numpy.savez writes")
    if dtype.hasobject:
        raise UserError(f"trajectory file {path} holds Python objects in {member.filename!r}; it holds numbers only")
    if math.prod(shape) * dtype.itemsize > member.file_size:
        raise UserError(
            f"trajectory file {path}: {member.filename!r} declares a {shape} array of {dtype}, more data than "
            f"its {member.file_size} bytes hold"
        )


def append(
    path: Path, *, epoch: int, split: str, index: np.ndarray, y: np.ndarray, columns: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Add ``epoch``'s column ``columns[name]`` (N,) to every (N, K) trajectory; write and return all arrays."""
    try:
        old = load(path)
    except UserError as exc:  # a damaged file from an earlier run: its columns are lost, this run's are not
        log.warning("%s; starting it afresh", exc)
        old = {}
    same = bool(old) and _continues(old, split=split, index=index, columns=columns)
    if old and not same:
        log.warning("%s was recorded on another subset or with other diagnostics; starting it afresh", path)
    keep = old["epochs"] < epoch if same else np.zeros(0, dtype=bool)
    epochs = np.append(old["epochs"][keep] if same else np.zeros(0, dtype=np.int64), epoch).astype(np.int64)
    out: dict[str, np.ndarray] = {
        "epochs": epochs,
        "index": np.asarray(index, dtype=np.int64),
        "y": np.asarray(y, dtype=np.int64),
        "split": np.array(split),
    }
    for name, value in columns.items():
        past = old[name][:, keep] if same else np.zeros((len(index), 0), dtype=np.float32)
        out[name] = np.concatenate([past, np.asarray(value, dtype=np.float32)[:, None]], axis=1)
    return out


def _continues(old: dict[str, np.ndarray], *, split: str, index: np.ndarray, columns: dict[str, np.ndarray]) -> bool:
    """Whether ``old`` holds trajectories of this subset with every column (N, K), K = its epochs."""
    needed = ("epochs", "split", "index", *columns)
    if any(name not in old for name in needed) or old["epochs"].ndim != 1 or old["epochs"].dtype.kind not in "iu":
        return False
    shape = (len(index), len(old["epochs"]))
    return (
        str(old["split"]) == split
        and np.array_equal(old["index"], index)
        and all(old[name].shape == shape for name in columns)
    )


def write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    atomic_write_bytes(path, buffer.getvalue())
