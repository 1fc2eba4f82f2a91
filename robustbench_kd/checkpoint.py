"""Training checkpoints: atomic writes, safe (``weights_only``) reads, and rebuilding a network.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: a crafted pickle cannot run code. It holds everything a resume
needs (student, optimiser, scheduler, distiller parameters/buffers and method state, epoch, step)
plus the student's architecture, so any checkpoint is usable as a teacher:
``file:RUN/checkpoints/epoch_020.pt``.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .io import atomic_torch_save

log = logging.getLogger(__name__)

FORMAT = "robustbench_kd.checkpoint/1"


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (temp file + rename): a crash leaves the previous file intact."""
    path = Path(path)
    atomic_torch_save({"format": FORMAT, **_plain(payload)}, path)
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any failure is a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (it looks like an HTML page, e.g. a failed download)" if _looks_like_html(path) else ""
        raise UserError(
            f"checkpoint {path} cannot be loaded safely{hint}: {first[:200]}; "
            "only tensors/number/str/list/dict checkpoints are accepted (weights_only=True) - re-create or re-download it"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict of tensors")
    return data


def _looks_like_html(path: Path) -> bool:
    try:
        head = path.open("rb").read(256).lstrip().lower()
    except OSError:
        return False
    return head.startswith(b"<!doctype html") or head.startswith(b"<html")


def _plain(obj: Any) -> Any:
    """Make scheduler/optimiser states weights_only-safe (MultiStepLR keeps a Counter)."""
    if isinstance(obj, Counter):
        return {"__counter__": {k: v for k, v in obj.items()}}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def restore_plain(obj: Any) -> Any:
    """Inverse of :func:`_plain`."""
    if isinstance(obj, dict):
        if set(obj) == {"__counter__"}:
            return Counter(obj["__counter__"])
        return {k: restore_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_plain(v) for v in obj]
    return obj


def state_dict_of(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network weights in a checkpoint: ours (``student``), zoo layout (``state_dict``) or bare."""
    for key in ("student", "state_dict", "model"):
        if isinstance(data.get(key), dict):
            return data[key]
    if all(isinstance(v, torch.Tensor) for v in data.values()):
        return data
    raise UserError("checkpoint holds no state dict (expected a 'student' or 'state_dict' entry)")


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> nn.Module:
    """``load_state_dict`` (strict), stripping a DDP ``module.`` prefix, with a readable error."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"{source} does not match the architecture: {detail}") from None
    return net
