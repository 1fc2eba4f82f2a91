"""Teachers: frozen wrappers, weighted ensembles, roles, and the ``scheme:ref`` spec strings.

* :class:`Teacher` wraps one network. Its parameters never require grad and it is always in eval
  mode (``.train()`` is ignored), so a RobustBench teacher's BN statistics can never drift. Input
  gradients still flow through it, which teacher-in-the-loop attacks (AdaAD, SmaraAD) need.
* :class:`EnsembleTeacher` combines several teachers with weights beta_i (AKD Eq. 5). With
  ``combine="probs"`` it returns log(sum_i beta_i softmax(z_i)), whose softmax is exactly the
  weighted mean of the members' probabilities; with ``combine="logits"`` it returns
  sum_i beta_i z_i. Either way it looks like one teacher returning logits. Members of one
  architecture are evaluated in one vectorised call (:mod:`robustbench_kd.vectorised_ensemble`), others
  in a loop; ``vectorize`` chooses.
* :class:`TeacherSet` maps roles (``robust``, ``natural``, ...) to teachers.
* A spec is ``scheme:ref`` -- ``robustbench:cifar10/Linf/Carmon2019Unlabeled`` or
  ``file:runs/x/checkpoints/epoch_020.pt`` (optionally ``?arch=resnet18``); schemes come from plugins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import torch
from torch import Tensor, nn

from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.vectorised_ensemble import StackedMembers, architecture_mismatch

log = logging.getLogger(__name__)


class Teacher(nn.Module):
    """A frozen network: eval mode forever, parameters without gradients.

    Args:
        net: the network, taking [0,1] inputs and returning logits.
        spec: where it came from (shown in logs and reports).
    """

    def __init__(self, net: nn.Module, *, spec: str = "") -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        net.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Teacher:
        # A teacher is never trained: keep BN running statistics and dropout frozen whatever the
        # caller asks (trainer.train(), model.train() on a parent module, torchattacks' mode restore).
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


class ResizeInput(nn.Module):
    """Resize square inputs to ``size`` x ``size`` (bilinear, differentiable) before ``net``.

    Lets an ImageNet zoo teacher evaluated at another resolution (``Crop288``: 288x288) see the run's
    images at the size it was trained for; input gradients flow through the resize.
    """

    def __init__(self, net: nn.Module, size: int) -> None:
        super().__init__()
        self.net = net
        self.size = int(size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > self.size
            )
        return self.net(x)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class EnsembleTeacher(nn.Module):
    """Weighted ensemble of teachers that behaves as one teacher.

    With member logits z_i and weights beta_i (sum 1), the output is

    * ``combine="probs"``:  log sum_i beta_i softmax(z_i)  (its softmax is the weighted mean probability),
    * ``combine="logits"``: sum_i beta_i z_i.

    The z_i come from one vectorised call over stacked weights when the members share one
    architecture (:mod:`robustbench_kd.vectorised_ensemble`), otherwise from a loop; both give the same
    output and the same input gradient (within float rounding).

    ``"auto"`` vectorises on accelerators only: on CPU the vectorised call (a grouped convolution)
    measured slower than the loop (``bench/ensemble_speed.py``), so CPU keeps the loop there.

    Args:
        members: the teachers.
        weights: beta_i >= 0 summing to 1 (normalised if they do not); default uniform 1/M.
        combine: ``"probs"`` or ``"logits"`` (above).
        vectorize: ``"auto"`` (vectorise when the members share one architecture and the input is
            not on the CPU, else loop), ``True`` (always vectorise; a UserError if the members do
            not share one architecture) or ``False`` (always loop).
    """

    def __init__(
        self,
        members: Sequence[Teacher],
        *,
        weights: Sequence[float] | None = None,
        combine: str = "probs",
        vectorize: bool | str = "auto",
    ) -> None:
        super().__init__()
        if not members:
            raise UserError("a teacher ensemble needs at least one member")
        if combine not in ("probs", "logits"):
            raise UserError(f"teacher combine must be 'probs' or 'logits', got {combine!r}")
        if vectorize != "auto" and not isinstance(vectorize, bool):
            raise UserError(f'teacher vectorize must be "auto", true or false, got {vectorize!r}')
        if weights is None:
            weights = [1.0 / len(members)] * len(members)
        if len(weights) != len(members):
            raise UserError(f"{len(weights)} teacher weights given for {len(members)} teachers")
        if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise UserError(f"teacher weights must be non-negative with a positive sum, got {list(weights)}")
        total = float(sum(weights))
        self.members = nn.ModuleList(members)
        self.weights = [float(w) / total for w in weights]
        self.combine = combine
        self.vectorize = vectorize
        self.spec = "+".join(getattr(m, "spec", "?") for m in members)
        # The vectorised call runs the networks themselves: a plain Teacher only forwards to .net, and
        # its own attributes (the spec string) differ per member without changing what is computed.
        nets = [m.net if type(m) is Teacher else m for m in members]
        if vectorize is False:
            reason: str | None = "vectorize = false"
        elif len(nets) < 2:
            reason = "a single member"
        else:
            reason = architecture_mismatch(nets)
            if reason is not None and vectorize is True:
                raise UserError(
                    f"teacher vectorize = true needs members of one architecture, but {reason}; "
                    'use vectorize = "auto" or false'
                )
            if reason is not None:
                log.info("teacher ensemble %s evaluated in a loop: %s", self.spec, reason)
        self.loop_reason = reason  #: why the members cannot be vectorised (None when they can)
        # A plain attribute (not a submodule): the stacks stay out of state_dict() and parameters().
        self._stacked: StackedMembers | None = StackedMembers(nets) if reason is None else None
        super().train(False)

    @property
    def can_vectorize(self) -> bool:
        """Whether the members can be evaluated in one vectorised call (one architecture, not disabled)."""
        return self._stacked is not None

    def vectorizes_on(self, device: torch.device | str) -> bool:
        """Whether forward on inputs on ``device`` uses the vectorised call."""
        return self._stacked is not None and (self.vectorize is True or torch.device(device).type != "cpu")

    def train(self, mode: bool = True) -> EnsembleTeacher:
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.half()/.cuda() give the members new tensors: drop the old stacks now (they would
        # otherwise keep the old copy alive until the next forward notices and rebuilds).
        if self._stacked is not None:
            self._stacked.clear()
        return super()._apply(fn, *args, **kwargs)

    def member_logits(self, x: Tensor) -> Tensor:
        """All members' logits, shape (M, N, C)."""
        if self._stacked is not None and (self.vectorize is True or x.device.type != "cpu"):
            return self._stacked(x)
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: Tensor) -> Tensor:
        z = self.member_logits(x)
        w = torch.tensor(self.weights, dtype=z.dtype, device=z.device).view(-1, *([1] * (z.ndim - 1)))
        if self.combine == "logits":
            return (w * z).sum(dim=0)
        # log sum_i beta_i softmax(z_i), stably: logsumexp_i(log beta_i + log_softmax(z_i)).
        return torch.logsumexp(torch.log_softmax(z, dim=-1) + w.log(), dim=0)


class TeacherSet(Mapping[str, nn.Module]):
    """Teachers by role. ``ts["robust"]`` is a :class:`Teacher` or :class:`EnsembleTeacher`."""

    def __init__(self, teachers: Mapping[str, nn.Module] | None = None) -> None:
        self._by_role: dict[str, nn.Module] = dict(teachers or {})

    def __getitem__(self, role: str) -> nn.Module:
        try:
            return self._by_role[role]
        except KeyError:
            have = ", ".join(self._by_role) or "none"
            raise UserError(f"no teacher for role {role!r} (configured roles: {have})") from None

    def __contains__(self, role: object) -> bool:
        return role in self._by_role

    def get(self, role: str, default: nn.Module | None = None) -> nn.Module | None:  # type: ignore[override]
        return self._by_role.get(role, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_role)

    def __len__(self) -> int:
        return len(self._by_role)

    def to(self, device: torch.device | str) -> TeacherSet:
        for t in self._by_role.values():
            t.to(device)
        return self

    def parameters(self) -> Iterator[nn.Parameter]:
        for t in self._by_role.values():
            yield from t.parameters()


@dataclass(frozen=True)
class TeacherSpec:
    """A parsed ``scheme:ref?key=value&...`` teacher string.

    ``sha256=<hex>[,<hex>...]`` is taken out of the options into :attr:`sha256`: the pinned digest(s)
    of the file(s) the source reads, checked before anything is unpickled (sources that cannot check
    one refuse the spec, so a pin is never silently ignored).
    """

    scheme: str
    ref: str
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""
    sha256: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> TeacherSpec:
        if not isinstance(text, str) or ":" not in text:
            raise UserError(
                f"teacher spec {text!r} has no scheme; write e.g. 'robustbench:cifar10/Linf/Carmon2019Unlabeled' "
                "or 'file:path/to/checkpoint.pt'"
            )
        scheme, _, rest = text.partition(":")
        ref, question, query = rest.partition("?")
        if not ref.strip():
            raise UserError(f"teacher spec {text!r} names no model after '{scheme}:'")
        options = parse_spec_query(query, text=text) if question else {}
        pinned = options.pop("sha256", None)
        from robustbench_kd.storage.checkpoint import parse_sha256

        digests = parse_sha256(pinned, where=f"teacher spec {text!r}") if pinned is not None else ()
        return cls(scheme=scheme.strip().lower(), ref=ref.strip(), options=options, text=text, sha256=digests)

    def check_options(self, allowed: Collection[str]) -> None:
        """Refuse options this spec's source does not read (``sha256`` is always read, see :meth:`parse`).

        A source that would ignore an option calls this: an ignored ``?arch=`` or a misspelt ``?sha265=`` must
        not look as if it had been applied.
        """
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            valid = ["sha256", *sorted(allowed)]
            raise UserError(
                f"teacher spec {self.text!r}: unknown option {unknown[0]!r}{close_matches(unknown[0], valid)} "
                f"for the {self.scheme}: source; valid options: {', '.join(valid)}"
            )

    def identity(self) -> str:
        """What this spec loads, independent of where its file lies: a resume compares teachers by it.

        A ``file:`` spec is named by its file's SHA-256 (a run whose teacher file moved is still the same
        run; one whose file was replaced is not), every other spec by scheme and ref; the options follow,
        sorted, without the pin (the digest says more).
        """
        name = f"{self.scheme}:{self.ref}"
        if self.scheme == "file":
            path = Path(self.ref).expanduser()
            if path.is_file():
                from robustbench_kd.storage.hashing import sha256_of

                name = f"file:sha256={sha256_of(path)}"
        options = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{name}?{options}" if options else name

    @staticmethod
    def option_value(text: str) -> int | float | bool | str:
        """An option's string value as the number or boolean it spells (``"2"`` -> 2, ``"true"`` -> True).

        Anything else stays a string. Sources that pass spec options to a constructor use this, so that
        ``file:ckpt.pt?arch=small-cnn&width=2`` and the submission bundle's zoo entry agree on ``width=2``.
        """
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return {"true": True, "false": False}.get(text.lower(), text)


def parse_spec_query(query: str, *, text: str) -> dict[str, str]:
    """The ``key=value&...`` options after a spec's ``?``, strictly (percent-escapes decoded).

    Unlike :func:`urllib.parse.parse_qsl`, which drops ``sha256=`` with an empty value and keeps the last of
    two equal keys, every part must be ``key=value`` with a non-empty key and value, and a key may appear
    once: ``file:t.pt?sha256=$PIN`` with ``PIN`` unset is an error, never a spec without its pin.
    """
    where = f"teacher spec {text!r}"
    if not query.strip():
        raise UserError(f"{where} ends in '?' with no options; write key=value after '?' or drop the '?'")
    options: dict[str, str] = {}
    for part in query.split("&"):
        key, sep, value = (unquote_plus(piece).strip() for piece in part.partition("="))
        if not part.strip():
            raise UserError(f"{where} has an empty option (a doubled or trailing '&'); write key=value&key=value")
        if not sep or not key:
            raise UserError(f"{where}: option {part!r} is not key=value (e.g. ?arch=small-cnn&sha256=<64 hex>)")
        if not value:
            raise UserError(
                f"{where}: option {key!r} has an empty value (an unset shell variable?); give it a value or drop "
                f"'{key}='"
            )
        if key in options:
            raise UserError(f"{where} gives option {key!r} twice ({options[key]!r} and {value!r}); give it once")
        options[key] = value
    return options


@dataclass(frozen=True, kw_only=True)
class TeacherLoadContext:
    """What a teacher source needs to know to build a teacher for this run."""

    dataset: str
    num_classes: int
    in_channels: int
    image_size: int
    threat_model: str = "Linf"
    model_dir: Path = Path("models")
    allow_download: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    students: Any = None  #: the student-architecture registry (to rebuild local checkpoints)


def check_teacher_output(teacher: nn.Module, ctx: TeacherLoadContext, spec: str) -> None:
    """Run a tiny forward to check the teacher accepts the data shape and predicts num_classes."""
    x = torch.rand(2, ctx.in_channels, ctx.image_size, ctx.image_size, device=ctx.device)
    try:
        with torch.no_grad():
            out = teacher(x)
    except Exception as exc:  # any failure here means the teacher does not fit the data
        raise UserError(
            f"teacher {spec} does not accept {ctx.dataset} inputs of shape "
            f"{tuple(x.shape[1:])}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if out.ndim != 2 or out.shape[1] != ctx.num_classes:
        raise UserError(f"teacher {spec} predicts {out.shape[-1]} classes but {ctx.dataset} has {ctx.num_classes}")


def role_identity(role_spec: Any) -> dict[str, Any]:
    """A configured role (one spec, a list, or ``{specs, weights, combine, vectorize}``) as what it computes.

    ``"x"`` and ``["x"]`` are the same teacher; ``vectorize`` is left out (it changes how the ensemble is
    evaluated, not its output).
    """
    table: Mapping[str, Any] = role_spec if isinstance(role_spec, Mapping) else {}
    if isinstance(role_spec, str):
        specs = [role_spec]
    else:
        specs = list(table.get("specs", [])) if table else list(role_spec)
    return {
        "members": [TeacherSpec.parse(text).identity() for text in specs],
        "weights": table.get("weights"),
        "combine": table.get("combine", "probs"),
    }


def describe(spec: Any) -> str:
    """A short human string for a role's configured spec (string or ensemble mapping)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return " + ".join(spec.get("specs", []))
    return str(spec)


def file_architecture(data: Mapping[str, Any], options: Mapping[str, str]) -> tuple[str | None, dict[str, Any]]:
    """``(arch, arch_options)`` that a ``file:`` spec with ``options`` rebuilds from the checkpoint entries ``data``.

    ``arch`` is the spec's ``arch`` option or else the checkpoint's recorded ``student_arch`` name (None when
    neither says); the options are the recorded ones (only when ``arch`` is the recorded architecture)
    overridden by the spec's other options, each read with :meth:`TeacherSpec.option_value`.
    """
    recorded = data.get("student_arch")
    recorded = recorded if isinstance(recorded, dict) else {}
    spec_options = dict(options)
    arch = spec_options.pop("arch", None) or recorded.get("name")
    arch_options = dict(recorded.get("options", {})) if arch == recorded.get("name") else {}
    arch_options.update({k: TeacherSpec.option_value(v) for k, v in spec_options.items()})
    return arch, arch_options
