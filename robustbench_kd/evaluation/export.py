"""Checkpoints in the layout and format of RobustBench's model zoo.

``robustbench.utils.load_model(model_id, model_dir=<out_dir>/models, dataset=..., threat_model=...)``
reads ``<model_dir>/<dataset>/<threat_model>/<model_id>.pt`` with ``torch.load`` (``weights_only``
is the default on torch >= 2.6), takes ``checkpoint['state_dict']`` and loads it strictly into the
architecture registered under ``model_id`` in ``robustbench.model_zoo``. Before that it "removes
DataParallel prefixes" in a way that damages keys: every key that contains ``module.`` or ``model.``
*anywhere* loses its first 7 or 6 characters (``submodel.fc.weight`` -> ``el.fc.weight``), and for
ImageNet every key then gets ``model.`` prepended. :func:`save_zoo_checkpoint` therefore refuses
state dicts that would not survive that round trip, instead of writing a file that fails (or worse,
half-loads) on the maintainers' side.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from ..errors import UserError
from ..io import atomic_torch_save
from .model_info import THREAT_MODELS, validate_dataset_name, validate_model_id

__all__ = ["save_zoo_checkpoint", "unwrap_model", "zoo_checkpoint_path", "zoo_key_problems"]

# The substrings robustbench.utils.load_model strips, in the order it strips them.
_STRIPPED = ("module.", "model.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Remove DataParallel / DistributedDataParallel / ``torch.compile`` wrappers.

    Their ``module.`` / ``_orig_mod.`` key prefixes are not part of the architecture that the zoo
    entry builds.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _key_after_zoo_loading(key: str, dataset: str) -> str:
    # Mirrors robustbench.utils.rm_substr_from_state_dict applied for 'module.' then 'model.'.
    for substr in _STRIPPED:
        if substr in key:
            key = key[len(substr) :]
    if dataset == "imagenet":
        # load_model re-adds the prefix of ImageNet's Sequential(normalize=..., model=...) wrapper.
        key = "model." + key
    return key


def zoo_key_problems(state_dict: Mapping[str, object], *, dataset: str) -> list[tuple[str, str]]:
    """``(key, key_as_load_model_would_see_it)`` for every state-dict key that load_model would rename."""
    problems = []
    for key in state_dict:
        seen = _key_after_zoo_loading(key, dataset)
        if seen != key:
            problems.append((key, seen))
    return problems


def zoo_checkpoint_path(
    out_dir: str | os.PathLike[str], *, dataset: str, threat_model: str, model_id: str
) -> Path:
    """``out_dir/models/<dataset>/<threat_model>/<model_id>.pt`` (arguments validated)."""
    validate_dataset_name(dataset)
    if threat_model not in THREAT_MODELS:
        raise UserError(f"threat_model must be one of {', '.join(THREAT_MODELS)}, got {threat_model!r}")
    validate_model_id(model_id)
    return Path(out_dir) / "models" / dataset / threat_model / f"{model_id}.pt"


def _cpu_copy(tensor: Tensor) -> Tensor:
    out = tensor.detach().to("cpu")
    # A view into a larger storage would make torch.save write the whole storage.
    if out.untyped_storage().nbytes() != out.numel() * out.element_size():
        out = out.clone()
    return out


def save_zoo_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    dataset: str,
    threat_model: str,
    model_id: str,
) -> Path:
    """Write ``{'state_dict': ...}`` (CPU tensors) to ``out_dir/models/<dataset>/<threat_model>/<model_id>.pt``.

    The file is written atomically and holds nothing but tensors, so ``torch.load`` with
    ``weights_only=True`` (what ``robustbench.utils.load_model`` gets on torch >= 2.6) reads it.
    DataParallel/DDP/``torch.compile`` wrappers are removed first. The model's mode and device are
    not changed. Returns the path.

    Raises:
        ValueError: if a state-dict key contains ``module.`` or ``model.`` (load_model would chop its
            first 7/6 characters; rename that submodule, e.g. ``self.model`` -> ``self.net``), or
            for ImageNet if a key does not start with ``model.`` (load_model prefixes every key
            with it), or if the state dict holds non-tensor entries.
        UserError: for an invalid model id, dataset or threat model.
    """
    path = zoo_checkpoint_path(out_dir, dataset=dataset, threat_model=threat_model, model_id=model_id)
    state_dict = unwrap_model(model).state_dict()
    problems = zoo_key_problems(state_dict, dataset=dataset)
    if problems:
        shown = ", ".join(f"{key!r} -> {seen!r}" for key, seen in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        if dataset == "imagenet":
            rule = (
                "for ImageNet, robustbench.utils.load_model strips 'module.'/'model.' and then "
                "prefixes every key with 'model.', so every key must be 'model.<name>' with no "
                "other 'module.'/'model.' inside (wrap the network as "
                "nn.Sequential(OrderedDict(normalize=..., model=net)) with a buffer-free normalizer)"
            )
        else:
            rule = (
                "robustbench.utils.load_model cuts the first 7/6 characters off every key that "
                "contains 'module.' or 'model.' anywhere (meant for DataParallel prefixes), so the "
                "weights would load under wrong names; rename the submodule (e.g. self.model -> "
                "self.net, 'submodel' -> 'sub_net')"
            )
        raise ValueError(f"state dict keys would be renamed when loaded: {shown}{more}; {rule}")
    bad = [key for key, value in state_dict.items() if not isinstance(value, Tensor)]
    if bad:
        raise ValueError(
            f"state dict entries {bad[:5]} are not tensors (module extra state?); "
            "torch.load(weights_only=True) in robustbench.utils.load_model may refuse them"
        )
    cpu_state = OrderedDict((key, _cpu_copy(value)) for key, value in state_dict.items())
    atomic_torch_save({"state_dict": cpu_state}, path)
    return path
