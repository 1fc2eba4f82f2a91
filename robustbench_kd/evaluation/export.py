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

ImageNet: every ImageNet zoo entry builds ``Sequential(OrderedDict(normalize=<normaliser>,
model=<network>))`` (``robustbench.model_zoo.architectures.utils_architectures.normalize_model``) and
its file holds the bare network's weights, which load_model moves under ``model.``; the normaliser's
buffers come from the constructor (load_model tolerates their absence). The checkpoint written here
is the same: the bare weights of the network (of the wrapper's ``model`` when the evaluated model
already is such a wrapper, e.g. a ``robustbench:imagenet/...`` entry). Our students take [0, 1]
inputs and normalise inside (or not at all), so their zoo entry wraps them with a buffer-free
identity normaliser (:func:`imagenet_zoo_model`, the constructor the submission bundle writes): the
keys then match exactly and load_model's strict load succeeds without its lenient fallback.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.model_info import THREAT_MODELS
from robustbench_kd.storage.atomic import atomic_torch_save
from robustbench_kd.zoo.names import validate_dataset_name, validate_model_id

__all__ = [
    "imagenet_zoo_model",
    "save_zoo_checkpoint",
    "unwrap_model",
    "zoo_checkpoint_path",
    "zoo_key_problems",
    "zoo_network",
]

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


def imagenet_zoo_model(net: nn.Module) -> nn.Sequential:
    """``net`` in RobustBench's ImageNet zoo layout, with an identity normaliser.

    ``Sequential(OrderedDict(normalize=nn.Identity(), model=net))``: the structure of
    ``normalize_model(net, mean, std)`` (so load_model's ``model.`` prefix lands on ``net``), for a
    network that takes [0, 1] inputs as they are. ``nn.Identity`` has no buffers, so the bare weights
    of ``net`` are the wrapper's complete state dict. Outputs equal ``net``'s.
    """
    return nn.Sequential(OrderedDict([("normalize", nn.Identity()), ("model", net)]))


def _is_imagenet_zoo_layout(model: nn.Module) -> bool:
    # normalize_model's Sequential(normalize=..., model=net), or the same without a normaliser.
    names = [name for name, _ in model.named_children()]
    return isinstance(model, nn.Sequential) and names in (["normalize", "model"], ["model"])


def zoo_network(model: nn.Module, *, dataset: str) -> nn.Module:
    """The module whose state dict the zoo checkpoint of ``model`` holds.

    Wrappers (DataParallel, DDP, ``torch.compile``) are removed. For ImageNet, a model already in the
    zoo layout (``Sequential(normalize=..., model=net)``, or ``Sequential(model=net)``) gives ``net``:
    load_model re-adds the ``model.`` prefix, and the normaliser's state is the zoo entry
    constructor's business, as for every RobustBench ImageNet entry.
    """
    model = unwrap_model(model)
    if dataset == "imagenet" and _is_imagenet_zoo_layout(model):
        return unwrap_model(dict(model.named_children())["model"])
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
    """``(key, key_as_load_model_would_see_it)`` for every state-dict key that load_model would damage.

    For ImageNet the expected key is ``model.<key>`` (the zoo wrapper's prefix, see the module docstring).
    """
    problems = []
    for key in state_dict:
        seen = _key_after_zoo_loading(key, dataset)
        if seen != ("model." + key if dataset == "imagenet" else key):
            problems.append((key, seen))
    return problems


def zoo_checkpoint_path(out_dir: str | os.PathLike[str], *, dataset: str, threat_model: str, model_id: str) -> Path:
    """``out_dir/models/<dataset>/<threat_model>/<model_id>.pt`` (arguments validated)."""
    validate_dataset_name(dataset)
    if threat_model not in THREAT_MODELS:
        raise UserError(f"threat_model must be one of {', '.join(THREAT_MODELS)}, got {threat_model!r}")
    validate_model_id(model_id)
    if dataset == "imagenet" and "Standard" in model_id:
        # robustbench.utils.load_model returns such ImageNet entries as their constructor builds them and
        # never reads their checkpoint (a shortcut meant for the torchvision-pretrained Standard_R50).
        raise UserError(
            f"ImageNet model id {model_id!r} contains 'Standard', for which robustbench.utils.load_model "
            "skips loading the checkpoint; choose another id"
        )
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
    DataParallel/DDP/``torch.compile`` wrappers are removed first; for ImageNet the file holds the
    bare network's weights (:func:`zoo_network`), which load into :func:`imagenet_zoo_model` of the
    network or, for a zoo-layout model, into its own zoo constructor. The model's mode and device are
    not changed. Returns the path.

    Raises:
        ValueError: if a state-dict key contains ``module.`` or ``model.`` (load_model would chop its
            first 7/6 characters; rename that submodule, e.g. ``self.model`` -> ``self.net``), or if
            the state dict holds non-tensor entries.
        UserError: for an invalid model id, dataset or threat model.
    """
    path = zoo_checkpoint_path(out_dir, dataset=dataset, threat_model=threat_model, model_id=model_id)
    state_dict = zoo_network(model, dataset=dataset).state_dict()
    problems = zoo_key_problems(state_dict, dataset=dataset)
    if problems:
        shown = ", ".join(f"{key!r} -> {seen!r}" for key, seen in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
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
