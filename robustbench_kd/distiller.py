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
import inspect
import json
import math
import numbers
import re
import sys
import types
import typing
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
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
# A method's options are the fields of its nested ``Config`` dataclass. The kind of value each accepts is
# its annotation; ranges and choices are declared once, as field metadata through :func:`option`. Both
# are checked by :func:`check_options` when a Config is built (from a run file or in Python), so no
# method writes its own type or range checks.

_OPTION = "rbkd_option"
_REFUSED: Any = object()  # what an OptionType's convert returns for a value of another kind
_NO_DEFAULT: Any = object()  # the "default" of an option declared without one


@dataclass(frozen=True)
class OptionRule:
    """What values an option accepts; ``describe()`` is the phrase of its error message.

    ``low``/``high`` bound the value (``low_open``/``high_open`` exclude the bound); ``integer`` asks for
    a whole number; ``choices`` lists the accepted values; ``help`` is shown by ``methods --options``.
    ``None`` (where the annotation or a ``None`` default allows it) means "use the reference value" and
    is never checked against the rule. For a list or table option the rule applies to each of its values.
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
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    choices: Any = None,
    help: str = "",
) -> Any:
    """A method option with its accepted values, for a ``Config`` field: ``beta: float = option(6.0, low=0)``.

    The field's annotation says what kind of value the option takes (see :class:`MethodConfig`); the
    keywords narrow it. ``choices`` may be any iterable of accepted values; the bounds are inclusive
    unless ``low_open`` / ``high_open``; for a list or table option they apply to each of its values.
    A list or table default is given as ``default_factory`` (``option(default_factory=dict)``), since
    a dataclass cannot share one mutable default between its instances. The rule is checked by
    :class:`MethodConfig` (message ``method.<name> must be <rule>, got <value>``) and its ``help`` is
    listed by ``robustbench-kd methods --options``.
    """
    if (default is dataclasses.MISSING) == (default_factory is dataclasses.MISSING):
        raise TypeError("option() needs exactly one of a default or a default_factory")
    rule = OptionRule(
        low=low,
        high=high,
        low_open=low_open,
        high_open=high_open,
        integer=integer,
        choices=tuple(choices) if choices is not None else None,
        help=help,
    )
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata={_OPTION: rule})
    return field(default=default, metadata={_OPTION: rule})


def option_rule(f: dataclasses.Field[Any]) -> OptionRule | None:
    """The :class:`OptionRule` a Config field was declared with (None for a plain field)."""
    return f.metadata.get(_OPTION)


@dataclass(frozen=True)
class OptionType:
    """The kind of value an option accepts, read from its annotation (see :func:`option_types`).

    ``spelling`` is the type as a user writes it (``float``, ``list[int]``, ``table``, ``float | None``);
    ``parts`` are the accepted alternatives in words (``("a number",)``, ``("true", "false")``), joined
    by :attr:`words` for messages; ``plural`` names several such values (``"numbers"``, inside ``"a list
    of numbers"``). ``convert`` returns the value as the Config stores it (an int given for a float as a
    float, a list for a tuple option as a tuple), or a private sentinel for a value of another kind.
    """

    spelling: str
    parts: tuple[str, ...]
    plural: str
    convert: Callable[[Any], Any] = field(repr=False, compare=False)

    @property
    def words(self) -> str:
        """The accepted values in words: ``"a number"``, ``"true or false"``, ``"a number or none"``."""
        return _join_or(self.parts)

    def accepts(self, value: Any) -> bool:
        return self.convert(value) is not _REFUSED


def _join_or(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _scalar(
    spelling: str, words: str, plural: str, check: Callable[[Any], bool], make: Callable[[Any], Any]
) -> OptionType:
    return OptionType(spelling, (words,), plural, lambda v: make(v) if check(v) else _REFUSED)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_ANY = OptionType("any", ("anything",), "values", lambda v: v)
_NONE = OptionType("None", ("none",), "none", lambda v: v if v is None else _REFUSED)
_SIMPLE: dict[Any, OptionType] = {
    bool: OptionType(
        "bool", ("true", "false"), "true or false values", lambda v: v if isinstance(v, bool) else _REFUSED
    ),
    # A float option takes an int too (TOML writes 6 for 6.0) and stores it as a float; exact up to 2**53.
    float: _scalar("float", "a number", "numbers", _is_number, float),
    int: _scalar(
        "int", "an integer", "integers", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), int
    ),
    str: _scalar("str", "a string", "strings", lambda v: isinstance(v, str), lambda v: v),
    type(None): _NONE,
    Any: _ANY,
    object: _ANY,
}


def _union(members: Sequence[OptionType]) -> OptionType:
    """Any of ``members``, the first that takes a value converting it; None listed last (``float | None``)."""
    ordered = [m for m in members if m is not _NONE] + [m for m in members if m is _NONE]

    def convert(v: Any) -> Any:
        for m in ordered:
            out = m.convert(v)
            if out is not _REFUSED:
                return out
        return _REFUSED

    return OptionType(
        " | ".join(m.spelling for m in ordered),
        tuple(p for m in ordered for p in m.parts),
        _join_or([m.plural for m in ordered]),
        convert,
    )


def _sequence(item: OptionType, container: type) -> OptionType:
    """A TOML array: a list or tuple whose every item ``item`` accepts, stored as ``container``."""

    def convert(v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            return _REFUSED
        out = [item.convert(x) for x in v]
        return _REFUSED if any(x is _REFUSED for x in out) else container(out)

    of = "" if item is _ANY else f" of {item.plural}"
    spelling = "list" if item is _ANY else f"list[{item.spelling}]"
    return OptionType(spelling, (f"a list{of}",), f"lists{of}", convert)


def _fixed_tuple(items: Sequence[OptionType]) -> OptionType:
    """A TOML array of exactly ``len(items)`` values, each of its own kind, stored as a tuple."""

    def convert(v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or len(v) != len(items):
            return _REFUSED
        out = [t.convert(x) for t, x in zip(items, v, strict=True)]
        return _REFUSED if any(x is _REFUSED for x in out) else tuple(out)

    inner = ", ".join(t.words for t in items)
    spelling = f"list[{', '.join(t.spelling for t in items)}]"
    return OptionType(spelling, (f"a list of {len(items)} values ({inner})",), f"lists of {len(items)} values", convert)


def _table(key: OptionType, value: OptionType) -> OptionType:
    """A TOML table: a mapping whose keys ``key`` and values ``value`` accept, stored as a dict."""

    def convert(v: Any) -> Any:
        if not isinstance(v, Mapping):
            return _REFUSED
        out = {key.convert(k): value.convert(x) for k, x in v.items()}
        return _REFUSED if any(k is _REFUSED or x is _REFUSED for k, x in out.items()) else out

    plain = key in (_ANY, _SIMPLE[str]) and value is _ANY
    of = "" if plain else f" of {key.plural} to {value.plural}"
    spelling = "table" if plain else f"table[{key.spelling}, {value.spelling}]"
    return OptionType(spelling, (f"a table{of}",), f"tables{of}", convert)


def _literal(values: Sequence[Any]) -> OptionType:
    def convert(v: Any) -> Any:  # 1 == True == 1.0: the kind must match too
        return v if any(v == c and type(v) is type(c) for c in values) else _REFUSED

    words = "one of " + ", ".join(repr(c) for c in values)
    return OptionType(" | ".join(_literal_text(c) for c in values), (words,), f"values {words}", convert)


def _option_type(annotation: Any) -> OptionType:
    """The :class:`OptionType` of a resolved annotation."""
    if annotation in _SIMPLE:
        return _SIMPLE[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _union([_option_type(a) for a in args])
    if origin is typing.Literal:
        return _literal(args)
    if annotation in (list, tuple, dict, Mapping, Sequence) or origin in (list, tuple, dict, Mapping, Sequence):
        kind = origin or annotation
        if kind is dict or kind is Mapping:
            key, value = (_option_type(a) for a in args) if args else (_ANY, _ANY)
            return _table(key, value)
        if kind is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            return _fixed_tuple([_option_type(a) for a in args])
        item = _option_type(args[0]) if args else _ANY
        return _sequence(item, list if kind is list else tuple)
    if isinstance(origin or annotation, type):  # any other class: an instance of it (set from Python)
        cls = origin or annotation
        return OptionType(
            cls.__name__,
            (f"a {cls.__name__}",),
            f"{cls.__name__} values",
            lambda v: v if isinstance(v, cls) else _REFUSED,
        )
    return _ANY  # a typing construct without a runtime check (a TypeVar, a NewType)


def _resolved_annotations(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)``, or per name where one annotation cannot be resolved (None there)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:  # e.g. a name imported only for type checkers; the others still resolve
        hints: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            module = sys.modules.get(klass.__module__)
            namespace = dict(vars(module)) if module is not None else {}
            for name, annotation in vars(klass).get("__annotations__", {}).items():
                try:
                    hints[name] = (
                        eval(annotation, namespace, dict(vars(klass))) if isinstance(annotation, str) else annotation
                    )
                except Exception:
                    hints[name] = None
        return hints


_OPTION_TYPES: weakref.WeakKeyDictionary[type, Mapping[str, OptionType]] = weakref.WeakKeyDictionary()


def option_types(config_cls: type) -> Mapping[str, OptionType]:
    """The :class:`OptionType` of every field of a ``Config`` dataclass, from its annotations.

    A ``None`` default makes ``None`` acceptable whatever the annotation says (it means "the reference
    value"); an annotation that cannot be resolved falls back to the type of the default.
    """
    known = _OPTION_TYPES.get(config_cls)
    if known is not None:
        return known
    hints = _resolved_annotations(config_cls)
    out: dict[str, OptionType] = {}
    for f in dataclasses.fields(config_cls):
        annotation = hints.get(f.name)
        default = option_default(f)
        if annotation is None:
            annotation = Any if default is None or default is _NO_DEFAULT else type(default)
        kind = _option_type(annotation)
        if default is None and not kind.accepts(None):
            kind = _union([kind, _NONE])
        out[f.name] = kind
    _OPTION_TYPES[config_cls] = out
    return out


def option_default(f: dataclasses.Field[Any]) -> Any:
    """The default of a Config field (a fresh one from its ``default_factory``)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _NO_DEFAULT


class OptionTypeError(UserError):
    """A method option given a value of another kind than its annotation declares.

    Raised by :func:`check_options` without the method's registry key, which a Config does not know;
    :meth:`Distiller.config_from_mapping` re-raises it with the key (:meth:`for_method`).
    """

    def __init__(self, key: str, expected: str, value: Any, default: Any = _NO_DEFAULT, method: str = "") -> None:
        self.key, self.expected, self.value, self.default, self.method = key, expected, value, default, method
        where = f"method.{key} of method {method!r}" if method else f"method.{key}"
        shown = "" if default is _NO_DEFAULT else f" (default {default!r})"
        super().__init__(f"{where} must be {expected}{shown}, got {value!r}")

    def for_method(self, method: str) -> OptionTypeError:
        """The same error, naming the method: ``method.beta of method 'trades' must be ...``."""
        return OptionTypeError(self.key, self.expected, self.value, self.default, method)


def check_options(config: Any) -> None:
    """Check every option of ``config``: its kind against its annotation, then its declared rule.

    A value of the right kind is stored as the annotation asks (see :class:`OptionType`), so a frozen
    Config holds a float for a float option given 6 and a tuple for a tuple option given a list. Raises
    a one-line UserError for the first option refused: :class:`OptionTypeError` for the kind, otherwise
    ``method.<name> must be <rule>, got <value>``.
    """
    kinds = option_types(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = kinds[f.name]
        converted = kind.convert(value)
        if converted is _REFUSED:
            raise OptionTypeError(f.name, kind.words, value, option_default(f))
        unusable = _unusable_number(converted)
        if unusable is not None:
            raise OptionTypeError(f.name, unusable, value, option_default(f))
        if converted is not value:
            object.__setattr__(config, f.name, converted)  # a frozen Config: normalised once, while being built
        rule = option_rule(f)
        if rule is None or converted is None:
            continue
        if isinstance(converted, (list, tuple, Mapping)):
            items = converted.values() if isinstance(converted, Mapping) else converted
            bad = next((x for x in items if x is not None and not rule.accepts(x)), _REFUSED)
            if bad is not _REFUSED:
                raise UserError(f"method.{f.name}: each value must be {rule.describe()}, got {bad!r} in {converted!r}")
        elif not rule.accepts(converted):
            shown = (
                repr(converted) if rule.choices is not None or rule.integer or isinstance(converted, str) else converted
            )
            tail = " or None" if f.default is None else ""
            raise UserError(f"method.{f.name} must be {rule.describe()}{tail}, got {shown}")


#: The largest integer an option may hold: torch and numpy hold integers in 64 bits.
_INT64_MAX = 2**63 - 1
#: Values :func:`_unusable_number` looks at in one option (a run file's option holds a handful).
_NUMBER_SCAN_LIMIT = 100_000


def _unusable_number(value: Any) -> str | None:
    """What ``value`` must be instead, if it is or holds a NaN/infinite number or an integer beyond 64 bits.

    Checked for every option whatever its annotation or rule says, since no method can mean such a value
    and each would surface later as a NaN loss or an overflow inside torch. Returns None for a usable value.
    """
    stack, seen = [value], 0
    while stack and seen < _NUMBER_SCAN_LIMIT:
        item = stack.pop()
        seen += 1
        if isinstance(item, float) and not math.isfinite(item):
            return "a finite number" if item is value else "finite numbers only"
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > _INT64_MAX:
            return "an integer that fits 64 bits" if item is value else "integers that fit 64 bits only"
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of a method's ``Config``: checks every option's kind and :func:`option` rule when it is built.

    Each field is an option. Its annotation is the kind of value it takes, checked whether the Config is
    built in Python or from a run file: ``bool``, ``int``, ``float`` (an int is taken and stored as a
    float), ``str``, ``Literal["a", "b"]``, ``X | None`` (None: the reference value; a None default
    allows it in any case), ``list[X]`` and ``tuple[X, ...]`` (a TOML array, stored as a list or a
    tuple; prefer the tuple, which keeps the frozen Config hashable), ``dict[str, X]`` or
    ``Mapping[str, X]`` (a TOML table, stored as a dict) and ``Any`` (anything). ``True`` is not a number
    and ``1`` is not true. A list or table default is a ``default_factory``::

        @dataclass(frozen=True, kw_only=True)
        class Config(MethodConfig):
            beta: float = option(6.0, low=0, help="weight of the KL term")
            milestones: tuple[int, ...] = option((), low=1, integer=True, help="epochs where beta decays")
            role_weights: dict[str, float] = option(default_factory=dict, low=0, help="weight per teacher role")

    A user sets them in the run file as ``milestones = [100, 150]`` and ``role_weights = {robust = 1.0}``,
    or as a table of its own::

        [method.role_weights]
        robust = 1.0
        natural = 0.5

    and on the command line as ``--set method.milestones=[100,150]``, as a TOML inline table,
    ``--set 'method.role_weights={robust = 1.0}'``, or key by key, ``--set method.role_weights.natural=0.5``.

    A subclass with checks that involve several options defines ``__post_init__`` and calls
    ``super().__post_init__()`` first; the values it reads are then already of their declared kinds.
    """

    def __post_init__(self) -> None:
        check_options(self)


def describe_options(cls: type[Distiller], source: str = "") -> list[str]:
    """The lines of ``robustbench-kd methods --options``: a header, then one aligned line per option.

    The header names the registry key, then ``source`` (e.g. ``plugin rslad, robustbench_kd 0.1.0``)
    and the paper; each option line reads ``method.<name>  <type>  = <default>  <help>``, the default
    written as in a TOML run file. The help is the option's ``help=``, else the first sentence of the
    entry for that name in the ``Arguments:`` / ``Args:`` / ``Attributes:`` section of the method's (or
    its Config's) docstring, else empty.
    """
    header = cls.name + (f"  ({source})" if source else "")
    paper = citation_of(cls)
    lines = [header + (f" - {paper}" if paper else "")]
    config = cls.Config
    kinds = option_types(config)
    documented = _documented_options(cls)
    rows = []
    for f in dataclasses.fields(config):
        rule = option_rule(f)
        default = option_default(f)
        shown = "(required)" if default is _NO_DEFAULT else _literal_text(default)
        text = " ".join(rule.help.split()) if rule is not None and rule.help else documented.get(f.name, "")
        rows.append((f"method.{f.name}", kinds[f.name].spelling, f"= {shown}", text))
    if not rows:
        return [*lines, "  (no options)"]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        lines.append(
            ("  " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3]).rstrip()
        )
    return lines


def _literal_text(value: Any) -> str:
    """``value`` as a TOML run file writes it (``true``, ``"eval"``, ``[1, 2]``, ``{a = 1.0}``); None as None."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal_text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        keys = (k if isinstance(k, str) and _BARE_KEY.match(k) else json.dumps(str(k)) for k in value)
        return "{" + ", ".join(f"{k} = {_literal_text(v)}" for k, v in zip(keys, value.values(), strict=True)) + "}"
    return repr(value)


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SECTION = re.compile(r"^(\s*)(Arguments|Args|Attributes)\b[^:]*:")
_ENTRY = re.compile(r"^(\s*)([A-Za-z_][\w, ]*?)\s*(\([^)]*\))?:\s+(.*)$")
_MARKUP = re.compile(r":\w+:`~?([^`]+)`|``([^`]+)``")
_SENTENCE_END = re.compile(r"\.\s+(?=[A-Z(])")


def _documented_options(cls: type[Distiller]) -> dict[str, str]:
    """Option name -> first sentence of its docstring entry, from the method and its Config (and their bases)."""
    found: dict[str, str] = {}
    for klass in (*cls.__mro__, *cls.Config.__mro__):
        if klass.__module__ in ("builtins", "abc") or klass.__module__.startswith("torch."):
            continue
        for name, text in _docstring_entries(klass.__dict__.get("__doc__") or "").items():
            found.setdefault(name, text)
    return found


def _docstring_entries(doc: str) -> dict[str, str]:
    """The entries of a docstring's ``Arguments:`` / ``Args:`` / ``Attributes:`` sections, one line each."""
    entries: dict[str, str] = {}
    lines = inspect.cleandoc(doc).splitlines()
    i = 0
    while i < len(lines):
        section = _SECTION.match(lines[i])
        i += 1
        if section is None:
            continue
        indent = len(section.group(1))
        names: list[str] = []
        text: list[str] = []
        entry_indent = -1
        while i < len(lines) and lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) > indent:
            line = lines[i]
            entry = _ENTRY.match(line)
            depth = len(line) - len(line.lstrip())
            if entry is not None and (entry_indent < 0 or depth <= entry_indent):
                _store_entry(entries, names, text)
                entry_indent = depth
                names = [n.strip() for n in entry.group(2).split(",") if n.strip()]
                text = [entry.group(4)]
            elif names:
                text.append(line.strip())
            i += 1
        _store_entry(entries, names, text)
    return entries


def _store_entry(entries: dict[str, str], names: list[str], text: list[str]) -> None:
    plain = _MARKUP.sub(lambda m: m.group(1) or m.group(2), " ".join(" ".join(text).split()))
    first = _SENTENCE_END.split(plain, maxsplit=1)[0].rstrip(".")
    for name in names:
        entries.setdefault(name, first)


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
        """Build ``cls.Config`` from a mapping (a run file's ``[method]`` table less its ``name``).

        Unknown keys raise a UserError listing the valid ones. The values are checked where every Config
        is, by :func:`check_options` as it is built; a value of the wrong kind is reported with the
        method's registry key (``method.beta of method 'trades' must be a number (default 6.0), got 'six'``).
        """
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        for key in values:
            if key not in fields:
                valid = ", ".join(sorted(fields)) or "(none)"
                raise UserError(
                    f"unknown option method.{key} for method {cls.name!r}{close_matches(key, fields)}; "
                    f"valid options: {valid}"
                )
        try:
            config = cls.Config(**dict(values))
            if not isinstance(config, MethodConfig):  # a plain dataclass checks nothing itself; __init__ checks it too
                check_options(config)
        except OptionTypeError as exc:
            raise exc.for_method(cls.name) from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"invalid options for method {cls.name!r}: {exc}") from None
        return config

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
