"""Named registries filled by plugins: methods, teacher sources, students, datasets.

What a plugin registers is checked when it registers it, so that a broken plugin fails when it is
loaded, in one line naming it, instead of deep inside a run:

* a name is a string of letters, digits and ``-_.+`` (at most 64 characters, starting with a letter
  or digit): it is what a run file or a teacher spec names;
* a method is a :class:`~robustbench_kd.distiller.Distiller` subclass that passes its own class check
  (``name`` in kebab-case, a dataclass ``Config``) and is not abstract (it defines ``loss``);
* anything else (a student factory, a dataset loader, a teacher source) is callable.

A failed check is a :class:`~robustbench_kd.errors.UserError` (exit 2): the plugin cannot be loaded.

What a registered factory *returns* can only be checked when it is called, during a run: a student
factory and a teacher source must return a ``torch.nn.Module``, a dataset loader a ``DataSplits`` (its
train and test tensors and ``num_classes``). :meth:`Registry.get` hands out the factory behind a check
that raises :class:`PluginFailure` naming the plugin (exit 1, like any crash of plugin code at run
time); :meth:`Registry.entry` keeps the factory itself (its source is shipped in submission bundles).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from robustbench_kd.errors import UserError, close_matches

#: Names that were registered once and are gone, per registry kind: name -> what to use instead. Looking one
#: up raises a one-line UserError with this advice instead of the generic "unknown name" message.
RETIRED: dict[str, dict[str, str]] = {
    "method": {
        "gacd-aft": 'GACD\'s adversarial fine-tuning is [method] name = "pgd-at" with [student] init_from = '
        '"<the GACD run\'s checkpoint>" (same attack and loss)',
    },
}

#: A registered name: what ``[method] name``, ``student.arch``, ``data.dataset`` or a ``scheme:`` names.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")

#: Where each plugin comes from, for messages: plugin name -> "distribution version".
Origins = Callable[[str], str]

DISABLE_PLUGINS_ENV = "RBKD_DISABLE_PLUGINS"


class PluginFailure(RuntimeError):
    """A third-party plugin's code handed back something this library cannot use (a factory returned the
    wrong type). The message is one line naming the plugin; the command line prints it and exits 1."""


@dataclass(frozen=True)
class Entry:
    """One registered object and the plugin that added it."""

    name: str
    value: Any
    plugin: str
    description: str = ""


def short_repr(value: Any) -> str:
    """A short ``repr`` with the type, for a message: ``None (NoneType)``, ``'my method' (str)``."""
    try:
        text = repr(value)
    except Exception:  # a broken __repr__ in plugin code
        text = "<unprintable>"
    text = " ".join(text.split())
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _module_result(value: Any) -> str | None:
    import torch.nn as nn  # only when a factory is called: importing the registry stays cheap

    return None if isinstance(value, nn.Module) else "not a torch.nn.Module"


#: The attributes a dataset loader's result needs (DataSplits: data sits above the registry's layer).
_DATASET_FIELDS = ("train_x", "train_y", "test_x", "test_y", "num_classes")


def _dataset_result(value: Any) -> str | None:
    missing = [name for name in _DATASET_FIELDS if not hasattr(value, name)]
    return f"not a DataSplits (it has no {', '.join(missing)})" if missing else None


#: Per registry kind: what a registered callable's result must be (None: not checked).
RESULT_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "student architecture": _module_result,
    "teacher source": _module_result,
    "dataset": _dataset_result,
}


class Registry:
    """Name -> object, remembering which plugin added each name.

    Args:
        kind: what the registry holds, used in messages ("method", "teacher source", ...).
        origins: plugin name -> ``"distribution version"``, for messages that name a plugin.
    """

    def __init__(self, kind: str, origins: Origins | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._origins = origins

    def source(self, plugin: str) -> str:
        """``plugin 'x' from rbkd-x 0.1`` (the distribution when known), as messages name a plugin."""
        return f"plugin {plugin!r}" + (f" from {self._origins(plugin)}" if self._origins is not None else "")

    def _add(self, name: str, value: Any, *, plugin: str, description: str = "") -> None:
        if not isinstance(name, str) or not NAME.match(name):
            raise UserError(
                f"{self.source(plugin)} registers a {self.kind} under the name {short_repr(name)}; a name is "
                "1-64 letters, digits and - _ . + starting with a letter or digit; "
                f"fix or uninstall the plugin, or skip it with {DISABLE_PLUGINS_ENV}={plugin}"
            )
        existing = self._entries.get(name)
        if existing is not None:
            raise UserError(
                f"{self.kind} {name!r} is registered twice: by plugin {existing.plugin!r} and by plugin "
                f"{plugin!r}; uninstall or block one of them ({DISABLE_PLUGINS_ENV}={plugin})"
            )
        self._entries[name] = Entry(name, value, plugin, description)

    def bound(self, plugin: str) -> Registrar:
        """A registrar that adds entries on behalf of ``plugin``."""
        return Registrar(self, plugin)

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name from a run file
            advice = RETIRED.get(self.kind, {}).get(name) if isinstance(name, str) else None
            if advice is not None:
                raise UserError(f"{self.kind} {name!r} was removed: {advice}") from None
            valid = ", ".join(sorted(self._entries)) or "(none registered)"
            raise UserError(
                f"unknown {self.kind} {name!r}{close_matches(str(name), self._entries)}; valid: {valid}"
            ) from None

    def get(self, name: str) -> Any:
        """The registered object; a factory comes wrapped in the check of what it returns (see the module)."""
        entry = self.entry(name)
        check = RESULT_CHECKS.get(self.kind)
        if check is None or not callable(entry.value):
            return entry.value
        return _CheckedFactory(entry, self.kind, self.source(entry.plugin), check)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


class _CheckedFactory:
    """A registered factory that checks its result: the wrong type is a PluginFailure naming the plugin.

    Wraps with :func:`functools.update_wrapper`: the factory's attributes (``verifies_sha256``), name and
    signature stay visible.
    """

    def __init__(self, entry: Entry, kind: str, source: str, check: Callable[[Any], str | None]) -> None:
        functools.update_wrapper(self, entry.value)
        self._entry, self._kind, self._source, self._check = entry, kind, source, check

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self._entry.value(*args, **kwargs)
        problem = self._check(result)
        if problem is not None:
            raise PluginFailure(
                f"{self._source}: its {self._kind} {self._entry.name!r} returned {short_repr(result)}, {problem}; "
                f"fix or uninstall the plugin, or skip it with {DISABLE_PLUGINS_ENV}={self._entry.plugin}"
            )
        return result


class Registrar:
    """What a registrar hook receives: ``add`` records entries for one plugin."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry = registry
        self.plugin = plugin

    @property
    def kind(self) -> str:
        return self._registry.kind

    def _refuse(self, what: str) -> UserError:
        return UserError(
            f"{self._registry.source(self.plugin)} {what}; fix or uninstall the plugin, or skip it with "
            f"{DISABLE_PLUGINS_ENV}={self.plugin}"
        )

    def add(self, name_or_obj: Any, value: Any = None, *, description: str = "") -> None:
        """Register ``value`` under ``name``; for methods call ``add(DistillerClass)``."""
        if not isinstance(description, str):
            raise self._refuse(f"gives a {self.kind} the description {short_repr(description)}, not a string")
        if self.kind == "method":
            cls = name_or_obj if value is None else value
            self._check_method(cls)
            name = cls.name if value is None else name_or_obj
            doc = cls.__doc__.strip().splitlines() if isinstance(cls.__doc__, str) else []
            self._registry._add(name, cls, plugin=self.plugin, description=description or (doc[0] if doc else ""))
            return
        if value is None:
            raise self._refuse(
                f"registers a {self.kind} {short_repr(name_or_obj)} without a value: call registry.add(name, factory)"
            )
        if not callable(value):
            shown = short_repr(value)
            raise self._refuse(f"registers the {self.kind} {repr(name_or_obj)[:60]} as {shown}, which is not callable")
        self._registry._add(name_or_obj, value, plugin=self.plugin, description=description)

    def _check_method(self, cls: Any) -> None:
        """A method is a concrete Distiller subclass whose class attributes pass its own check."""
        from robustbench_kd.distiller import Distiller

        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            shown = short_repr(cls)
            raise self._refuse(f"registers {shown} as a method; a method is a robustbench_kd.Distiller subclass")
        try:
            cls.check_class()
        except (ValueError, TypeError, AttributeError) as exc:
            raise self._refuse(f"registers the method class {cls.__qualname__}, which is invalid: {exc}") from None
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ()))) or "?"
            raise self._refuse(
                f"registers the method class {cls.__qualname__} without defining {missing} (abstract in Distiller)"
            )
