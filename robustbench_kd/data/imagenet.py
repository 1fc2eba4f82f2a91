"""ImageNet from local class folders, decoded lazily with RobustBench's preprocessing.

ImageNet does not fit in memory as a tensor (1.28M images x 150 KB at 224x224), so the rest of the
pipeline, which indexes ``DataSplits.train_x`` like an in-memory uint8 tensor, gets a
:class:`LazyImages` container instead: ``len()``, ``.shape`` (N, 3, S, S), ``.dtype`` uint8, and
``images[index]`` for an int, a slice or an index tensor, which opens, decodes and preprocesses
only those files (in a few threads: PIL releases the GIL while decoding) and returns uint8 NCHW.
``subset(index)`` gives a lazy sub-container (validation split, ``n_train``) without decoding.

Layout: ``<data_dir>/train/<wnid>/*.JPEG`` and ``<data_dir>/val/<wnid>/*.JPEG`` (torchvision's
ImageFolder layout); class indices are the sorted folder names, as in RobustBench's
``CustomImageFolder`` (for the 1000 ImageNet wnids that is the standard 0..999 mapping). Evaluation
needs only ``val/``; training also needs ``train/``.

Test split: when ``val/`` holds RobustBench's fixed 5000-image evaluation subset
(``robustbench/helper_files/imagenet_test_image_ids.txt``, the ImageNet leaderboard protocol) the test
split is exactly those images in that file's order, as ``robustbench.data.load_imagenet`` reads them;
otherwise (a partial or custom ``val/``) it is every image of ``val/`` in sorted order, with a warning.

Preprocessing: evaluation uses RobustBench's ``Res256Crop224`` (resize the shorter side to 256,
bilinear, then center-crop 224), ``load_imagenet``'s default; ``data.preprocessing`` picks another of
RobustBench's names. Training images get the same deterministic decode, then the trainer's batch
augmentation (random 4-pixel pad-and-crop and horizontal flip, seeded per epoch) when
``data.augment`` is on; ImageNet's usual RandomResizedCrop is not applied.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.storage.bounded import open_regular

__all__ = [
    "IMG_EXTENSIONS",
    "PREPROCESSINGS",
    "LazyImages",
    "Preprocessing",
    "get_preprocessing",
    "load_imagefolder_splits",
    "timm_preprocessing",
]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
ROBUSTBENCH_TEST_IDS = "helper_files/imagenet_test_image_ids.txt"


@dataclass(frozen=True)
class Preprocessing:
    """One of ``robustbench.data.PREPROCESSINGS``, producing uint8 instead of ToTensor's floats.

    ``resize``: an int resizes the shorter side to it, a pair resizes to exactly (h, w); ``crop``: center
    crop side (torchvision pads with zeros when the image is smaller).
    """

    name: str
    size: int  #: side of the output image
    resize: int | tuple[int, int] | None = None
    crop: int | None = None
    interpolation: str = "bilinear"

    def __call__(self, image: Any) -> Tensor:
        """PIL image -> uint8 tensor (3, size, size), exactly ``PREPROCESSINGS[name](image) * 255``."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = image.convert("RGB")
        if self.resize is not None:
            size = list(self.resize) if isinstance(self.resize, tuple) else self.resize
            image = TF.resize(image, size, interpolation=InterpolationMode(self.interpolation))
        if self.crop is not None:
            image = TF.center_crop(image, [self.crop, self.crop])
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


PREPROCESSINGS = {
    p.name: p
    for p in (
        Preprocessing("Res256Crop224", 224, resize=256, crop=224),
        Preprocessing("BicubicRes256Crop224", 224, resize=256, crop=224, interpolation="bicubic"),
        Preprocessing("Res224", 224, resize=(224, 224)),
        Preprocessing("Crop288", 288, crop=288),
        # Not in robustbench's table: what its get_timm_model_preprocessing builds for the timm-registered
        # ImageNet entries (Debenedetti2022Light_XCiT-*: input 224, crop_pct 1.0, bicubic).
        Preprocessing("BicubicRes224Crop224", 224, resize=224, crop=224, interpolation="bicubic"),
    )
}


def timm_preprocessing(input_size: int, crop_pct: float, interpolation: str) -> str | None:
    """Name of the :data:`PREPROCESSINGS` entry equal to timm's eval transform, or None if there is none.

    timm (as ``robustbench.data.get_timm_model_preprocessing``) resizes the shorter side to
    floor(input_size / crop_pct) and center-crops input_size.
    """
    scale = int(input_size / crop_pct)
    for prep in PREPROCESSINGS.values():
        if (prep.resize, prep.crop, prep.interpolation) == (scale, input_size, interpolation):
            return prep.name
    return None


def get_preprocessing(name: str) -> Preprocessing:
    """The :class:`Preprocessing` called ``name`` (RobustBench's spelling), or a one-line UserError."""
    if name not in PREPROCESSINGS:
        raise UserError(
            f"unknown ImageNet preprocessing {name!r}{close_matches(name, PREPROCESSINGS)}; "
            f"valid: {', '.join(PREPROCESSINGS)}"
        )
    return PREPROCESSINGS[name]


def _decode(path: str, preprocessing: Preprocessing) -> Tensor:
    """Decode one image file; a damaged, hostile or non-regular file is a one-line UserError naming it.

    The file is opened as a regular file first (a FIFO put in place of an image would block the
    decoder forever); PIL refuses images of absurd pixel counts (decompression bombs) by itself.
    """
    import struct

    from PIL import Image

    # PIL's decoders raise these for damaged files (UnidentifiedImageError is an OSError), and
    # DecompressionBombError (an Exception) for an image whose header claims billions of pixels.
    damaged = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
    handle = os.fdopen(open_regular(path, what="image"), "rb")  # outside the try: UserError is a ValueError
    try:
        with handle, Image.open(handle) as image:
            return preprocessing(image)
    except damaged as exc:
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"cannot read image {path} ({type(exc).__name__}: {detail}); remove or replace it") from None


class LazyImages:
    """Image files that index like a uint8 (N, 3, S, S) tensor, decoding only what is indexed.

    Args:
        paths: image files, in dataset order.
        preprocessing: decode + resize/crop to (3, S, S) uint8.
        workers: decoding threads per indexing call (default: min(8, CPU count)).
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, paths: Sequence[str], preprocessing: Preprocessing, *, workers: int | None = None) -> None:
        self.paths = list(paths)
        self.preprocessing = preprocessing
        self.workers = workers or min(8, os.cpu_count() or 1)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> torch.Size:
        side = self.preprocessing.size
        return torch.Size((len(self.paths), 3, side, side))

    def _positions(self, index: Any) -> list[int]:
        if isinstance(index, slice):
            return list(range(len(self.paths)))[index]
        if isinstance(index, Tensor):
            if index.dtype == torch.bool:
                index = index.nonzero().flatten()
            return index.tolist()
        return [int(i) for i in np.asarray(index).ravel()]

    def subset(self, index: Any) -> LazyImages:
        """A lazy container of the indexed images (nothing is decoded)."""
        return LazyImages([self.paths[i] for i in self._positions(index)], self.preprocessing, workers=self.workers)

    def __getitem__(self, index: Any) -> Tensor:
        """Decode: an int gives (3, S, S), a slice / index tensor / sequence gives (n, 3, S, S) uint8."""
        if isinstance(index, (int, np.integer)) or (isinstance(index, Tensor) and index.ndim == 0):
            return _decode(self.paths[int(index)], self.preprocessing)
        paths = [self.paths[i] for i in self._positions(index)]
        if not paths:
            side = self.preprocessing.size
            return torch.empty((0, 3, side, side), dtype=torch.uint8)
        if self.workers > 1 and len(paths) > 1:
            with ThreadPoolExecutor(min(self.workers, len(paths))) as pool:
                images = list(pool.map(lambda p: _decode(p, self.preprocessing), paths))
        else:
            images = [_decode(p, self.preprocessing) for p in paths]
        return torch.stack(images)

    def __repr__(self) -> str:
        return f"LazyImages({len(self.paths)} files, {self.preprocessing.name})"


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir())


def _scan(split_dir: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """Every image under ``split_dir/<class>/``, classes in index order, files sorted by name."""
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            entry.name
            for entry in os.scandir(split_dir / name)
            if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS)
        )
        paths += [str(split_dir / name / f) for f in files]
        labels += [label] * len(files)
    return paths, labels


def _robustbench_test_ids() -> list[str] | None:
    """RobustBench's 5000 ``<wnid>/<file>`` evaluation ids, read without importing robustbench."""
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        return None
    ids_file = Path(next(iter(spec.submodule_search_locations))) / ROBUSTBENCH_TEST_IDS
    if not ids_file.is_file():
        return None
    return [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]


def _test_split(val_dir: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    index = {name: i for i, name in enumerate(classes)}
    ids = _robustbench_test_ids()
    if ids and all(i.split("/")[0] in index and (val_dir / i).is_file() for i in ids):
        return [str(val_dir / i) for i in ids], [index[i.split("/")[0]] for i in ids]
    paths, labels = _scan(val_dir, classes)
    log.warning(
        "%s does not hold RobustBench's 5000-image ImageNet evaluation subset (%s); the test split is "
        "all %d images of it, so accuracies are not comparable with the leaderboard",
        val_dir,
        ROBUSTBENCH_TEST_IDS,
        len(paths),
    )
    return paths, labels


def load_imagefolder_splits(name: str, root: str | Path, *, preprocessing: str = "Res256Crop224") -> Any:
    """``root/train`` and ``root/val`` class folders as a :class:`~robustbench_kd.data.datasets.DataSplits`.

    Images are :class:`LazyImages` (nothing decoded here); labels int64 tensors. ``val/`` alone is
    enough for evaluation (what most ImageNet users have): the train split is then empty and
    ``DataSplits.missing_train`` says that training needs ``train/``. A missing ``val/``, class folders
    that differ between the splits, and empty splits are one-line UserErrors.
    """
    from robustbench_kd.data.datasets import DataSplits

    prep = get_preprocessing(preprocessing)
    root = Path(root).expanduser()
    dirs = {split: root / split for split in ("train", "val")}
    layout = "each with one folder of images per class (e.g. {}/n01440764/*.JPEG)"
    if not dirs["val"].is_dir():
        raise UserError(
            f"{name}: {dirs['val']} is not a directory; data.data_dir must hold val/ (and train/ for "
            f"training), " + layout.format(dirs["val"])
        )
    val_classes = _class_folders(dirs["val"])
    missing_train = None
    if dirs["train"].is_dir():
        classes = _class_folders(dirs["train"])
        if not classes:
            raise UserError(f"{name}: {dirs['train']} has no class folders")
        if val_classes != classes:
            odd = sorted(set(classes) ^ set(val_classes))
            raise UserError(
                f"{name}: train/ has {len(classes)} class folders and val/ {len(val_classes)}; they must "
                f"be the same (e.g. {odd[0] if odd else 'the order differs'} is in only one)"
            )
        train_paths, train_labels = _scan(dirs["train"], classes)
    else:
        # Evaluation reads only val/; the classes (and their indices) are its folders.
        classes, train_paths, train_labels = val_classes, [], []
        missing_train = (
            f"{name}: {dirs['train']} is not a directory; training needs data.data_dir/train/, "
            + layout.format(dirs["train"])
            + " (evaluation needs only val/)"
        )
        if not classes:
            raise UserError(f"{name}: {dirs['val']} has no class folders")
    test_paths, test_labels = _test_split(dirs["val"], classes)
    # LazyImages stands in for a uint8 image tensor: it indexes, has len, shape, ndim and dtype like one.
    train_x = cast(torch.Tensor, LazyImages(train_paths, prep))
    test_x = cast(torch.Tensor, LazyImages(test_paths, prep))
    return DataSplits(
        name,
        train_x,
        torch.tensor(train_labels, dtype=torch.int64),
        test_x,
        torch.tensor(test_labels, dtype=torch.int64),
        num_classes=len(classes),
        augment_default=True,
        missing_train=missing_train,
    )
