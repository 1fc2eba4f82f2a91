"""Submission bundles: leaderboard JSON, AutoAttack log, checkpoint SHA-256, zoo entry, New Model issue."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
import torch

from robustbench_kd.cli import main
from robustbench_kd.errors import UserError
from robustbench_kd.students import build_student
from robustbench_kd.submission.bundle import write_submission_bundle
from robustbench_kd.submission.zoo_entry import (
    ZooConstructor,
    constructor_for_spec,
    exec_zoo_entry,
    format_zoo_entry,
    student_constructor,
    zoo_entry_constructor,
)
from robustbench_kd.testing.fixtures import (
    CARMON2019_MODEL_INFO,
    make_tiny_cifar,
    relabel_to_predictions,
    tiny_zoo_entry,
)

pytestmark = pytest.mark.single_thread

CARMON2019 = CARMON2019_MODEL_INFO
MODEL_ID = "Tiny2026Bundle"


def assert_leaderboard_format(info: dict) -> None:
    """Same keys, key order and value types as the leaderboard file; percentages as strings."""
    assert [k for k in info if k != "footnote"] == list(CARMON2019)
    for key, reference in CARMON2019.items():
        assert type(info[key]) is type(reference), key
    for key in ("clean_acc", "reported", "autoattack_acc"):
        assert 0.0 <= float(info[key]) <= 100.0
    assert info["eps"] == "8/255"


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student("small-cnn", num_classes=10, in_channels=3, image_size=32, width=0.25).eval()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """`robustbench-kd evaluate --name` on a tiny CNN, 20 CIFAR points, standard AutoAttack."""
    tmp = tmp_path_factory.mktemp("bundle")  # one thread: the module is marked single_thread
    model = tiny_model()
    data = make_tiny_cifar(tmp / "data", n_train_per_batch=2, n_test=20, seed=3)
    x = relabel_to_predictions(data, model)
    torch.save({"state_dict": model.state_dict()}, tmp / "model.pt")
    argv = [
        "evaluate",
        f"file:{tmp / 'model.pt'}?arch=small-cnn&width=0.25",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(data),
        "--no-verify-md5",
        "--n-examples",
        "20",
        "--attacks",
        "clean,autoattack",
        "--batch-size",
        "20",
        "--name",
        MODEL_ID,
        "--out",
        str(tmp / "out"),
        "--device",
        "cpu",
        "--title",
        "Tiny Models Are Not Robust",
        "--authors",
        "Ada Lovelace, Alan Turing",
        "--venue",
        "arXiv, Jan 2026",
        "--link",
        "https://arxiv.org/abs/0000.00000",
        "--architecture",
        "SmallCNN-x0.25",
        "--additional-data",
        "--reported",
        "62.5",
    ]
    assert main(argv) == 0
    out = tmp / "out"
    return {
        "out": out,
        "bundle": out / "submission" / f"{MODEL_ID}.preview",  # 20 of 10,000 points: a preview
        "model": model,
        "x": x,
        "results": json.loads((out / "results" / f"{MODEL_ID}.json").read_text()),
    }


def test_bundle_json_has_the_leaderboard_format_and_copies_the_canonical_file(evaluated):
    canonical = evaluated["out"] / "model_info" / "cifar10" / "Linf" / f"{MODEL_ID}.json"
    copy = evaluated["bundle"] / f"{MODEL_ID}.json"
    assert copy.read_bytes() == canonical.read_bytes()
    info = json.loads(copy.read_text())
    assert_leaderboard_format(info)
    results = evaluated["results"]
    assert info["clean_acc"] == f"{results['accuracy']['clean'] * 100:.2f}" == "100.00"
    assert info["autoattack_acc"] == f"{results['accuracy']['autoattack'] * 100:.2f}"
    assert (info["name"], info["authors"], info["venue"], info["link"], info["architecture"]) == (
        "Tiny Models Are Not Robust",
        "Ada Lovelace, Alan Turing",
        "arXiv, Jan 2026",
        "https://arxiv.org/abs/0000.00000",
        "SmallCNN-x0.25",
    )
    assert info["additional_data"] is True and info["reported"] == "62.50" and info["number_forward_passes"] == 1
    # The leaderboard defaults are recorded beside it.
    assert results["seed"] == 0 and results["autoattack_version"].startswith("pyautoattack")
    assert results["batch_size"] == 20 and results["n_examples"] == 20


def test_checkpoint_sha256_matches_the_zoo_file(evaluated):
    checkpoint = evaluated["out"] / "models" / "cifar10" / "Linf" / f"{MODEL_ID}.pt"
    digest, relative = (evaluated["bundle"] / "checkpoint.sha256").read_text().strip().split("  ")
    assert digest == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    # sha256sum format, relative to the bundle: `sha256sum -c checkpoint.sha256` works inside it.
    assert (evaluated["bundle"] / relative).resolve() == checkpoint.resolve()


def test_autoattack_log_is_the_runs_log(evaluated):
    text = (evaluated["bundle"] / "autoattack.log").read_text()
    assert "standard version" in text and "apgd-ce" in text
    robust = 100 * evaluated["results"]["accuracy"]["autoattack"]
    assert f"robust accuracy: {robust:.2f}%" in text
    names = sorted(p.name for p in evaluated["bundle"].iterdir())
    architecture = [name for name in names if name.startswith("rbkd_small_cnn_")]
    assert len(architecture) == 1  # the student's self-contained architecture file
    assert names == sorted(
        [
            f"{MODEL_ID}.json",
            "autoattack.log",
            "checkpoint.sha256",
            "zoo_entry.py",
            "new_model_issue.md",
            "README.md",
            "bundle.json",
            *architecture,
        ]
    )  # no partial log left behind
    assert not (evaluated["out"] / "submission" / MODEL_ID).exists()  # no empty "ready" directory beside it


def test_zoo_entry_loads_the_checkpoint_through_robustbench(evaluated):
    from robustbench_kd.zoo import compat

    compat.import_robustbench()
    from robustbench.utils import load_model

    source = (evaluated["bundle"] / "zoo_entry.py").read_text()
    assert "robustbench_kd" not in source.split("ENTRY")[0]  # imports RobustBench's architectures only
    assert "SmallCNN(num_classes=10, in_channels=3, width=0.25)" in source
    files = {p.name: p.read_text() for p in evaluated["bundle"].glob("rbkd_*.py")}
    name, entry = exec_zoo_entry(source, files)
    assert name == MODEL_ID and entry["gdrive_id"] == "<fill in>"
    with tiny_zoo_entry(name, entry["model"]):
        loaded = load_model(name, model_dir=str(evaluated["out"] / "models"), dataset="cifar10", threat_model="Linf")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(evaluated["x"]), evaluated["model"](evaluated["x"]))


def test_new_model_issue_is_filled_in(evaluated):
    text = (evaluated["bundle"] / "new_model_issue.md").read_text()
    info = json.loads((evaluated["bundle"] / f"{MODEL_ID}.json").read_text())
    sha = (evaluated["bundle"] / "checkpoint.sha256").read_text().split()[0]
    assert text.splitlines()[0] == f"Title: [New Model] {MODEL_ID}"
    for line in (
        "- **Paper Title**: Tiny Models Are Not Robust",
        "- **Paper URL**: https://arxiv.org/abs/0000.00000",
        "- **Paper authors**: Ada Lovelace, Alan Turing",
        "- **Architecture**: SmallCNN-x0.25",
        "- **Threat Model**: Linf",
        "- **eps**: 8/255",
        f"- **Clean accuracy**: {info['clean_acc']}%",
        f"- **Robust accuracy**: {info['autoattack_acc']}%",
        "- **Additional data**: true",
        "- [ ] I want to add my models to the Model Zoo",  # the submitter's choice, never pre-ticked
        "- [ ] I use an architecture that is included among",  # SmallCNN is shipped, not in RobustBench
        "> **Preview: not ready to submit.** This text shows the format; the bundle does not meet:",
        "> - evaluated on 20 test points; the leaderboard uses all 10,000",
    ):
        assert line in text
    method = next(line for line in text.splitlines() if line.startswith("- **Evaluation method**"))
    assert "AutoAttack, version standard" in method and "seed 0" in method
    assert evaluated["results"]["autoattack_version"] in method and "first 20 CIFAR-10 test points" in method
    assert sha in text and "`autoattack.log`" in method


def test_readme_names_every_file_and_the_command(evaluated):
    text = (evaluated["bundle"] / "README.md").read_text()
    for name in (f"{MODEL_ID}.json", "autoattack.log", "checkpoint.sha256", "zoo_entry.py", "new_model_issue.md"):
        assert f"`{name}`" in text
    assert f"robustbench-kd evaluate 'file:{evaluated['out'].parent / 'model.pt'}?arch=small-cnn&width=0.25'" in text
    assert f"--name {MODEL_ID}" in text and "the leaderboard uses all 10,000" in text
    assert text.startswith(f"# PREVIEW submission bundle for {MODEL_ID}: not ready to submit")


def test_distill_ends_with_a_bundle_whose_zoo_entry_rebuilds_the_student(tmp_path, host):
    from robustbench_kd_plugins.teacher_sources import build_network_from_file

    from robustbench_kd.config import load_config
    from robustbench_kd.jobs.pipeline import distill

    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(f"""
        [run]
        name = "Distill2026Bundle"
        out_dir = "{tmp_path / "run"}"
        progress = false
        [data]
        n_train = 320
        [threat]
        steps = 1
        [student]
        arch = "small-cnn"
        options = {{width = 0.5}}
        [method]
        name = "standard"
        [optim]
        epochs = 2
        [eval]
        attacks = ["clean", "autoattack"]
        final_n_examples = 12
        teachers = false
        [model_info]
        title = "Distilled"
        reported = "40%"
    """)
    )
    distill(load_config(config), host=host)
    bundle = tmp_path / "run" / "submission" / "Distill2026Bundle.preview"  # digits: no leaderboard
    info = json.loads((bundle / "Distill2026Bundle.json").read_text())
    assert info["architecture"] == "SmallCNN (width=0.5)" and info["eps"] == "0.2" and info["reported"] == "40.00"
    assert "robustbench-kd distill" in (bundle / "README.md").read_text()
    assert "RobustBench has no digits/Linf leaderboard" in (bundle / "README.md").read_text()
    assert (bundle / "autoattack.log").read_text().strip()

    files = {p.name: p.read_text() for p in bundle.glob("rbkd_*.py")}
    rebuilt = exec_zoo_entry((bundle / "zoo_entry.py").read_text(), files)[1]["model"]()
    state = torch.load(tmp_path / "run" / "models" / "digits" / "Linf" / "Distill2026Bundle.pt", weights_only=True)
    rebuilt.load_state_dict(state["state_dict"], strict=True)
    trained = build_network_from_file(
        tmp_path / "run" / "checkpoints" / "last.pt",
        {},
        students=host.students,
        num_classes=10,
        in_channels=1,
        image_size=8,
    )
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), trained.eval()(x))


def _built_on_meta(constructor: ZooConstructor) -> torch.nn.Module:
    _, entry = exec_zoo_entry(
        format_zoo_entry("X", constructor, dataset="cifar10", threat_model="Linf"), constructor.files
    )
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return entry["model"]()


def _layout(model: torch.nn.Module) -> tuple[str, dict]:
    # By name: a shipped architecture file defines its own copy of the class.
    return type(model).__name__, {key: tuple(value.shape) for key, value in model.state_dict().items()}


@pytest.mark.parametrize(
    "arch,options,native",
    [
        ("resnet18", {}, True),
        ("preact-resnet18", {}, True),
        ("wrn-34-10", {}, True),
        ("wrn-28-10", {}, True),
        ("WRN_28_10", {}, True),
        ("wrn-28-10", {"normalize": [[0.5, 0.4, 0.3], 0.25]}, False),
        ("small-cnn", {"width": 2.0}, False),
        ("mobilenetv2", {"width": 0.5}, False),
    ],
)
def test_student_constructor_rebuilds_the_exact_architecture(arch, options, native):
    constructor = student_constructor(arch, num_classes=100, in_channels=3, image_size=32, options=options)
    assert constructor.in_robustbench is native and not constructor.placeholder
    assert bool(constructor.files) is not native and constructor.standalone
    assert not any("robustbench_kd" in line for line in constructor.imports)
    with torch.device("meta"):
        expected = build_student(arch, num_classes=100, in_channels=3, image_size=32, **options)
    assert _layout(_built_on_meta(constructor)) == _layout(expected)


@pytest.mark.parametrize(
    "name",
    [
        "Carmon2019Unlabeled",  # lambda: WideResNet(depth=28, widen_factor=10, sub_block1=True)
        "Hendrycks2019Using",  # a class defined in the zoo file
        "Gowal2020Uncovering_28_10_extra",  # lambda with module constants (CIFAR10_MEAN, Swish)
    ],
)
def test_zoo_entry_constructor_rebuilds_zoo_architectures(name):
    from robustbench_kd.zoo import models as zoo

    constructor = zoo_entry_constructor("cifar10", "Linf", name)
    assert constructor.in_robustbench and not constructor.placeholder
    with torch.device("meta"):
        expected = zoo._lookup(name, "cifar10", "Linf")[2]["model"]()
    assert _layout(_built_on_meta(constructor)) == _layout(expected)


def test_constructor_for_spec(tmp_path):
    shape = dict(num_classes=10, in_channels=3, image_size=32)
    # Our training checkpoint records the architecture; spec options override it, as the file source does.
    torch.save({"student": {}, "student_arch": {"name": "small-cnn", "options": {"width": 0.5}}}, tmp_path / "a.pt")
    assert student_constructor("small-cnn", options={"width": 0.5}, **shape) == constructor_for_spec(
        f"file:{tmp_path / 'a.pt'}", **shape
    )
    assert "width=2" in constructor_for_spec(f"file:{tmp_path / 'a.pt'}?width=2", **shape).expression
    torch.save({"state_dict": {}}, tmp_path / "b.pt")
    assert constructor_for_spec(f"file:{tmp_path / 'b.pt'}", **shape).placeholder
    assert constructor_for_spec(f"file:{tmp_path / 'b.pt'}?arch=resnet18", **shape).in_robustbench
    assert "sub_block1=True" in constructor_for_spec("robustbench:cifar10/Linf/Carmon2019Unlabeled", **shape).expression
    other = constructor_for_spec("hub:some/model", **shape)
    assert other.placeholder and "'hub'" in other.note
    # A placeholder entry is still valid Python; its model is None until filled in.
    namespace: dict = {}
    exec(compile(format_zoo_entry("X", other, dataset="cifar10", threat_model="L2"), "z", "exec"), namespace)
    assert namespace["ENTRY"] == ("X", {"model": None, "gdrive_id": "<fill in>"})


def _written_entry(out, *, model_id="Bare2026Entry", **meta):
    from robustbench_kd.evaluation import (
        build_model_info,
        save_zoo_checkpoint,
        write_model_info,
    )

    info = build_model_info(dataset="cifar10", threat_model="L2", eps=0.5, clean_acc=0.9, autoattack_acc=0.5, **meta)
    info_path = write_model_info(out, info, dataset="cifar10", threat_model="L2", model_id=model_id)
    checkpoint = save_zoo_checkpoint(tiny_model(), out, dataset="cifar10", threat_model="L2", model_id=model_id)
    return info_path, checkpoint


def test_bundle_concatenates_shard_logs_and_lists_what_is_missing(tmp_path):
    info_path, checkpoint = _written_entry(tmp_path)
    logs = [tmp_path / "shard0.log", tmp_path / "shard1.log"]
    for i, path in enumerate(logs):
        path.write_text(f"robust accuracy: {i}0.00%\n")
    bundle = write_submission_bundle(
        tmp_path,
        model_id="Bare2026Entry",
        threat_model="L2",
        info_path=info_path,
        checkpoint_path=checkpoint,
        results={"n_examples": 10000, "seed": 0, "eps_str": "0.5", "autoattack_version": "pyautoattack 0.2.0"},
        constructor=None,
        autoattack_log=logs,
    )
    log_text = bundle.autoattack_log.read_text()
    assert (
        log_text.index("shard0.log")
        < log_text.index("00.00%")
        < log_text.index("shard1.log")
        < log_text.index("10.00%")
    )
    assert not any(path.exists() for path in logs)
    assert bundle.sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert not bundle.ready and bundle.directory.name == "Bare2026Entry.preview"
    assert any("name, authors, venue, link, architecture" in item for item in bundle.unmet)
    issue = bundle.issue.read_text()
    assert "- **Paper Title**: <fill in>" in issue and "- **Threat Model**: L2" in issue and "- **eps**: 0.5" in issue
    assert "the leaderboard uses all" not in issue  # 10000 points: the full test set
    assert "'model': None" in bundle.zoo_entry.read_text() and "`l2` OrderedDict" in bundle.zoo_entry.read_text()
    with pytest.raises(UserError, match="does not exist"):
        write_submission_bundle(
            tmp_path,
            model_id="Bare2026Entry",
            threat_model="L2",
            info_path=info_path,
            checkpoint_path=tmp_path / "missing.pt",
            results={"n_examples": 1},
            constructor=None,
            autoattack_log=None,
        )


def test_no_standard_autoattack_means_no_bundle(tmp_path):
    from robustbench_kd.evaluation.final_report import evaluate_and_write

    x, y = torch.rand(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)
    report = evaluate_and_write(
        tiny_model(),
        x,
        y,
        label="t",
        model_id="NoAA2026Run",
        dataset="cifar10",
        norm="Linf",
        eps=8 / 255,
        attacks=["clean"],
        out_dir=tmp_path,
        progress=False,
        sanity=False,
    )
    assert report.bundle_path is None and report.checkpoint_path.is_file()
    assert not (tmp_path / "submission").exists()


@pytest.mark.parametrize("reported,expected", [("62.5", 0.625), ("59.53%", 0.5953), (None, None)])
def test_reported_is_a_percentage(reported, expected):
    from robustbench_kd.evaluation.final_report import _reported_fraction

    value = _reported_fraction(reported)
    assert value is None if expected is None else value == pytest.approx(expected)


@pytest.mark.parametrize("reported", ["abc", "120", "nan"])
def test_reported_out_of_range_is_a_user_error(reported):
    from robustbench_kd.evaluation.final_report import _reported_fraction

    with pytest.raises(UserError, match=r"model_info.reported must be a percentage"):
        _reported_fraction(reported)
