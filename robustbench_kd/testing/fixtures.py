"""Offline fixtures for tests and plugin authors: tiny CIFAR files, random zoo checkpoints.

Nothing here touches the network. The files written follow the exact on-disk layouts that
torchvision and ``robustbench.utils.load_model`` read, so code under test goes through the real
loading paths.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustbench_kd.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["make_tiny_cifar", "patch_cifar_integrity", "save_random_zoo_checkpoint", "tiny_zoo_entry"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _dump(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def make_tiny_cifar(
    root: str | Path, *, dataset: str = "cifar10", n_train_per_batch: int = 20, n_test: int = 50, seed: int = 0
) -> Path:
    """Write a small random CIFAR-10 or CIFAR-100 in the official pickle layout; return ``root``.

    CIFAR-10: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``, so the
    train split has ``5 * n_train_per_batch`` images. CIFAR-100: ``<root>/cifar-100-python/{train,
    test,meta}`` with the same ``5 * n_train_per_batch`` train images. Pixels and labels are uniform
    random (deterministic in ``seed``). The files do not match torchvision's MD5 sums: load them
    with ``load_cifar(..., verify_md5=False)`` or inside :func:`patch_cifar_integrity`.
    """
    import numpy as np

    if dataset not in ("cifar10", "cifar100"):
        raise UserError(f"make_tiny_cifar: unknown dataset {dataset!r}; valid: cifar10, cifar100")
    if n_train_per_batch < 1 or n_test < 1:
        raise UserError("make_tiny_cifar: n_train_per_batch and n_test must be >= 1")
    rng = np.random.default_rng(seed)
    root = Path(root)

    def pixels(n: int) -> Any:
        # One row per image: 1024 red, 1024 green, 1024 blue values, each plane 32x32 row-major.
        return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)

    def names(n: int, split: str) -> list[str]:
        return [f"{split}_{i:05d}.png" for i in range(n)]

    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            _dump(
                {
                    "batch_label": f"training batch {i} of 5",
                    "labels": rng.integers(0, 10, n_train_per_batch).tolist(),
                    "data": pixels(n_train_per_batch),
                    "filenames": names(n_train_per_batch, f"b{i}"),
                },
                folder / f"data_batch_{i}",
            )
        _dump(
            {
                "batch_label": "testing batch 1 of 1",
                "labels": rng.integers(0, 10, n_test).tolist(),
                "data": pixels(n_test),
                "filenames": names(n_test, "test"),
            },
            folder / "test_batch",
        )
        _dump(
            {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": n_train_per_batch, "num_vis": 3072},
            folder / "batches.meta",
        )
        return root

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 5 * n_train_per_batch), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        _dump(
            {
                "batch_label": f"{split}ing batch 1 of 1",
                "fine_labels": fine.tolist(),
                "coarse_labels": (fine // 5).tolist(),
                "data": pixels(n),
                "filenames": names(n, split),
            },
            folder / split,
        )
    _dump(
        {
            "fine_label_names": [f"fine_{i:02d}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i:02d}" for i in range(20)],
        },
        folder / "meta",
    )
    return root


def _entry(name: str, dataset: str, threat_model: str) -> tuple[str, str, dict[str, Any]]:
    from robustbench_kd.zoo import models as zoo

    return zoo._lookup(name, dataset, threat_model)


def _to_disk_dict(state_dict: dict[str, torch.Tensor], half: bool, prefix: str) -> dict[str, Any]:
    # load_model strips 'module.' / 'model.' by chopping the first 7 / 6 characters of any key that
    # contains them anywhere; a prefix that contains each substring exactly where it is chopped
    # makes every key come back intact, whatever the architecture's own key names are.
    return {
        prefix + key: (value.half() if half and value.is_floating_point() else value)
        for key, value in state_dict.items()
    }


def save_random_zoo_checkpoint(
    model_dir: str | Path,
    name: str,
    *,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    half: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Save a randomly initialised copy of zoo entry ``name`` where ``load_model`` looks for it.

    The real architecture is built by the zoo entry's own factory under ``torch.manual_seed(seed)``
    (the caller's RNG state is preserved), so ``load_zoo_model`` then exercises the real loading
    path offline. ``half=True`` stores floating tensors as fp16 (half the disk size; loading casts
    them back, so outputs match only to fp16 precision). Ensemble entries get one file per member.
    Returns the paths written. CIFAR entries only; timm-served names and the CUDA-only
    ``Bai2023Improving``/``Bai2024MixedNUTS`` ensembles are refused with :class:`UserError`.
    """
    import torch

    from robustbench_kd.zoo import models as zoo

    dataset, folder, entry = _entry(name, dataset, threat_model)
    ref = f"{dataset}/{threat_model}/{name}"
    if dataset == "imagenet":
        raise UserError(f"save_random_zoo_checkpoint: {ref}: only CIFAR entries are supported")
    if zoo._hub_paths(name, dataset, folder) is not None:
        raise UserError(f"save_random_zoo_checkpoint: {ref} is loaded through timm's hub, not model_dir")
    if entry.get("gdrive_id") is None:
        raise UserError(f"save_random_zoo_checkpoint: {ref} has no checkpoint in RobustBench")
    if name.startswith(("Bai2023Improving", "Bai2024MixedNUTS")):
        raise UserError(f"save_random_zoo_checkpoint: {ref} has a composite checkpoint format that is not supported")
    paths = zoo.expected_checkpoint_paths(model_dir, dataset, threat_model, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry["model"]()
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    if isinstance(entry["gdrive_id"], (list, tuple)):
        # The ensemble branch of load_model strips only 'module.' and loads model.models[i].
        for i, path in enumerate(paths):
            torch.save(_to_disk_dict(model.models[i].state_dict(), half, "module."), path)
        return paths
    payload: dict[str, Any] = _to_disk_dict(model.state_dict(), half, "module.model.")
    if "Kireev2021Effectiveness" in name or name == "Andriushchenko2020Understanding":
        payload = {"last": payload}  # load_model reads checkpoint['last'] for these two
    torch.save(payload, paths[0])
    return paths


@contextlib.contextmanager
def patch_cifar_integrity() -> Iterator[None]:
    """Make torchvision's CIFAR classes accept any files that exist, for the duration of the block.

    Needed for ``robustbench.data.load_cifar10/100`` and ``robustbench.eval.benchmark``, which
    construct ``torchvision.datasets.CIFAR10(..., download=True)`` themselves: with the patch the
    MD5 checks pass for fixture files, so no download is attempted. Without the MD5 check nothing
    vouches for the files, so torchvision's ``pickle.load`` is replaced too, by the loader that never
    runs code (:mod:`robustbench_kd.storage.safe_pickle`). Both are restored on exit.
    """
    import torchvision.datasets.cifar as tv_cifar

    original, original_pickle = tv_cifar.check_integrity, tv_cifar.pickle

    def exists_only(fpath: str, md5: str | None = None) -> bool:
        return os.path.isfile(fpath)

    tv_cifar.check_integrity = exists_only
    tv_cifar.pickle = _SafePickleModule  # type: ignore[assignment]  # only .load is used there
    try:
        yield
    finally:
        tv_cifar.check_integrity, tv_cifar.pickle = original, original_pickle


class _SafePickleModule:
    """Stands in for the ``pickle`` module inside torchvision's CIFAR code: ``load`` never runs code."""

    @staticmethod
    def load(handle: Any, encoding: str = "latin1") -> Any:
        return _load_batch(Path(handle.name), encoding=encoding)


def _load_batch(path: Path, encoding: str = "latin1") -> Any:
    """A CIFAR pickle file read without running code, its arrays as plain ``np.ndarray``."""
    import numpy as np

    from robustbench_kd.storage.bounded import MiB
    from robustbench_kd.storage.safe_pickle import load_pickle

    batch = load_pickle(
        path,
        limit=256 * MiB,
        what="CIFAR file",
        fix="write it with make_tiny_cifar",
        kind="CIFAR pickles",
        encoding=encoding,
    )
    if isinstance(batch, dict):
        batch = {k: np.asarray(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
    return batch


@contextlib.contextmanager
def tiny_zoo_entry(
    name: str, factory: Callable[[], torch.nn.Module], *, dataset: str = "cifar10", threat_model: str = "Linf"
) -> Iterator[dict[str, Any]]:
    """Register ``{'model': factory, 'gdrive_id': 'offline-test'}`` as zoo entry ``name`` in the block.

    Lets ``load_zoo_model``/``load_model`` load a KB-sized model from
    ``<model_dir>/<dataset>/<threat>/<name>.pt`` (write it with ``torch.save(net.state_dict(), path)``
    or :func:`save_random_zoo_checkpoint`). A previous entry of that name is restored on exit.
    Keys of a plain ``torch.save(state_dict)`` must not contain ``module.`` or ``model.``, which
    ``load_model`` mangles; :func:`save_random_zoo_checkpoint` compensates for that. Yields the entry.
    """
    from robustbench_kd.zoo import models as zoo

    _, _, entries = zoo._zoo_dict(dataset, threat_model)
    entry: dict[str, Any] = {"model": factory, "gdrive_id": "offline-test"}
    missing = object()
    previous = entries.get(name, missing)
    entries[name] = entry
    try:
        yield entry
    finally:
        if previous is missing:
            entries.pop(name, None)
        else:
            entries[name] = previous


#: ``model_info/cifar10/Linf/Carmon2019Unlabeled.json`` of RobustBench, written out by hand (a copy
#: of the file in RobustBench's repository): the reference for the key set, key order and value types of a
#: leaderboard entry.
CARMON2019_MODEL_INFO: dict = {
    "link": "https://arxiv.org/abs/1905.13736",
    "name": "Unlabeled Data Improves Adversarial Robustness",
    "authors": "Yair Carmon, Aditi Raghunathan, Ludwig Schmidt, Percy Liang, John C. Duchi",
    "additional_data": True,
    "number_forward_passes": 1,
    "dataset": "cifar10",
    "venue": "NeurIPS 2019",
    "architecture": "WideResNet-28-10",
    "eps": "8/255",
    "clean_acc": "89.69",
    "reported": "62.5",
    "autoattack_acc": "59.53",
    "unreliable": False,
}


def relabel_to_predictions(
    data_root: str | os.PathLike[str], model: torch.nn.Module, *, steps: int = 100
) -> torch.Tensor:
    """Fit ``model`` briefly to a tiny CIFAR-10 test batch, then make its predictions the batch's labels.

    For fast AutoAttack tests on CPU: a random CNN predicts one class for every noise image and cannot be
    moved off it, so AutoAttack would spend its whole budget; a few Adam steps make the predictions vary
    and easy to flip, and with the predictions as labels the clean accuracy is 100%, so AutoAttack has
    every point to attack. Rewrites ``<data_root>/cifar-10-batches-py/test_batch`` (made by
    :func:`make_tiny_cifar`); returns its images in [0, 1]; ``model`` is left in eval mode.
    """
    import torch

    path = Path(data_root) / "cifar-10-batches-py" / "test_batch"
    batch = _load_batch(path)
    x = torch.as_tensor(batch["data"]).reshape(-1, 3, 32, 32).float() / 255
    targets = torch.arange(len(x)) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):  # fewer steps leave every prediction on one class
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), targets).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        batch["labels"] = model(x).argmax(1).tolist()
    _dump(batch, path)
    return x
