"""One vectorised call for a teacher ensemble whose members share one architecture.

For members f(.; theta_1), ..., f(.; theta_M) of the same architecture f, the ensemble needs the M
outputs z_i = f(x; theta_i). Instead of M Python-level forwards, the member weights are stacked
along a new leading axis, Theta = stack(theta_1, ..., theta_M), and

    Z = vmap(theta -> f(x; theta))(Theta),      Z[i] = f(x; theta_i),   Z of shape (M, N, C),

is one call (``torch.func.functional_call`` of the first member with the stacked tensors, mapped by
``torch.vmap`` over the leading axis; x is shared, not copied). A convolution with a stacked weight
becomes one grouped convolution, so M small kernels launch as one. The members are frozen and in
eval mode, so BatchNorm reads its running statistics and nothing is written back.

Memory: the stacks are built lazily (first call, and again after the members are moved, cast or
given new tensors) and every member parameter/buffer is then re-pointed at its slice of the stack,
so the weights are stored once, not twice. In-place updates of a member (``load_state_dict``)
therefore update the stack too; anything that replaces a member's tensors (``.to()``, ``.half()``,
``load_state_dict(assign=True)``) is detected by storage address and triggers a rebuild. (A member's
tensors are then views of the stack: ``torch.save`` of one member's ``state_dict()`` would write the
whole stack, so clone them first if you ever save a vectorised member on its own.)

Same architecture means more than equal parameter shapes: :func:`architecture_mismatch` compares
the module tree (types, ``extra_repr`` such as stride/padding/eps) and the plain attributes of every
submodule (numbers, strings, non-buffer tensors such as a normalisation mean), because the
vectorised call runs the *first* member's code and attributes with every member's tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

_PLAIN = (bool, int, float, str, type(None))


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """Non-parameter, non-buffer attributes that can change what ``forward`` computes."""
    out: dict[str, Any] = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        plain_tuple = isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)
        if isinstance(value, (*_PLAIN, Tensor)) or plain_tuple:
            out[key] = value
    return out


def _tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def architecture_mismatch(members: Sequence[nn.Module]) -> str | None:
    """Why the members cannot share one vectorised call, or None when they can.

    They can when every member has the same module tree (names, types, ``extra_repr``), the same
    plain attributes, and parameters/buffers with the same names, shapes, dtypes and device, and
    none has forward hooks.
    """
    for i, member in enumerate(members):
        # Hooks expect one member's tensors per call; the vectorised call would run member 0's hooks
        # once, on all members' outputs at once.
        if any(m._forward_hooks or m._forward_pre_hooks for m in member.modules()):
            return f"member {i} has forward hooks"
    first = members[0]
    ref_modules = [(n, type(m), m.extra_repr(), _plain_attributes(m)) for n, m in first.named_modules()]
    ref_tensors = [(n, t.shape, t.dtype, t.device) for n, t in _tensors(first)]
    for i, member in enumerate(members[1:], start=1):
        if type(member) is not type(first):
            return f"member {i} is a {type(member).__name__}, member 0 a {type(first).__name__}"
        modules = [(n, type(m), m.extra_repr(), _plain_attributes(m)) for n, m in member.named_modules()]
        if len(modules) != len(ref_modules):
            return f"member {i} has {len(modules)} submodules, member 0 has {len(ref_modules)}"
        for (name, typ, rep, attrs), (_, rtyp, rrep, rattrs) in zip(modules, ref_modules, strict=False):
            if typ is not rtyp or rep != rrep:
                return (
                    f"member {i} submodule {name or '<root>'!r} is {typ.__name__}({rep}), "
                    f"member 0 has {rtyp.__name__}({rrep})"
                )
            if attrs.keys() != rattrs.keys() or any(not _same_value(attrs[k], rattrs[k]) for k in attrs):
                return f"member {i} submodule {name or '<root>'!r} has different attributes from member 0"
        tensors = [(n, t.shape, t.dtype, t.device) for n, t in _tensors(member)]
        if len(tensors) != len(ref_tensors):
            return f"member {i} has {len(tensors)} parameters/buffers, member 0 has {len(ref_tensors)}"
        for got, ref in zip(tensors, ref_tensors, strict=False):
            if got != ref:
                return (
                    f"member {i} tensor {got[0]!r} is {tuple(got[1])} {got[2]} on {got[3]}, "
                    f"member 0 has {ref[0]!r} {tuple(ref[1])} {ref[2]} on {ref[3]}"
                )
    return None


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
    return type(a) is type(b) and a == b


class StackedMembers:
    """The members' weights stacked on a leading axis, and the vectorised forward over them.

    Not an ``nn.Module`` on purpose: the stacks must not appear in ``state_dict()`` or
    ``parameters()`` (the members already own those tensors, as views of the stacks).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        self._members = list(members)
        self._params: dict[str, Tensor] = {}
        self._buffers: dict[str, Tensor] = {}
        self._pointers: list[int] = []

    def _current_pointers(self) -> list[int]:
        return [t.data_ptr() for m in self._members for _, t in _tensors(m)]

    def is_current(self) -> bool:
        """True while every member tensor is still the slice of the stack it was pointed at."""
        return bool(self._pointers) and self._pointers == self._current_pointers()

    def rebuild(self) -> None:
        """Stack the members' current tensors and re-point each member at its slice (no copy kept)."""
        self._params, self._buffers = torch.func.stack_module_state(self._members)
        for i, member in enumerate(self._members):
            for name, param in member.named_parameters():
                param.data = self._params[name][i]
            for name, _ in member.named_buffers():
                owner, _, leaf = name.rpartition(".")
                member.get_submodule(owner)._buffers[leaf] = self._buffers[name][i]
        self._pointers = self._current_pointers()

    def clear(self) -> None:
        self._params, self._buffers, self._pointers = {}, {}, []

    def __call__(self, x: Tensor) -> Tensor:
        """All member outputs at once, shape (M, *member_output_shape)."""
        if not self.is_current():
            self.rebuild()
        base = self._members[0]

        def one(params: dict[str, Tensor], buffers: dict[str, Tensor], inp: Tensor) -> Tensor:
            return torch.func.functional_call(base, (params, buffers), (inp,))

        return torch.vmap(one, in_dims=(0, 0, None))(self._params, self._buffers, x)
