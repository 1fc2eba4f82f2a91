"""``load_student()``: a trained student back as an ``nn.Module``, from any file a run wrote."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from robustbench_kd.errors import UserError

__all__ = ["load_student"]


def load_student(path_or_run_dir: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a trained student (random init, then its weights), in eval mode on the CPU.

    Accepts:

    * a run directory: the student the run reports under its name (``checkpoints/best.pt`` when a
      validation split selected an earlier epoch, else ``checkpoints/last.pt``);
    * ``models/<dataset>/<threat>/<ID>.safetensors``, written beside the zoo checkpoint ``<ID>.pt``: the
      weights and, in its metadata, the architecture; nothing in it is unpickled;
    * a training checkpoint (``checkpoints/last.pt``, ``best.pt``, ``epoch_NNN.pt``), read with
      ``torch.load(weights_only=True)``;
    * a zoo checkpoint ``<ID>.pt``: its weights, with the architecture from the metadata of the
      ``<ID>.safetensors`` beside it (the zoo file holds weights only, as RobustBench expects).

    Architectures come from the student registry, plugins' included. Raises a one-line UserError for a
    file that is not one of these.
    """
    from robustbench_kd.jobs.pipeline import run_student_checkpoint
    from robustbench_kd.plugin_host import PluginHost
    from robustbench_kd.students.files import read_student

    path = Path(path_or_run_dir).expanduser()
    if path.is_dir():
        path = run_student_checkpoint(path)
    elif not path.exists():
        raise UserError(f"{path} does not exist; give a run directory, a .safetensors file or a checkpoint")
    return read_student(path, PluginHost.create().students.get)
