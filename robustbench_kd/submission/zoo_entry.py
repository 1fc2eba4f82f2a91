"""The bundle's ``zoo_entry.py``: how RobustBench's model zoo rebuilds the architecture, as source.

RobustBench's zoo files may import only RobustBench's own architectures (``robustbench/model_zoo/
architectures``) and timm, so an entry never imports this project. The constructor is a
:class:`ZooConstructor`:

* :func:`student_constructor` for our students: RobustBench's own class where the student *is* a RobustBench
  architecture (resnet18, preact-resnet18, wrn-34-10, wrn-28-10); otherwise the student's classes are
  shipped as one self-contained module for RobustBench's ``architectures`` folder
  (:attr:`ZooConstructor.files`, generated from their source by :mod:`.architecture_source`), which the
  entry imports. A plugin student whose source cannot be made self-contained gets a placeholder entry;
* :func:`zoo_entry_constructor` for a model that already is a zoo entry, :func:`constructor_for_spec` for a
  ``file:``/``robustbench:`` model spec.

ImageNet entries carry RobustBench's ``'preprocessing'`` key (``robustbench.data.get_preprocessing`` reads
it for every ImageNet model that is not timm's). :attr:`ZooConstructor.standalone` says whether the entry
works in RobustBench as it is; :func:`format_zoo_entry` writes the entry file and :func:`exec_zoo_entry`
runs one the way RobustBench's zoo would.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import inspect
import pickle
import sys
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from robustbench_kd.errors import UserError
from robustbench_kd.submission.architecture_source import (
    ArchitectureSource,
    NotSelfContained,
    self_contained_source,
)
from robustbench_kd.submission.layout import FILL_IN, LEADERBOARD_N_EXAMPLES

__all__ = [
    "ARCHITECTURES_PACKAGE",
    "ROBUSTBENCH_PREPROCESSINGS",
    "ZOO_DICT_NAMES",
    "ZooConstructor",
    "constructor_for_run",
    "constructor_for_spec",
    "exec_zoo_entry",
    "format_zoo_entry",
    "placeholder_constructor",
    "student_constructor",
    "zoo_entry_constructor",
]

#: The OrderedDict each threat model's entries live in, in robustbench/model_zoo/<dataset>.py.
ZOO_DICT_NAMES = {"Linf": "linf", "L2": "l2", "corruptions": "common_corruptions"}
#: Where RobustBench keeps its architectures; a shipped architecture file goes into this package.
ARCHITECTURES_PACKAGE = "robustbench.model_zoo.architectures"
#: The names ``robustbench.data.PREPROCESSINGS`` has for ImageNet (robustbench 1.1.1); an ImageNet entry's
#: ``'preprocessing'`` must be one of them, or ``get_preprocessing`` fails with a KeyError.
ROBUSTBENCH_PREPROCESSINGS = ("Res256Crop224", "Crop288", "Res224", "BicubicRes256Crop224")
# Leaderboard-style names of the built-in students.
_ARCH_NAMES = {
    "small-cnn": "SmallCNN",
    "resnet18": "ResNet-18",
    "preact-resnet18": "PreActResNet-18",
    "wrn-34-10": "WideResNet-34-10",
    "wrn-28-10": "WideResNet-28-10",
    "mobilenetv2": "MobileNetV2",
}
# Built-in students that are RobustBench's own classes, and the native zoo-file constructor of each.
_NATIVE = {
    "resnet18": (
        (f"from {ARCHITECTURES_PACKAGE}.resnet import BasicBlock, ResNet",),
        "ResNet(BasicBlock, [2, 2, 2, 2], num_classes={num_classes})",
    ),
    "preact-resnet18": (
        (f"from {ARCHITECTURES_PACKAGE}.resnet import PreActBlock, PreActResNet",),
        "PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes={num_classes})",
    ),
    "wrn-34-10": (
        (f"from {ARCHITECTURES_PACKAGE}.wide_resnet import WideResNet",),
        "WideResNet(depth=34, widen_factor=10, num_classes={num_classes})",
    ),
    "wrn-28-10": (
        (f"from {ARCHITECTURES_PACKAGE}.wide_resnet import WideResNet",),
        "WideResNet(depth=28, widen_factor=10, num_classes={num_classes})",
    ),
}
# Built-in students RobustBench does not have: the class (in robustbench_kd.students) their factory returns,
# and how the factory turns each option into the class's argument (it validates them, then converts).
_SHIPPED: dict[str, tuple[str, dict[str, Any]]] = {
    "small-cnn": ("SmallCNN", {"width": float}),
    "mobilenetv2": ("MobileNetV2", {"width": float}),
}


@dataclass(frozen=True)
class ZooConstructor:
    """Python source that rebuilds a model's architecture (random weights) for the zoo entry.

    Attributes:
        expression: one expression building the network, e.g.
            ``"SmallCNN(num_classes=10, in_channels=3, width=0.5)"``.
        imports: the import lines ``expression`` needs (RobustBench's architectures, a shipped architecture
            module under ``robustbench.model_zoo.architectures``, timm, torch).
        architecture: a leaderboard-style architecture name (``"WideResNet-34-10"``), or None.
        in_robustbench: the architecture is one of ``robustbench/model_zoo/architectures`` (the
            issue template asks whether it is *not*).
        placeholder: no constructor could be derived; the entry says what to fill in (``note``).
        note: a comment written above the entry.
        architecture_source: the module to add to RobustBench's ``architectures`` folder, or None.
        preprocessing: ImageNet only: RobustBench's name of the preprocessing the model was evaluated with,
            written as the entry's ``'preprocessing'``.
        not_standalone: why the entry, though not a placeholder, does not work in RobustBench as it is.
    """

    expression: str
    imports: tuple[str, ...] = ()
    architecture: str | None = None
    in_robustbench: bool = False
    placeholder: bool = False
    note: str | None = None
    architecture_source: ArchitectureSource | None = field(default=None, repr=False)
    preprocessing: str | None = None
    not_standalone: str | None = None

    def __post_init__(self) -> None:
        # ``ZooConstructor(**json.loads(json.dumps(dataclasses.asdict(c))))`` gives ``c`` back: shard files
        # store the constructor that way, as plain JSON (lists for tuples, a dict for the source).
        object.__setattr__(self, "imports", tuple(self.imports))
        source = self.architecture_source
        if isinstance(source, Mapping):
            object.__setattr__(self, "architecture_source", ArchitectureSource(**source))

    @property
    def standalone(self) -> bool:
        """Whether RobustBench can build and evaluate the model from the entry and :attr:`files` alone."""
        return self.standalone_problem is None

    @property
    def standalone_problem(self) -> str | None:
        """Why the entry is not standalone (one sentence), or None when it is."""
        if self.placeholder:
            return self.note or "the architecture constructor is a placeholder"
        return self.not_standalone

    @property
    def files(self) -> dict[str, str]:
        """Files for ``robustbench/model_zoo/architectures/`` the entry imports: ``{file name: text}``."""
        source = self.architecture_source
        return {source.filename: source.text} if source is not None else {}


def placeholder_constructor(
    note: str, architecture: str | None = None, *, preprocessing: str | None = None
) -> ZooConstructor:
    """A constructor whose entry has ``'model': None`` and says, in ``note``, what to write by hand."""
    return ZooConstructor(
        expression="None", architecture=architecture, placeholder=True, note=note, preprocessing=preprocessing
    )


def _literal(value: Any) -> bool:
    """Whether ``repr(value)`` is Python source that evaluates back to ``value``."""
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def _default_imagenet_preprocessing() -> str:
    """The preprocessing our ImageNet loader uses unless told otherwise (its signature's default)."""
    from robustbench_kd.data.imagenet import load_imagefolder_splits

    return str(inspect.signature(load_imagefolder_splits).parameters["preprocessing"].default)


def student_constructor(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    options: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    preprocessing: str | None = None,
    students: Any = None,
) -> ZooConstructor:
    """The constructor of student ``arch`` built with ``options`` for data of the given shape.

    A built-in student that is RobustBench's own class (resnet18, preact-resnet18, wrn-34-10, wrn-28-10)
    gets RobustBench's native constructor, which builds the identical module (same class, layer names and
    shapes). small-cnn and mobilenetv2, and the ``normalize`` wrapper of any built-in, are shipped as a
    self-contained architecture module generated from their classes' source; a plugin's student likewise
    from its factory's source, when that source is self-contained (else a placeholder saying why). A
    shipped architecture is checked against the student itself: built on the ``meta`` device, both must
    have the same modules and state-dict keys and shapes. An option that cannot be written as a Python
    literal, or that the student refuses, gives a placeholder.

    For ``dataset='imagenet'`` the network is wrapped in RobustBench's ImageNet zoo layout with an
    identity normaliser (:func:`_imagenet_layout`), the model ``save_zoo_checkpoint``'s ImageNet
    checkpoints load into, and ``preprocessing`` (default: our ImageNet loader's) becomes the entry's
    ``'preprocessing'``.

    Args:
        students: the student registry that built the model (``PluginHost.students``), for plugin students;
            default: the registry of a fresh plugin host.
    """
    constructor = _student_constructor(
        arch,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        options=dict(options or {}),
        students=students,
    )
    if dataset != "imagenet":
        return constructor
    return _imagenet_layout(constructor, preprocessing or _default_imagenet_preprocessing())


def _imagenet_layout(constructor: ZooConstructor, preprocessing: str) -> ZooConstructor:
    """``constructor`` wrapped as ``Sequential(OrderedDict(normalize=nn.Identity(), model=<net>))``.

    robustbench.utils.load_model prefixes every key of an ImageNet checkpoint with ``model.``, for the
    ``normalize_model(net, mean, std)`` wrapper every ImageNet entry builds. Our students take [0, 1]
    inputs and normalise inside if at all, so the normaliser is the identity; ``nn.Identity`` has no
    buffers, so the checkpoint (the bare weights) loads strictly, without load_model's fallback that
    ignores missing keys. Same source as ``robustbench_kd.evaluation.export.imagenet_zoo_model``.
    ``preprocessing`` is recorded for the entry (:func:`_preprocessing_problem`).
    """
    if constructor.placeholder:
        note = (
            f"{constructor.note}; wrap it as nn.Sequential(OrderedDict([('normalize', nn.Identity()), "
            "('model', <network>)])) (the checkpoint holds the bare network's weights)"
        )
        return placeholder_constructor(note, constructor.architecture, preprocessing=preprocessing)
    imports = tuple(
        dict.fromkeys(("from collections import OrderedDict", "from torch import nn", *constructor.imports))
    )
    expression = f"nn.Sequential(OrderedDict([('normalize', nn.Identity()), ('model', {constructor.expression})]))"
    return ZooConstructor(
        expression=expression,
        imports=imports,
        architecture=constructor.architecture,
        in_robustbench=constructor.in_robustbench,
        note=constructor.note,
        architecture_source=constructor.architecture_source,
        preprocessing=preprocessing,
        not_standalone=constructor.not_standalone or _preprocessing_problem(preprocessing),
    )


def _preprocessing_problem(preprocessing: str | None) -> str | None:
    """Why RobustBench cannot evaluate an ImageNet entry with ``preprocessing`` (None if it can)."""
    if preprocessing in ROBUSTBENCH_PREPROCESSINGS:
        return None
    return (
        f"the model was evaluated with the preprocessing {preprocessing!r}, which RobustBench's "
        f"robustbench.data.PREPROCESSINGS lacks (it has {', '.join(ROBUSTBENCH_PREPROCESSINGS)})"
    )


def _student_constructor(
    arch: str, *, num_classes: int, in_channels: int, image_size: int, options: dict[str, Any], students: Any
) -> ZooConstructor:
    from robustbench_kd.students import BUILTIN_STUDENTS

    canonical = arch.strip().lower().replace("_", "-") if isinstance(arch, str) else arch
    builtin = canonical if canonical in BUILTIN_STUDENTS else None
    shown = {k: v for k, v in sorted(options.items()) if k != "normalize"}
    name = _ARCH_NAMES.get(builtin or "", arch)
    if shown:
        name += " (" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"
    bad = [k for k, v in options.items() if not (isinstance(k, str) and k.isidentifier() and _literal(v))]
    if bad:
        return placeholder_constructor(
            f"student option {bad[0]!r} of {arch!r} cannot be written as Python source; write the constructor by hand",
            name,
        )
    shape = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    if builtin is not None:
        return _builtin_constructor(builtin, name, shape, options)
    return _plugin_constructor(arch, name, shape, options, students)


def _builtin_constructor(builtin: str, name: str, shape: dict[str, int], options: dict[str, Any]) -> ZooConstructor:
    """A built-in student: RobustBench's class, or our classes shipped as an architecture module."""
    from robustbench_kd import students as builtins_module

    normalize = options.get("normalize")
    rest = {k: v for k, v in options.items() if k != "normalize"}
    if builtin in _NATIVE and not rest:
        imports, template = _NATIVE[builtin]
        native = ZooConstructor(
            expression=template.format(num_classes=shape["num_classes"]),
            imports=imports,
            architecture=name,
            in_robustbench=True,
        )
        if normalize is None:
            return native
        roots: list[Any] = []
        core, core_imports = native.expression, native.imports
    elif builtin in _SHIPPED:
        class_name, converters = _SHIPPED[builtin]
        unknown = sorted(set(rest) - set(converters))
        if unknown:
            return _refused(builtin, name, shape, options)
        roots = [getattr(builtins_module, class_name)]
        arguments = [f"num_classes={shape['num_classes']}", f"in_channels={shape['in_channels']}"]
        arguments += [f"{k}={converters[k](v)!r}" for k, v in sorted(rest.items())]
        core, core_imports = f"{class_name}({', '.join(arguments)})", ()
    else:  # a built-in with options RobustBench's class does not take
        return _refused(builtin, name, shape, options)
    expression = core
    if normalize is not None:
        try:
            mean, std = builtins_module._normalization(normalize, shape["in_channels"])
        except UserError as error:
            return placeholder_constructor(f"student {builtin!r} cannot be built: {error}", name)
        roots.append(builtins_module.Normalized)
        expression = f"Normalized({core}, mean={mean!r}, std={std!r})"
    slug = builtin.replace("-", "_") if builtin in _SHIPPED else "normalized"
    classes = " and ".join(root.__name__ for root in roots)
    kind = "student architectures" if len(roots) > 1 else "a student architecture"
    title = f"{classes}, {kind} of robustbench_kd, for RobustBench's model zoo."
    source = self_contained_source(roots, slug=slug, title=title)
    constructor = ZooConstructor(
        expression=expression,
        imports=(*core_imports, _architecture_import(source)),
        architecture=name,
        architecture_source=source,
    )

    def build() -> Any:
        return builtins_module.build_student(builtin, **shape, **options)

    problem = _layout_problem(constructor, build)
    if problem is not None:
        # The generated module is derived from the very classes the student is built from: a mismatch
        # is a bug here, not something a user can fix.
        raise RuntimeError(f"the shipped architecture of {builtin!r} does not rebuild the student: {problem}")
    return constructor


def _refused(builtin: str, name: str, shape: dict[str, int], options: dict[str, Any]) -> ZooConstructor:
    """The placeholder for options the built-in student refuses (its own error message says why)."""
    from robustbench_kd.students import build_student

    try:
        with _meta_device():
            build_student(builtin, **shape, **options)
    except UserError as error:
        return placeholder_constructor(f"student {builtin!r} cannot be built: {error}", name)
    return placeholder_constructor(
        f"student {builtin!r} with options {sorted(options)} has no RobustBench constructor; write it by hand", name
    )


def _plugin_constructor(
    arch: str, name: str, shape: dict[str, int], options: dict[str, Any], students: Any
) -> ZooConstructor:
    """A plugin's student: its factory's source shipped as an architecture module, when self-contained."""
    if students is None:
        from robustbench_kd.plugin_host import PluginHost

        students = PluginHost.create().students
    try:
        entry = students.entry(arch)
    except UserError as error:
        return placeholder_constructor(f"student {arch!r} is not registered here ({error})", name)
    factory, arguments = entry.value, []
    where = f"student architecture {arch!r} of the plugin {entry.plugin!r}"
    if isinstance(factory, functools.partial):
        bound = [*factory.args, *factory.keywords.values()]
        if not all(_literal(value) for value in bound):
            return placeholder_constructor(f"{where} is a functools.partial with non-literal arguments", name)
        arguments += [repr(value) for value in factory.args]
        arguments += [f"{k}={v!r}" for k, v in factory.keywords.items()]
        factory = factory.func
    try:
        source = self_contained_source(
            [factory],
            slug=_slug(arch),
            title=f"The student architecture {arch!r} of the robustbench_kd plugin {entry.plugin!r}.",
        )
    except NotSelfContained as error:
        return placeholder_constructor(
            f"{where} cannot be shipped to RobustBench as one self-contained file ({error}); add its "
            "architecture to robustbench/model_zoo/architectures by hand",
            name,
        )
    arguments += [f"{k}={v}" for k, v in shape.items()]
    arguments += [f"{k}={v!r}" for k, v in sorted(options.items())]
    constructor = ZooConstructor(
        expression=f"{source.names[0]}({', '.join(arguments)})",
        imports=(_architecture_import(source),),
        architecture=name,
        architecture_source=source,
        note=f"{where}, copied from its source",
    )
    problem = _layout_problem(constructor, lambda: entry.value(**shape, **options))
    if problem is not None:
        return placeholder_constructor(f"{where}: its copied source does not rebuild the student ({problem})", name)
    return constructor


def _slug(arch: str) -> str:
    """``arch`` as a module-name stem: lower case, every run of other characters one underscore."""
    text = "".join(c if c.isalnum() else "_" for c in arch.lower()).strip("_")
    while "__" in text:
        text = text.replace("__", "_")
    return text or "student"


def _architecture_import(source: ArchitectureSource) -> str:
    return f"from {ARCHITECTURES_PACKAGE}.{source.module} import {', '.join(source.names)}"


@contextlib.contextmanager
def _meta_device() -> Iterator[None]:
    """Build modules on the ``meta`` device: shapes only, no memory, no initialisation cost."""
    import torch

    with torch.device("meta"):
        yield


def _layout(model: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    modules = [(name, type(module).__name__) for name, module in model.named_modules()]
    tensors = [(key, tuple(value.shape), value.dtype) for key, value in model.state_dict().items()]
    return modules, tensors


def _layout_problem(constructor: ZooConstructor, build: Any) -> str | None:
    """How the entry's model differs from ``build()``'s (module names and types, state-dict keys and shapes)."""
    try:
        with _meta_device():
            expected = build()
            rebuilt = _build_from_entry(constructor)
    except Exception as error:  # third-party code: any failure means "not verified"
        return f"building it failed: {type(error).__name__}: {error}"
    layouts: list[tuple[str, list[tuple[Any, ...]], list[tuple[Any, ...]]]] = [
        ("module", _layout(rebuilt)[0], _layout(expected)[0]),
        ("state-dict entry", _layout(rebuilt)[1], _layout(expected)[1]),
    ]
    for what, got, wanted in layouts:
        if got != wanted:
            pairs = enumerate(zip(got, wanted, strict=False))
            first = next((i for i, (a, b) in pairs if a != b), min(len(got), len(wanted)))
            mine = got[first] if first < len(got) else "(none)"
            theirs = wanted[first] if first < len(wanted) else "(none)"
            return f"{what} {first}: {mine} where the student has {theirs}"
    return None


def _build_from_entry(constructor: ZooConstructor) -> Any:
    """The model the entry builds: its expression evaluated with its imports bound.

    The shipped module is executed directly rather than imported through ``robustbench``, so checking a
    small-cnn entry does not cost an import of robustbench (timm, torchvision); the other import lines are
    executed as written.
    """
    namespace: dict[str, Any] = {}
    source = constructor.architecture_source
    shipped = _architecture_import(source) if source is not None else None
    if source is not None:
        module = types.ModuleType(f"{ARCHITECTURES_PACKAGE}.{source.module}")
        exec(compile(source.text, source.filename, "exec"), module.__dict__)
        namespace.update({name: getattr(module, name) for name in source.names})
    others = [line for line in constructor.imports if line != shipped]
    if any("robustbench" in line for line in others):
        from robustbench_kd.zoo.compat import import_robustbench

        import_robustbench()
    exec(compile("\n".join(others), "<zoo entry imports>", "exec"), namespace)
    return eval(constructor.expression, namespace)


@contextlib.contextmanager
def _architectures_importable(files: Mapping[str, str]) -> Iterator[None]:
    """While inside, ``files`` (``{name.py: text}``) import as modules of RobustBench's architectures package.

    As if they had been copied into ``robustbench/model_zoo/architectures/``; the modules are removed from
    ``sys.modules`` afterwards (what was built from them keeps working).
    """
    from robustbench_kd.zoo.compat import import_robustbench

    import_robustbench()
    added: list[str] = []
    try:
        for filename, text in files.items():
            qualified = f"{ARCHITECTURES_PACKAGE}.{Path(filename).stem}"
            if qualified in sys.modules:
                continue
            module = types.ModuleType(qualified)
            module.__file__ = filename
            sys.modules[qualified] = module
            added.append(qualified)
            exec(compile(text, filename, "exec"), module.__dict__)
        yield
    finally:
        for qualified in added:
            sys.modules.pop(qualified, None)


def exec_zoo_entry(source: str, files: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]]:
    """``ENTRY`` of a ``zoo_entry.py`` text, executed as in RobustBench's zoo with ``files`` in its architectures.

    ``files`` are the architecture modules the entry imports (``{file name: text}``: a bundle's
    architecture files, :attr:`ZooConstructor.files`); while the entry's imports run they are importable as
    ``robustbench.model_zoo.architectures.<stem>``. For tests and checks of a bundle in this process; a
    separate RobustBench checkout gets the files copied instead.
    """
    namespace: dict[str, Any] = {}
    with _architectures_importable(dict(files or {})):
        exec(compile(source, "zoo_entry.py", "exec"), namespace)
    entry = namespace.get("ENTRY")
    if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict)):
        raise UserError("zoo_entry.py does not define ENTRY = (name, {'model': ..., 'gdrive_id': ...})")
    return entry[0], entry[1]


def constructor_for_run(run: Any) -> ZooConstructor:
    """:func:`student_constructor` for the student of a trained run (its config, data shape and preprocessing)."""
    cfg, data = run.config, run.data
    return student_constructor(
        cfg.student.arch,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        options=cfg.student.options,
        dataset=data.name,
        preprocessing=_data_preprocessing(data) or getattr(getattr(cfg, "data", None), "preprocessing", None),
        students=getattr(getattr(run, "host", None), "students", None),
    )


def _data_preprocessing(data: Any) -> str | None:
    """The preprocessing name the test images of ``data`` are decoded with (lazy ImageNet images), if any."""
    name = getattr(getattr(data.test_x, "preprocessing", None), "name", None)
    return name if isinstance(name, str) else None


def _import_line(name: str, obj: Any, home_module: str) -> str:
    """An import that binds ``name`` to ``obj`` (``home_module``: where ``name`` is a global)."""
    if isinstance(obj, types.ModuleType):
        parent, _, leaf = obj.__name__.rpartition(".")
        if parent:
            return f"from {parent} import {leaf}" + (f" as {name}" if leaf != name else "")
        return f"import {obj.__name__}" + (f" as {name}" if obj.__name__ != name else "")
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and qualname.isidentifier():
        return f"from {module} import {qualname}" + (f" as {name}" if qualname != name else "")
    # A constant (e.g. CIFAR10_MEAN): import it from the module whose global it is.
    return f"from {home_module} import {name}"


def _lambda_body(factory: types.FunctionType) -> ast.expr | None:
    """The body of the zero-argument lambda ``factory``, from its module's source; None if not found."""
    module = inspect.getmodule(factory)
    try:
        source = inspect.getsource(module) if module is not None else None
    except (OSError, TypeError):
        source = None
    if source is None:
        return None
    line = factory.__code__.co_firstlineno
    found = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Lambda) and node.lineno == line]
    if len(found) != 1:  # several lambdas on one line: which one is ours cannot be told reliably
        return None
    node = found[0]
    if node.args.args or node.args.posonlyargs or node.args.kwonlyargs or node.args.vararg or node.args.kwarg:
        return None
    return node.body


def zoo_entry_constructor(dataset: str, threat_model: str, name: str) -> ZooConstructor:
    """The constructor of RobustBench zoo entry ``dataset/threat_model/name``, as source.

    The entry's ``'model'`` is a class or function (written as ``Name()``) or a zero-argument lambda
    (its body is read from the zoo module's source). Every global name the expression uses gets an
    import line: classes and functions from their defining module, constants from the zoo module.
    Anything else (closures, ``functools.partial``, unavailable source) gives a placeholder. An ImageNet
    entry keeps the zoo's preprocessing.
    """
    constructor = _zoo_entry_constructor(dataset, threat_model, name)
    if dataset != "imagenet":
        return constructor
    from robustbench_kd.zoo.models import zoo_preprocessing

    preprocessing = zoo_preprocessing(name, dataset=dataset, threat_model=threat_model)
    return replace(
        constructor,
        preprocessing=preprocessing,
        not_standalone=constructor.not_standalone or _preprocessing_problem(preprocessing),
    )


def _zoo_entry_constructor(dataset: str, threat_model: str, name: str) -> ZooConstructor:
    from robustbench_kd.zoo.models import _lookup

    dataset, _folder, entry = _lookup(name, dataset, threat_model)
    factory = entry.get("model")
    ref = f"{dataset}/{threat_model}/{name}"
    home = getattr(factory, "__module__", None) or ""
    if inspect.isclass(factory) or (inspect.isfunction(factory) and factory.__name__ != "<lambda>"):
        if not factory.__qualname__.isidentifier():  # nested or local: not importable by name
            return placeholder_constructor(
                f"the architecture of zoo entry {ref} ({factory.__qualname__}) is not importable"
            )
        line = _import_line(factory.__qualname__, factory, home)
        return ZooConstructor(
            expression=f"{factory.__qualname__}()",
            imports=(line,),
            in_robustbench=home.startswith("robustbench."),
            note=f"same architecture as the zoo entry {ref}",
        )
    if not inspect.isfunction(factory) or factory.__closure__:
        return placeholder_constructor(f"copy the 'model' constructor of the zoo entry {ref}")
    body = _lambda_body(factory)
    if body is None:
        return placeholder_constructor(f"copy the 'model' constructor of the zoo entry {ref}")
    imports: list[str] = []
    for node in ast.walk(body):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id in factory.__globals__:
                line = _import_line(node.id, factory.__globals__[node.id], home)
            elif hasattr(builtins, node.id):
                continue
            else:
                return placeholder_constructor(f"copy the 'model' constructor of the zoo entry {ref}")
            if line not in imports:
                imports.append(line)
    return ZooConstructor(
        expression=ast.unparse(body),
        imports=tuple(imports),
        in_robustbench=home.startswith("robustbench."),
        note=f"same architecture as the zoo entry {ref}",
    )


def constructor_for_spec(
    spec: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    dataset: str | None = None,
    preprocessing: str | None = None,
    students: Any = None,
) -> ZooConstructor:
    """The constructor of the model a ``scheme:ref`` spec loads (what ``robustbench-kd evaluate`` takes).

    * ``file:PATH[?arch=NAME&opt=value]``: the architecture the file teacher source rebuilds - ``arch``
      from the spec or the checkpoint's recorded ``student_arch`` (with its options, overridden by the
      spec's), and the checkpoint's recorded data shape if any (for ``dataset='imagenet'`` in the
      ImageNet zoo layout, with ``preprocessing``: see :func:`student_constructor`);
    * ``robustbench:<dataset>/<threat>/<Name>``: :func:`zoo_entry_constructor`;
    * anything else (a plugin's scheme), or a file that records no architecture: a placeholder.
    """
    from robustbench_kd.teachers import TeacherSpec, file_architecture

    parsed = TeacherSpec.parse(spec)
    if parsed.scheme == "robustbench":
        from robustbench_kd.zoo.models import parse_zoo_ref

        return zoo_entry_constructor(*parse_zoo_ref(parsed.ref))
    if parsed.scheme != "file":
        return placeholder_constructor(
            f"the model was loaded through the {parsed.scheme!r} source ({spec}); write its constructor by hand"
        )
    data = _checkpoint_metadata(Path(parsed.ref).expanduser())
    # The same option resolution as the file teacher source, so the entry rebuilds what was evaluated.
    arch, arch_options = file_architecture(data, parsed.options)
    if not arch:
        return placeholder_constructor(f"{spec} records no architecture; write its constructor by hand")
    return student_constructor(
        arch,
        num_classes=int(data.get("num_classes", num_classes)),
        in_channels=int(data.get("in_channels", in_channels)),
        image_size=int(data.get("image_size", image_size)),
        options=arch_options,
        dataset=dataset,
        preprocessing=preprocessing,
        students=students,
    )


def _checkpoint_metadata(path: Path) -> dict[str, Any]:
    """The non-tensor entries of a checkpoint (architecture, data shape), read without loading weights."""
    import torch

    try:
        # mmap: the tensors are not read into memory, only the small metadata is looked at.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError, OSError, EOFError, pickle.UnpicklingError):
        # Legacy (non-zip) files cannot be mmapped; the normal reader handles them, and turns a damaged
        # file into a one-line UserError.
        from robustbench_kd.storage.checkpoint import load_checkpoint

        data = load_checkpoint(path)
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k in ("student_arch", "num_classes", "in_channels", "image_size")}


def format_zoo_entry(model_id: str, constructor: ZooConstructor, *, dataset: str, threat_model: str) -> str:
    """Source of ``zoo_entry.py``: a docstring saying where it goes, the imports, and ``ENTRY``.

    Executing the text (with :attr:`ZooConstructor.files` in RobustBench's architectures folder, see
    :func:`exec_zoo_entry`) defines ``ENTRY = (model_id, {'model': <callable>, 'gdrive_id': '<fill in>'})``,
    plus ``'preprocessing'`` for ImageNet; with a placeholder constructor ``'model'`` is None and a
    ``PLACEHOLDER`` comment says what to write. An entry that is not standalone says why in a comment.
    """
    dict_name = ZOO_DICT_NAMES.get(threat_model, threat_model)
    where = (
        f"robustbench/model_zoo/{dataset}.py"
        if dataset in LEADERBOARD_N_EXAMPLES
        else f"a model-zoo file for {dataset!r} (RobustBench has no {dataset!r} model zoo)"
    )
    copy = [
        line
        for name in constructor.files
        for line in (
            f"Copy {name} (next to this file) into robustbench/model_zoo/architectures/",
            "first: the entry imports it.",
        )
    ]
    lines = [
        f'"""Model-zoo entry for {model_id} ({dataset} / {threat_model}).',
        "",
        *copy,
        f"Paste the import lines at the top of {where} (skip any already there) and the ENTRY tuple",
        f"into its `{dict_name}` OrderedDict. Upload models/{dataset}/{threat_model}/{model_id}.pt and put its",
        f"Google Drive id in place of {FILL_IN!r}. Executing this file defines ENTRY.",
        '"""',
        "",
        *constructor.imports,
        "",
    ]
    if constructor.placeholder:
        lines.append(f"# PLACEHOLDER, not usable as it is: {constructor.note}")
    elif constructor.note:
        lines.append(f"# {constructor.note}")
    if constructor.not_standalone and not constructor.placeholder:
        lines.append(f"# NOT STANDALONE: {constructor.not_standalone}")
    if constructor.placeholder:
        model = f"None,  # {FILL_IN}: a callable that builds the architecture"
    else:
        model = f"lambda: {constructor.expression},"
    lines += [f"ENTRY = ({model_id!r}, {{", f"    'model': {model}", f"    'gdrive_id': {FILL_IN!r},"]
    if dataset == "imagenet":
        # robustbench.data.get_preprocessing reads this key for every ImageNet entry that is not timm's.
        preprocessing = constructor.preprocessing
        lines.append(
            f"    'preprocessing': {preprocessing!r},"
            if preprocessing is not None
            else f"    'preprocessing': {FILL_IN!r},  # RobustBench's name of the evaluation preprocessing"
        )
    lines += ["})", ""]
    return "\n".join(lines)
