"""Submission bundles: everything needed to put one evaluated model on the RobustBench leaderboard.

For a model id ``ID`` evaluated with standard AutoAttack, :func:`write_submission_bundle` writes
``<out>/submission/<ID>/``:

* ``<ID>.json`` - byte-for-byte copy of the leaderboard entry ``<out>/model_info/<dataset>/<threat>/<ID>.json``
  (the canonical file, which stays where it is);
* ``autoattack.log`` - AutoAttack's full log of the run that produced the robust accuracy;
* ``checkpoint.sha256`` - SHA-256 of the zoo-layout checkpoint ``<out>/models/<dataset>/<threat>/<ID>.pt``
  in ``sha256sum`` format, with the path relative to the bundle (``sha256sum -c checkpoint.sha256``
  run inside the bundle checks it);
* ``zoo_entry.py`` - the entry for RobustBench's ``robustbench/model_zoo/<dataset>.py`` (import lines
  plus an ``ENTRY = ('ID', {'model': lambda: ..., 'gdrive_id': '<fill in>'})`` tuple); executing the
  file defines ``ENTRY``;
* ``new_model_issue.md`` - RobustBench's "New Model(s)" issue template, filled in;
* ``README.md`` - what each file is, the command that produced it, and what is left to fill in.

The zoo entry's constructor is a :class:`ZooConstructor`: :func:`student_constructor` for our
students (RobustBench's own class where the student *is* a RobustBench architecture, else
``robustbench_kd.students.build_student``), :func:`zoo_entry_constructor` for a model that already is
a zoo entry, :func:`constructor_for_spec` for a ``file:``/``robustbench:`` model spec.
"""

from __future__ import annotations

import ast
import builtins
import importlib.metadata
import inspect
import json
import logging
import os
import pickle
import shlex
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_bytes, atomic_write_text
from robustbench_kd.storage.hashing import sha256_of
from robustbench_kd.zoo.names import validate_model_id

__all__ = [
    "AUTOATTACK_LOG",
    "SubmissionBundle",
    "ZooConstructor",
    "autoattack_log_partial",
    "bundle_dir",
    "constructor_for_run",
    "constructor_for_spec",
    "distill_command",
    "format_new_model_issue",
    "format_zoo_entry",
    "student_constructor",
    "write_submission_bundle",
    "zoo_entry_constructor",
]

log = logging.getLogger(__name__)

FILL_IN = "<fill in>"
AUTOATTACK_LOG = "autoattack.log"
CHECKSUM_FILE = "checkpoint.sha256"
ZOO_ENTRY_FILE = "zoo_entry.py"
ISSUE_FILE = "new_model_issue.md"
README_FILE = "README.md"
#: The leaderboard protocol: the full CIFAR test set (ImageNet: a fixed 5000-image subset).
LEADERBOARD_N_EXAMPLES = {"cifar10": 10000, "cifar100": 10000, "imagenet": 5000}
#: The OrderedDict each threat model's entries live in, in robustbench/model_zoo/<dataset>.py.
ZOO_DICT_NAMES = {"Linf": "linf", "L2": "l2", "corruptions": "common_corruptions"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "imagenet": "ImageNet",
                 "digits": "digits (scikit-learn 8x8)"}
THREAT_NAMES = {"Linf": "Linf", "L2": "L2", "corruptions": "Common Corruptions"}
STANDARD_ATTACKS = "APGD-CE, APGD-T, FAB-T, Square"
# Leaderboard-style names of the built-in students.
_ARCH_NAMES = {"small-cnn": "SmallCNN", "resnet18": "ResNet-18", "preact-resnet18": "PreActResNet-18",
               "wrn-34-10": "WideResNet-34-10", "wrn-28-10": "WideResNet-28-10", "mobilenetv2": "MobileNetV2"}
# Built-in students that are RobustBench's own classes, and the native zoo-file constructor of each.
_RB_ARCH = "robustbench.model_zoo.architectures"
_NATIVE = {
    "resnet18": ((f"from {_RB_ARCH}.resnet import BasicBlock, ResNet",),
                 "ResNet(BasicBlock, [2, 2, 2, 2], num_classes={num_classes})"),
    "preact-resnet18": ((f"from {_RB_ARCH}.resnet import PreActBlock, PreActResNet",),
                        "PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes={num_classes})"),
    "wrn-34-10": ((f"from {_RB_ARCH}.wide_resnet import WideResNet",),
                  "WideResNet(depth=34, widen_factor=10, num_classes={num_classes})"),
    "wrn-28-10": ((f"from {_RB_ARCH}.wide_resnet import WideResNet",),
                  "WideResNet(depth=28, widen_factor=10, num_classes={num_classes})"),
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


def _placeholder(note: str, architecture: str | None = None) -> ZooConstructor:
    return ZooConstructor(expression="None", architecture=architecture, placeholder=True, note=note)


def _literal(value: Any) -> bool:
    """Whether ``repr(value)`` is Python source that evaluates back to ``value``."""
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def student_constructor(arch: str, *, num_classes: int, in_channels: int, image_size: int,
                        options: Mapping[str, Any] | None = None, dataset: str | None = None) -> ZooConstructor:
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
    constructor = _student_constructor(arch, num_classes=num_classes, in_channels=in_channels,
                                       image_size=image_size, options=dict(options or {}))
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
        note = (f"{constructor.note}; wrap it as nn.Sequential(OrderedDict([('normalize', nn.Identity()), "
                "('model', <network>)])) (the checkpoint holds the bare network's weights)")
        return _placeholder(note, constructor.architecture)
    imports = tuple(dict.fromkeys(("from collections import OrderedDict", "from torch import nn",
                                   *constructor.imports)))
    expression = f"nn.Sequential(OrderedDict([('normalize', nn.Identity()), ('model', {constructor.expression})]))"
    return ZooConstructor(expression=expression, imports=imports, architecture=constructor.architecture,
                          in_robustbench=constructor.in_robustbench, note=constructor.note)


def _student_constructor(arch: str, *, num_classes: int, in_channels: int, image_size: int,
                         options: dict[str, Any]) -> ZooConstructor:
    from robustbench_kd.students import BUILTIN_STUDENTS

    canonical = arch.strip().lower().replace("_", "-") if isinstance(arch, str) else arch
    builtin = canonical if canonical in BUILTIN_STUDENTS else None
    shown = {k: v for k, v in sorted(options.items()) if k != "normalize"}
    name = _ARCH_NAMES.get(builtin or "", arch)
    if shown:
        name += " (" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"
    bad = [k for k, v in options.items() if not (isinstance(k, str) and k.isidentifier() and _literal(v))]
    if bad:
        return _placeholder(f"student option {bad[0]!r} of {arch!r} cannot be written as Python source; "
                            "write the constructor by hand", name)
    if builtin in _NATIVE and options.get("normalize") is None and not (set(options) - {"normalize"}):
        imports, template = _NATIVE[builtin]
        return ZooConstructor(expression=template.format(num_classes=num_classes), imports=imports,
                              architecture=name, in_robustbench=True)
    arguments = ", ".join([f"num_classes={num_classes}", f"in_channels={in_channels}", f"image_size={image_size}",
                           *(f"{k}={v!r}" for k, v in sorted(options.items()))])
    if builtin is not None:
        return ZooConstructor(expression=f"build_student({builtin!r}, {arguments})",
                              imports=("from robustbench_kd.students import build_student",), architecture=name)
    return ZooConstructor(
        expression=f"PluginHost.create().students.get({arch!r})({arguments})",
        imports=("from robustbench_kd.plugin_host import PluginHost",), architecture=name,
        note=f"{arch!r} is a student architecture registered by a robustbench_kd plugin; "
             "the plugin's distribution must be installed",
    )


def constructor_for_run(run: Any) -> ZooConstructor:
    """:func:`student_constructor` for the student of a trained run (its config and data shape)."""
    cfg, data = run.config, run.data
    return student_constructor(cfg.student.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                               image_size=data.image_size, options=cfg.student.options, dataset=data.name)


def distill_command(run: Any) -> str:
    """The command that reproduces a trained run: ``robustbench-kd distill <out_dir>/config.yaml``.

    That file is the run's resolved configuration (every override applied), written when training starts.
    """
    return shlex.join(["robustbench-kd", "distill", str(Path(run.out_dir) / "config.yaml")])


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
            return _placeholder(f"the architecture of zoo entry {ref} ({factory.__qualname__}) is not importable")
        line = _import_line(factory.__qualname__, factory, home)
        return ZooConstructor(expression=f"{factory.__qualname__}()", imports=(line,),
                              in_robustbench=home.startswith("robustbench."),
                              note=f"same architecture as the zoo entry {ref}")
    if not inspect.isfunction(factory) or factory.__closure__:
        return _placeholder(f"copy the 'model' constructor of the zoo entry {ref}")
    body = _lambda_body(factory)
    if body is None:
        return _placeholder(f"copy the 'model' constructor of the zoo entry {ref}")
    imports: list[str] = []
    for node in ast.walk(body):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if node.id in factory.__globals__:
                line = _import_line(node.id, factory.__globals__[node.id], home)
            elif hasattr(builtins, node.id):
                continue
            else:
                return _placeholder(f"copy the 'model' constructor of the zoo entry {ref}")
            if line not in imports:
                imports.append(line)
    return ZooConstructor(expression=ast.unparse(body), imports=tuple(imports),
                          in_robustbench=home.startswith("robustbench."),
                          note=f"same architecture as the zoo entry {ref}")


def constructor_for_spec(spec: str, *, num_classes: int, in_channels: int, image_size: int,
                         dataset: str | None = None) -> ZooConstructor:
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
        return _placeholder(f"the model was loaded through the {parsed.scheme!r} source ({spec}); "
                            "write its constructor by hand")
    data = _checkpoint_metadata(Path(parsed.ref).expanduser())
    # The same option resolution as the file teacher source, so the entry rebuilds what was evaluated.
    arch, arch_options = file_architecture(data, parsed.options)
    if not arch:
        return _placeholder(f"{spec} records no architecture; write its constructor by hand")
    return student_constructor(arch, num_classes=int(data.get("num_classes", num_classes)),
                               in_channels=int(data.get("in_channels", in_channels)),
                               image_size=int(data.get("image_size", image_size)), options=arch_options,
                               dataset=dataset)


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


# -- formatting ------------------------------------------------------------------------------------
def format_zoo_entry(model_id: str, constructor: ZooConstructor, *, dataset: str, threat_model: str) -> str:
    """Source of ``zoo_entry.py``: a docstring saying where it goes, the imports, and ``ENTRY``.

    Executing the text defines ``ENTRY = (model_id, {'model': <callable>, 'gdrive_id': '<fill in>'})``;
    with a placeholder constructor ``'model'`` is None.
    """
    dict_name = ZOO_DICT_NAMES.get(threat_model, threat_model)
    where = (f"robustbench/model_zoo/{dataset}.py" if dataset in LEADERBOARD_N_EXAMPLES
             else f"a model-zoo file for {dataset!r} (RobustBench has no {dataset!r} model zoo)")
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


def _value(value: Any) -> str:
    return FILL_IN if value is None or value == "" else str(value)


def format_new_model_issue(info: Mapping[str, Any], *, model_id: str, threat_model: str, n_examples: int,
                           seed: int | None, autoattack_version: str | None, batch_size: int | None,
                           sha256: str | None, constructor: ZooConstructor | None,
                           tool_version: str | None = None) -> str:
    """RobustBench's "New Model(s)" issue (``.github/ISSUE_TEMPLATE/new-model.md``) filled in for one model.

    Fields the run cannot know (paper title, URL, authors when not given, the checkpoint URL, the
    license) read ``<fill in>`` / stay unchecked. The evaluation method states AutoAttack's version
    (standard: APGD-CE, APGD-T, FAB-T, Square), backend, seed and the number of test points; an
    entry marked ``unreliable`` gets a note with its footnote (AutoAttack's flags, failed sanity checks).
    """
    dataset = str(info["dataset"])
    full = LEADERBOARD_N_EXAMPLES.get(dataset)
    points = (f"the first {n_examples} {DATASET_NAMES.get(dataset, dataset)} test images "
              "(unshuffled, as robustbench.eval.benchmark)")
    method = (f"AutoAttack, version standard ({STANDARD_ATTACKS}), backend {_value(autoattack_version)}, "
              f"seed {seed}, batch size {_value(batch_size)}, on {points}")
    if tool_version:
        method += f"; run with robustbench_kd {tool_version}"
    notes = []
    if full is not None and n_examples != full:
        notes.append(f"evaluated on {n_examples} points, not the {full} the leaderboard requires: "
                     "re-run on the full test set before submitting")
    if info.get("unreliable"):
        notes.append("the entry is marked unreliable: " + _value(info.get("footnote")))
    robust_key = "autoattack_acc" if "autoattack_acc" in info else "corruptions_acc"
    sha = f" (SHA-256 of {model_id}.pt: `{sha256}`)" if sha256 else ""
    not_in_rb = constructor is not None and not constructor.in_robustbench
    lines = [
        f"Title: [New Model] {model_id}",
        "Labels: new-model",
        "",
        "# Paper Information",
        "",
        f"- **Paper Title**: {_value(info.get('name'))}",
        f"- **Paper URL**: {_value(info.get('link'))}",
        f"- **Paper authors**: {_value(info.get('authors'))}",
        "",
        "# Leaderboard Claim(s)",
        "",
        f"## Model 1: {model_id}",
        "",
        f"- **Architecture**: {_value(info.get('architecture'))}",
        f"- **Threat Model**: {THREAT_NAMES.get(threat_model, threat_model)}",
        f"- **eps**: {'N/A' if info.get('eps') is None else info['eps']}",
        f"- **Clean accuracy**: {info['clean_acc']}%",
        f"- **Robust accuracy**: {info[robust_key]}%",
        f"- **Additional data**: {'true' if info.get('additional_data') else 'false'}",
        f"- **Evaluation method**: {method}",
        f"- **Checkpoint and code**: checkpoint {FILL_IN} (URL){sha}; code {FILL_IN} (URL). The model-zoo "
        f"entry is in `{ZOO_ENTRY_FILE}` of the submission bundle.",
    ]
    if notes:
        lines += ["", *[f"**Note:** {note}" for note in notes]]
    lines += [
        "",
        f"Leaderboard entry (`model_info/{dataset}/{threat_model}/{model_id}.json`):",
        "",
        "```json",
        _json(info).rstrip("\n"),
        "```",
        "",
        "# Model Zoo:",
        "",
        "- [x] I want to add my models to the Model Zoo (check if true)",
        f"- {'[x]' if not_in_rb else '[ ]'} I use an architecture that is **not** included among",
        "  those [here](https://github.com/RobustBench/robustbench/tree/master/robustbench/model_zoo/architectures) "
        "(check if true).",
        "- [ ] I agree to release my model(s) under MIT license (check if true) **OR**",
        "- [ ] I want my models to be released under a custom license, located here: (custom license URL here)",
        "",
    ]
    return "\n".join(lines)


def _json(info: Mapping[str, Any]) -> str:
    return json.dumps(dict(info), indent=2) + "\n"


# -- writing ---------------------------------------------------------------------------------------
def bundle_dir(out_dir: str | os.PathLike[str], model_id: str) -> Path:
    """``<out_dir>/submission/<model_id>`` (the id is validated)."""
    return Path(out_dir) / "submission" / validate_model_id(model_id)


def autoattack_log_partial(out_dir: str | os.PathLike[str], model_id: str) -> Path:
    """Where the evaluation writes AutoAttack's log while it runs; the bundle moves it into place.

    A stale file from an interrupted run is removed, so the log holds this run only.
    """
    path = bundle_dir(out_dir, model_id) / f".{AUTOATTACK_LOG}.partial"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    return path


@dataclass
class SubmissionBundle:
    """The files of one submission bundle (all under ``directory``)."""

    directory: Path
    model_info: Path
    autoattack_log: Path | None
    checksum: Path
    zoo_entry: Path
    issue: Path
    readme: Path
    sha256: str
    missing: list[str] = field(default_factory=list)  #: what the submitter still has to fill in


def _tool_version() -> str | None:
    try:
        return importlib.metadata.version("robustbench_kd")
    except importlib.metadata.PackageNotFoundError:
        return None


def write_submission_bundle(out_dir: str | os.PathLike[str], *, model_id: str, threat_model: str,
                            info_path: str | os.PathLike[str], checkpoint_path: str | os.PathLike[str],
                            results: Mapping[str, Any], constructor: ZooConstructor | None,
                            autoattack_log: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
                            command: str | None = None, batch_size: int | None = None) -> SubmissionBundle:
    """Write ``<out_dir>/submission/<model_id>/`` (see the module docstring) and return its files.

    Args:
        info_path: the canonical leaderboard entry (``model_info/...``), copied byte for byte.
        checkpoint_path: the zoo-layout checkpoint written by ``save_zoo_checkpoint``; hashed.
        results: the evaluation summary (``EvalResult.to_dict()``): ``n_examples``, ``seed``,
            ``eps_str`` and ``autoattack_version`` are used.
        constructor: how to rebuild the architecture; None gives a placeholder zoo entry.
        autoattack_log: AutoAttack's log file(s) of this evaluation, moved into the bundle as
            ``autoattack.log`` (several - e.g. one per shard - are concatenated in order, each under a
            header, and removed). None: no log is bundled and the README says so.
        command: the command line that produced the evaluation (recorded in the README).
        batch_size: AutoAttack's batch size (stated in the issue).

    Every file is written atomically. Raises UserError if the entry or checkpoint does not exist.
    """
    info_path, checkpoint_path = Path(info_path), Path(checkpoint_path)
    for what, path in (("model_info entry", info_path), ("checkpoint", checkpoint_path)):
        if not path.is_file():
            raise UserError(f"submission bundle for {model_id}: the {what} {path} does not exist")
    directory = bundle_dir(out_dir, model_id)
    directory.mkdir(parents=True, exist_ok=True)
    raw_info = info_path.read_bytes()
    info = json.loads(raw_info)
    constructor = constructor or _placeholder("the architecture is unknown; write its constructor by hand")

    info_copy = atomic_write_bytes(directory / f"{model_id}.json", raw_info)
    log_file = _bundle_log(directory, autoattack_log)
    sha256 = sha256_of(checkpoint_path)
    relative = Path(os.path.relpath(checkpoint_path.resolve(), directory.resolve())).as_posix()
    checksum = atomic_write_text(directory / CHECKSUM_FILE, f"{sha256}  {relative}\n")
    dataset = str(info["dataset"])
    zoo_entry = atomic_write_text(directory / ZOO_ENTRY_FILE,
                                  format_zoo_entry(model_id, constructor, dataset=dataset, threat_model=threat_model))
    n_examples = int(results["n_examples"])
    issue = atomic_write_text(directory / ISSUE_FILE, format_new_model_issue(
        info, model_id=model_id, threat_model=threat_model, n_examples=n_examples, seed=results.get("seed"),
        autoattack_version=results.get("autoattack_version"), batch_size=batch_size, sha256=sha256,
        constructor=constructor, tool_version=_tool_version()))

    missing = [key for key in ("name", "authors", "venue", "link", "architecture") if info.get(key) in (None, "")]
    todo = [f"model_info fields still null: {', '.join(missing)} (set them in [model_info] or with the "
            "evaluate flags --title/--authors/--venue/--link/--architecture and re-run, or edit "
            f"{info_copy.name} and the canonical file)"] if missing else []
    full = LEADERBOARD_N_EXAMPLES.get(dataset)
    if full is None:
        todo.append(f"RobustBench has no {dataset!r} leaderboard; this bundle shows the format only")
    elif n_examples != full:
        todo.append(f"evaluated on {n_examples} test points; the leaderboard needs all {full}")
    if info.get("unreliable"):
        todo.append("the entry is marked unreliable (AutoAttack's flags or failed sanity checks): "
                    + _value(info.get("footnote")))
    if constructor.placeholder:
        todo.append(f"write the architecture constructor into {ZOO_ENTRY_FILE} ({constructor.note})")
    todo += [f"upload the checkpoint and put its Google Drive id into {ZOO_ENTRY_FILE}",
             f"fill in the checkpoint/code URLs and the license choice in {ISSUE_FILE}"]
    readme = atomic_write_text(directory / README_FILE, _readme(
        model_id, dataset=dataset, threat_model=threat_model, info_path=info_path, info_copy=info_copy,
        checkpoint_path=checkpoint_path, log_file=log_file, sha256=sha256, command=command, todo=todo,
        n_examples=n_examples, results=results))
    if missing:
        log.warning("submission bundle %s: model_info fields %s are null; fill them in before submitting",
                    model_id, ", ".join(missing))
    return SubmissionBundle(directory=directory, model_info=info_copy, autoattack_log=log_file, checksum=checksum,
                            zoo_entry=zoo_entry, issue=issue, readme=readme, sha256=sha256, missing=todo)


def _bundle_log(directory: Path, logs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
                ) -> Path | None:
    """Move (or concatenate) this run's AutoAttack log(s) to ``directory/autoattack.log``."""
    target = directory / AUTOATTACK_LOG
    if logs is None:
        target.unlink(missing_ok=True)  # a log from an earlier run would not describe these numbers
        return None
    paths = [Path(logs)] if isinstance(logs, (str, os.PathLike)) else [Path(p) for p in logs]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise UserError(f"AutoAttack log {absent[0]} does not exist; was AutoAttack run with log_path?")
    if len(paths) == 1 and paths[0].resolve().parent == directory.resolve():
        os.replace(paths[0], target)  # same directory: a rename is atomic
        return target
    parts = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text if len(paths) == 1 else f"===== {path.name} =====\n{text}")
    atomic_write_text(target, "".join(parts))
    for path in paths:
        if path.resolve() != target.resolve():
            path.unlink(missing_ok=True)
    return target


def _readme(model_id: str, *, dataset: str, threat_model: str, info_path: Path, info_copy: Path,
            checkpoint_path: Path, log_file: Path | None, sha256: str, command: str | None, todo: list[str],
            n_examples: int, results: Mapping[str, Any]) -> str:
    produced = f"`{command}`" if command else "(command not recorded)"
    version = _tool_version()
    log_line = (f"| `{AUTOATTACK_LOG}` | AutoAttack's full log (every attack, robust accuracy after each) of the run "
                "that produced the robust accuracy |" if log_file is not None
                else f"| (`{AUTOATTACK_LOG}` missing) | no AutoAttack log was recorded for this evaluation |")
    lines = [
        f"# Submission bundle for {model_id}",
        "",
        f"Produced by {produced}" + (f" with robustbench_kd {version}" if version else "") + ".",
        f"Evaluation: {n_examples} {dataset} test points, threat model {threat_model}, "
        f"eps {results.get('eps_str', '')}, "
        f"AutoAttack standard ({results.get('autoattack_version')}), seed {results.get('seed')}.",
        "",
        "| file | what it is |",
        "|---|---|",
        f"| `{info_copy.name}` | the RobustBench leaderboard entry (copy of `{info_path}`); it goes to "
        f"`model_info/{dataset}/{threat_model}/{model_id}.json` in the RobustBench repository |",
        log_line,
        f"| `{CHECKSUM_FILE}` | SHA-256 of the checkpoint `{checkpoint_path}` (`{sha256}`); check it with "
        f"`sha256sum -c {CHECKSUM_FILE}` in this directory |",
        f"| `{ZOO_ENTRY_FILE}` | the entry for `robustbench/model_zoo/{dataset}.py` (imports + `ENTRY` tuple for the "
        f"`{ZOO_DICT_NAMES.get(threat_model, threat_model)}` OrderedDict) |",
        f"| `{ISSUE_FILE}` | RobustBench's \"New Model(s)\" issue, filled in; open it at "
        "https://github.com/RobustBench/robustbench/issues/new/choose |",
        f"| `{README_FILE}` | this file |",
        "",
        "## Before submitting",
        "",
        *[f"- {item}" for item in todo],
        "",
    ]
    return "\n".join(lines)
