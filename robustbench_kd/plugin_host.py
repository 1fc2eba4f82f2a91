"""Building the plugin manager, and the typed facade the rest of the code calls hooks through.

``PluginHost.create()`` makes a *fresh* ``pluggy.PluginManager`` every time (no module-level global,
nothing happens at import): it adds the hookspecs, registers the built-in plugins from the explicit
:data:`BUILTIN_PLUGINS` tuple, loads third-party plugins from the ``robustbench_kd`` entry-point group
(unless disabled), registers any extra plugin objects, and calls ``check_pending()`` so a misspelt
hook name in a plugin fails at once.

:func:`plugin_failure` turns an exception raised inside a third-party plugin's code into one line that
names the plugin, for the command line's last-resort error handler.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import FrameType
from typing import Any

import pluggy

from robustbench_kd import hookspecs
from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.registry import DISABLE_PLUGINS_ENV, PluginFailure, Registry, short_repr

log = logging.getLogger(__name__)

PROJECT = "robustbench_kd"
ENTRY_POINT_GROUP = "robustbench_kd"
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


#: Top-level packages of this project. Code in them is never a third-party plugin's: a crash there is a bug of
#: the project and keeps its traceback.
OWN_PACKAGES = frozenset({"robustbench_kd", "robustbench_kd_plugins"})

#: Where a plugin registered in code (``PluginHost.create(extra=...)``) comes from.
IN_CODE = "(registered in code)"


def _own_distribution() -> str:
    try:
        return f"{PROJECT} {md.version(PROJECT)}"
    except md.PackageNotFoundError:
        return f"{PROJECT} (source tree)"


@dataclass(frozen=True)
class _Origin:
    """Where one registered plugin came from, to tell a second copy of it from a genuine name clash.

    ``project`` (the PEP 503 name) is None for built-in plugins and plugins registered in code, which
    no ``pip uninstall`` removes.
    """

    label: str  #: "name version", as ``distribution_of`` shows it
    project: str | None = None
    dist_name: str = ""
    version: str = ""
    value: str = ""  #: the entry point's value, "module" or "module:attr"
    location: str | None = None  #: the metadata folder this copy was read from, when known
    builtin: bool = False

    def describe(self) -> str:
        """The origin as an error message names it; a third-party copy says where its metadata lives."""
        if self.builtin:
            return f"{self.label} (built in)"
        if self.project is None:
            return self.label
        return f"{self.label} (metadata in {self.where()})"

    def where(self) -> str:
        """The metadata folder, which the user deletes when it is a stale copy."""
        return self.location or "an unknown folder"


def _normalise(name: str) -> str:
    """PEP 503 name: the same distribution spelt ``rbkd_lbgat`` in one copy and ``rbkd-lbgat`` in another."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_name(dist: md.Distribution) -> str:
    # A metadata folder without a Name field still gets a readable label instead of "None".
    return dist.metadata["name"] or "(unnamed distribution)"


def _metadata_location(dist: md.Distribution) -> str | None:
    """The folder holding ``dist``'s metadata (``X.egg-info``, ``X-1.0.dist-info``), or None if hidden.

    ``importlib.metadata`` has no public attribute for it; ``PathDistribution`` keeps it in ``_path``.
    Made absolute because a copy found through the current directory (``''`` on ``sys.path``) has a
    relative one.
    """
    path = getattr(dist, "_path", None)
    if path is None:
        return None
    if isinstance(path, (str, os.PathLike)):
        return str(Path(path).absolute())
    return str(path)


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
        origins: dict[str, _Origin] = {}
        own = _Origin(_own_distribution(), builtin=True)
        for name, module_name in BUILTIN_PLUGINS:
            if pm.is_blocked(name):
                continue
            pm.register(importlib.import_module(module_name), name=name)
            origins[name] = own
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("1", "true", "yes")
        if autoload:
            _load_entry_points(pm, origins)
        for obj in extra:
            if pm.is_registered(obj):  # e.g. a built-in plugin module passed again: nothing to add
                continue
            name = getattr(obj, "__name__", None) or type(obj).__name__
            _register(pm, obj, name, _Origin(IN_CODE), origins)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise _unknown_hook(pm, exc, origins) from None
        return cls(pm, {name: origin.label for name, origin in origins.items()})

    # -- introspection --------------------------------------------------------------------------
    def plugin_names(self) -> list[str]:
        return [name for name, plugin in self.pm.list_name_plugin() if plugin is not None]

    def distribution_of(self, plugin: str) -> str:
        """``"name version"`` of the distribution that provided ``plugin``."""
        return self._distributions.get(plugin, "(unknown)")

    # -- registries -----------------------------------------------------------------------------
    def _collect(self, hook_name: str, kind: str) -> Registry:
        registry = Registry(kind, origins=self.distribution_of)
        caller = getattr(self.pm.hook, hook_name)
        # Call each implementation on its own so every entry knows its plugin. get_hookimpls() is in
        # registration order: built-ins first, so a clash names the built-in first, the newcomer second.
        for impl in caller.get_hookimpls():
            kwargs = {"registry": registry.bound(impl.plugin_name)}
            returned = impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
            if returned is not None:
                # Registering by returning (a list of classes, say) would silently register nothing.
                raise UserError(
                    f"{registry.source(impl.plugin_name)}: its {hook_name} returned {short_repr(returned)}; a "
                    f"registrar hook calls registry.add(...) for each {kind} and returns nothing; fix or "
                    f"uninstall the plugin, or skip it with {DISABLE_PLUGINS_ENV}={impl.plugin_name}"
                )
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
        if not callable(attack):
            # The trainer would call it on the first batch and fail there, in this project's code.
            builders = [impl.plugin_name for impl in self.pm.hook.rbkd_make_attack.get_hookimpls()]
            others = [f"{name!r} from {self.distribution_of(name)}" for name in builders if name != "attack"]
            raise PluginFailure(
                f"rbkd_make_attack returned {short_repr(attack)}, not a callable attack(x, y); it comes from one of "
                f"the plugins {', '.join(others) or '(none)'}; fix or uninstall it, or skip it with "
                f"{DISABLE_PLUGINS_ENV}=<name>"
            )
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


def _clash_advice(name: str, first: _Origin, second: _Origin) -> str:
    """What to do about two plugins called ``name``: advice that removes the unwanted one, not both."""
    if first.project is not None and first.project == second.project:
        # One distribution, two metadata copies: typically a stale egg-info left in a source folder (on
        # sys.path as the current directory) next to the installed copy. Blocking by name would drop both.
        return (
            f"delete the stale one of these metadata folders, or pip uninstall {second.dist_name} and install "
            "the version you want"
        )
    removable = [origin.dist_name for origin in (first, second) if origin.project is not None]
    if not removable:  # built in or registered in code on both sides: nothing to uninstall
        return f"register one of them under another name than {name!r}"
    uninstall = " or ".join(f"pip uninstall {dist}" for dist in removable)
    author = f"the author of {removable[0]}" if len(removable) == 1 else "one author"
    # Blocking is by plugin name, so it cannot keep one of two same-named plugins; say so, since it is the
    # switch a user reaches for first.
    return (
        f"keep one: {uninstall}, or ask {author} to rename the {name!r} entry point "
        f"({DISABLE_PLUGINS_ENV}={name} would skip both)"
    )


def _check_name_free(pm: pluggy.PluginManager, name: str, origin: _Origin, origins: dict[str, _Origin]) -> None:
    """Raise a one-line UserError if another plugin already has ``name``, naming where each copy lives."""
    if not pm.has_plugin(name):
        return
    first = origins.get(name, _Origin("(unknown)"))
    if first.project is not None and first.project == origin.project:
        if first.version != origin.version:
            copies = f"{first.version} ({first.where()}) and {origin.version} ({origin.where()})"
        else:  # same version, different entry-point values: the metadata of one copy is out of date
            copies = (
                f"{first.version} '{first.value}' ({first.where()}) and "
                f"{origin.version} '{origin.value}' ({origin.where()})"
            )
        raise UserError(
            f"plugin {name!r} is provided by two copies of {origin.dist_name}: {copies}; "
            f"{_clash_advice(name, first, origin)}"
        )
    raise UserError(
        f"two plugins are named {name!r}: one from {first.describe()} and one from {origin.describe()}; "
        f"{_clash_advice(name, first, origin)}"
    )


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, origin: _Origin, origins: dict[str, _Origin]) -> None:
    """Register ``plugin`` as ``name`` and record its origin; every refusal is a one-line UserError."""
    _check_name_free(pm, name, origin, origins)
    if pm.is_registered(plugin):
        # Two entry points with different names loaded the same module; pluggy would refuse it with a
        # ValueError, and registering its hooks twice would register every method twice anyway.
        other = pm.get_name(plugin) or "(unnamed)"
        first = origins.get(other, _Origin("(unknown)"))
        if first.project is not None and (first.project, first.location) == (origin.project, origin.location):
            # One metadata folder declares the object under two names: blocking one name is the right fix.
            advice = (
                f"ask the author of {origin.dist_name} to declare it once, and meanwhile skip one with "
                f"{DISABLE_PLUGINS_ENV}={name}"
            )
        else:
            advice = _clash_advice(name, first, origin)
        raise UserError(
            f"plugins {other!r} from {first.describe()} and {name!r} from {origin.describe()} load the same "
            f"object {origin.value or name!r}; {advice}"
        )
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise UserError(f"plugin {name!r} from {origin.label} {_invalid_hook(pm, exc)}") from None
    except (TypeError, ValueError, AttributeError) as exc:  # an object pluggy cannot take as a plugin at all
        raise UserError(
            f"plugin {name!r} from {origin.label} cannot be registered ({_describe(exc)}); an entry point names "
            f"a module or an object with @hookimpl functions; skip it with {DISABLE_PLUGINS_ENV}={name}"
        ) from None
    origins[name] = origin


#: pluggy's message for a hook implementation that asks for an argument the hook does not pass.
_EXTRA_ARGUMENTS = re.compile(r"for hook '(?P<hook>\w+)'.*Argument\(s\) \{(?P<names>[^}]*)\} are declared", re.S)


def _invalid_hook(pm: pluggy.PluginManager, exc: pluggy.PluginValidationError) -> str:
    """What pluggy refused in a plugin's hook implementation, on one line, with the valid arguments."""
    found = _EXTRA_ARGUMENTS.search(str(exc))
    hook = getattr(pm.hook, found["hook"], None) if found else None
    spec = getattr(hook, "spec", None)
    if found is None or spec is None:
        return f"has an invalid hook implementation ({' '.join(str(exc).split())})"
    names = found["names"].replace("'", "")
    return (
        f"implements {found['hook']} with argument(s) {names} that the hook does not pass; valid arguments "
        f"(any subset): {', '.join(spec.argnames)}"
    )


def _unknown_hook(
    pm: pluggy.PluginManager, exc: pluggy.PluginValidationError, origins: dict[str, _Origin]
) -> UserError:
    """A one-line UserError for a hook implementation whose name no hookspec has (a typo, an old hook)."""
    name = pm.get_name(exc.plugin) or getattr(exc.plugin, "__name__", None) or type(exc.plugin).__name__
    label = origins.get(name, _Origin("(unknown)")).label
    found = re.search(r"unknown hook '([^']+)'", str(exc))
    hook = found[1] if found else "?"
    hooks = sorted(n for n in dir(hookspecs) if n.startswith("rbkd_"))
    return UserError(
        f"plugin {name!r} from {label} implements an unknown hook {hook!r}{close_matches(hook, hooks, n=1)}; "
        f"fix or uninstall the plugin, or skip it with {DISABLE_PLUGINS_ENV}={name}"
    )


def _load_entry_points(pm: pluggy.PluginManager, origins: dict[str, _Origin]) -> None:
    """Import and register every ``robustbench_kd`` entry point, naming the culprit on failure.

    ``importlib.metadata.distributions()`` yields every metadata copy on ``sys.path``, so one distribution
    can appear twice (an installed copy, and the ``X.egg-info`` of its source folder when that folder is
    the current directory). An entry point identical to one already registered is the same plugin and is
    skipped; a plugin name that comes back with anything different is an error.
    """
    seen: set[tuple[str, str, str, str]] = set()
    for dist in md.distributions():
        entry_points = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
        if not entry_points:
            continue
        dist_name = _dist_name(dist)
        project = _normalise(dist_name)
        location = _metadata_location(dist)
        for ep in entry_points:
            if pm.is_blocked(ep.name):
                continue
            key = (project, dist.version, ep.name, ep.value)
            if key in seen:
                log.debug("plugin %r of %s %s found again in %s; skipped", ep.name, dist_name, dist.version, location)
                continue
            seen.add(key)
            origin = _Origin(
                f"{dist_name} {dist.version}",
                project=project,
                dist_name=dist_name,
                version=dist.version,
                value=ep.value,
                location=location,
            )
            # Before importing: a clash is the cause to report, whatever the second copy's import would do.
            _check_name_free(pm, ep.name, origin, origins)
            try:
                plugin = ep.load()
            except BaseException as exc:  # a broken third-party plugin must not crash with a traceback
                if isinstance(exc, KeyboardInterrupt):  # Ctrl-C while importing still interrupts
                    raise
                # SystemExit too: a plugin calling sys.exit() at import must not end the command with its code.
                # Chained, so that --debug shows the plugin's own traceback.
                raise UserError(
                    f"plugin {ep.name!r} from {origin.label} failed to import ({_describe(exc)}); "
                    f"fix or uninstall it, or skip it with {DISABLE_PLUGINS_ENV}={ep.name}; "
                    "run with --debug for the traceback"
                ) from exc
            if not _has_hookimpls(pm, plugin):
                # Registered, it would do nothing (None would even block the name): the entry point names
                # the wrong object, and the user would only see the plugin's methods missing.
                raise UserError(
                    f"plugin {ep.name!r} from {origin.label}: its entry point {ep.value!r} loads "
                    f"{short_repr(plugin)}, which has no @hookimpl functions; point it at the module or object "
                    f"that defines the hooks, or skip it with {DISABLE_PLUGINS_ENV}={ep.name}"
                )
            _register(pm, plugin, ep.name, origin, origins)


def _has_hookimpls(pm: pluggy.PluginManager, plugin: Any) -> bool:
    """Whether ``plugin`` has a ``@hookimpl`` attribute; an object pluggy cannot inspect is left to register."""
    if plugin is None:
        return False
    try:
        return any(pm.parse_hookimpl_opts(plugin, name) is not None for name in dir(plugin))
    except Exception:
        return True


# -- naming the plugin behind a crash ------------------------------------------------------------------------
def plugin_failure(exc: BaseException) -> str | None:
    """One line naming the third-party plugin whose code raised ``exc``, or None if no plugin's code did.

    Meant for the command line's last-resort handler: an unexpected exception from a plugin (in a method,
    a hook, a student factory, a teacher source, a dataset loader) is the plugin's fault, and the user
    needs to know which plugin, not a traceback of this project's trainer. The innermost frame of
    ``exc``'s traceback (then of its ``__cause__``/``__context__`` chain) whose module belongs to a
    ``robustbench_kd`` entry point names it, e.g. ``plugin 'lbgat' from rbkd-lbgat 0.1.0 failed in
    rbkd_lbgat.LBGAT.loss (ZeroDivisionError: division by zero); run with --debug for the traceback``.

    A :class:`~robustbench_kd.registry.PluginFailure` (a plugin's factory returned the wrong type) is
    already such a line. ``SystemExit`` raised in a plugin's code is a failure like any other: a plugin
    calling ``sys.exit()`` must not end a run with its exit code and no word of why.

    Returns None, so that the caller re-raises, for a :class:`UserError` (already a one-line message),
    for a ``KeyboardInterrupt`` (Ctrl-C interrupts, whoever's code was running) and other non-``Exception``
    exceptions, and when no third-party plugin's frame is on the stack: a crash (or ``SystemExit``) in
    this project's own code, built-in plugins included, keeps its traceback (or exit code). Never raises.
    """
    if isinstance(exc, PluginFailure):
        return " ".join(str(exc).split())
    if not isinstance(exc, (Exception, SystemExit)) or isinstance(exc, UserError):
        return None
    try:
        owners = _plugin_modules()
        if not owners:
            return None
        for failure in _exception_chain(exc):
            found = _innermost_plugin_frame(failure, owners)
            if found is not None:
                frame, plugin, label = found
                return (
                    f"plugin {plugin!r} from {label} failed in {_frame_name(frame)} ({_describe(failure)}); "
                    "run with --debug for the traceback"
                )
    except Exception:  # called while handling another exception: never replace it with our own
        log.debug("could not tell which plugin raised %r", exc, exc_info=True)
    return None


def _plugin_modules() -> list[tuple[str, str, str]]:
    """``(module prefix, plugin name, "distribution version")`` for every third-party entry point.

    Each entry point ``name = a.b.c[:attr]`` contributes ``a.b.c``, ``a.b`` and ``a``: a plugin's code
    lives in its entry-point module and in the package around it. Longer prefixes are more specific,
    which matters when two plugins share a top-level (namespace) package.
    """
    owners: list[tuple[str, str, str]] = []
    for dist in md.distributions():
        try:
            entry_points = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
            if not entry_points:
                continue
            label = f"{_dist_name(dist)} {dist.version}"
            for ep in entry_points:
                parts = ep.module.split(".")
                if parts[0] in OWN_PACKAGES:
                    continue
                owners.extend((".".join(parts[:i]), ep.name, label) for i in range(len(parts), 0, -1))
        except Exception:  # unreadable metadata of one distribution must not hide the others
            continue
    return owners


def _owner(module: str, owners: list[tuple[str, str, str]]) -> tuple[str, str] | None:
    """``(plugin name, "distribution version")`` of the most specific prefix that contains ``module``."""
    if module.split(".")[0] in OWN_PACKAGES:
        return None
    best: tuple[str, str, str] | None = None
    for owner in owners:
        prefix = owner[0]
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = owner
    return None if best is None else (best[1], best[2])


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it was raised from or while handling, innermost last; each exception once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _innermost_plugin_frame(
    exc: BaseException, owners: list[tuple[str, str, str]]
) -> tuple[FrameType, str, str] | None:
    """The innermost frame of ``exc``'s traceback in a third-party plugin's module, with its owner."""
    found: tuple[FrameType, str, str] | None = None
    tb = exc.__traceback__
    while tb is not None:  # outermost first: the last match is the innermost
        module = tb.tb_frame.f_globals.get("__name__")
        owner = _owner(module, owners) if isinstance(module, str) else None
        if owner is not None:
            found = (tb.tb_frame, *owner)
        tb = tb.tb_next
    return found


def _frame_name(frame: FrameType) -> str:
    """``module.Class.method`` of a frame (qualified name on Python 3.11+, the function name before)."""
    code = frame.f_code
    qualname = getattr(code, "co_qualname", code.co_name)
    module = frame.f_globals.get("__name__", "?")
    return module if qualname == "<module>" else f"{module}.{qualname}"


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line: a multi-line message (a CUDA error, a shape dump) is joined up."""
    try:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    except Exception:  # a broken __str__ in plugin code
        text = ""
    name = type(exc).__qualname__
    return f"{name}: {text}" if text else name
