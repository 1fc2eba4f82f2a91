"""A trained student as a file: ``safetensors`` weights with the architecture in the metadata, and back.

The zoo checkpoint ``models/<dataset>/<threat>/<ID>.pt`` is what RobustBench's ``load_model`` reads: a bare
``{'state_dict': ...}`` that needs the leaderboard's constructor to be rebuilt. Beside it, ``<ID>.safetensors``
holds the same weights in the safetensors format (a header and raw tensor bytes: nothing in it can run
code when read, and other frameworks read it too), and its metadata records how to rebuild the network:

==================  ======================================================================
``format``          ``robustbench_kd.student/1``
``arch``            the student registry name (``resnet18``, a plugin's name, ...)
``options``         the architecture options as JSON (``{"width": 0.5}``)
``num_classes``     the data's shape the network was built for (decimal strings)
``in_channels``
``image_size``
==================  ======================================================================

:func:`read_student` rebuilds a network from such a file, or from a training checkpoint of a run
(``checkpoints/last.pt``, which records the same fields as ``student_arch``, ``num_classes``, ...).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_bytes
from robustbench_kd.storage.bounded import open_regular
from robustbench_kd.storage.checkpoint import load_checkpoint, load_weights, state_dict_of

__all__ = ["STUDENT_FORMAT", "StudentRecord", "read_student", "write_student_safetensors"]

STUDENT_FORMAT = "robustbench_kd.student/1"

#: ``factory(num_classes=, in_channels=, image_size=, **options) -> nn.Module``, looked up by name: the
#: plugin host's student registry (``host.students.get``), so plugin architectures load too.
StudentFactoryLookup = Callable[[str], Callable[..., nn.Module]]


@dataclass(frozen=True)
class StudentRecord:
    """How to rebuild a student network: its registry name, options and the data shape it was built for."""

    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    options: Mapping[str, Any] = field(default_factory=dict)

    def build(self, lookup: StudentFactoryLookup) -> nn.Module:
        """A freshly initialised network of this architecture."""
        factory = lookup(self.arch)
        return factory(
            num_classes=self.num_classes, in_channels=self.in_channels, image_size=self.image_size, **dict(self.options)
        )

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata (string to string) that records this architecture."""
        return {
            "format": STUDENT_FORMAT,
            "arch": self.arch,
            "options": json.dumps(dict(self.options), sort_keys=True),
            "num_classes": str(self.num_classes),
            "in_channels": str(self.in_channels),
            "image_size": str(self.image_size),
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None, *, source: str) -> StudentRecord:
        """Parse :meth:`metadata` back; anything missing or malformed is a one-line UserError."""
        metadata = dict(metadata or {})
        if metadata.get("format") != STUDENT_FORMAT:
            raise UserError(
                f"{source} has no robustbench_kd student metadata (format {metadata.get('format')!r}, expected "
                f"{STUDENT_FORMAT!r}); it was not written by robustbench_kd, so its architecture is unknown"
            )
        try:
            options = json.loads(metadata["options"])
            record = cls(
                arch=metadata["arch"],
                num_classes=int(metadata["num_classes"]),
                in_channels=int(metadata["in_channels"]),
                image_size=int(metadata["image_size"]),
                options=options,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"{source} has damaged student metadata ({type(exc).__name__}: {exc})") from None
        if not isinstance(record.options, dict) or not isinstance(record.arch, str):
            raise UserError(f"{source} has damaged student metadata (arch or options of the wrong type)")
        return record

    @classmethod
    def from_checkpoint(cls, data: Mapping[str, Any], *, source: str) -> StudentRecord:
        """The record a training checkpoint keeps (``student_arch``, ``num_classes``, ...)."""
        arch = data.get("student_arch")
        if not isinstance(arch, Mapping) or not isinstance(arch.get("name"), str):
            raise UserError(
                f"{source} does not record its architecture (no 'student_arch' entry): it is not a checkpoint "
                "that `robustbench-kd distill` wrote; load a run directory, its checkpoints/last.pt or the "
                "<ID>.safetensors beside the zoo checkpoint"
            )
        try:
            return cls(
                arch=arch["name"],
                num_classes=int(data["num_classes"]),
                in_channels=int(data["in_channels"]),
                image_size=int(data["image_size"]),
                options=dict(arch.get("options") or {}),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"{source} has a damaged architecture record ({type(exc).__name__}: {exc})") from None


def write_student_safetensors(net: nn.Module, path: str | os.PathLike[str], record: StudentRecord) -> Path:
    """Write ``net``'s weights (CPU, contiguous) and ``record`` as a safetensors file, atomically; return the path.

    Weights that share memory (tied parameters) are written once each under every name, as safetensors
    requires distinct buffers.
    """
    from safetensors.torch import save

    tensors = {key: value.detach().to("cpu").contiguous().clone() for key, value in net.state_dict().items()}
    return atomic_write_bytes(path, save(tensors, metadata=record.metadata()))


def read_student(path: str | os.PathLike[str], lookup: StudentFactoryLookup) -> nn.Module:
    """Rebuild the student saved in ``path``, in eval mode on the CPU.

    ``path`` is a ``.safetensors`` file of :func:`write_student_safetensors`, a training checkpoint (which
    records its architecture), or a zoo checkpoint ``<ID>.pt`` (weights only), whose architecture is read
    from the ``<ID>.safetensors`` metadata beside it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, record = _read_safetensors(path)
    else:
        data = load_checkpoint(path)
        sibling = path.with_suffix(".safetensors")
        if "student_arch" not in data and sibling.is_file():
            record = _read_safetensors(sibling, weights=False)[1]
        else:
            record = StudentRecord.from_checkpoint(data, source=f"checkpoint {path}")
        tensors = state_dict_of(data)
    net = record.build(lookup)
    return load_weights(net, tensors, source=str(path)).eval()


def _read_safetensors(path: Path, *, weights: bool = True) -> tuple[dict[str, torch.Tensor], StudentRecord]:
    from safetensors import SafetensorError, safe_open

    os.close(open_regular(path, what="student file"))  # a FIFO or a device is refused, not read
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if weights else {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"student file {path} is not a readable safetensors file ({exc})") from None
    return tensors, StudentRecord.from_metadata(metadata, source=f"student file {path}")
