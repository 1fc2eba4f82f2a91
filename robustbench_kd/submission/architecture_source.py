"""One self-contained Python module holding an architecture's source, for ``robustbench/model_zoo/architectures``.

RobustBench's zoo files may import only RobustBench's own architectures and timm, so a student RobustBench
does not have is shipped as a new file for its ``architectures`` folder. That file is generated here from
the *source of the trained classes* (``inspect``): the definitions they use (helper functions, constants,
other classes of the same package) are copied along in dependency order, and the imports they rely on are
carried over only when they come from :data:`ALLOWED_IMPORTS` (the standard library, torch and what
RobustBench itself ships). Copying the real source, rather than keeping a second hand-written copy, is what
keeps the file from drifting away from the class the weights were trained with: same layers, same
state-dict keys.

:func:`self_contained_source` builds the module or raises :class:`NotSelfContained` saying which name
cannot be carried over (e.g. a helper imported from ``robustbench_kd.errors``); :func:`check_self_contained`
compiles any module text and checks every import in it, at any depth, with ``ast``.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import inspect
import symtable
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ALLOWED_IMPORTS",
    "ArchitectureSource",
    "NotSelfContained",
    "check_self_contained",
    "self_contained_source",
]

#: Packages a generated architecture module may import: the standard library, torch, and what RobustBench's
#: own architecture files use (torchvision, timm, and RobustBench's architectures themselves).
ALLOWED_IMPORTS = frozenset(
    {"__future__", "torch", "torchvision", "timm", "robustbench.model_zoo.architectures", *sys.stdlib_module_names}
)
# Packages whose definitions may be copied into the generated module. Within this project only the student
# architectures qualify: anything else of robustbench_kd (its errors, its plugin host) is not an
# architecture, and copying it would drag the project into RobustBench.
_PROJECT_ARCHITECTURES = "robustbench_kd.students"


class NotSelfContained(Exception):
    """The source cannot be made into a module that imports only :data:`ALLOWED_IMPORTS` (message: why)."""


@dataclass(frozen=True)
class ArchitectureSource:
    """The text of one generated architecture module, and what a zoo entry imports from it.

    Attributes:
        slug: what the architecture is, as a module-name stem (``"small_cnn"``).
        text: the module's source.
        names: the names the zoo entry imports from the module (``("SmallCNN",)``).
    """

    slug: str
    text: str
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))  # a list, after a round trip through JSON

    @property
    def module(self) -> str:
        """The module name under ``robustbench.model_zoo.architectures``: ``rbkd_<slug>_<8 hex digits>``.

        The digits are the start of the text's SHA-256, so two submissions whose architecture files differ
        (another version of a class, another set of classes) never claim the same file name in RobustBench,
        and identical files share one.
        """
        digest = hashlib.sha256(self.text.encode()).hexdigest()[:8]
        return f"rbkd_{self.slug}_{digest}"

    @property
    def filename(self) -> str:
        """``<module>.py``, the file for ``robustbench/model_zoo/architectures/``."""
        return f"{self.module}.py"


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _allowed(module: str) -> bool:
    return any(_within(module, root) for root in ALLOWED_IMPORTS)


def _home(module: str) -> str:
    """The package whose definitions may be copied along with a definition of ``module``."""
    return _PROJECT_ARCHITECTURES if _within(module, _PROJECT_ARCHITECTURES) else module.partition(".")[0]


@dataclass
class _Module:
    """A parsed source module: its lines, its top-level statements by the names they bind, its imports."""

    name: str
    lines: list[str]
    definitions: dict[str, ast.stmt]
    imports: dict[str, tuple[ast.stmt, ast.alias]]
    future_annotations: bool
    table: symtable.SymbolTable

    def position(self, name: str) -> tuple[int, str]:
        """Sort key: where ``name`` is defined (imports and builtins first)."""
        node = self.definitions.get(name)
        return (node.lineno if node is not None else 0, name)


@dataclass(frozen=True)
class _Import:
    """One binding made by an import: ``import module [as bound]`` or ``from module import name [as bound]``."""

    module: str
    name: str | None
    bound: str

    def line(self) -> str:
        if self.name is None:
            if self.bound == self.module:
                return f"import {self.module}"
            if self.module.endswith("." + self.bound):
                parent, _, leaf = self.module.rpartition(".")
                return f"from {parent} import {leaf}"
            return f"import {self.module} as {self.bound}"
        return f"from {self.module} import {self.name}" + (f" as {self.bound}" if self.bound != self.name else "")


class _Builder:
    """Collects the definitions and imports a set of root objects needs (see :func:`self_contained_source`)."""

    def __init__(self) -> None:
        self.modules: dict[str, _Module] = {}
        self.order: list[tuple[str, str]] = []  # (module, name) of the copied definitions, dependencies first
        self.visiting: set[tuple[str, str]] = set()
        self.bound: dict[str, object] = {}  # name in the generated module -> (module, name) or _Import
        self.future_annotations = False

    def parsed(self, module_name: str) -> _Module:
        if module_name not in self.modules:
            module = sys.modules.get(module_name)
            try:
                source = inspect.getsource(module) if module is not None else None
            except (OSError, TypeError):
                source = None
            if source is None:
                raise NotSelfContained(f"the source of module {module_name} is not available")
            tree = ast.parse(source)
            definitions: dict[str, ast.stmt] = {}
            imports: dict[str, tuple[ast.stmt, ast.alias]] = {}
            future = False
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    definitions[node.name] = node
                elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for target in targets:
                        for sub in ast.walk(target):
                            if isinstance(sub, ast.Name):
                                definitions[sub.id] = node
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                        future = future or any(alias.name == "annotations" for alias in node.names)
                        continue
                    for alias in node.names:
                        # `import a.b` binds `a`; `from m import a` and `import a.b as c` bind their alias.
                        imports[(alias.asname or alias.name).partition(".")[0]] = (node, alias)
            table = symtable.symtable(source, module_name, "exec")
            self.modules[module_name] = _Module(module_name, source.splitlines(), definitions, imports, future, table)
        return self.modules[module_name]

    def bind(self, name: str, what: object, where: str) -> None:
        existing = self.bound.get(name)
        if existing is not None and existing != what:
            raise NotSelfContained(f"two different things are named {name!r} (one of them in {where})")
        self.bound[name] = what

    def add_root(self, obj: object) -> None:
        module_name, name = getattr(obj, "__module__", None), getattr(obj, "__name__", None)
        if not isinstance(module_name, str) or not isinstance(name, str):
            raise NotSelfContained(f"{obj!r} is not a class or function defined in a module")
        qualname = getattr(obj, "__qualname__", name)
        if qualname != name or not name.isidentifier():
            raise NotSelfContained(f"{module_name}.{qualname} is not defined at the top level of its module")
        if getattr(sys.modules.get(module_name), name, None) is not obj:
            raise NotSelfContained(f"{module_name}.{name} is not the object it names in its module")
        self.add_definition(module_name, name, home=_home(module_name))

    def add_definition(self, module_name: str, name: str, *, home: str) -> None:
        key = (module_name, name)
        if key in self.order or key in self.visiting:
            return
        module = self.parsed(module_name)
        node = module.definitions.get(name)
        if node is None:
            raise NotSelfContained(f"{name!r} is not defined at the top level of {module_name}")
        self.bind(name, key, module_name)
        self.visiting.add(key)
        self.future_annotations = self.future_annotations or module.future_annotations
        runtime, annotation_only = _references(node, module.table, lazy_annotations=module.future_annotations)
        # Depth first, in the order the module defines them: the copy keeps the source's order where it can.
        for ref in sorted(runtime, key=module.position):
            self.resolve(module, ref, home=home, required=True)
        for ref in sorted(annotation_only, key=module.position):
            # Annotations are never evaluated under `from __future__ import annotations`: carry their names
            # over when possible, and leave them as text otherwise.
            saved = (dict(self.bound), list(self.order), set(self.visiting), self.future_annotations)
            try:
                self.resolve(module, ref, home=home, required=False)
            except NotSelfContained:
                bound, order, visiting, future = saved  # forget whatever that attempt had added
                self.bound, self.order, self.visiting, self.future_annotations = bound, order, visiting, future
        self.visiting.discard(key)
        # A statement binding several names (a, b = ...) is copied once.
        if not any(self.modules[m].definitions[n] is node for m, n in self.order if m == module_name):
            self.order.append(key)

    def resolve(self, module: _Module, ref: str, *, home: str, required: bool) -> None:
        if ref in module.definitions:
            self.add_definition(module.name, ref, home=home)
            return
        if ref in module.imports:
            node, alias = module.imports[ref]
            self.resolve_import(module, node, alias, ref, home=home)
            return
        if hasattr(builtins, ref):
            return
        if required:
            raise NotSelfContained(f"{ref!r}, used in {module.name}, is not defined at the top level of that module")

    def resolve_import(self, module: _Module, node: ast.stmt, alias: ast.alias, ref: str, *, home: str) -> None:
        if isinstance(node, ast.Import):
            target = alias.name if alias.asname else alias.name.partition(".")[0]
            if not _allowed(target):
                raise NotSelfContained(f"{module.name} uses the module {alias.name}, which RobustBench does not have")
            self.bind(ref, _Import(target, None, ref), module.name)
            return
        assert isinstance(node, ast.ImportFrom)
        source = _absolute(node, module.name)
        if _allowed(source):
            self.bind(ref, _Import(source, alias.name, ref), module.name)
            return
        if _within(source, home) and (alias.asname is None or alias.asname == alias.name):
            # A definition from the same package (e.g. a helper in a sibling module): copy it along.
            if isinstance(sys.modules.get(f"{source}.{alias.name}"), types.ModuleType):
                raise NotSelfContained(f"{module.name} uses the module {source}.{alias.name} as a whole")
            self.parsed(source)
            self.resolve(self.modules[source], alias.name, home=home, required=True)
            return
        raise NotSelfContained(f"{module.name} uses {alias.name} from {source}, which RobustBench does not have")

    def text(self, title: str, origins: Iterable[str]) -> str:
        imports = [what for what in self.bound.values() if isinstance(what, _Import)]
        stdlib = [i for i in imports if i.module.partition(".")[0] in sys.stdlib_module_names]
        groups = [_import_block(stdlib), _import_block([i for i in imports if i not in stdlib])]
        lines = [f'"""{title}', ""]
        lines += ["Generated by robustbench_kd from the source the weights were trained with, so the layers and"]
        lines += ["state-dict keys are the trained model's. Self-contained: it imports only the standard library,"]
        lines += ["torch and what RobustBench itself ships. Copied from:", ""]
        lines += [f"* {origin}" for origin in origins]
        lines += ['"""', ""]
        if self.future_annotations:
            lines += ["from __future__ import annotations", ""]
        for group in groups:
            if group:
                lines += [*group, ""]
        body: list[str] = []
        previous: ast.stmt | None = None
        previous_module = ""
        for module_name, name in self.order:
            node = self.modules[module_name].definitions[name]
            if body:
                # Constants that stood on consecutive lines stay together; everything else is apart.
                together = (
                    previous_module == module_name
                    and isinstance(previous, (ast.Assign, ast.AnnAssign))
                    and isinstance(node, (ast.Assign, ast.AnnAssign))
                    and previous.end_lineno is not None
                    and self.segment_start(module_name, name) == previous.end_lineno + 1
                )
                body += [] if together else ["", ""]
            body.append(self.segment(module_name, name))
            previous, previous_module = node, module_name
        return "\n".join([*lines, "", *body, ""])

    def segment_start(self, module_name: str, name: str) -> int:
        module = self.modules[module_name]
        node = module.definitions[name]
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        # Comment lines right above a definition document it (`#:` for constants): keep them.
        while start > 1 and module.lines[start - 2].lstrip().startswith("#"):
            start -= 1
        return start

    def segment(self, module_name: str, name: str) -> str:
        module = self.modules[module_name]
        node = module.definitions[name]
        return "\n".join(module.lines[self.segment_start(module_name, name) - 1 : node.end_lineno or node.lineno])


def _import_block(imports: list[_Import]) -> list[str]:
    """``import x`` lines, then one ``from m import a, b`` line per module, each sorted."""
    plain = sorted({i.line() for i in imports if i.line().startswith("import ")})
    names: dict[str, set[str]] = {}
    for i in imports:
        line = i.line()
        if line.startswith("from "):
            module, _, imported = line[len("from ") :].partition(" import ")
            names.setdefault(module, set()).add(imported)

    # isort's order: constants, then classes, then everything else.
    def order(imported: str) -> tuple[bool, bool, str]:
        return (not imported.isupper(), not imported[:1].isupper(), imported)

    return plain + [f"from {m} import {', '.join(sorted(names[m], key=order))}" for m in sorted(names)]


def _absolute(node: ast.ImportFrom, module_name: str) -> str:
    """The absolute module of ``from ... import`` in ``module_name`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    module = sys.modules.get(module_name)
    package = module.__package__ if module is not None and module.__package__ is not None else module_name
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
    return ".".join([*base, *([node.module] if node.module else [])])


def _references(node: ast.stmt, table: symtable.SymbolTable, *, lazy_annotations: bool) -> tuple[set[str], set[str]]:
    """Global names the top-level statement ``node`` reads: (evaluated at runtime, read only in annotations).

    Inside function and class bodies the compiler's own scope analysis (``symtable``: the tables of the
    scopes ``node`` opens) tells globals from locals and parameters; what the statement evaluates in the
    module scope itself (decorators, base classes, default values, a constant's value) is read from the
    syntax tree. With ``lazy_annotations`` (``from __future__ import annotations``) annotations are never
    evaluated, so their names are reported apart.
    """
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    last = node.end_lineno or node.lineno
    runtime: set[str] = set()
    for child in table.get_children():
        if first <= child.get_lineno() <= last:
            runtime |= _scope_globals(child)
    annotations: list[ast.expr] = []
    stack: list[ast.AST] = [node]
    while stack:
        sub = stack.pop()
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            arguments = sub.args
            stack += [*arguments.defaults, *(d for d in arguments.kw_defaults if d is not None)]
            if not isinstance(sub, ast.Lambda):
                stack += sub.decorator_list
                every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
                every += [a for a in (arguments.vararg, arguments.kwarg) if a is not None]
                hints = [a.annotation for a in every if a.annotation is not None]
                hints += [sub.returns] if sub.returns is not None else []
                (annotations if lazy_annotations else stack).extend(hints)
        elif isinstance(sub, ast.ClassDef):
            stack += [*sub.decorator_list, *sub.bases, *(k.value for k in sub.keywords)]
        elif isinstance(sub, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            stack.append(sub.generators[0].iter)  # the only part evaluated in the enclosing scope
        elif isinstance(sub, ast.AnnAssign):
            stack += [sub.target, *([sub.value] if sub.value is not None else [])]
            (annotations if lazy_annotations else stack).append(sub.annotation)
        elif isinstance(sub, ast.Name):
            if isinstance(sub.ctx, ast.Load):
                runtime.add(sub.id)
        else:
            stack.extend(ast.iter_child_nodes(sub))
    if lazy_annotations:
        # Annotations inside the bodies too (a class attribute's, a nested function's).
        for sub in ast.walk(node):
            if isinstance(sub, ast.arg) and sub.annotation is not None:
                annotations.append(sub.annotation)
            elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.returns is not None:
                annotations.append(sub.returns)
            elif isinstance(sub, ast.AnnAssign):
                annotations.append(sub.annotation)
    hinted = {n.id for a in annotations for n in ast.walk(a) if isinstance(n, ast.Name)}
    return runtime, hinted - runtime


def _scope_globals(table: symtable.SymbolTable) -> set[str]:
    """Global (module-level or builtin) names read in ``table``'s scope and the scopes nested in it."""
    names = {symbol.get_name() for symbol in table.get_symbols() if symbol.is_global() and symbol.is_referenced()}
    for child in table.get_children():
        names |= _scope_globals(child)
    return names


def self_contained_source(roots: Sequence[Callable[..., object]], *, slug: str, title: str) -> ArchitectureSource:
    """One module defining ``roots`` (classes or functions) and everything they use, importing only allowed packages.

    Each root must be defined at the top level of its module, with its source available. The names a
    definition reads are looked up in its module: a top-level definition there (function, class,
    constant) is copied too, an import from :data:`ALLOWED_IMPORTS` is carried over, and a name imported
    from the root's own package (for this project: the student architectures) is followed to its
    definition and copied. Anything else - an import from elsewhere, a name bound dynamically - raises
    :class:`NotSelfContained` naming it. The result passes :func:`check_self_contained`.

    Args:
        roots: what the zoo entry imports, in the order to list them.
        slug: the module-name stem (``"small_cnn"``), see :attr:`ArchitectureSource.module`.
        title: the first line of the module docstring.
    """
    builder = _Builder()
    for root in roots:
        builder.add_root(root)
    names = tuple(getattr(root, "__name__", "") for root in roots)
    origins = [f"{getattr(root, '__module__', '')}.{name}" for root, name in zip(roots, names, strict=True)]
    text = builder.text(title, origins)
    check_self_contained(text)
    return ArchitectureSource(slug=slug, text=text, names=names)


def check_self_contained(text: str) -> None:
    """Compile ``text`` and check that every import in it (also inside functions) is of an allowed package.

    Raises :class:`NotSelfContained` for a syntax error, a relative import, or an import of anything outside
    :data:`ALLOWED_IMPORTS` (``robustbench_kd`` above all).
    """
    try:
        tree = ast.parse(text)
        compile(tree, "<architecture>", "exec")
    except SyntaxError as error:
        raise NotSelfContained(f"the generated module does not compile: {error}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                raise NotSelfContained(f"the generated module has a relative import (line {node.lineno})")
            modules = [node.module or ""]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            if not _allowed(module):
                raise NotSelfContained(f"the generated module imports {module} (line {node.lineno})")
