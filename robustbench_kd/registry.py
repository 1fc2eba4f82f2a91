"""Named registries filled by plugins: methods, teacher sources, students, datasets."""

from __future__ import annotations

from collections.abc import Iterator
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


@dataclass(frozen=True)
class Entry:
    """One registered object and the plugin that added it."""

    name: str
    value: Any
    plugin: str
    description: str = ""


class Registry:
    """Name -> object, remembering which plugin added each name.

    Args:
        kind: what the registry holds, used in messages ("method", "teacher source", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def _add(self, name: str, value: Any, *, plugin: str, description: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        existing = self._entries.get(name)
        if existing is not None:
            raise UserError(
                f"{self.kind} {name!r} is registered twice: by plugin {existing.plugin!r} and by plugin "
                f"{plugin!r}; uninstall or block one of them (RBKD_DISABLE_PLUGINS={plugin})"
            )
        self._entries[name] = Entry(name, value, plugin, description)

    def bound(self, plugin: str) -> Registrar:
        """A registrar that adds entries on behalf of ``plugin``."""
        return Registrar(self, plugin)

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            advice = RETIRED.get(self.kind, {}).get(name)
            if advice is not None:
                raise UserError(f"{self.kind} {name!r} was removed: {advice}") from None
            valid = ", ".join(sorted(self._entries)) or "(none registered)"
            raise UserError(
                f"unknown {self.kind} {name!r}{close_matches(name, self._entries)}; valid: {valid}"
            ) from None

    def get(self, name: str) -> Any:
        return self.entry(name).value

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


class Registrar:
    """What a registrar hook receives: ``add`` records entries for one plugin."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry = registry
        self.plugin = plugin

    @property
    def kind(self) -> str:
        return self._registry.kind

    def add(self, name_or_obj: Any, value: Any = None, *, description: str = "") -> None:
        """Register ``value`` under ``name``; for methods call ``add(DistillerClass)``."""
        if value is None and hasattr(name_or_obj, "name") and isinstance(name_or_obj, type):
            cls: Any = name_or_obj  # a Distiller subclass
            cls.check_class()
            doc = (cls.__doc__ or "").strip().splitlines()
            self._registry._add(cls.name, cls, plugin=self.plugin, description=description or (doc[0] if doc else ""))
            return
        if value is None:
            raise TypeError("Registrar.add(name, value) needs a value (or a Distiller subclass alone)")
        self._registry._add(name_or_obj, value, plugin=self.plugin, description=description)
