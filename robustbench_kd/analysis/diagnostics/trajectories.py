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
from pathlib import Path

import numpy as np

from robustbench_kd.storage.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

FILE = Path("diagnostics") / "trajectories.npz"


def load(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an existing trajectory file, or {} when there is none."""
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def append(
    path: Path, *, epoch: int, split: str, index: np.ndarray, y: np.ndarray, columns: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Add ``epoch``'s column ``columns[name]`` (N,) to every (N, K) trajectory; write and return all arrays."""
    old = load(path)
    same = (
        old
        and str(old["split"]) == split
        and np.array_equal(old["index"], index)
        and set(columns) <= {k for k in old if old[k].ndim == 2}
    )
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


def write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
    atomic_write_bytes(path, buffer.getvalue())
