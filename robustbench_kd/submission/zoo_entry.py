"""The bundle's ``zoo_entry.py``: how RobustBench's model zoo rebuilds the architecture, as source.

The constructor is a :class:`ZooConstructor`: :func:`student_constructor` for our students (RobustBench's
own class where the student *is* a RobustBench architecture, else ``robustbench_kd.students.build_student``),
:func:`zoo_entry_constructor` for a model that already is a zoo entry, :func:`constructor_for_spec` for a
``file:``/``robustbench:`` model spec; :func:`format_zoo_entry` writes the entry file.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import pickle
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustbench_kd.submission.layout import FILL_IN, LEADERBOARD_N_EXAMPLES

__all__ = [
    "ZOO_DICT_NAMES",
    "ZooConstructor",
    "constructor_for_run",
    "constructor_for_spec",
    "format_zoo_entry",
    "placeholder_constructor",
    "student_constructor",
    "zoo_entry_constructor",
]

#: The OrderedDict each threat model's entries live in, in robustbench/model_zoo/<dataset>.py.
ZOO_DICT_NAMES = {"Linf": "linf", "L2": "l2", "corruptions": "common_corruptions"}
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
_RB_ARCH = "robustbench.model_zoo.architectures"
_NATIVE = {
    "resnet18": (
        (f"from {_RB_ARCH}.resnet import BasicBlock, ResNet",),
        "ResNet(BasicBlock, [2, 2, 2, 2], num_classes={num_classes})",
    ),
    "preact-resnet18": (
        (f"from {_RB_ARCH}.resnet import PreActBlock, PreActResNet",),
        "PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes={num_classes})",
    ),
    "wrn-34-10": (
        (f"from {_RB_ARCH}.wide_resnet import WideResNet",),
        "WideResNet(depth=34, widen_factor=10, num_classes={num_classes})",
    ),
    "wrn-28-10": (
        (f"from {_RB_ARCH}.wide_resnet import WideResNet",),
        "WideResNet(depth=28, widen_factor=10, num_classes={num_classes})",
    ),
}


@dataclass(frozen=True)
class ZooConstructor:
    """Python source that rebuilds a model's architecture (random weights) for the zoo entry.

    Attributes:
        expression: one expression building the network, e.g.
            ``"build_student('small-cnn', num_classes=10, in_channels=3, image_size=32, width=0.5)"``.
        imports: the import lines ``expression`` needs.
        architecture: a leaderboard-style architecture name (``"WideResNet-34-10"``), or None.
        in_robustbench: the architecture is one of ``robustbench/model_zoo/architectures`` (the
            issue template asks whether it is *not*).
        placeholder: no constructor could be derived; the entry says what to fill in (``note``).
        note: a comment written above the entry.
    """

    expression: str
    imports: tuple[str, ...] = ()
    architecture: str | None = None
    in_robustbench: bool = False
    placeholder: bool = False
    note: str | None = None


def placeholder_constructor(note: str, architecture: str | None = None) -> ZooConstructor:
    return ZooConstructor(expression="None", architecture=architecture, placeholder=True, note=note)


def _literal(value: Any) -> bool:
    """Whether ``repr(value)`` is Python source that evaluates back to ``value``."""
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def student_constructor(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    options: Mapping[str, Any] | None = None,
    dataset: str | None = None,
) -> ZooConstructor:
    """The constructor of student ``arch`` built with ``options`` for data of the given shape.

    A built-in student that is RobustBench's own class (resnet18, preact-resnet18, wrn-34-10,
    wrn-28-10) without a ``normalize`` wrapper gets RobustBench's native constructor, which builds
    the identical module (same class, layer names and shapes). Other built-ins go through
    ``robustbench_kd.students.build_student`` with every option spelled out, and students from
    plugins through the plugin registry (the plugin's distribution must then be installed). An
    option that cannot be written as a Python literal gives a placeholder entry.

    For ``dataset='imagenet'`` the network is wrapped in RobustBench's ImageNet zoo layout with an
    identity normaliser (:func:`_imagenet_layout`), the model ``save_zoo_checkpoint``'s ImageNet
    checkpoints load into.
    """
    constructor = _student_constructor(
        arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size, options=dict(options or {})
    )
    return _imagenet_layout(constructor) if dataset == "imagenet" else constructor


def _imagenet_layout(constructor: ZooConstructor) -> ZooConstructor:
    """``constructor`` wrapped as ``Sequential(OrderedDict(normalize=nn.Identity(), model=<net>))``.

    robustbench.utils.load_model prefixes every key of an ImageNet checkpoint with ``model.``, for the
    ``normalize_model(net, mean, std)`` wrapper every ImageNet entry builds. Our students take [0, 1]
    inputs and normalise inside if at all, so the normaliser is the identity; ``nn.Identity`` has no
    buffers, so the checkpoint (the bare weights) loads strictly, without load_model's fallback that
    ignores missing keys. Same source as ``robustbench_kd.evaluation.export.imagenet_zoo_model``.
    """
    if constructor.placeholder:
        note = (
            f"{constructor.note}; wrap it as nn.Sequential(OrderedDict([('normalize', nn.Identity()), "
            "('model', <network>)])) (the checkpoint holds the bare network's weights)"
        )
        return placeholder_constructor(note, constructor.architecture)
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
    )


def _student_constructor(
    arch: str, *, num_classes: int, in_channels: int, image_size: int, options: dict[str, Any]
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
    if builtin in _NATIVE and options.get("normalize") is None and not (set(options) - {"normalize"}):
        imports, template = _NATIVE[builtin]
        return ZooConstructor(
            expression=template.format(num_classes=num_classes), imports=imports, architecture=name, in_robustbench=True
        )
    arguments = ", ".join(
        [
            f"num_classes={num_classes}",
            f"in_channels={in_channels}",
            f"image_size={image_size}",
            *(f"{k}={v!r}" for k, v in sorted(options.items())),
        ]
    )
    if builtin is not None:
        return ZooConstructor(
            expression=f"build_student({builtin!r}, {arguments})",
            imports=("from robustbench_kd.students import build_student",),
            architecture=name,
        )
    return ZooConstructor(
        expression=f"PluginHost.create().students.get({arch!r})({arguments})",
        imports=("from robustbench_kd.plugin_host import PluginHost",),
        architecture=name,
        note=f"{arch!r} is a student architecture registered by a robustbench_kd plugin; "
        "the plugin's distribution must be installed",
    )


def constructor_for_run(run: Any) -> ZooConstructor:
    """:func:`student_constructor` for the student of a trained run (its config and data shape)."""
    cfg, data = run.config, run.data
    return student_constructor(
        cfg.student.arch,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        options=cfg.student.options,
        dataset=data.name,
    )


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
    Anything else (closures, ``functools.partial``, unavailable source) gives a placeholder.
    """
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
    spec: str, *, num_classes: int, in_channels: int, image_size: int, dataset: str | None = None
) -> ZooConstructor:
    """The constructor of the model a ``scheme:ref`` spec loads (what ``robustbench-kd evaluate`` takes).

    * ``file:PATH[?arch=NAME&opt=value]``: the architecture the file teacher source rebuilds - ``arch``
      from the spec or the checkpoint's recorded ``student_arch`` (with its options, overridden by the
      spec's), and the checkpoint's recorded data shape if any (for ``dataset='imagenet'`` in the
      ImageNet zoo layout, see :func:`student_constructor`);
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

    Executing the text defines ``ENTRY = (model_id, {'model': <callable>, 'gdrive_id': '<fill in>'})``;
    with a placeholder constructor ``'model'`` is None.
    """
    dict_name = ZOO_DICT_NAMES.get(threat_model, threat_model)
    where = (
        f"robustbench/model_zoo/{dataset}.py"
        if dataset in LEADERBOARD_N_EXAMPLES
        else f"a model-zoo file for {dataset!r} (RobustBench has no {dataset!r} model zoo)"
    )
    lines = [
        f'"""Model-zoo entry for {model_id} ({dataset} / {threat_model}).',
        "",
        f"Paste the import lines at the top of {where} (skip any already there) and the ENTRY tuple",
        f"into its `{dict_name}` OrderedDict. Upload models/{dataset}/{threat_model}/{model_id}.pt and put its",
        f"Google Drive id in place of {FILL_IN!r}. Executing this file defines ENTRY.",
        '"""',
        "",
        *constructor.imports,
        "",
    ]
    if constructor.note:
        lines.append(f"# {constructor.note}")
    if constructor.placeholder:
        model = f"None,  # {FILL_IN}: a callable that builds the architecture"
    else:
        model = f"lambda: {constructor.expression},"
    lines += [f"ENTRY = ({model_id!r}, {{", f"    'model': {model}", f"    'gdrive_id': {FILL_IN!r},", "})", ""]
    return "\n".join(lines)
