"""The one interface every distillation method implements.

A method is a :class:`Distiller` subclass in a plugin module. The trainer calls, per batch (the step
itself is :func:`robustbench_kd.training.step.train_step`)::

    ctx = BatchContext(...)                 # clean batch, student, teachers, threat, counters
    distiller.prepare(ctx)                  # optional: precompute what the attack needs
    spec = distiller.attack_spec(threat)    # None = no inner maximisation (clean training)
    ctx.x_adv = attack(x, y)                # built per spec per epoch; maximises distiller.attack_loss(ctx, x').sum()
    out = distiller.loss(ctx)               # LossOutput(total, terms), student in train mode
    out.total.backward(); optimiser.step()
    distiller.after_step(ctx, out)          # stateful updates (adaptive weights, memory banks)

A method's options are the fields of its nested ``Config``; :func:`option` declares an option's accepted
values and help once, and :class:`MethodConfig` checks them whenever a Config is built.

Once per run, before any batch, the trainer calls in this order::

    distiller = Method(config, num_classes=...)   # options only: no network exists yet
    distiller.on_setup(setup)                      # SetupContext: the real student, teachers, data shape
    optimiser = SGD(student params + distiller.trainable_parameters())
    (--resume) distiller.load_state_dict(...); distiller.load_method_state(...)
    distiller.on_train_start(run)                  # also after a resume, with the state restored
    per epoch: on_epoch_start, the batches above, on_epoch_end

A network the method owns (a second classifier, embedding heads whose sizes depend on the student) is
created in ``on_setup`` as an attribute of the distiller: it then joins the optimiser, moves with
``.to()``, and is saved and restored with the checkpoint. Created later (in ``loss``), it would train
without being in the optimiser; :func:`robustbench_kd.testing.check_distiller` refuses that.

The trainer never branches on a method's name: everything method-specific lives in these calls.
A distiller is an ``nn.Module`` so that extra trainable parts (embedding heads) and buffers (memory
banks, priors) move with ``.to()``, join the optimiser and are saved in checkpoints.
"""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from robustbench_kd.errors import UserError, close_matches

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext, SetupContext
    from robustbench_kd.threat import ThreatSpec

ATTACK_INITS = ("uniform", "gauss", "none")
STUDENT_MODES = ("train", "eval")
_KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


# -- declarative method options ------------------------------------------------------------------
# A method's options are the fields of its nested ``Config`` dataclass. Ranges and choices are declared
# once, as field metadata through :func:`option`, and checked by :class:`MethodConfig` when a Config is
# built (from a run file or in Python), so no method writes its own range checks.

_OPTION = "rbkd_option"


@dataclass(frozen=True)
class OptionRule:
    """What values an option accepts; ``describe()`` is the phrase of its error message.

    ``low``/``high`` bound the value (``low_open``/``high_open`` exclude the bound); ``integer`` asks for
    a whole number; ``choices`` lists the accepted values; ``help`` is shown by ``methods --options``.
    A ``None`` default means "use the reference value" and is always accepted.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    choices: tuple[Any, ...] | None = None
    help: str = ""

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        if self.integer:
            if self.low == 0 and self.high is None:
                return "a positive integer" if self.low_open else "a non-negative integer"
            return "an integer " + self._interval()
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low == 0 and self.low_open and self.high is None:
            return "positive"
        return self._interval()

    def _interval(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)

    def accepts(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.low is None and self.high is None and not self.integer:
            return True  # no rule: an option declared for its help text only
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


def option(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    choices: Any = None,
    help: str = "",
) -> Any:
    """A method option with its accepted values, for a ``Config`` field: ``beta: float = option(6.0, low=0)``.

    ``choices`` may be any iterable of accepted values; the bounds are inclusive unless ``low_open`` /
    ``high_open``. The rule is checked by :class:`MethodConfig` (message ``method.<name> must be <rule>,
    got <value>``) and its ``help`` is listed by ``robustbench-kd methods --options``.
    """
    rule = OptionRule(
        low=low,
        high=high,
        low_open=low_open,
        high_open=high_open,
        integer=integer,
        choices=tuple(choices) if choices is not None else None,
        help=help,
    )
    return field(default=default, metadata={_OPTION: rule})


def option_rule(f: dataclasses.Field[Any]) -> OptionRule | None:
    """The :class:`OptionRule` a Config field was declared with (None for a plain field)."""
    return f.metadata.get(_OPTION)


def check_options(config: Any) -> None:
    """Raise a one-line UserError for the first option of ``config`` that its declared rule refuses."""
    for f in dataclasses.fields(config):
        rule = option_rule(f)
        value = getattr(config, f.name)
        if rule is None or (value is None and f.default is None) or rule.accepts(value):
            continue
        shown = repr(value) if rule.choices is not None or rule.integer or isinstance(value, str) else value
        tail = " or None" if f.default is None else ""
        raise UserError(f"method.{f.name} must be {rule.describe()}{tail}, got {shown}")


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of a method's ``Config``: checks every :func:`option` rule when the Config is built.

    A subclass with checks that involve several options defines ``__post_init__`` and calls
    ``super().__post_init__()`` first.
    """

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True, kw_only=True)
class AttackSpec:
    """How the inner maximisation runs for one method.

    Attributes:
        eps, alpha, steps: radius, step size and number of steps (input units).
        norm: ``"Linf"`` or ``"L2"``.
        init: ``"uniform"`` (x + U(-eps, eps), Madry/ARD), ``"gauss"`` (x + init_std * N(0, I),
            TRADES/RSLAD/AdaAD) or ``"none"``.
        init_std: standard deviation of the gaussian start.
        student_mode: BN/dropout mode of the student during the attack: ``"eval"`` (TRADES, RSLAD,
            MTARD, AdaAD) or ``"train"`` (ARD, IAD: batch statistics, running stats updated per step).
        teacher_grad: the attack loss differentiates the teacher w.r.t. its input (AdaAD, SmaraAD);
            informational: teachers always allow input gradients, their parameters never get any.
        large_step: allow ``alpha > eps``. Only single-step FGSM with random start (Wong et al.
            2020, step 1.25 eps) needs it; everywhere else a step above the radius means swapped
            arguments, so it is rejected.
    """

    eps: float
    alpha: float
    steps: int
    norm: str = "Linf"
    init: str = "uniform"
    init_std: float = 1e-3
    student_mode: str = "eval"
    teacher_grad: bool = False
    large_step: bool = False

    def __post_init__(self) -> None:
        if self.init not in ATTACK_INITS:
            raise UserError(f"attack init must be one of {', '.join(ATTACK_INITS)}, got {self.init!r}")
        if self.student_mode not in STUDENT_MODES:
            raise UserError(f"attack student_mode must be one of {', '.join(STUDENT_MODES)}, got {self.student_mode!r}")
        if self.steps > 0 and self.alpha > self.eps + 1e-12 and not self.large_step:
            raise UserError(
                f"attack step size alpha={self.alpha:.6g} exceeds eps={self.eps:.6g}; "
                "pass them by keyword and check they are not swapped"
            )


@dataclass
class LossOutput:
    """The outer objective of one batch.

    Attributes:
        total: scalar tensor to back-propagate (the method computes its own weighting).
        terms: named, detached pieces for logging (e.g. ``{"kl_adv": ..., "kl_nat": ...}``).
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


class Distiller(nn.Module, ABC):
    """Base class of every method.

    Subclasses set the class attributes and define a nested frozen ``Config`` dataclass whose
    defaults reproduce the method's reference code; deviations are flags on that Config.

    Class attributes:
        name: registry key, lowercase kebab-case (``"rslad"``, ``"pgd-at"``).
        paper: citation shown by ``robustbench-kd methods``.
        teacher_roles: roles the method needs (``()``, ``("robust",)``, ``("robust", "natural")``).
        optional_teacher_roles: roles it can use but does not need.
        supports_distributed: the method trains correctly under torchrun/DDP, where each process sees
            a slice of the global batch: its loss is a mean over the batch and any state it updates
            from a step's samples is made identical on every process (all-reduce). Default False:
            a method must opt in (see :meth:`check_distributed`).
        indexes_training_set: True if the method keeps per-sample state indexed by ``ctx.index`` over
            the training set (a memory bank); such a method refuses ``data.extra_path``.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    teacher_roles: ClassVar[tuple[str, ...]] = ()
    optional_teacher_roles: ClassVar[tuple[str, ...]] = ()
    supports_distributed: ClassVar[bool] = False
    indexes_training_set: ClassVar[bool] = False
    # The instance's Config (each subclass's own dataclass; typed loosely so subclasses read their fields).
    config: Any

    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        """Method hyper-parameters (none by default)."""

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__()
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {type(self).__name__}.Config, got {type(config)}")
        if not isinstance(self.config, MethodConfig):  # a plain dataclass Config: its rules are checked here
            check_options(self.config)
        self.num_classes = num_classes

    # -- configuration ------------------------------------------------------------------------
    @classmethod
    def config_from_mapping(cls, values: Mapping[str, Any]) -> Any:
        """Build ``cls.Config`` from a mapping; unknown keys raise a UserError listing the valid ones."""
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        for key in values:
            if key not in fields:
                valid = ", ".join(sorted(fields)) or "(none)"
                raise UserError(
                    f"unknown option method.{key} for method {cls.name!r}{close_matches(key, fields)}; "
                    f"valid options: {valid}"
                )
            _check_option_type(cls.name, key, values[key], fields[key].default)
        try:
            return cls.Config(**dict(values))
        except (TypeError, ValueError) as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"invalid options for method {cls.name!r}: {exc}") from None

    @classmethod
    def check_class(cls) -> None:
        """Validate the class attributes (called on registration)."""
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not _KEBAB.match(name):
            raise ValueError(f"{cls.__qualname__}.name must be lowercase kebab-case, got {name!r}")
        if not dataclasses.is_dataclass(cls.Config):
            raise ValueError(f"{cls.__qualname__}.Config must be a dataclass")

    def check_distributed(self, world_size: int) -> None:
        """Raise a one-line UserError if this configured method cannot train on ``world_size`` processes.

        Called once before a DDP run. Default: refuse unless the class sets ``supports_distributed``, and
        refuse ``kl_reduction = "sum"`` (DDP averages the per-process gradients, so a per-slice sum would
        shrink the step by the number of processes). Override to refuse further option combinations.
        """
        if not self.supports_distributed:
            raise UserError(
                f"method {self.name!r} does not support multi-process (torchrun/DDP) training: its "
                "state depends on every sample of a step; run it in one process"
            )
        if getattr(self.config, "kl_reduction", None) == "sum":
            raise UserError(
                f"method.kl_reduction = 'sum' cannot be split over {world_size} processes (DDP averages "
                "gradients); use 'batchmean' or 'mean_all', or run in one process"
            )

    # -- per-batch protocol ------------------------------------------------------------------
    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        """The inner maximisation for this method, or None for clean training.

        Default: the threat's budget, uniform start, student in eval mode.
        """
        return AttackSpec(eps=threat.eps, alpha=threat.alpha, steps=threat.steps, norm=threat.norm)

    def prepare(self, ctx: BatchContext) -> None:
        """Hook before the attack (e.g. memoise clean teacher outputs). Default: nothing."""

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        """Per-sample loss ``[B]`` that the inner maximisation ascends (its sum's input gradient)."""
        raise NotImplementedError(f"{type(self).__name__} has an attack_spec but no attack_loss")

    @abstractmethod
    def loss(self, ctx: BatchContext) -> LossOutput:
        """The outer objective for the batch, read from ``ctx`` (``ctx.x_adv`` is set when attacking)."""

    def after_step(self, ctx: BatchContext, out: LossOutput) -> None:
        """Hook after the optimiser step. Default: nothing."""

    def on_setup(self, setup: SetupContext) -> None:
        """Hook once per run, with the real networks, before the optimiser is built and before a resume.

        Create here what depends on the student, the teachers or the data's shape, as attributes of the
        distiller (see the module docstring): ``setup.new_student()`` builds a fresh network like the
        student, ``setup.example_input()`` a batch to measure feature sizes with. A resume then loads the
        checkpoint's state into what this hook built, so it must build the same modules every time.
        Default: nothing.
        """

    def on_train_start(self, run: Any) -> None:
        """Hook once before the first epoch (also after a resume, with the method state restored).

        ``run`` is the :class:`robustbench_kd.training.setup.Run`: ``run.config`` gives the optimiser
        schedule (e.g. MTARD decays its weight-update rate at ``run.config.optim.milestones``),
        ``run.data`` the training set size, ``run.epoch`` the epochs already done. Default: nothing.
        """

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Hook at the start of each epoch (0-based). Default: nothing."""

    def on_epoch_end(self, epoch: int, num_epochs: int) -> dict[str, float]:
        """Hook at the end of each epoch; may return metrics to log. Default: nothing."""
        return {}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Extra parameters the optimiser must update (default: the distiller's own parameters)."""
        return self.parameters()

    # -- persistence -------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        """State outside ``state_dict()`` that a resume must restore (Python scalars, tensors).

        Checkpoints are loaded with ``weights_only=True``: use tensors, numbers, strings, lists,
        dicts only.
        """
        return {}

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`method_state` returned."""

    # -- helpers for subclasses --------------------------------------------------------------
    @staticmethod
    def student_logits(ctx: BatchContext, x: Tensor) -> Tensor:
        """Student forward (never memoised: BN mode and gradients differ between phases)."""
        return ctx.student(x)


def citation_of(cls: type[Distiller]) -> str:
    """The paper a method cites, falling back to the first docstring line."""
    if getattr(cls, "paper", ""):
        return cls.paper
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def no_grad_eval(module: nn.Module, x: Tensor) -> Tensor:
    """Run ``module`` on ``x`` without gradients (used for teacher targets)."""
    with torch.no_grad():
        return module(x)


def _check_option_type(method: str, key: str, value: Any, default: Any) -> None:
    """A method option must have its default's kind (number, true/false, string); None defaults take anything."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise UserError(f"method.{key} of method {method!r} must be {kind} (default {default!r}), got {value!r}")
