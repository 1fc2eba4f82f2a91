"""The bundle's zoo entry works in a RobustBench checkout that has never heard of robustbench_kd.

The end-to-end checks do what a RobustBench maintainer does with a submission: copy the shipped
architecture file into ``robustbench/model_zoo/architectures/``, paste the entry into the zoo file's
OrderedDict, and load the checkpoint with ``robustbench.utils.load_model`` - in a separate Python process
where importing robustbench_kd (or its bundled plugins) fails and the network is refused. The logits must
equal the evaluated model's bit for bit; for ImageNet the preprocessing RobustBench looks up for the entry
must be the one the model was evaluated with.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.export import save_zoo_checkpoint
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.students import build_student
from robustbench_kd.submission.architecture_source import (
    NotSelfContained,
    check_self_contained,
)
from robustbench_kd.submission.zoo_entry import (
    ZOO_DICT_NAMES,
    ZooConstructor,
    constructor_for_spec,
    exec_zoo_entry,
    format_zoo_entry,
    student_constructor,
)

pytestmark = pytest.mark.single_thread

# What runs in RobustBench's checkout: no robustbench_kd, no network, one thread (bitwise-comparable sums).
CHILD = textwrap.dedent(
    """
    import importlib.abc
    import json
    import socket
    import sys
    from pathlib import Path


    class NotInstalled(importlib.abc.MetaPathFinder):
        # robustbench_kd is absent from a RobustBench checkout: every import of it (or its plugins) fails.
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("robustbench_kd", "robustbench_kd_plugins"):
                raise ImportError(f"No module named {name!r} (blocked: RobustBench's side)")
            return None


    sys.meta_path.insert(0, NotInstalled())
    try:
        import robustbench_kd  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("robustbench_kd is importable in the child")


    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")


    socket.socket.connect = refuse
    job = json.loads(Path(sys.argv[1]).read_text())
    sys.path.insert(0, job["checkout"])
    # robustbench 1.1.1 imports fra31's `autoattack`; this environment has the same code as `pyautoattack`.
    import pyautoattack
    import pyautoattack.state

    sys.modules.setdefault("autoattack", pyautoattack)
    sys.modules.setdefault("autoattack.state", pyautoattack.state)
    import gdown
    import torch

    gdown.download = refuse
    torch.set_num_threads(1)
    import robustbench
    from robustbench.utils import load_model

    assert Path(robustbench.__file__).parent == Path(job["checkout"]) / "robustbench", robustbench.__file__
    report = {}
    for dataset, work in job["datasets"].items():
        for model in work["models"]:
            net = load_model(model_name=model["id"], model_dir=job["model_dir"], dataset=dataset, threat_model="Linf")
            x = torch.load(model["inputs"])
            if "image" in model:
                # The path robustbench.eval.benchmark takes: the entry's preprocessing, looked up by model name.
                from PIL import Image
                from robustbench.data import get_preprocessing
                from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

                transform = get_preprocessing(BenchmarkDataset(dataset), ThreatModel.Linf, model["id"], None)
                x = transform(Image.open(model["image"])).unsqueeze(0)
                torch.save(x, model["preprocessed"])
            with torch.no_grad():
                torch.save(net(x), model["logits"])
            report[model["id"]] = type(net).__module__
    blocked = ("robustbench_kd", "robustbench_kd_plugins")
    report["robustbench_kd_modules"] = sorted(name for name in sys.modules if name.partition(".")[0] in blocked)
    Path(job["report"]).write_text(json.dumps(report))
    """
)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights *and* BatchNorm statistics, so every state-dict entry matters for the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(0.5 + values if name.endswith("running_var") else (values - 0.5) * 0.2)
    return model.eval()


def _paste_entry(zoo_file: Path, entry_source: str, dict_name: str) -> None:
    """What a maintainer does: the entry's imports below the zoo file's, its tuple into the OrderedDict."""
    entry_tree = ast.parse(entry_source)
    imports = [
        ast.get_source_segment(entry_source, node)
        for node in entry_tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]
    entry = next(
        node.value
        for node in entry_tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ENTRY" for t in node.targets)
    )
    text = zoo_file.read_text()
    tree = ast.parse(text)
    mapping = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == dict_name for t in node.targets)
    )
    assert isinstance(mapping, ast.Call) and isinstance(mapping.args[0], ast.List)
    first = mapping.args[0].elts[0].lineno  # the new entry goes in as the first item of the list
    last_import = max(n.end_lineno or n.lineno for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
    lines = text.splitlines()
    lines[first - 1 : first - 1] = [f"    {ast.get_source_segment(entry_source, entry)},"]
    lines[last_import:last_import] = [line for line in imports if line]
    zoo_file.write_text("\n".join(lines) + "\n")


def _robustbench_checkout(root: Path) -> Path:
    """A private copy of the installed robustbench package (the maintainer's checkout), under ``root``."""
    spec = importlib.util.find_spec("robustbench")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations)))
    shutil.copytree(package, root / "robustbench", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _submit(checkout: Path, model_id: str, constructor: ZooConstructor, dataset: str) -> str:
    """Write the bundle's entry and architecture file into ``checkout`` as a maintainer would; the entry text."""
    assert constructor.standalone, constructor.standalone_problem
    entry = format_zoo_entry(model_id, constructor, dataset=dataset, threat_model="Linf")
    assert "robustbench_kd" not in "\n".join(constructor.imports)
    for name, text in constructor.files.items():
        target = checkout / "robustbench" / "model_zoo" / "architectures" / name
        assert not target.exists() or target.read_text() == text  # a file shared by two entries is one file
        target.write_text(text)
    _paste_entry(checkout / "robustbench" / "model_zoo" / f"{dataset}.py", entry, ZOO_DICT_NAMES["Linf"])
    return entry


def _run_in_robustbench(tmp_path: Path, job: dict) -> dict:
    script, job_file = tmp_path / "child.py", tmp_path / "job.json"
    script.write_text(CHILD)
    job_file.write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, str(script), str(job_file)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(Path(job["report"]).read_text())


CIFAR_STUDENTS = [
    ("Tiny2026SmallCnn", "small-cnn", {"width": 0.5}),
    ("Tiny2026ResNet18", "resnet18", {}),
    ("Tiny2026MobileNet", "mobilenetv2", {"width": 0.25}),
]
IMAGENET_ID, IMAGENET_OPTIONS = "Tiny2026ImageNet", {"width": 0.125, "normalize": (0.45, 0.25)}


@pytest.fixture(scope="module")
def in_robustbench(tmp_path_factory):
    """Submit three CIFAR-10 students and one ImageNet student to one RobustBench checkout, then load them there.

    One child process for all of them: importing robustbench (timm, torchvision) is most of its time.
    Returns what the child reported, the entries, and per model the expected and the child's tensors.
    """
    from PIL import Image

    from robustbench_kd.data.imagenet import get_preprocessing

    tmp_path = tmp_path_factory.mktemp("zoo")
    checkout = _robustbench_checkout(tmp_path / "checkout")
    out = tmp_path / "out"
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    torch.save(x, tmp_path / "inputs.pt")
    jobs: dict[str, dict] = {"cifar10": {"models": []}, "imagenet": {"models": []}}
    expected, entries, constructors = {}, {}, {}
    for seed, (model_id, arch, options) in enumerate(CIFAR_STUDENTS):
        net = _randomise(build_student(arch, num_classes=10, in_channels=3, image_size=32, **options), seed)
        save_zoo_checkpoint(net, out, dataset="cifar10", threat_model="Linf", model_id=model_id)
        constructor = student_constructor(arch, num_classes=10, in_channels=3, image_size=32, options=options)
        constructors[model_id], entries[model_id] = constructor, _submit(checkout, model_id, constructor, "cifar10")
        with torch.no_grad():
            expected[model_id] = net(x)
        logits = str(tmp_path / f"{model_id}.pt")
        jobs["cifar10"]["models"].append({"id": model_id, "inputs": str(tmp_path / "inputs.pt"), "logits": logits})

    net = _randomise(build_student("small-cnn", num_classes=1000, in_channels=3, image_size=224, **IMAGENET_OPTIONS), 9)
    save_zoo_checkpoint(net, out, dataset="imagenet", threat_model="Linf", model_id=IMAGENET_ID)
    # Evaluated with a preprocessing other than the default, so the entry must carry the one that was used.
    constructor = student_constructor(
        "small-cnn",
        num_classes=1000,
        in_channels=3,
        image_size=224,
        options=IMAGENET_OPTIONS,
        dataset="imagenet",
        preprocessing="Res224",
    )
    constructors[IMAGENET_ID] = constructor
    entries[IMAGENET_ID] = _submit(checkout, IMAGENET_ID, constructor, "imagenet")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (190, 260, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    with Image.open(tmp_path / "image.png") as image:
        ours = get_preprocessing("Res224")(image).unsqueeze(0).to(torch.float32).div(255)
    expected["preprocessed"] = ours
    with torch.no_grad():
        expected[IMAGENET_ID] = net(ours)
    torch.save(ours, tmp_path / "image.pt")
    jobs["imagenet"]["models"].append(
        {
            "id": IMAGENET_ID,
            "inputs": str(tmp_path / "image.pt"),
            "image": str(tmp_path / "image.png"),
            "preprocessed": str(tmp_path / "preprocessed.pt"),
            "logits": str(tmp_path / f"{IMAGENET_ID}.pt"),
        }
    )

    report = _run_in_robustbench(
        tmp_path,
        {"checkout": str(checkout), "model_dir": str(out / "models"), "datasets": jobs, "report": str(tmp_path / "r")},
    )
    loaded = {model["id"]: torch.load(model["logits"]) for job in jobs.values() for model in job["models"]}
    loaded["preprocessed"] = torch.load(tmp_path / "preprocessed.pt")
    return {"report": report, "expected": expected, "loaded": loaded, "entries": entries, "constructors": constructors}


def test_cifar10_entries_load_in_robustbench_without_robustbench_kd(in_robustbench):
    report = in_robustbench["report"]
    assert report["robustbench_kd_modules"] == []
    assert report["Tiny2026ResNet18"] == "robustbench.model_zoo.architectures.resnet"  # RobustBench's own class
    assert report["Tiny2026SmallCnn"].startswith("robustbench.model_zoo.architectures.rbkd_small_cnn_")
    assert report["Tiny2026MobileNet"].startswith("robustbench.model_zoo.architectures.rbkd_mobilenetv2_")
    resnet = in_robustbench["constructors"]["Tiny2026ResNet18"]
    assert resnet.in_robustbench and not resnet.files  # nothing to ship
    assert (
        "from robustbench.model_zoo.architectures.resnet import BasicBlock, ResNet"
        in (in_robustbench["entries"]["Tiny2026ResNet18"])
    )
    for model_id, _, _ in CIFAR_STUDENTS:
        assert torch.equal(in_robustbench["loaded"][model_id], in_robustbench["expected"][model_id]), model_id


def test_imagenet_entry_loads_with_the_evaluated_preprocessing(in_robustbench):
    assert "'preprocessing': 'Res224'," in in_robustbench["entries"][IMAGENET_ID]
    assert in_robustbench["report"][IMAGENET_ID] == "torch.nn.modules.container"  # the ImageNet zoo layout
    loaded, expected = in_robustbench["loaded"], in_robustbench["expected"]
    assert torch.equal(loaded["preprocessed"], expected["preprocessed"])  # RobustBench's transform is ours
    assert torch.equal(loaded[IMAGENET_ID], expected[IMAGENET_ID])


# -- in-process checks of the pieces ---------------------------------------------------------------------------


def _imports(text: str) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


@pytest.mark.parametrize(
    "arch,options,classes",
    [
        ("small-cnn", {"width": 2}, ("SmallCNN",)),
        ("mobilenetv2", {}, ("MobileNetV2",)),
        ("small-cnn", {"normalize": (0.5, 0.25)}, ("SmallCNN", "Normalized")),
        ("wrn-28-10", {"normalize": [[0.5, 0.4, 0.3], 0.25]}, ("Normalized",)),
    ],
)
def test_shipped_architectures_import_only_torch_and_the_standard_library(arch, options, classes):
    constructor = student_constructor(arch, num_classes=100, in_channels=3, image_size=32, options=options)
    assert constructor.standalone and not constructor.in_robustbench
    (name, text), *others = constructor.files.items()
    assert not others and name.startswith("rbkd_") and name == constructor.architecture_source.filename
    check_self_contained(text)
    assert {m.partition(".")[0] for m in _imports(text)} <= {"__future__", "torch", *sys.stdlib_module_names}
    assert all(f"class {cls}(nn.Module):" in text for cls in classes)
    assert "\ndef build_" not in text  # the classes, not our factories (which raise robustbench_kd's UserError)
    # The entry imports exactly what the file defines, from RobustBench's architectures package.
    module = name.removesuffix(".py")
    assert any(
        line.startswith(f"from robustbench.model_zoo.architectures.{module} import") for line in constructor.imports
    )
    _, entry = exec_zoo_entry(
        format_zoo_entry("X", constructor, dataset="cifar10", threat_model="Linf"), constructor.files
    )
    with torch.device("meta"):
        rebuilt, trained = (
            entry["model"](),
            build_student(arch, num_classes=100, in_channels=3, image_size=32, **options),
        )
    assert [(k, v.shape) for k, v in rebuilt.state_dict().items()] == [
        (k, v.shape) for k, v in trained.state_dict().items()
    ]


def test_the_file_name_follows_the_content():
    def files(**options):
        return student_constructor("small-cnn", num_classes=10, in_channels=3, image_size=32, options=options).files

    assert files(width=0.5) == files(width=2.0)  # the options are the entry's, the class is the same
    assert set(files()) != set(files(normalize=(0.5, 0.25)))  # another set of classes: another file


def test_check_self_contained_finds_imports_anywhere():
    check_self_contained("import math\nfrom torch import nn\n")
    for text in (
        "def f():\n    from robustbench_kd.errors import UserError\n",
        "import robustbench_kd.students\n",
        "from . import sibling\n",
        "import numpy\n",
    ):
        with pytest.raises(NotSelfContained):
            check_self_contained(text)


class PluginNet(nn.Module):
    """A plugin's student whose source needs nothing but torch."""

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, hidden: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_checked_plugin_net(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A plugin factory that validates with robustbench_kd's UserError: not shippable on its own."""
    if image_size < 1:
        raise UserError("image_size must be positive")
    return PluginNet(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


class _Students:
    @hookimpl
    def rbkd_register_students(self, registry):
        registry.add("plugin-net", PluginNet, description="self-contained")
        registry.add("checked-net", build_checked_plugin_net, description="uses UserError")


def test_plugin_students_are_shipped_from_source_or_marked_not_standalone():
    students = PluginHost.create(autoload=False, extra=[_Students()]).students
    shape = dict(num_classes=3, in_channels=1, image_size=4)

    shipped = student_constructor("plugin-net", **shape, options={"hidden": 5}, students=students)
    assert shipped.standalone and not shipped.placeholder
    (text,) = shipped.files.values()
    assert "class PluginNet(nn.Module):" in text and "robustbench_kd" not in "\n".join(_imports(text))
    _, entry = exec_zoo_entry(format_zoo_entry("X", shipped, dataset="cifar10", threat_model="Linf"), shipped.files)
    torch.manual_seed(0)
    original = PluginNet(**shape, hidden=5).eval()
    rebuilt = entry["model"]().eval()
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(rebuilt(x), original(x))

    refused = student_constructor("checked-net", **shape, students=students)
    assert refused.placeholder and not refused.standalone and not refused.files
    assert "robustbench_kd.errors" in refused.standalone_problem
    text = format_zoo_entry("X", refused, dataset="cifar10", threat_model="Linf")
    assert "# PLACEHOLDER, not usable as it is:" in text and "'model': None," in text
    assert exec_zoo_entry(text) == ("X", {"model": None, "gdrive_id": "<fill in>"})


def test_imagenet_entries_name_their_preprocessing(tmp_path):
    shape = dict(num_classes=1000, in_channels=3, image_size=224)
    default = student_constructor("small-cnn", **shape, dataset="imagenet")
    assert default.preprocessing == "Res256Crop224" and default.standalone  # our loader's default
    assert "'preprocessing': 'Res256Crop224'," in format_zoo_entry(
        "X", default, dataset="imagenet", threat_model="Linf"
    )
    # CIFAR entries have no such key: RobustBench uses ToTensor for them.
    cifar = student_constructor("small-cnn", num_classes=10, in_channels=3, image_size=32)
    assert "preprocessing" not in format_zoo_entry("X", cifar, dataset="cifar10", threat_model="Linf")
    # A preprocessing RobustBench's table lacks: the entry cannot be benchmarked there as it is.
    timm_only = student_constructor("small-cnn", **shape, dataset="imagenet", preprocessing="BicubicRes224Crop224")
    assert not timm_only.standalone and "BicubicRes224Crop224" in timm_only.standalone_problem
    assert "# NOT STANDALONE:" in format_zoo_entry("X", timm_only, dataset="imagenet", threat_model="Linf")
    # A file: spec records the preprocessing it was evaluated with.
    torch.save({"student": {}, "student_arch": {"name": "small-cnn", "options": {"width": 0.5}}}, tmp_path / "a.pt")
    spec = constructor_for_spec(f"file:{tmp_path / 'a.pt'}", **shape, dataset="imagenet", preprocessing="Crop288")
    assert spec.preprocessing == "Crop288" and spec.standalone


def test_a_constructor_survives_a_json_round_trip():
    """Shard files store the constructor as ``dataclasses.asdict`` JSON; the merge rebuilds it with ``**``."""
    import dataclasses

    constructor = student_constructor(
        "small-cnn",
        num_classes=10,
        in_channels=3,
        image_size=224,
        options={"width": 0.5, "normalize": (0.5, 0.25)},
        dataset="imagenet",
        preprocessing="Res224",
    )
    again = ZooConstructor(**json.loads(json.dumps(dataclasses.asdict(constructor))))
    assert again == constructor and again.files == constructor.files


def test_a_robustbench_imagenet_entry_keeps_the_zoos_preprocessing():
    from robustbench_kd.submission.zoo_entry import zoo_entry_constructor

    wong = zoo_entry_constructor("imagenet", "Linf", "Wong2020Fast")  # evaluated at 288x288
    assert wong.preprocessing == "Crop288" and wong.standalone and wong.in_robustbench
    assert "'preprocessing': 'Crop288'," in format_zoo_entry("X", wong, dataset="imagenet", threat_model="Linf")
