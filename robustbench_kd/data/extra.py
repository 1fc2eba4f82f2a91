"""Extra (e.g. generated) training images mixed into every batch at a fixed ratio.

The recipe of RobustBench's generated-data entries (Wang et al. 2023, "Better diffusion models further
improve adversarial training"): every training batch of ``B`` images holds ``round(B * f)`` images drawn
from the extra set and ``B - round(B * f)`` from the real training set, whose single pass defines the
epoch. Here ``f`` is ``data.extra_fraction`` and the extra set is ``data.extra_path``, an ``.npz`` with an
image and a label array (the public 1m/5m/20m files store ``image`` as NHWC uint8 and ``label``).

The file is memory-mapped (:mod:`robustbench_kd.data.npz_mmap`), never loaded: per batch only the drawn
rows are read and converted. The extra samples of a batch are drawn uniformly at random (with
replacement) from a generator seeded by (run seed, epoch), so a resumed run draws exactly what an
uninterrupted one would. They carry the dataset indices ``N_real + j`` (row ``j`` of the file), past
every real index, so per-sample analyses can tell them apart; methods that keep per-sample state over
the training set (``Distiller.indexes_training_set``, e.g. GACD's memory bank) refuse extra data.
Under torchrun every process draws the same rows and keeps its share of the real and of the extra
images of each global batch (:func:`robustbench_kd.scale.distributed.shard_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustbench_kd.data.datasets import random_crop_flip, to_float
from robustbench_kd.data.npz_mmap import memmap_npz
from robustbench_kd.errors import UserError

__all__ = ["IMAGE_KEYS", "LABEL_KEYS", "ExtraData", "batch_split", "check_extra_supported", "mix_extra", "open_extra"]

#: Member names accepted for the images and the labels, first match wins (np.savez(path, x, y) -> arr_0/1).
IMAGE_KEYS = ("image", "images", "x", "data", "arr_0")
LABEL_KEYS = ("label", "labels", "y", "target", "targets", "arr_1")
_LABEL_CHUNK = 1 << 20  # labels are range-checked in chunks: a 20M-label file is never read at once


def batch_split(batch_size: int, fraction: float) -> tuple[int, int]:
    """``(real, extra)`` images per batch: extra = round(batch_size * fraction), halves rounded up."""
    extra = math.floor(batch_size * fraction + 0.5)
    return batch_size - extra, extra


@dataclass
class ExtraData:
    """The memory-mapped extra images and labels.

    Attributes:
        images: read-only ``np.memmap``, uint8, (M, C, H, W) or, with ``channels_last``, (M, H, W, C).
        labels: read-only ``np.memmap`` of integers, (M,).
    """

    path: Path
    images: np.memmap
    labels: np.memmap
    channels_last: bool

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def read(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Images (uint8 NCHW) and labels (int64) of ``rows``; reads only those rows, in file order."""
        wanted = rows.numpy()
        unique, inverse = np.unique(wanted, return_inverse=True)  # sorted: sequential reads, no repeats
        images = np.ascontiguousarray(self.images[unique][inverse])
        labels = np.asarray(self.labels[unique][inverse], dtype=np.int64)
        x = torch.from_numpy(images)
        if self.channels_last:
            x = x.permute(0, 3, 1, 2).contiguous()
        return x, torch.from_numpy(labels)


def _member(arrays: dict[str, np.memmap], keys: tuple[str, ...], what: str, path: Path) -> np.memmap:
    for key in keys:
        if key in arrays:
            return arrays[key]
    raise UserError(
        f"{path} has no {what} array: its members are {', '.join(sorted(arrays)) or 'none'}; "
        f"name it one of {', '.join(keys)}"
    )


def open_extra(path: str | Path, *, image_shape: tuple[int, int, int], num_classes: int) -> ExtraData:
    """Memory-map ``path`` and check it against the real training data.

    Args:
        image_shape: (C, H, W) of the real training images; the file may store (M, C, H, W) or
            (M, H, W, C) (as the public generated-data files do).
        num_classes: labels must lie in [0, num_classes).

    Every mismatch (keys, rank, dtype, image shape, label count or range) is a one-line UserError.
    """
    path = Path(path).expanduser()
    arrays = memmap_npz(path, what="data.extra_path")
    images = _member(arrays, IMAGE_KEYS, "image", path)
    labels = _member(arrays, LABEL_KEYS, "label", path)
    c, h, w = image_shape
    if images.dtype != np.uint8:
        raise UserError(
            f"{path}: extra images must be uint8 in [0, 255] (as np.savez of the generated-data "
            f"files stores them), got {images.dtype}"
        )
    if images.ndim != 4:
        raise UserError(f"{path}: extra images must be 4-d (N, H, W, C) or (N, C, H, W), got shape {images.shape}")
    if tuple(images.shape[1:]) == (c, h, w):
        channels_last = False
    elif tuple(images.shape[1:]) == (h, w, c):
        channels_last = True
    else:
        raise UserError(
            f"{path}: extra images of shape {tuple(images.shape[1:])} do not match the training "
            f"images; expected (N, {h}, {w}, {c}) or (N, {c}, {h}, {w})"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: extra labels must be a 1-d integer array, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != len(images):
        raise UserError(f"{path}: {len(images)} extra images but {len(labels)} labels")
    for start in range(0, len(labels), _LABEL_CHUNK):
        chunk = np.asarray(labels[start : start + _LABEL_CHUNK])
        low, high = int(chunk.min()), int(chunk.max())
        if low < 0 or high >= num_classes:
            raise UserError(
                f"{path}: extra labels must lie in [0, {num_classes}) like the training set's, "
                f"found {low if low < 0 else high}"
            )
    return ExtraData(path=path, images=images, labels=labels, channels_last=channels_last)


def check_extra_supported(distiller: Any, extra: ExtraData | None) -> None:
    """UserError when a method keeping per-sample state over the training set is given extra data."""
    if extra is not None and getattr(distiller, "indexes_training_set", False):
        raise UserError(
            f"method {distiller.name!r} keeps per-sample state over the training set (indexed by "
            f"dataset index) and cannot train with extra data; remove data.extra_path"
        )


def mix_extra(
    batches: Iterator[tuple[Tensor, Tensor, Tensor]],
    extra: ExtraData,
    *,
    count: int,
    offset: int,
    generator: torch.Generator,
    augment: bool = False,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Append ``count`` extra samples to every ``(x, y, index)`` batch of real data.

    The rows are drawn uniformly with replacement from ``generator`` (and augmented from it when
    ``augment``); their indices are ``offset + row`` (``offset`` = number of real training samples).
    They go to the device of the real batch, after it.
    """
    for x, y, index in batches:
        rows = torch.randint(len(extra), (count,), generator=generator)
        images, labels = extra.read(rows)
        images = to_float(images)
        if augment:
            images = random_crop_flip(images, generator)
        yield (
            torch.cat([x, images.to(x.device, non_blocking=True)]),
            torch.cat([y, labels.to(y.device, non_blocking=True)]),
            torch.cat([index, rows + offset]),
        )
