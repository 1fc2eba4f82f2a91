"""Per-point results: for every evaluated test point, whether the model is correct under each attack.

An accuracy is a mean over test points; two models evaluated on the same points can be compared point by
point (a paired test), which is far more sensitive than comparing two means. Every evaluation that writes
``results/<id>.json`` therefore also writes ``results/<id>.points.safetensors`` beside it:

* tensor ``index`` (int64 [n]): the position of each point in the test set (the leaderboard evaluates the
  first ``n`` test points, so this is ``0..n-1``; merged shards give the same file as one unsharded run);
* one bool tensor [n] per attack key of ``results/<id>.json``'s ``accuracy`` (``clean``, ``fgsm``,
  ``pgd-20``, ``cw-20``, ``autoattack``, ...): correct under that attack;
* one bool tensor [n] per AutoAttack stage, ``autoattack/apgd-ce``, ``autoattack/apgd-t``, ...: still
  robust after that attack and the ones before it (AutoAttack's own verdict; absent when the run could
  not tell, see :mod:`robustbench_kd.evaluation.autoattack_stages`);
* metadata (strings): the format, the model id, and a JSON object ``settings`` with everything the
  outcomes depend on besides the model: dataset, norm, eps, the SHA-256 of the evaluated inputs and
  labels, the attack keys, PGD/CW steps and step size, the AutoAttack version and backend, the attack seed
  and batch size.

safetensors because the file is read back by comparisons of other people's runs: loading it runs no code,
its header is bounded, and it is a format every framework reads. :func:`pairing_problem` says why two
files cannot be paired (other points, eps or attack settings); the comparison refuses such pairs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_bytes
from robustbench_kd.storage.bounded import MiB, check_structure, read_bytes_bounded
from robustbench_kd.threat import format_eps
from robustbench_kd.zoo.names import validate_model_id

__all__ = [
    "POINTS_FORMAT",
    "POINTS_SUFFIX",
    "PointResults",
    "pairing_problem",
    "points_from_result",
    "points_path",
    "read_points",
    "write_points",
]

POINTS_FORMAT = "robustbench_kd.points"
POINTS_FORMAT_VERSION = 1
POINTS_SUFFIX = ".points.safetensors"
#: A points file holds about one byte per point and attack plus 8 for the index: ImageNet's 5000 points
#: with every attack take well under 1 MiB. Anything above this limit is not a points file.
POINTS_LIMIT = 256 * MiB

#: Settings that must be equal for two files' outcomes to be paired: the same points (inputs and labels),
#: the same threat model, the same attacks with the same parameters. The attack seed and batch size are
#: recorded but not compared: they choose random starts, not the attack.
PAIRED_SETTINGS = ("dataset", "n_examples", "data_sha256", "norm", "eps", "pgd_steps", "pgd_alpha", "autoattack_mode")


@dataclass
class PointResults:
    """The per-point outcomes of one model's evaluation (see the module docstring)."""

    model_id: str
    index: Tensor
    outcomes: dict[str, Tensor]
    settings: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n_points(self) -> int:
        return int(self.index.numel())

    def accuracy(self, key: str) -> float:
        """Mean of the outcome ``key`` over the points."""
        return float(self.outcomes[key].float().mean().item()) if self.n_points else float("nan")


def points_path(results_dir: str | os.PathLike[str], model_id: str) -> Path:
    """``<results_dir>/<model_id>.points.safetensors``, next to ``<model_id>.json``."""
    return Path(results_dir) / f"{validate_model_id(model_id)}{POINTS_SUFFIX}"


def points_from_result(
    result: Any,
    *,
    model_id: str,
    dataset: str,
    data_sha256: str,
    batch_size: int,
    autoattack_backend: str | None = None,
) -> PointResults:
    """The :class:`PointResults` of an ``EvalResult`` (``evaluate_model``'s, or merged shards')."""
    outcomes = {key: flags.to(torch.bool).cpu() for key, flags in result.per_example.items()}
    outcomes.update({key: flags.to(torch.bool).cpu() for key, flags in result.autoattack_stages.items()})
    mode = "standard" if "autoattack" in result.accuracy else None
    other = [key for key in result.accuracy if key.startswith("autoattack-")]
    settings = {
        "dataset": dataset,
        "n_examples": int(result.n_examples),
        "data_sha256": data_sha256,
        "norm": result.norm,
        "eps": float(result.eps),
        "eps_str": format_eps(result.eps),
        "attacks": list(result.accuracy),
        "stages": list(result.autoattack_stages),
        "pgd_steps": int(result.pgd_steps),
        "pgd_alpha": float(result.pgd_alpha),
        "autoattack_mode": ",".join(filter(None, [mode, *other])) or None,
        "autoattack_version": result.autoattack_version if autoattack_backend is None else autoattack_backend,
        "seed": int(result.seed),
        "batch_size": int(batch_size),
    }
    return PointResults(
        model_id=model_id,
        index=torch.arange(int(result.n_examples), dtype=torch.long),
        outcomes=outcomes,
        settings=settings,
    )


def write_points(path: str | os.PathLike[str], points: PointResults) -> Path:
    """Write ``points`` to ``path`` atomically (safetensors; see the module docstring)."""
    tensors = {"index": points.index.to(torch.long).contiguous()}
    for key, flags in points.outcomes.items():
        if key == "index":
            raise ValueError("'index' is reserved for the point indices")
        tensors[key] = flags.to(torch.bool).contiguous()
    metadata = {
        "format": POINTS_FORMAT,
        "format_version": str(POINTS_FORMAT_VERSION),
        "model_id": points.model_id,
        "keys": json.dumps(list(points.outcomes)),
        "settings": json.dumps(points.settings, sort_keys=True),
    }
    return atomic_write_bytes(Path(path), save_safetensors(tensors, metadata=metadata))


def _bad(path: Path, why: str) -> UserError:
    return UserError(f"points file {path} {why}; it is written by the evaluation as results/<id>{POINTS_SUFFIX}")


def read_points(path: str | os.PathLike[str]) -> PointResults:
    """Read and check a points file; anything damaged or foreign is a one-line UserError naming the file."""
    path = Path(path)
    data = read_bytes_bounded(path, limit=POINTS_LIMIT, what="points file")
    try:
        tensors = load_safetensors(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError, OSError) as exc:
        raise _bad(path, f"is not a safetensors file ({str(exc).splitlines()[0][:120]})") from None
    if metadata.get("format") != POINTS_FORMAT:
        raise _bad(path, "is not a points file (no robustbench_kd.points format in its metadata)")
    if metadata.get("format_version") != str(POINTS_FORMAT_VERSION):
        raise _bad(
            path, f"has format version {metadata.get('format_version')!r}; this version reads {POINTS_FORMAT_VERSION}"
        )
    try:
        keys = json.loads(metadata.get("keys", ""))
        settings = json.loads(metadata.get("settings", ""))
    except (json.JSONDecodeError, RecursionError):
        raise _bad(path, "has damaged metadata (keys or settings are not JSON)") from None
    check_structure(settings, what=f"points file {path} settings")
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys) or not isinstance(settings, dict):
        raise _bad(path, "has damaged metadata (keys must be a list of names, settings an object)")
    model_id = metadata.get("model_id", "")
    try:
        validate_model_id(model_id)
    except UserError:
        raise _bad(path, f"names the model {model_id[:60]!r}, which is not a model id") from None
    index = tensors.get("index")
    if index is None or index.dtype != torch.long or index.dim() != 1:
        raise _bad(path, "has no int64 'index' vector")
    if sorted(tensors) != sorted(["index", *keys]):
        raise _bad(path, f"holds the tensors {sorted(tensors)[:8]} but its metadata lists {keys[:8]}")
    outcomes: dict[str, Tensor] = {}
    for key in keys:
        flags = tensors[key]
        if flags.dtype != torch.bool or flags.shape != index.shape:
            raise _bad(path, f"has outcome {key!r} that is not a bool vector of its {index.numel()} points")
        outcomes[key] = flags
    if index.numel() and (int(index.min()) < 0 or torch.unique(index).numel() != index.numel()):
        raise _bad(path, "has point indices that are negative or repeated")
    return PointResults(model_id=model_id, index=index, outcomes=outcomes, settings=settings, path=path)


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (8-byte little-endian header length, JSON header)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("metadata is not a string mapping")
    return dict(metadata)


def pairing_problem(a: PointResults, b: PointResults, *, key: str) -> str | None:
    """Why the outcomes ``key`` of ``a`` and ``b`` cannot be compared point by point; None when they can.

    They can when both hold ``key``, were evaluated on the same points (indices, and inputs and labels by
    their SHA-256), and share the threat model and attack settings (:data:`PAIRED_SETTINGS`).
    """
    for points in (a, b):
        if key not in points.outcomes:
            held = ", ".join(points.outcomes) or "nothing"
            return f"{points.model_id} has no {key!r} outcome (it holds {held})"
    for name in PAIRED_SETTINGS:
        left, right = a.settings.get(name), b.settings.get(name)
        if left != right:
            what = {"data_sha256": "test points (inputs or labels differ)", "n_examples": "number of points"}.get(
                name, name
            )
            return (
                f"{a.model_id} and {b.model_id} were evaluated with different {what}: {_short(left)} vs {_short(right)}"
            )
    if not torch.equal(a.index, b.index):
        return f"{a.model_id} and {b.model_id} were evaluated on different point indices"
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."
