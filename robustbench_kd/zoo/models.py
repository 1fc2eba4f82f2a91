"""RobustBench model-zoo teachers by name, without surprise downloads.

``robustbench.utils.load_model`` silently calls Google Drive when a checkpoint is missing, and
reports unknown names as a bare ``KeyError``. :func:`load_zoo_model` checks everything it can
first (dataset, threat model, name, files on disk) and only then delegates to ``load_model``, so
that with ``allow_download=False`` a missing file is a one-line :class:`UserError` and never a
network call.

Importing this module does not import robustbench (that takes seconds); the functions do.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robustbench_kd.errors import UserError, close_matches

if TYPE_CHECKING:
    import torch

__all__ = [
    "DATASETS",
    "THREAT_MODELS",
    "expected_checkpoint_paths",
    "load_zoo_model",
    "parse_zoo_ref",
    "zoo_input_size",
    "zoo_names",
    "zoo_preprocessing",
]

logger = logging.getLogger(__name__)

# Values of robustbench.model_zoo.enums.BenchmarkDataset / ThreatModel, duplicated so that
# validating a reference does not need robustbench imported.
DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions", "corruptions_3d")

_REF_FORM = "<dataset>/<threat_model>/<name>, e.g. cifar10/Linf/Carmon2019Unlabeled"


def _canonical(kind: str, value: str, choices: tuple[str, ...]) -> str:
    """Return the canonical spelling of ``value`` (case-insensitive) or raise UserError."""
    for choice in choices:
        if str(value).lower() == choice.lower():
            return choice
    raise UserError(f"unknown {kind} {value!r}{close_matches(str(value), choices)}; valid: {', '.join(choices)}")


def parse_zoo_ref(ref: str) -> tuple[str, str, str]:
    """Split ``"cifar10/Linf/Carmon2019Unlabeled"`` into ``(dataset, threat_model, name)``.

    Dataset and threat model are matched case-insensitively and returned in RobustBench's
    spelling. The name is not checked against the zoo here (see :func:`load_zoo_model`).
    """
    parts = str(ref).strip().split("/")
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise UserError(f"bad model-zoo reference {ref!r}: expected {_REF_FORM}")
    dataset, threat, name = (p.strip() for p in parts)
    return (_canonical("dataset", dataset, DATASETS), _canonical("threat model", threat, THREAT_MODELS), name)


def _zoo_dict(dataset: str, threat_model: str) -> tuple[str, str, dict[str, Any]]:
    """Canonical (dataset, threat) and robustbench's name -> entry dict for that leaderboard.

    ``corruptions_3d`` shares the ``corruptions`` entries, as in ``load_model``.
    """
    dataset = _canonical("dataset", dataset, DATASETS)
    threat = _canonical("threat model", threat_model, THREAT_MODELS)
    from robustbench_kd.zoo.compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    by_threat = model_dicts[BenchmarkDataset(dataset)]
    folder = threat.replace("_3d", "")
    try:
        entries = by_threat[ThreatModel(folder)]
    except KeyError:
        available = ", ".join(t.value for t in by_threat)
        raise UserError(f"RobustBench has no {dataset}/{threat} model zoo; {dataset} has: {available}") from None
    return dataset, folder, entries


def zoo_names(dataset: str, threat_model: str) -> list[str]:
    """Names in RobustBench's model zoo for ``dataset``/``threat_model``, in leaderboard-file order."""
    return list(_zoo_dict(dataset, threat_model)[2])


def _lookup(name: str, dataset: str, threat_model: str) -> tuple[str, str, dict[str, Any]]:
    dataset, folder, entries = _zoo_dict(dataset, threat_model)
    if name not in entries:
        raise UserError(
            f"unknown {dataset}/{threat_model} model-zoo name {name!r}{close_matches(name, entries)}; "
            f"{len(entries)} names exist (robustbench_kd.zoo.models.zoo_names({dataset!r}, {threat_model!r}) "
            "lists them)"
        )
    return dataset, folder, entries[name]


def zoo_preprocessing(name: str, *, dataset: str, threat_model: str) -> str | None:
    """The preprocessing RobustBench evaluates this ImageNet entry with (``robustbench.data.get_preprocessing``).

    A name of ``robustbench_kd.data.imagenet.PREPROCESSINGS`` (``Res256Crop224``, ``Crop288``, ...): the
    entry's ``preprocessing`` field, or for timm-registered entries the table entry equal to timm's eval
    transform. None for CIFAR (plain ToTensor), and for a timm transform the table lacks.
    """
    dataset, folder, entry = _lookup(name, dataset, threat_model)
    if dataset != "imagenet":
        return None
    timm_name = _timm_name(name, dataset, folder)
    if timm_name is not None:
        import timm.models

        from robustbench_kd.data.imagenet import timm_preprocessing

        cfg = timm.models.get_pretrained_cfg(timm_name)
        return timm_preprocessing(int(cfg.input_size[-1]), float(cfg.crop_pct), str(cfg.interpolation))
    return entry.get("preprocessing") or "Res256Crop224"


def zoo_input_size(name: str, *, dataset: str, threat_model: str) -> int | None:
    """Side of the square inputs this ImageNet entry was evaluated on (224, or 288 for ``Crop288``).

    For timm-registered entries it is timm's ``input_size``. None for CIFAR models (32x32, and they accept
    any size through their normalisation-free forward).
    """
    dataset, folder, _ = _lookup(name, dataset, threat_model)
    if dataset != "imagenet":
        return None
    timm_name = _timm_name(name, dataset, folder)
    if timm_name is not None:
        import timm.models

        return int(timm.models.get_pretrained_cfg(timm_name).input_size[-1])
    from robustbench_kd.data.imagenet import get_preprocessing

    preprocessing = zoo_preprocessing(name, dataset=dataset, threat_model=threat_model)
    return None if preprocessing is None else get_preprocessing(preprocessing).size


def _timm_name(name: str, dataset: str, folder: str) -> str | None:
    """The timm model name ``load_model`` would use for this entry, or None if it is not timm's."""
    import timm

    candidate = f"{name.lower().replace('-', '_')}_{dataset.lower()}_{folder.lower()}"
    return candidate if timm.is_model(candidate) else None


def _hub_cache_path(url: str) -> Path:
    from urllib.parse import urlparse

    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _hub_paths(name: str, dataset: str, folder: str) -> list[Path] | None:
    """Torch-hub cache files for entries whose weights do not live in ``model_dir``, else None.

    Two kinds: timm-registered names (XCiT, DeiT, AlexNet), which ``load_model`` creates with
    ``pretrained=True``, and ImageNet ``Standard_R50``, which torchvision downloads itself.
    """
    timm_name = _timm_name(name, dataset, folder)
    if timm_name is not None:
        import timm.models

        url = getattr(timm.models.get_pretrained_cfg(timm_name), "url", None) or ""
        return [_hub_cache_path(url)] if url else []
    if dataset == "imagenet" and "Standard" in name:
        if name == "Standard_R50":
            from torchvision.models import ResNet50_Weights

            return [_hub_cache_path(ResNet50_Weights.IMAGENET1K_V1.url)]
        return []
    return None


def expected_checkpoint_paths(model_dir: str | Path, dataset: str, threat_model: str, name: str) -> list[Path]:
    """Files ``robustbench.utils.load_model`` reads for this zoo entry.

    ``<model_dir>/<dataset>/<threat>/<name>.pt``; for ensembles (``gdrive_id`` is a list) one
    ``<name>.pt_m{i}.pt`` per member; ``corruptions_3d`` uses the ``corruptions`` folder. Entries
    whose weights come from a hub instead (timm-registered names, ImageNet ``Standard_R50``) map to
    their torch-hub cache file, or to ``[]`` when that location cannot be known in advance.
    """
    dataset, folder, entry = _lookup(name, dataset, threat_model)
    hub = _hub_paths(name, dataset, folder)
    if hub is not None:
        return hub
    base = Path(model_dir) / dataset / folder / f"{name}.pt"
    gdrive_id = entry.get("gdrive_id")
    if isinstance(gdrive_id, (list, tuple)):
        return [Path(f"{base}_m{i}.pt") for i in range(len(gdrive_id))]
    return [base]


def _checkpoint_problem(path: Path) -> str | None:
    """Say why ``path`` cannot be a ``torch.save`` file, or None if it looks like one.

    Only reads the header and the zip directory, so it costs milliseconds even for 150 MB files.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not head:
        return "is empty"
    if head.lstrip().startswith(b"<") or b"<html" in head.lower():
        return "is an HTML page, not a checkpoint (typically a failed Google Drive download)"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except zipfile.BadZipFile:
            return "is a truncated or corrupt zip archive (an interrupted download?)"
        return None
    if head[:1] == b"\x80":  # pickle protocol marker of the legacy (pre-1.6) torch.save format
        return None
    return "is not a PyTorch checkpoint (unrecognised file header)"


def _refetch_hint(paths: list[Path]) -> str:
    return f"delete {' '.join(str(p) for p in paths)} and download it again"


def _fetch_hint(name: str, dataset: str, threat_model: str, model_dir: Path) -> str:
    return (
        f"download it on a machine with internet via robustbench.utils.load_model({name!r}, "
        f"model_dir={str(model_dir)!r}, dataset={dataset!r}, threat_model={threat_model!r}) and copy "
        "it there, or pass allow_download=True"
    )


def load_zoo_model(
    name: str,
    *,
    dataset: str,
    threat_model: str,
    model_dir: str | Path,
    allow_download: bool = False,
    sha256: tuple[str, ...] | list[str] = (),
) -> torch.nn.Module:
    """Load RobustBench zoo model ``name`` (inputs in [0,1], logits out), in eval mode.

    Checks, in order, each failing with a one-line :class:`UserError`: dataset and threat model;
    the name (with close matches); that every expected checkpoint file exists (unless
    ``allow_download``; no network access is attempted before this check); that existing files look
    like checkpoints (an HTML page from a failed download is caught here). Then calls
    ``robustbench.utils.load_model``; unpickling and state-dict errors are re-raised as UserError
    naming the file. Download failures (with ``allow_download=True``) are UserErrors too.

    Safety: ``load_model`` runs inside :func:`robustbench_kd.storage.checkpoint.weights_only_loads`, so every
    ``torch.load`` it (or timm/torch hub under it) makes is ``weights_only=True`` whatever the torch
    version or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say: a crafted pickle is refused, never executed.
    ``sha256`` pins the digest of each expected file (:func:`expected_checkpoint_paths` order); files
    on disk are checked before ``load_model`` reads them, a file it downloads right after the download.
    """
    dataset, folder, entry = _lookup(name, dataset, threat_model)
    model_dir = Path(model_dir)
    if entry.get("gdrive_id") is None and _timm_name(name, dataset, folder) is None:
        raise UserError(
            f"{dataset}/{threat_model}/{name} has no downloadable checkpoint in RobustBench 1.1.1; pick another teacher"
        )
    paths = expected_checkpoint_paths(model_dir, dataset, threat_model, name)
    hub = _hub_paths(name, dataset, folder) is not None
    missing = [p for p in paths if not p.is_file()]
    if hub and not paths and not allow_download:
        raise UserError(
            f"{dataset}/{threat_model}/{name} is fetched from a model hub at load time; pass allow_download=True"
        )
    if missing and not allow_download:
        where = " ".join(str(p) for p in missing)
        if hub:
            raise UserError(
                f"{dataset}/{threat_model}/{name} needs the hub weights file {where} "
                "(torch hub cache; set TORCH_HOME to move it); load it once with "
                "allow_download=True on a machine with internet and copy the file there"
            )
        raise UserError(
            f"checkpoint for {dataset}/{threat_model}/{name} not found: expected {where}; "
            f"{_fetch_hint(name, dataset, threat_model, model_dir)}"
        )
    for path in paths:
        if path.is_file() and (problem := _checkpoint_problem(path)) is not None:
            raise UserError(f"checkpoint {path} {problem}; {_refetch_hint([path])}")
    from robustbench_kd.storage.checkpoint import verify_sha256_all, weights_only_loads

    ref = f"{dataset}/{threat_model}/{name}"
    if sha256:
        if not paths:
            raise UserError(
                f"{ref} is fetched from a model hub to a location not known in advance; "
                "its file cannot be pinned with sha256"
            )
        verify_sha256_all(paths, list(sha256), what=ref, skip_missing=True)
    if missing:
        logger.info("downloading %s for %s/%s/%s", " ".join(map(str, missing)), dataset, threat_model, name)
    with weights_only_loads():
        model = _call_load_model(name, dataset, threat_model, model_dir, paths, downloading=bool(missing))
    if sha256 and missing:  # downloaded just now: loaded weights_only, but refuse a file that is not the pinned one
        verify_sha256_all(paths, list(sha256), what=ref)
    return model


def _call_load_model(
    name: str, dataset: str, threat_model: str, model_dir: Path, paths: list[Path], *, downloading: bool
) -> torch.nn.Module:
    from urllib.error import URLError

    import requests
    from robustbench.utils import load_model

    network_errors: tuple[type[BaseException], ...] = (requests.exceptions.RequestException, URLError)
    try:
        from gdown.exceptions import FileURLRetrievalError

        network_errors += (FileURLRetrievalError,)
    except ImportError:  # older gdown: its errors surface as requests exceptions
        pass
    ref = f"{dataset}/{threat_model}/{name}"
    try:
        model = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except network_errors as exc:
        if not downloading:
            raise
        raise UserError(
            f"downloading the checkpoint for {ref} failed ({type(exc).__name__}); "
            f"{_fetch_hint(name, dataset, threat_model, model_dir)}"
        ) from exc
    except (pickle.UnpicklingError, EOFError) as exc:
        bad = [p for p in paths if p.is_file() and _checkpoint_problem(p)] or paths
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"checkpoint {' '.join(map(str, bad))} for {ref} cannot be unpickled "
            f"({detail}); it is corrupt or holds non-tensor objects that "
            f"torch.load(weights_only=True) refuses: {_refetch_hint(bad)}"
        ) from exc
    except RuntimeError as exc:
        message = str(exc)
        first = message.strip().splitlines()[0][:200] if message.strip() else type(exc).__name__
        if "state_dict" in message:
            raise UserError(
                f"checkpoint {' '.join(map(str, paths))} does not match the {ref} "
                f"architecture ({first}); {_refetch_hint(paths)}"
            ) from exc
        if "NVIDIA driver" in message or "CUDA" in message:
            raise UserError(
                f"{ref} builds CUDA tensors in its constructor and cannot be loaded without a GPU ({first})"
            ) from exc
        raise UserError(
            f"checkpoint {' '.join(map(str, paths))} for {ref} cannot be loaded ({first}); {_refetch_hint(paths)}"
        ) from exc
    return model.eval()
