"""Feature taps: read a classifier's penultimate features and final feature map through forward hooks.

The taps work on any network whose head is "feature map -> global average pool -> ``nn.Linear``",
which covers the built-in students and the RobustBench CIFAR architectures (``WideResNet``,
``DMWideResNet``, ``ResNet``, ``PreActResNet``) without knowing their attribute names::

    with FeatureTap(model, penultimate=True, feature_map=True) as tap:
        logits = model(x)
    tap.penultimate   # (N, K): the input of the final nn.Linear
    tap.feature_map   # (N, K, H, W): its spatial mean is tap.penultimate
    tap.fc_weight     # (num_classes, K): the final nn.Linear's weight
    cam(tap.feature_map, tap.fc_weight, labels)  # (N, H, W)

The captured tensors are the ones in the forward pass (never detached or copied), so losses built
on them backpropagate into the model and to the input.

Locating the feature map
------------------------
The final ``nn.Linear`` is the last ``nn.Linear`` in ``model.named_modules()`` (override with
``fc_module``). The feature map is found once per model instance by a probe: during the first
forward pass inside a tap, the submodules' 4-D outputs with as many channels as the Linear has
inputs are recorded (the latest :data:`PROBE_WINDOW` of them); after the pass the last one produced
before the final Linear ran whose spatial mean equals the Linear's input is chosen (maps with more
than one spatial position are preferred over an explicit 1x1 pooling output). Outputs are compared
as they stand *after* the forward pass, which handles two traps of the RobustBench code:

* ``WideResNet`` computes ``self.relu(self.bn1(out))`` with ``ReLU(inplace=True)``: the tensor ``bn1``
  returned is overwritten by the ReLU, and ``relu`` (which runs later) is the module chosen.
* ``PreActResNet(bn_before_fc=True)`` applies ``F.relu(self.bn(out))`` functionally, so no module
  outputs the post-ReLU map; the probe then finds that ``relu(bn output)`` matches and records the
  transform ``"relu"``, applied when :attr:`FeatureTap.feature_map` is read.

The result (:class:`FeatureMapLocation`) is cached per model instance, so later taps hook just that
one module. Models where nothing matches raise :class:`~robustbench_kd.errors.UserError`; pass
``feature_map_module=`` and ``feature_map_transform=`` to :class:`FeatureTap` for them.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from robustbench_kd.attacks import module_mode
from robustbench_kd.errors import UserError, close_matches

__all__ = [
    "FEATURE_MAP_TRANSFORMS",
    "FeatureMapLocation",
    "FeatureTap",
    "cam",
    "final_linear",
    "locate_feature_map",
]

#: Allowed values of ``feature_map_transform``: ``None`` (the module output as is) or ``"relu"``.
FEATURE_MAP_TRANSFORMS: tuple[str | None, ...] = (None, "relu")

#: How many of the latest 4-D outputs with the classifier's input width the probe keeps. Only
#: these can be chosen; the window bounds the probe's memory (under ``no_grad`` a large teacher's
#: activations would otherwise all stay alive until the end of the pass). Between the feature map
#: and the classifier there are only a few modules (pooling, dropout), so this is plenty.
PROBE_WINDOW = 8

# model -> {final Linear name -> location}; weak so a cached model can still be garbage-collected.
_LOCATIONS: weakref.WeakKeyDictionary[nn.Module, dict[str, FeatureMapLocation]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class FeatureMapLocation:
    """Where a model's final feature map is: the output of submodule ``module``, then ``transform``.

    ``module`` is a name from ``model.named_modules()``; ``transform`` is ``None`` or ``"relu"``
    (for architectures that apply the last ReLU functionally).
    """

    module: str
    transform: str | None = None

    def apply(self, output: Tensor) -> Tensor:
        """Turn the module's output into the feature map (keeps the autograd graph)."""
        return F.relu(output) if self.transform == "relu" else output


def final_linear(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """Return ``(name, module)`` of the classifier: the last ``nn.Linear`` in ``model.named_modules()``.

    With ``name`` given, return that submodule instead, which must be an ``nn.Linear``. Raises
    :class:`UserError` if there is none.
    """
    modules = dict(model.named_modules())
    if name is not None:
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            what = "no submodule" if module is None else f"submodule {type(module).__name__}"
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise UserError(
                f"fc_module={name!r}: {type(model).__name__} has {what} of that name, expected an nn.Linear"
                f"{close_matches(name, linears)}"
            )
        return name, module
    found = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not found:
        raise UserError(
            f"{type(model).__name__} has no nn.Linear classifier, so its penultimate features cannot be tapped"
        )
    return found[-1]


class FeatureTap:
    """Context manager that captures penultimate features and the final feature map of ``model``.

    Inside the ``with`` block, each forward pass of ``model`` overwrites :attr:`penultimate` (the
    input of the final ``nn.Linear``) and :attr:`feature_map` (the 4-D map whose spatial mean is
    that input, i.e. the map a class activation map is computed from); both stay readable after the
    block. Only what was requested is captured. All hooks are removed on exit, also when the block
    raises.

    ``feature_map_module`` (a name from ``model.named_modules()``) and ``feature_map_transform``
    (``None`` or ``"relu"``) skip the automatic search (see the module docstring) and take the last
    output of that module in each forward pass; giving ``feature_map_module`` implies
    ``feature_map=True``. ``fc_module`` names the classifier Linear if it is not the last one.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        penultimate: bool = True,
        feature_map: bool = False,
        feature_map_module: str | None = None,
        feature_map_transform: str | None = None,
        fc_module: str | None = None,
    ) -> None:
        if feature_map_transform not in FEATURE_MAP_TRANSFORMS:
            raise UserError(f"feature_map_transform must be None or 'relu', got {feature_map_transform!r}")
        if feature_map_transform is not None and feature_map_module is None:
            raise UserError("feature_map_transform needs feature_map_module as well")
        # A torch.compile view ([speed] compile): hook the module it wraps. The view's own call does not run
        # hooks registered on the view, while the wrapped module's hooks run inside the compiled call.
        while isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        self.model = model
        self.fc_name, self.fc = final_linear(model, fc_module)
        self._want_penultimate = penultimate
        self._want_feature_map = feature_map or feature_map_module is not None
        self._location: FeatureMapLocation | None = None
        if feature_map_module is not None:
            if feature_map_module not in dict(model.named_modules()):
                raise UserError(
                    f"feature_map_module={feature_map_module!r}: {type(model).__name__} has no submodule of that "
                    f"name{close_matches(feature_map_module, (n for n, _ in model.named_modules() if n))}"
                )
            self._location = FeatureMapLocation(feature_map_module, feature_map_transform)
        self._handles: list[RemovableHandle] = []
        self._active = False
        self._penultimate: Tensor | None = None
        self._raw_map: Tensor | None = None
        self._map: Tensor | None = None
        # Probe state (first forward of a model whose feature map is not located yet).
        self._candidates: deque[tuple[str, Tensor]] = deque(maxlen=PROBE_WINDOW)
        self._probe_handles: list[RemovableHandle] = []
        self._fc_ran = False

    # -- context manager -------------------------------------------------------------------------

    def __enter__(self) -> FeatureTap:
        if self._active:
            raise RuntimeError("this FeatureTap is already active; create one tap per with-block")
        self._active = True
        # A tap may be reused for another with-block; never show the previous block's tensors.
        self._penultimate = self._raw_map = self._map = None
        try:
            probing = False
            if self._want_feature_map and self._location is None:
                self._location = _LOCATIONS.get(self.model, {}).get(self.fc_name)
                probing = self._location is None
            if self._want_penultimate or probing:
                self._handles.append(self.fc.register_forward_pre_hook(self._on_fc_input, with_kwargs=True))
            if probing:
                self._start_probe()
            elif self._want_feature_map:
                assert self._location is not None
                self._hook_feature_map(self._location)
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove_hooks()

    # -- results ---------------------------------------------------------------------------------

    @property
    def penultimate(self) -> Tensor:
        """Input of the final ``nn.Linear`` in the latest forward pass, shape (N, K), graph attached."""
        if not self._want_penultimate:
            raise RuntimeError("penultimate features were not requested (FeatureTap(..., penultimate=True))")
        if self._penultimate is None:
            raise RuntimeError(f"no forward pass of {type(self.model).__name__} ran inside the FeatureTap yet")
        return self._penultimate

    @property
    def feature_map(self) -> Tensor:
        """Final feature map of the latest forward pass, shape (N, K, H, W), graph attached.

        With the usual global-average-pool head, ``feature_map.mean((2, 3))`` equals
        :attr:`penultimate`.
        """
        if not self._want_feature_map:
            raise RuntimeError("the feature map was not requested (FeatureTap(..., feature_map=True))")
        if self._raw_map is None or self._location is None:
            raise RuntimeError(f"no forward pass of {type(self.model).__name__} ran inside the FeatureTap yet")
        if self._map is None:
            # Transform lazily: the module output may still have been changed in place later in the pass.
            self._map = self._location.apply(self._raw_map)
        return self._map

    @property
    def feature_map_location(self) -> FeatureMapLocation | None:
        """Where the feature map is taken from; ``None`` until the probe forward pass has run."""
        return self._location

    @property
    def fc_weight(self) -> Tensor:
        """Weight of the final ``nn.Linear``, shape (num_classes, K)."""
        return self.fc.weight

    @property
    def fc_bias(self) -> Tensor | None:
        """Bias of the final ``nn.Linear`` (``None`` if it has none)."""
        return self.fc.bias

    def cam(self, classes: Tensor | int) -> Tensor:
        """Class activation maps of the latest forward pass; see :func:`cam`."""
        return cam(self.feature_map, self.fc_weight, classes)

    # -- hooks -----------------------------------------------------------------------------------

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._probe_handles = []
        self._candidates.clear()
        self._active = False

    def _on_fc_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._want_penultimate or self._location is None:  # the probe needs it too
            self._penultimate = args[0] if args else kwargs["input"]
        self._fc_ran = True

    def _hook_feature_map(self, location: FeatureMapLocation) -> None:
        module = self.model.get_submodule(location.module)

        def capture(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            self._raw_map = output
            self._map = None

        self._handles.append(module.register_forward_hook(capture))

    def _start_probe(self) -> None:
        def begin_pass(module: nn.Module, args: tuple[Any, ...]) -> None:
            self._candidates.clear()
            self._fc_ran = False

        channels = self.fc.in_features

        def record(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                if (
                    not self._fc_ran
                    and isinstance(output, Tensor)
                    and output.dim() == 4
                    and output.shape[1] == channels
                ):
                    self._candidates.append((name, output))

            return hook

        self._probe_handles = [self.model.register_forward_pre_hook(begin_pass)]
        self._probe_handles += [m.register_forward_hook(record(n)) for n, m in self.model.named_modules() if n]
        self._handles += self._probe_handles
        # Registered last so that it runs after any forward hooks the model already had.
        self._handles.append(self.model.register_forward_hook(self._finish_probe))

    def _finish_probe(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._location is not None:
            return  # resolved by an earlier pass inside this tap
        candidates = list(self._candidates)
        self._candidates.clear()
        location, raw = _match_feature_map(
            self.model, self.fc_name, self._penultimate if self._fc_ran else None, candidates
        )
        _LOCATIONS.setdefault(self.model, {})[self.fc_name] = location
        self._location = location
        self._raw_map, self._map = raw, None
        if not self._want_penultimate:
            # Needed only for the probe; do not keep the activation alive.
            self._penultimate = None
        # Swap the all-module probe hooks for one hook on the found module. This hook itself stays
        # registered until exit (it is running right now) and is a no-op from here on.
        for handle in self._probe_handles:
            handle.remove()
        self._probe_handles = []
        self._hook_feature_map(location)


def _match_feature_map(
    model: nn.Module, fc_name: str, penultimate: Tensor | None, candidates: list[tuple[str, Tensor]]
) -> tuple[FeatureMapLocation, Tensor]:
    """Pick the feature map among the probe's recorded 4-D outputs (see the module docstring)."""
    model_name = type(model).__name__
    hint = (
        "pass FeatureTap(model, feature_map_module='<submodule name>', feature_map_transform='relu' or None) "
        "to name the map explicitly"
    )
    if penultimate is None:
        raise UserError(f"the final nn.Linear {fc_name!r} of {model_name} did not run in the forward pass; {hint}")
    if penultimate.dim() != 2:
        raise UserError(
            f"the final nn.Linear {fc_name!r} of {model_name} gets a {penultimate.dim()}-D input, not (N, K) "
            f"features, so it has no class-activation feature map; {hint}"
        )
    target = penultimate.detach().float()
    tolerance = max(1e-4, 16 * torch.finfo(penultimate.dtype).eps) if penultimate.is_floating_point() else 1e-4
    atol = tolerance * max(1.0, float(target.abs().max()) if target.numel() else 1.0)
    fallback: tuple[FeatureMapLocation, Tensor] | None = None
    with torch.no_grad():
        for name, output in reversed(candidates):
            if output.shape[:2] != target.shape:
                continue
            for transform in FEATURE_MAP_TRANSFORMS:
                location = FeatureMapLocation(name, transform)
                pooled = location.apply(output.detach()).float().mean(dim=(2, 3))
                if torch.allclose(pooled, target, rtol=tolerance, atol=atol):
                    break
            else:
                continue
            if output.shape[2] * output.shape[3] > 1:
                return location, output
            # A 1x1 map is usually an explicit global-pooling module; keep looking for the map it pooled.
            if fallback is None:
                fallback = (location, output)
    if fallback is not None:
        return fallback
    seen = list(dict.fromkeys(name for name, _ in reversed(candidates)))[:4]
    raise UserError(
        f"FeatureTap does not support {model_name}: no 4-D submodule output before its final nn.Linear "
        f"{fc_name!r} has a spatial mean (directly or after ReLU) equal to the Linear's input "
        f"(last 4-D outputs with {target.shape[1]} channels: {', '.join(seen) or 'none'}); {hint}"
    )


def locate_feature_map(model: nn.Module, example: Tensor, *, fc_module: str | None = None) -> FeatureMapLocation:
    """Find (and cache) where ``model``'s feature map is, by one probe forward pass on ``example``.

    Runs under ``torch.no_grad()`` with the model temporarily in eval mode, so batch-norm running
    statistics are left untouched; every module's train/eval flag is restored afterwards. Useful to
    reject an unsupported teacher before training starts; :class:`FeatureTap` otherwise probes on
    its first forward pass by itself.
    """
    with (
        module_mode(model, "eval"),
        torch.no_grad(),
        FeatureTap(model, penultimate=False, feature_map=True, fc_module=fc_module) as tap,
    ):
        model(example)
    location = tap.feature_map_location
    assert location is not None
    return location


def cam(feature_map: Tensor, fc_weight: Tensor, classes: Tensor | int) -> Tensor:
    """Class activation maps, shape (N, H, W), without any normalisation.

    For feature map A of shape (N, K, H, W), classifier weight W of shape (C, K) and one class
    c_n per sample (a tensor of shape (N,) or one int for all samples):

    .. math:: \\mathrm{CAM}_n(h, w) = \\sum_k W_{c_n, k} \\, A_{n, k, h, w}

    (Zhou et al., 2016). When the penultimate features are the spatial mean of A, the spatial mean of
    CAM_n equals the logit of c_n minus the classifier bias. Differentiable in both inputs.
    """
    if feature_map.dim() != 4:
        raise ValueError(f"feature_map must be (N, K, H, W), got shape {tuple(feature_map.shape)}")
    if fc_weight.dim() != 2 or fc_weight.shape[1] != feature_map.shape[1]:
        raise ValueError(
            f"fc_weight must be (num_classes, K) with K = {feature_map.shape[1]} feature-map channels, "
            f"got shape {tuple(fc_weight.shape)}"
        )
    n = feature_map.shape[0]
    index = torch.as_tensor(classes, device=fc_weight.device, dtype=torch.long)
    if index.dim() == 0:
        index = index.expand(n)
    if index.shape != (n,):
        raise ValueError(f"classes must be an int or a tensor of shape ({n},), got shape {tuple(index.shape)}")
    weights = fc_weight.index_select(0, index).to(feature_map.dtype)
    return torch.einsum("nk,nkhw->nhw", weights, feature_map)
