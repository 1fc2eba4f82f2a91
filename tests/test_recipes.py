"""The papers' recipes (examples/recipes/*.toml) and `reproduce`: every recipe is a leaderboard reproduction
that names a real RobustBench zoo teacher and trains one real step offline; the verdict line; the
[published] section."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from robustbench_kd.api.reproduce import check_leaderboard_protocol, reproduce, verdict_line
from robustbench_kd.config import PublishedSection, load_config
from robustbench_kd.errors import UserError
from robustbench_kd.students import BUILTIN_STUDENTS
from robustbench_kd.testing.fixtures import make_tiny_cifar, patch_cifar_integrity, save_random_zoo_checkpoint
from robustbench_kd.training.builders import build_distiller
from robustbench_kd.training.loop import train, train_one_epoch
from robustbench_kd.training.setup import setup_run
from robustbench_kd.zoo.models import parse_zoo_ref, zoo_names

pytestmark = [
    pytest.mark.single_thread,  # batches of 2 on a busy 2-core box: a second thread only waits for the first
    pytest.mark.filterwarnings("ignore:'saved_variables' is deprecated:DeprecationWarning"),  # robustbench's DM WRN
]

RECIPE_DIR = Path(__file__).resolve().parents[1] / "examples" / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.toml"))
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def zoo_refs(config) -> list[tuple[str, str, str]]:
    """(dataset, threat model, name) of every robustbench: teacher of a run config."""
    refs = []
    for spec in config.teachers.values():
        specs = spec["specs"] if isinstance(spec, dict) else [spec] if isinstance(spec, str) else spec
        for one in specs:
            scheme, _, ref = one.partition(":")
            assert scheme == "robustbench", f"recipe teachers come from the RobustBench zoo, got {one!r}"
            refs.append(parse_zoo_ref(ref))
    return refs


def test_the_recipe_directory_holds_recipes_only():
    assert len(RECIPES) >= 10
    assert sorted(p.name for p in RECIPE_DIR.iterdir()) == [p.name for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_is_a_leaderboard_reproduction_of_a_published_setting(path, host):
    config = load_config(path)
    check_leaderboard_protocol(config)  # clean + AutoAttack, whole test set, leaderboard eps
    assert config.eval.final_n_examples is None
    published = config.published
    assert published.clean is not None and published.autoattack is not None and published.source
    assert 0 < published.autoattack < published.clean
    stem = path.stem
    assert stem.startswith(f"{config.data.dataset}_{config.method_name}_")
    assert config.student.arch in BUILTIN_STUDENTS and config.student.arch in stem
    # The method and its options are valid (options are checked when the method is built).
    distiller = build_distiller(host, config, NUM_CLASSES[config.data.dataset])
    assert set(config.teachers) == set(type(distiller).teacher_roles)
    for dataset, threat_model, name in zoo_refs(config):
        assert name in zoo_names(dataset, threat_model), f"{name} is not a {dataset}/{threat_model} zoo entry"
        assert dataset == config.data.dataset
    if published.teacher_note:
        assert config.teachers, "a teacher note belongs to a recipe with a teacher"
    text = path.read_text()
    assert f"robustbench-kd reproduce examples/recipes/{path.name}" in text
    assert f"{published.clean:.2f}%" in text and f"{published.autoattack:.2f}%" in text  # the header quotes them


@pytest.fixture(scope="module")
def offline_zoo(tmp_path_factory):
    """Tiny CIFAR-10/100 files and a lazily filled model dir of zoo architectures at random weights."""
    root = tmp_path_factory.mktemp("recipes")
    for dataset in NUM_CLASSES:
        make_tiny_cifar(root / "data", dataset=dataset, n_train_per_batch=1, n_test=2)
    saved: set[tuple[str, str, str]] = set()

    def place(config) -> None:
        for ref in zoo_refs(config):
            if ref not in saved:
                save_random_zoo_checkpoint(root / "models", ref[2], dataset=ref[0], threat_model=ref[1])
                saved.add(ref)

    return root, place


def one_step_config(path: Path, root: Path, out: Path):
    """The recipe as it is (method, options, student, teachers) with only what a one-step CPU run needs changed."""
    overrides = [
        f"run.out_dir={out}",
        "run.progress=false",
        'run.device="cpu"',
        f"data.data_dir={root / 'data'}",
        "data.download=false",
        "data.verify_md5=false",
        "data.batch_size=2",
        "data.n_train=2",  # one batch: one optimiser step
        "threat.steps=1",
        "optim.epochs=1",
        'optim.schedule="constant"',  # a per-batch schedule over one step would leave the lr near 0 (OneCycle)
        f"zoo.model_dir={root / 'models'}",
        "zoo.allow_download=false",
    ]
    if "steps" in load_config(path).method_options:  # a method with its own attack steps (AKD's PGD-7)
        overrides.append("method.steps=1")
    return load_config(path, overrides)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_one_step_with_its_zoo_architecture(path, host, offline_zoo, tmp_path):
    """One optimiser step offline: the recipe's student moves, its zoo teachers (real architectures at random
    weights, loaded through robustbench's load_model) do not."""
    root, place = offline_zoo
    config = one_step_config(path, root, tmp_path / "run")
    place(config)
    run = setup_run(config, host)
    for role, teacher in run.teachers.items():
        assert type(teacher.net).__module__.startswith("robustbench.model_zoo"), role
    student_before = snapshot(run.student)
    teachers_before = {role: snapshot(teacher) for role, teacher in run.teachers.items()}
    run.distiller.on_train_start(run)
    run.distiller.on_epoch_start(0, config.optim.epochs)
    metrics = train_one_epoch(run, 0)
    assert run.global_step == 1 and math.isfinite(metrics["loss"])
    after = dict(run.student.named_parameters())
    unchanged = [name for name, p in after.items() if torch.equal(p.detach(), student_before[name])]
    assert not unchanged, f"student parameters not updated by the step: {unchanged[:5]}"
    for role, teacher in run.teachers.items():
        assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
        now = teacher.state_dict()
        assert all(torch.equal(now[k], v) for k, v in teachers_before[role].items()), f"teacher {role} changed"


# -- the verdict --------------------------------------------------------------------------------------------------
PAPER = PublishedSection(clean=83.38, autoattack=51.49, source="Paper X, Table 1, row R")


@pytest.mark.parametrize(
    "metrics,expected,within",
    [
        (
            {"clean": 0.8310, "autoattack": 0.5102},
            "reproduce r18: clean 83.10% (published 83.38%, -0.28), AutoAttack 51.02% (published 51.49%, -0.47): "
            "within the ±1.00-point tolerance (Paper X, Table 1, row R)",
            True,
        ),
        (
            {"clean": 0.8338, "autoattack": 0.4990},
            "reproduce r18: clean 83.38% (published 83.38%, +0.00), AutoAttack 49.90% (published 51.49%, -1.59): "
            "outside the ±1.00-point tolerance (Paper X, Table 1, row R)",
            False,
        ),
        (  # exactly the tolerance counts as inside, whatever binary floating point makes of 0.5049 * 100
            {"clean": 0.8438, "autoattack": 0.5049, "pgd-20": 0.55},
            "reproduce r18: clean 84.38% (published 83.38%, +1.00), AutoAttack 50.49% (published 51.49%, -1.00): "
            "within the ±1.00-point tolerance (Paper X, Table 1, row R)",
            True,
        ),
    ],
)
def test_verdict_line_against_hand_computed_differences(metrics, expected, within):
    assert verdict_line(metrics, PAPER, recipe_name="r18") == (expected, within)


def test_verdict_line_without_published_numbers_and_with_one():
    metrics = {"clean": 0.9, "autoattack": 0.4}
    line, within = verdict_line(metrics, PublishedSection(), recipe_name="x")
    assert (line, within) == (
        "reproduce x: clean 90.00%, AutoAttack 40.00%: no published numbers for this setting",
        None,
    )
    clean_only = PublishedSection(clean=88.5, source="S", tolerance=2.0, teacher_note="teacher: closest zoo entry T")
    line, within = verdict_line(metrics, clean_only, recipe_name="x")
    assert line == (
        "reproduce x: clean 90.00% (published 88.50%, +1.50), AutoAttack 40.00% (not published): within the "
        "±2.00-point tolerance (S); teacher: closest zoo entry T"
    )
    assert within is True


def test_verdict_line_refuses_a_published_metric_that_was_not_measured():
    with pytest.raises(UserError, match=r"the paper gives AutoAttack accuracy 51.49% but the run measured none"):
        verdict_line({"clean": 0.8}, PAPER, recipe_name="x")
    with pytest.raises(UserError, match=r"clean accuracy must be a fraction in \[0, 1\]"):
        verdict_line({"clean": 83.1, "autoattack": 0.5}, PAPER, recipe_name="x")


# -- the [published] section ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values,message",
    [
        ({"clean": float("nan")}, "published.clean must be a finite number, got nan"),
        ({"autoattack": 100.5}, r"published.autoattack must be a percentage in \[0, 100\], got 100.5"),
        ({"clean": -1}, r"published.clean must be a percentage in \[0, 100\], got -1"),
        ({"clean": True}, "published.clean must be a number, got True"),
        ({"tolerance": 0}, r"published.tolerance must be in \(0, 100\] points, got 0"),
        ({"tolerance": float("inf")}, "published.tolerance must be a finite number, got inf"),
        ({"source": 3}, "published.source must be a string, got 3"),
        ({"teacher_note": "a\nb"}, "published.teacher_note must be one line"),
    ],
)
def test_published_section_is_checked(values, message):
    with pytest.raises(UserError, match=message) as info:
        PublishedSection(**values)
    assert "\n" not in str(info.value).replace("\\n", "")


def test_published_section_from_a_run_file(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[published]\nclean = 83\nautoattack = "high"\n')
    with pytest.raises(UserError, match=r"published\.autoattack must be a number or a fraction"):
        load_config(path)
    path.write_text('[published]\nclean = 83\nsorce = "x"\n')
    with pytest.raises(UserError, match=r"unknown key published.sorce \(did you mean: source"):
        load_config(path)
    path.write_text("[published]\nclean = 83\n")
    published = load_config(path).published
    assert published.clean == 83.0 and isinstance(published.clean, float) and published.autoattack is None
    assert published.tolerance == 1.0


# -- the protocol check ------------------------------------------------------------------------------------------
CIFAR = {"data": {"dataset": "cifar10"}, "eval": {"attacks": ["clean", "autoattack"]}}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (['eval.attacks=["clean", "pgd"]'], "eval.attacks lacks 'autoattack'"),
        (['eval.attacks=["autoattack"]'], "eval.attacks lacks 'clean'"),
        (["eval.final_n_examples=1000"], "eval.final_n_examples = 1000; remove it"),
        (['threat.eps="4/255"'], "eps = 8/255 for cifar10 Linf, but threat.eps = 0.0156863"),
        (['data.dataset="digits"', "threat.eps=0.2"], "there is none for digits Linf; valid: cifar10 Linf"),
    ],
)
def test_reproduce_refuses_a_final_evaluation_that_is_not_the_leaderboards(overrides, message):
    config = load_config(None, overrides, base=CIFAR)
    with pytest.raises(UserError, match=message) as info:
        check_leaderboard_protocol(config)
    assert "\n" not in str(info.value)


def test_reproduce_refuses_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"eval\.final_n_examples = 16"):
        reproduce({**CIFAR, "run": {"out_dir": str(out)}}, overrides=["eval.final_n_examples=16"])
    assert not out.exists()


def _tiny_recipe(tmp_path, name: str) -> dict:
    """A leaderboard-protocol run on a 6-image tiny CIFAR-10 written under ``tmp_path``: one epoch, a tiny student."""
    make_tiny_cifar(tmp_path / "data", n_train_per_batch=2, n_test=6)
    return {
        "run": {"name": name, "out_dir": str(tmp_path / "run"), "progress": False, "device": "cpu"},
        "data": {"dataset": "cifar10", "data_dir": str(tmp_path / "data"), "verify_md5": False, "batch_size": 10},
        "threat": {"eps": "8/255", "alpha": "2/255", "steps": 1},
        "student": {"arch": "small-cnn", "options": {"width": 0.25}},
        "method": {"name": "pgd-at"},
        "optim": {"epochs": 1},
        "eval": {"attacks": ["clean", "autoattack"], "teachers": False, "sanity": False},
    }


def test_reproduce_trains_evaluates_the_whole_test_set_and_ends_with_the_verdict(tmp_path):
    """End to end on a 6-image tiny CIFAR-10: the whole (tiny) test set, clean + AutoAttack, then the line."""
    recipe = {
        **_tiny_recipe(tmp_path, "TinyRecipe"),
        "published": {"clean": 10.0, "autoattack": 0.0, "source": "hand-made", "tolerance": 100.0},
    }
    with patch_cifar_integrity():
        done = reproduce(recipe, progress=False)
    metrics = done.result.metrics
    assert set(metrics) >= {"clean", "autoattack"} and 0 <= metrics["autoattack"] <= metrics["clean"] <= 1
    clean, robust = 100 * metrics["clean"], 100 * metrics["autoattack"]
    assert done.verdict == (
        f"reproduce TinyRecipe: clean {clean:.2f}% (published 10.00%, {clean - 10:+.2f}), AutoAttack {robust:.2f}% "
        f"(published 0.00%, {robust:+.2f}): within the ±100.00-point tolerance (hand-made)"
    )
    assert done.within_tolerance is True and done.published.source == "hand-made"
    assert done.result.paths["results"].is_file()


def test_the_reproduce_command_prints_the_table_then_the_verdict_last(tmp_path, capsys):
    import yaml

    from robustbench_kd.cli import main

    recipe = {**_tiny_recipe(tmp_path, "TinyCli"), "report": {"enabled": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with patch_cifar_integrity():
        assert main(["reproduce", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("student TinyCli") for line in lines)
    assert lines[-1].startswith("reproduce recipe: clean ")
    assert lines[-1].endswith("no published numbers for this setting")


# -- resume ---------------------------------------------------------------------------------------------------------
def test_a_changed_published_section_does_not_block_a_resume(tmp_path, host):
    base = {
        "run": {"out_dir": str(tmp_path / "run"), "progress": False},
        "data": {"dataset": "digits", "n_train": 64, "batch_size": 32},
        "method": {"name": "pgd-at"},
        "threat": {"steps": 1},
        "optim": {"epochs": 2},
        "published": {"clean": 90.0, "source": "first reading"},
    }
    train(load_config(None, base=base), host=host, stop_after=1)
    changed = {**base, "published": {"clean": 91.5, "autoattack": 40.0, "source": "corrected", "tolerance": 2.0}}
    run = train(load_config(None, base=changed), host=host, resume=True)
    assert [row["epoch"] for row in run.history] == [1, 2] and run.config_changes == []
    # The resume does compare what training depends on: the same resume with another seed is refused.
    with pytest.raises(UserError, match=r"run.seed = 0 in the checkpoint, 1 in the config"):
        train(load_config(None, ["run.seed=1"], base=changed), host=host, resume=True)
