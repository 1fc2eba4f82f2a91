"""Datasets as in-memory tensors, and a seeded batch iterator that yields sample indices.

Every dataset is loaded once into tensors (uint8 or float images, int64 labels). Batches are drawn
by :func:`iterate_batches` with a ``torch.Generator`` seeded from (run seed, epoch), so the data order
and the augmentation of epoch k are the same whether or not the run was resumed, and each batch
carries the dataset indices of its samples (per-sample state: GACD's memory bank, trajectories).

The embedded default is scikit-learn's bundled handwritten digits (1797 real 8x8 images that ship
inside the scikit-learn wheel): no download, minutes on a laptop CPU.

Validation: :func:`split_validation` holds out a fixed random subset of the *training* set
(``data.val_size``) for the per-epoch evaluation and best-checkpoint choice, so the test set is read
only by the final evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from robustbench_kd.errors import UserError

DIGITS_TRAIN = 1500  # the first 1500 digits train, the remaining 297 are the test set (a fixed split)
DIGITS_SPLIT_SEED = 20240  # fixed: the test set must not depend on the run's seed
VAL_SPLIT_SEED = 20241  # fixed: the validation split must not depend on the run's seed either


@dataclass
class DataSplits:
    """Train, test and (optionally) validation tensors of one dataset.

    Images are uint8 in [0,255] or float in [0,1], shape (N, C, H, W); labels int64 (N,). ``val_x``/
    ``val_y`` are None unless a validation split was held out of the training set
    (:func:`split_validation`) or the loader provides one. Images may also be a lazy container (e.g.
    :class:`robustbench_kd.data.imagenet.LazyImages`) that decodes only the indexed images; subsets of
    either kind are taken with :func:`take`. ``extra`` is the memory-mapped extra training data of
    ``data.extra_path`` (:mod:`robustbench_kd.data.extra`), or None. ``missing_train`` is set, to a
    one-line reason, by a loader that found only the test data (ImageNet's ``val/`` without
    ``train/``): the train split is then empty, evaluation works and training refuses with the reason.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    augment_default: bool = False
    val_x: Tensor | None = None
    val_y: Tensor | None = None
    extra: Any = None  #: robustbench_kd.data.extra.ExtraData | None
    missing_train: str | None = None  #: why there is no train split (evaluation-only data), or None

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    @property
    def has_validation(self) -> bool:
        return self.val_x is not None

    def __post_init__(self) -> None:
        splits = [("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)]
        if (self.val_x is None) != (self.val_y is None):
            raise UserError(f"dataset {self.name!r}: a validation split needs both images and labels")
        if self.val_x is not None and self.val_y is not None:
            splits.append(("validation", self.val_x, self.val_y))
        for split, x, y in splits:
            if len(x) == 0 and not (split == "train" and self.missing_train):
                raise UserError(f"dataset {self.name!r} has an empty {split} split")
            if len(x) != len(y):
                raise UserError(f"dataset {self.name!r}: {len(x)} {split} images but {len(y)} labels")


def take(images: Any, index: Tensor | slice) -> Any:
    """``images[index]`` without decoding: a lazy container returns a lazy subset, a tensor a tensor."""
    return images[index] if isinstance(images, Tensor) else images.subset(index)


def to_float(images: Tensor) -> Tensor:
    """uint8 [0,255] -> float32 [0,1]; float images are returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def load_digits() -> DataSplits:
    """scikit-learn's digits as (N,1,8,8) floats in [0,1]: 1500 train / 297 test, fixed split."""
    from sklearn.datasets import load_digits as sk_load_digits  # heavy import, only when used

    bunch = sk_load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    tr, te = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    return DataSplits("digits", images[tr], labels[tr], images[te], labels[te], num_classes=10)


def load_cifar_splits(name: str, root: str, *, download: bool, verify_md5: bool) -> DataSplits:
    """CIFAR-10/100 train and test sets (uint8), from ``root`` or downloaded when allowed."""
    from robustbench_kd.data.cifar import load_cifar

    tx, ty = load_cifar(name, root, train=True, download=download, verify_md5=verify_md5)
    vx, vy = load_cifar(name, root, train=False, download=download, verify_md5=verify_md5)
    return DataSplits(name, tx, ty, vx, vy, num_classes=100 if name == "cifar100" else 10, augment_default=True)


def validation_count(val_size: float, n_train: int) -> int:
    """How many of ``n_train`` training images ``data.val_size`` holds out.

    0 -> none; a fraction in (0, 1) -> ``round(val_size * n_train)`` (at least 1); a whole number >= 1 ->
    that many images. At least one image must stay for training (UserError otherwise).
    """
    if val_size == 0:
        return 0
    if 0 < val_size < 1:
        count = max(1, round(val_size * n_train))
    elif val_size >= 1 and float(val_size).is_integer():
        count = int(val_size)
    else:
        raise UserError(f"data.val_size must be 0, a fraction in (0, 1) or a whole number of images, got {val_size!r}")
    if count >= n_train:
        raise UserError(
            f"data.val_size = {val_size} holds out {count} of the {n_train} training images; "
            "leave at least one for training (use a smaller count or fraction)"
        )
    return count


def split_validation(data: DataSplits, val_size: float, *, seed: int = VAL_SPLIT_SEED) -> DataSplits:
    """Hold out a validation split of the training set; returns a new :class:`DataSplits`.

    The held-out images are a uniformly random subset drawn from a generator seeded with ``seed`` alone
    (never the run's seed), so every run on a dataset with the same ``val_size`` validates on the same
    images and resume sees the same split. Validation images keep the random draw order (so any prefix
    is itself a random subset); the remaining training images keep the loader's order (so
    ``data.n_train``'s "first n" still means the loader's first n). The test split is not touched.
    """
    n = len(data.train_y)
    count = validation_count(val_size, n)
    if count == 0:
        return data
    if data.val_x is not None:
        raise UserError(f"dataset {data.name!r} brings its own validation split; leave data.val_size = 0")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:count], order[count:].sort().values
    return replace(
        data,
        train_x=take(data.train_x, train_idx),
        train_y=data.train_y[train_idx],
        val_x=take(data.train_x, val_idx),
        val_y=data.train_y[val_idx],
    )


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, stream) only: the basis of exact resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + stream) % (2**63 - 1))


def random_crop_flip(x: Tensor, generator: torch.Generator, *, padding: int = 4) -> Tensor:
    """Standard CIFAR augmentation on a float batch: zero-pad by ``padding``, random crop, random h-flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = flip.to(out.device)
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)


def iterate_batches(
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    augment: bool = False,
    device: torch.device | str = "cpu",
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Yield ``(x, y, index)`` batches; x float in [0,1] on ``device``.

    Args:
        shuffle: permute with ``generator`` (required for shuffle/augment).
        augment: random crop (padding 4) + horizontal flip, drawn from ``generator``.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    n = len(labels)
    if (shuffle or augment) and generator is None:
        raise ValueError("shuffle/augment need a generator (use epoch_generator)")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        x = to_float(images[idx])
        if augment:
            assert generator is not None  # checked above
            x = random_crop_flip(x, generator)
        yield x.to(device, non_blocking=True), labels[idx].to(device, non_blocking=True), idx


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last and n >= batch_size else -(-n // batch_size)
