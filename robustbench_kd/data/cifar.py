"""CIFAR-10/100 as whole tensors, for the trainer and the evaluator.

Reads torchvision's on-disk layout (``<root>/cifar-10-batches-py`` or ``<root>/cifar-100-python``)
straight into memory: the whole split is 150 MB of uint8 at most, and skipping torchvision's
per-image PIL transforms makes loading take about a second.

The batch files are pickles, and ``pickle.load`` (what torchvision's dataset classes call) runs any
code a file names. They are read here instead, in both ``verify_md5`` modes, through
:mod:`robustbench_kd.storage.safe_pickle` (no code is ever run; FIFOs, devices and oversized files are
refused), then checked: 3072 image bytes per label, labels in ``[0, num_classes)``, one class name
per class in the meta file. With ``verify_md5`` each file's bytes are also checked against
torchvision's MD5 sums before they are unpickled. Downloads still use torchvision's archive URL,
checksum and extraction.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.storage.bounded import MiB, read_bytes_bounded

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torchvision.datasets import CIFAR10

__all__ = ["CIFAR_DIRS", "load_cifar"]

# Folder torchvision extracts each archive into, under ``root``.
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
LABEL_KEYS = {"cifar10": "labels", "cifar100": "fine_labels"}  # CIFAR-100: fine labels, as torchvision
IMAGE_BYTES = 3 * 32 * 32

#: Largest file read: a CIFAR-10 batch is 31 MB (10 000 images), CIFAR-100's train file 155 MB
#: (50 000 images), a meta file a few KB.
BATCH_LIMIT = {"cifar10": 64 * MiB, "cifar100": 256 * MiB}
META_LIMIT = 1 * MiB


def _dataset_class(name: str) -> type[CIFAR10]:
    """torchvision's class for ``name``: the source of the file names, MD5 sums and download URL."""
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if name == "cifar10" else CIFAR100


def _canonical_name(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in CIFAR_DIRS:
        raise UserError(
            f"unknown CIFAR dataset {name!r}{close_matches(str(name), CIFAR_DIRS)}; valid: {', '.join(CIFAR_DIRS)}"
        )
    return key


def _refetch(folder: Path) -> str:
    return f"delete {folder} and fetch it again"


def _read_file(name: str, path: Path, md5: str | None, limit: int, folder: Path) -> Any:
    """Read one pickle file of the dataset: bounded, MD5-checked when ``md5`` is given, never run."""
    from robustbench_kd.storage.safe_pickle import loads_pickle

    data = read_bytes_bounded(path, limit=limit, what=f"{name} file")
    if md5 is not None:
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if digest != md5:
            raise UserError(
                f"{name} file {path} fails torchvision's MD5 check (md5 {digest}, expected {md5}); pass "
                f"verify_md5=False if this is a deliberate non-official copy, otherwise delete {folder} "
                "and fetch it again with download=True"
            )
    return loads_pickle(data, source=f"{name} file {path}", fix=_refetch(folder), kind="CIFAR pickles")


def _decode_batch(name: str, path: Path, batch: Any, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, 3, 32, 32) uint8 and labels (n,) int64 of one unpickled batch, or a one-line UserError."""
    import numpy as np

    key = LABEL_KEYS[name]
    where, fix = f"{name} file {path}", _refetch(folder)
    if not isinstance(batch, dict) or "data" not in batch or key not in batch:
        found = f"a dict with keys {_keys(batch)}" if isinstance(batch, dict) else f"a {type(batch).__name__}"
        raise UserError(f"{where} is not a CIFAR batch (a dict with 'data' and {key!r}), it holds {found}; {fix}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        got = f"a {data.dtype} array" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise UserError(f"{where}: its 'data' entry must be a uint8 array of image bytes, got {got}; {fix}")
    try:
        labels = np.asarray(batch[key])
    except (ValueError, TypeError):  # ragged nested lists
        labels = np.asarray(None)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"{where}: its {key!r} entry must be a list of integer class labels; {fix}")
    count = len(labels)
    if count == 0:
        raise UserError(f"{where} holds no images; {fix}")
    if data.size != count * IMAGE_BYTES:
        raise UserError(
            f"{where} holds {data.size:,} image bytes for {count:,} labels, expected {count * IMAGE_BYTES:,} "
            f"({IMAGE_BYTES} bytes per 3x32x32 image); {fix}"
        )
    low, high, classes = int(labels.min()), int(labels.max()), NUM_CLASSES[name]
    if low < 0 or high >= classes:
        raise UserError(
            f"{where} holds the label {low if low < 0 else high}; {name} labels lie in [0, {classes}); {fix}"
        )
    return np.ascontiguousarray(data).reshape(count, 3, 32, 32), labels.astype(np.int64)


def _keys(mapping: dict) -> str:
    keys = [repr(k) if isinstance(k, str) and k.isprintable() else ascii(k) for k in list(mapping)[:8]]
    return ", ".join(keys) + (", ..." if len(mapping) > 8 else "") if keys else "none"


def _check_meta(name: str, path: Path, meta: Any, key: str, folder: Path) -> None:
    """The meta file must name one class per label value."""
    names = meta.get(key) if isinstance(meta, dict) else None
    classes = NUM_CLASSES[name]
    if not isinstance(names, list) or len(names) != classes:
        found = f"{len(names)} names" if isinstance(names, list) else "none"
        raise UserError(
            f"{name} meta file {path} must list the {classes} class names under {key!r}, found {found}; "
            f"{_refetch(folder)}"
        )


def _download(name: str, root: Path, cls: type[CIFAR10]) -> None:
    """Fetch and extract torchvision's archive for ``name`` into ``root`` (archive MD5 checked)."""
    import tarfile

    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)
    except RuntimeError as exc:  # torchvision: the downloaded archive fails its MD5 check
        raise UserError(
            f"the {name} archive downloaded into {root} is not the official one ({exc}); "
            f"delete {root / cls.filename} and try again"
        ) from None
    except (OSError, tarfile.TarError) as exc:  # urllib.error.URLError is an OSError
        raise UserError(
            f"downloading {name} into {root} failed ({exc}); on a machine without internet "
            f"copy the extracted {CIFAR_DIRS[name]} directory into {root}"
        ) from None


def _needs_download(name: str, folder: Path, files: list[tuple[str, str | None]]) -> bool:
    """Whether a file is missing or (with its MD5 given) not the official one, as torchvision decides."""
    for filename, md5 in files:
        path = folder / filename
        if not path.exists():
            return True
        if md5 is not None:
            data = read_bytes_bounded(path, limit=BATCH_LIMIT[name], what=f"{name} file")
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != md5:
                return True
    return False


def load_cifar(
    name: str, root: str | Path, *, train: bool, download: bool = False, verify_md5: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR split as ``(images, labels)``.

    ``images`` is uint8 of shape (N, 3, 32, 32) in torchvision's order; ``labels`` is int64 (N,)
    (fine labels for CIFAR-100). ``name`` is ``cifar10`` or ``cifar100`` (``CIFAR-10`` etc. accepted).
    With ``download=True`` the official archive is fetched into ``root`` when a file is missing (or,
    with ``verify_md5``, not the official one). ``verify_md5=False`` accepts files that are not the
    official ones (e.g. the fixtures of :mod:`robustbench_kd.testing.fixtures`); in both modes the files
    are unpickled without running code and their content is checked. Missing, corrupt or hostile data
    raises a one-line :class:`UserError` naming the file.
    """
    import numpy as np
    import torch

    name = _canonical_name(name)
    root = Path(root).expanduser()
    folder = root / CIFAR_DIRS[name]
    cls = _dataset_class(name)
    # torchvision's (file name, MD5) pairs; without verify_md5 no sum is checked.
    files = {
        split: [(f, md5 if verify_md5 else None) for f, md5 in entries]
        for split, entries in (("train", cls.train_list), ("test", cls.test_list))
    }
    meta = (cls.meta["filename"], cls.meta["md5"] if verify_md5 else None)
    if download and _needs_download(name, folder, [*files["train"], *files["test"], meta]):
        _download(name, root, cls)
    if not folder.is_dir():
        raise UserError(
            f"{name} not found: expected the directory {folder} (torchvision layout); "
            "pass download=True on a machine with internet to fetch it"
        )
    # exists() follows links: a dangling link is missing, a FIFO or device is refused when read.
    missing = [f for f, _ in (*files["train"], *files["test"], meta) if not (folder / f).exists()]
    if missing:
        raise UserError(
            f"{name} in {folder} is incomplete: missing {', '.join(missing)}; "
            "delete the directory and fetch it again with download=True"
        )
    meta_path = folder / meta[0]
    _check_meta(name, meta_path, _read_file(name, meta_path, meta[1], META_LIMIT, folder), cls.meta["key"], folder)
    images, labels = [], []
    for filename, md5 in files["train" if train else "test"]:
        path = folder / filename
        x, y = _decode_batch(name, path, _read_file(name, path, md5, BATCH_LIMIT[name], folder), folder)
        images.append(x)
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
