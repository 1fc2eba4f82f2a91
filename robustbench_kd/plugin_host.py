"""Building the plugin manager, and the typed facade the rest of the code calls hooks through.

``PluginHost.create()`` makes a *fresh* ``pluggy.PluginManager`` every time (no module-level global,
nothing happens at import): it adds the hookspecs, registers the built-in plugins from the explicit
:data:`BUILTIN_PLUGINS` tuple, loads third-party plugins from the ``robustbench_kd`` entry-point group
(unless disabled), registers any extra plugin objects, and calls ``check_pending()`` so a misspelt
hook name in a plugin fails at once.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
from collections.abc import Iterable
from functools import cached_property
from typing import Any

import pluggy

from robustbench_kd import hookspecs
from robustbench_kd.errors import UserError
from robustbench_kd.registry import Registry

log = logging.getLogger(__name__)

PROJECT = "robustbench_kd"
ENTRY_POINT_GROUP = "robustbench_kd"
DISABLE_PLUGINS_ENV = "RBKD_DISABLE_PLUGINS"
DISABLE_AUTOLOAD_ENV = "RBKD_DISABLE_PLUGIN_AUTOLOAD"

#: (plugin name, module) of every built-in plugin. The source of truth: nothing registers itself.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("attack", "robustbench_kd_plugins.attack"),
    ("teacher-sources", "robustbench_kd_plugins.teacher_sources"),
    ("students", "robustbench_kd_plugins.students"),
    ("datasets", "robustbench_kd_plugins.datasets"),
    ("standard", "robustbench_kd_plugins.standard"),
    ("pgd-at", "robustbench_kd_plugins.pgd_at"),
    ("trades", "robustbench_kd_plugins.trades"),
    ("kd", "robustbench_kd_plugins.kd"),
    ("ard", "robustbench_kd_plugins.ard"),
    ("rslad", "robustbench_kd_plugins.rslad"),
    ("akd", "robustbench_kd_plugins.akd"),
    ("iad", "robustbench_kd_plugins.iad"),
    ("adaad", "robustbench_kd_plugins.adaad"),
    ("mtard", "robustbench_kd_plugins.mtard"),
    ("smaraad", "robustbench_kd_plugins.smaraad"),
    ("smaraad-plus", "robustbench_kd_plugins.smaraad_plus"),
    ("gacd", "robustbench_kd_plugins.gacd"),
    ("ikl-at", "robustbench_kd_plugins.ikl_at"),
    ("diagnostics", "robustbench_kd_plugins.diagnostics"),  # per-epoch diagnostics observer
)


def _own_distribution() -> str:
    try:
        return f"{PROJECT} {md.version(PROJECT)}"
    except md.PackageNotFoundError:
        return f"{PROJECT} (source tree)"


class PluginHost:
    """Typed facade over one plugin manager. Create with :meth:`create`."""

    def __init__(self, pm: pluggy.PluginManager, distributions: dict[str, str]) -> None:
        self.pm = pm
        self._distributions = distributions

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls, *, autoload: bool | None = None, blocked: Iterable[str] = (), extra: Iterable[Any] = ()
    ) -> PluginHost:
        """Build a fresh host.

        Args:
            autoload: load entry-point plugins; default True unless ``RBKD_DISABLE_PLUGIN_AUTOLOAD=1``.
            blocked: plugin names to block, added to ``RBKD_DISABLE_PLUGINS``.
            extra: plugin objects (modules, classes, instances) to register after the others.
        """
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        env_blocked = [n.strip() for n in os.environ.get(DISABLE_PLUGINS_ENV, "").split(",") if n.strip()]
        for name in (*blocked, *env_blocked):
            pm.set_blocked(name)
        distributions: dict[str, str] = {}
        own = _own_distribution()
        for name, module_name in BUILTIN_PLUGINS:
            if pm.is_blocked(name):
                continue
            pm.register(importlib.import_module(module_name), name=name)
            distributions[name] = own
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("1", "true", "yes")
        if autoload:
            _load_entry_points(pm, distributions)
        for obj in extra:
            if pm.is_registered(obj):  # e.g. a built-in plugin module passed again: nothing to add
                continue
            name = getattr(obj, "__name__", None) or type(obj).__name__
            _register(pm, obj, name, "(registered in code)", distributions)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise UserError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from None
        return cls(pm, distributions)

    # -- introspection --------------------------------------------------------------------------
    def plugin_names(self) -> list[str]:
        return [name for name, plugin in self.pm.list_name_plugin() if plugin is not None]

    def distribution_of(self, plugin: str) -> str:
        """``"name version"`` of the distribution that provided ``plugin``."""
        return self._distributions.get(plugin, "(unknown)")

    # -- registries -----------------------------------------------------------------------------
    def _collect(self, hook_name: str, kind: str) -> Registry:
        registry = Registry(kind)
        caller = getattr(self.pm.hook, hook_name)
        # Call each implementation on its own so every entry knows its plugin. get_hookimpls() is in
        # registration order: built-ins first, so a clash names the built-in first, the newcomer second.
        for impl in caller.get_hookimpls():
            kwargs = {"registry": registry.bound(impl.plugin_name)}
            impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
        return registry

    @cached_property
    def methods(self) -> Registry:
        """Registered methods: name -> Distiller subclass."""
        return self._collect("rbkd_register_methods", "method")

    @cached_property
    def teacher_sources(self) -> Registry:
        """Registered teacher schemes: scheme -> loader."""
        return self._collect("rbkd_register_teacher_sources", "teacher source")

    @cached_property
    def students(self) -> Registry:
        """Registered student architectures: name -> factory."""
        return self._collect("rbkd_register_students", "student architecture")

    @cached_property
    def datasets(self) -> Registry:
        """Registered datasets: name -> loader."""
        return self._collect("rbkd_register_datasets", "dataset")

    # -- strategy and observers -----------------------------------------------------------------
    def make_attack(self, *, distiller: Any, student: Any, spec: Any, loss_fn: Any) -> Any:
        attack = self.pm.hook.rbkd_make_attack(distiller=distiller, student=student, spec=spec, loss_fn=loss_fn)
        if attack is None:
            raise RuntimeError("no plugin built an attack (is the built-in 'attack' plugin blocked?)")
        return attack

    def train_start(self, run: Any) -> None:
        self.pm.hook.rbkd_train_start(run=run)

    def epoch_start(self, run: Any, epoch: int) -> None:
        self.pm.hook.rbkd_epoch_start(run=run, epoch=epoch)

    def step_end(self, run: Any, ctx: Any, out: Any) -> None:
        self.pm.hook.rbkd_step_end(run=run, ctx=ctx, out=out)

    def epoch_end(self, run: Any, epoch: int, metrics: dict[str, float]) -> None:
        self.pm.hook.rbkd_epoch_end(run=run, epoch=epoch, metrics=metrics)

    def train_end(self, run: Any, metrics: dict[str, Any]) -> None:
        self.pm.hook.rbkd_train_end(run=run, metrics=metrics)

    def model_info(self, info: dict[str, Any], run: Any = None) -> None:
        self.pm.hook.rbkd_model_info(info=info, run=run)


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, dist: str, distributions: dict[str, str]) -> None:
    if pm.has_plugin(name):
        raise UserError(
            f"two plugins are named {name!r}: one from {distributions.get(name, '(unknown)')} and one from "
            f"{dist}; uninstall one, or block it with {DISABLE_PLUGINS_ENV}={name}"
        )
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise UserError(f"plugin {name!r} from {dist} is invalid: {exc}") from None
    distributions[name] = dist


def _load_entry_points(pm: pluggy.PluginManager, distributions: dict[str, str]) -> None:
    """Import and register every ``robustbench_kd`` entry point, naming the culprit on failure."""
    for dist in md.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or pm.is_blocked(ep.name):
                continue
            label = f"{dist.metadata['name']} {dist.version}"
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not crash with a traceback
                raise UserError(
                    f"plugin {ep.name!r} from {label} failed to import ({type(exc).__name__}: {exc}); "
                    f"fix or uninstall it, or skip it with {DISABLE_PLUGINS_ENV}={ep.name}"
                ) from None
            _register(pm, plugin, ep.name, label, distributions)
