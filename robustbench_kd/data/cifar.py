"""CIFAR-10/100 as whole tensors, for the trainer and the evaluator.

Reads torchvision's on-disk layout (``<root>/cifar-10-batches-py`` or ``<root>/cifar-100-python``)
straight into memory: the whole split is 150 MB of uint8 at most, and skipping torchvision's
per-image PIL transforms makes loading take well under a second.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from robustbench_kd.errors import UserError, close_matches

if TYPE_CHECKING:
    import torch
    from torchvision.datasets import CIFAR10

__all__ = ["CIFAR_DIRS", "load_cifar"]

# Folder torchvision extracts each archive into, under ``root``.
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _dataset_class(name: str, verify_md5: bool) -> type[CIFAR10]:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100
    if verify_md5:
        return base

    # torchvision MD5-checks every file on construction, whatever ``download`` says; with md5=None
    # its check_integrity only tests that the file exists, so unofficial copies (test fixtures,
    # re-packed subsets) load. The archive checksum (tgz_md5) is kept for real downloads.
    # The lists and dict replace torchvision's class attributes of the same shape (hence mutable).
    class _Unverified(base):  # type: ignore[valid-type, misc]  # a class chosen at run time
        train_list = [[entry[0], None] for entry in base.train_list]  # noqa: RUF012
        test_list = [[entry[0], None] for entry in base.test_list]  # noqa: RUF012
        meta = {**base.meta, "md5": None}  # noqa: RUF012

    _Unverified.__name__ = _Unverified.__qualname__ = f"Unverified{base.__name__}"
    return _Unverified


def _canonical_name(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in CIFAR_DIRS:
        raise UserError(
            f"unknown CIFAR dataset {name!r}{close_matches(str(name), CIFAR_DIRS)}; valid: {', '.join(CIFAR_DIRS)}"
        )
    return key


def load_cifar(
    name: str, root: str | Path, *, train: bool, download: bool = False, verify_md5: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a CIFAR split as ``(images, labels)``.

    ``images`` is uint8 of shape (N, 3, 32, 32) in torchvision's order; ``labels`` is int64 (N,)
    (fine labels for CIFAR-100). ``name`` is ``cifar10`` or ``cifar100`` (``CIFAR-10`` etc. accepted).
    With ``download=True`` the official archive is fetched into ``root`` when missing.
    ``verify_md5=False`` accepts files that exist but are not the official ones (e.g. the fixtures
    of :mod:`robustbench_kd.testing.fixtures`). Missing or corrupt data raises :class:`UserError`
    naming the directory and files involved.
    """
    import torch

    name = _canonical_name(name)
    root = Path(root).expanduser()
    folder = root / CIFAR_DIRS[name]
    cls = _dataset_class(name, verify_md5)
    if not download:
        if not folder.is_dir():
            raise UserError(
                f"{name} not found: expected the directory {folder} (torchvision layout); "
                "pass download=True on a machine with internet to fetch it"
            )
        needed = [entry[0] for entry in (*cls.train_list, *cls.test_list)] + [cls.meta["filename"]]
        missing = [f for f in needed if not (folder / f).is_file()]
        if missing:
            raise UserError(
                f"{name} in {folder} is incomplete: missing {', '.join(missing)}; "
                "delete the directory and fetch it again with download=True"
            )
    try:
        dataset = cls(root=str(root), train=train, download=download)
    except RuntimeError as exc:
        # Every file exists (or download just wrote them), so this is torchvision's MD5 check.
        hint = (
            "pass verify_md5=False if this is a deliberate non-official copy, otherwise delete "
            f"{folder} and fetch it again with download=True"
        )
        raise UserError(f"{name} files in {folder} fail torchvision's MD5 check ({exc}); {hint}") from exc
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
        raise UserError(
            f"{name} files in {folder} cannot be read as CIFAR pickles "
            f"({type(exc).__name__}: {exc}); delete {folder} and fetch it again"
        ) from exc
    except OSError as exc:  # urllib.error.URLError is an OSError: the download itself failed
        raise UserError(
            f"downloading {name} into {root} failed ({exc}); on a machine without internet "
            f"copy the extracted {CIFAR_DIRS[name]} directory into {root}"
        ) from exc
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    if images.dtype != torch.uint8 or images.shape[1:] != (3, 32, 32) or len(labels) != len(images):
        raise UserError(
            f"{name} in {folder} has unexpected content: images {tuple(images.shape)} "
            f"{images.dtype}, {len(labels)} labels; delete it and fetch it again"
        )
    return images, labels
