"""Config: strict validation, fractions, overrides, TOML/YAML files, eps-unit mistakes."""

from __future__ import annotations

import pytest

from robustbench_kd.config import apply_overrides, load_config
from robustbench_kd.errors import UserError


def test_defaults_are_the_embedded_digits_run():
    cfg = load_config(None)
    assert cfg.data.dataset == "digits" and cfg.threat.eps == 0.2 and cfg.method_name == "pgd-at"


def test_cifar_gets_leaderboard_threat_by_default():
    cfg = load_config(None, ['data.dataset="cifar10"'])
    assert cfg.threat.eps == pytest.approx(8 / 255) and cfg.threat.alpha == pytest.approx(2 / 255)


def test_fraction_strings_and_partial_threat(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\ndataset = "cifar10"\n[threat]\neps = "4/255"\nalpha = "1/255"\n')
    cfg = load_config(path)
    assert cfg.threat.eps == pytest.approx(4 / 255) and cfg.threat.steps == 10


def test_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  name: rslad\n  label_mix_alpha: 0.5\noptim:\n  lr: 0.1\n")
    cfg = load_config(path)
    assert cfg.method_options == {"label_mix_alpha": 0.5} and cfg.optim.lr == 0.1


def test_overrides_are_toml_literals():
    raw = apply_overrides({}, ["optim.lr=0.2", "optim.milestones=[3, 4]", "run.name=abc", "eval.teachers=false"])
    assert raw == {"optim": {"lr": 0.2, "milestones": [3, 4]}, "run": {"name": "abc"}, "eval": {"teachers": False}}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=0.1"], r"unknown key optim.lrr \(did you mean: lr\?\)"),
        (["optimizer.lr=0.1"], r"unknown section \[optimizer\]"),
        (["threat.eps=8"], r"write it as a fraction of 255, e.g. '8/255'"),
        (['threat.eps="2/255"', 'threat.alpha="8/255"'], "step size must not exceed the radius"),
        (["optim.epochs=1.5"], "optim.epochs must be an integer"),
        (['optim.schedule="cosin"'], r"did you mean: cosine"),
        (['threat.norm="L3"'], "threat.norm must be one of Linf, L2"),
        (["data.batch_size=true"], "data.batch_size must be an integer"),
        (["teachers.robust=3"], "teachers.robust must be a spec string"),
        (["method.label_mix_alpha=0.5"], r"\[method\] needs a name"),
        (["optim"], "--set expects key=value"),
    ],
)
def test_bad_config_gives_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)


def test_unknown_method_option_lists_valid_ones(host):
    from robustbench_kd.training.builders import build_distiller

    cfg = load_config(None, ['method.name="rslad"', "method.temprature=2"])
    with pytest.raises(UserError, match=r"unknown option method.temprature for method 'rslad'.*valid options"):
        build_distiller(host, cfg, 10)


NAN, INF = float("nan"), float("inf")
CONFIG, THREAT, SCALE = "robustbench_kd.config", "robustbench_kd.threat", "robustbench_kd.scale.sections"
DIAGNOSTICS, REPORT = "robustbench_kd.analysis.diagnostics.section", "robustbench_kd.analysis.reports.section"
SUBMISSION = "robustbench_kd.submission.section"
SMALL_THREAT = {"eps": 0.1, "alpha": 0.01}


@pytest.mark.parametrize(
    "module,cls,kwargs,message",
    [
        (CONFIG, "RunSection", {"seed": -1}, r"run.seed must be an integer in \[0, "),
        (CONFIG, "RunSection", {"name": "a/b"}, "run.name is not a usable model id"),
        (CONFIG, "RunSection", {"out_dir": ""}, "run.out_dir is empty"),
        (CONFIG, "DataSection", {"data_dir": "x\ny"}, "data.data_dir 'x\\\\ny' contains the control character"),
        (CONFIG, "DataSection", {"n_train": 2**40}, "data.n_train must be <= 2147483647"),
        (CONFIG, "OptimSection", {"lr": NAN}, "optim.lr must be a finite number, got nan"),
        (CONFIG, "OptimSection", {"weight_decay": -1e-4}, "optim.weight_decay must be >= 0"),
        (CONFIG, "OptimSection", {"gamma": 0}, r"optim.gamma must be in \(0, 1\]"),
        (CONFIG, "OptimSection", {"max_lr": INF}, "optim.max_lr must be a finite number, got inf"),
        (CONFIG, "OptimSection", {"milestones": [0, 3]}, "optim.milestones must be positive epochs"),
        (CONFIG, "OptimSection", {"milestones": [3, 3]}, "optim.milestones must be increasing epochs"),
        (CONFIG, "CheckpointSection", {"every": -1}, "checkpoint.every must be >= 0"),
        (CONFIG, "EvalSection", {"seed": 2**32}, r"eval.seed must be an integer in \[0, 4294967295\]"),
        (CONFIG, "EvalSection", {"pgd_steps": 0}, "eval.pgd_steps must be >= 1"),
        (CONFIG, "ZooSection", {"model_dir": ""}, "zoo.model_dir is empty"),
        (THREAT, "ThreatSpec", {**SMALL_THREAT, "eps": NAN}, "threat.eps must be a finite number"),
        (THREAT, "ThreatSpec", {**SMALL_THREAT, "norm": "L2", "eps": INF}, "threat.eps must be a finite number"),
        (THREAT, "ThreatSpec", {**SMALL_THREAT, "steps": -1}, "threat.steps must be >= 0"),
        (SCALE, "EmaSection", {"decay": NAN}, "ema.decay must be a finite number"),
        (SCALE, "EmaSection", {"every": 0}, "ema.every must be >= 1"),
        (SCALE, "SpeedSection", {"channels_last": "yes"}, "speed.channels_last must be true or false"),
        (DIAGNOSTICS, "DiagnosticsSection", {"seed": -3}, r"diagnostics.seed must be an integer in \[0, "),
        (DIAGNOSTICS, "DiagnosticsSection", {"bins": 0}, "diagnostics.bins must be >= 1"),
        (REPORT, "ReportSection", {"eps_factors": [0.5, NAN]}, r"report.eps_factors\[1\] must be a finite number"),
        (REPORT, "ReportSection", {"tsne_perplexity": INF}, "report.tsne_perplexity must be a finite number"),
        (SUBMISSION, "ModelInfoSection", {"title": 3}, "model_info.title must be a string"),
        (SUBMISSION, "ModelInfoSection", {"number_forward_passes": 10**6}, "number_forward_passes must be <= 1000"),
    ],
)
def test_sections_built_in_python_are_checked(module, cls, kwargs, message):
    import importlib

    with pytest.raises(UserError, match=message):
        getattr(importlib.import_module(module), cls)(**kwargs)


def test_threat_takes_fraction_strings_from_python():
    from robustbench_kd.threat import ThreatSpec

    spec = ThreatSpec(eps="8/255", alpha="2/255")
    assert spec.eps == pytest.approx(8 / 255) and isinstance(spec.alpha, float)


def test_run_config_free_sections_are_bounded_and_checked():
    from robustbench_kd.config import RunConfig

    shared: list = [0] * 100
    for _ in range(4):
        shared = [shared] * 100  # 10**10 values, a few KB in memory until something copies it
    with pytest.raises(UserError, match=r"\[method\] expands to more than 100,000 values"):
        RunConfig(method={"name": "pgd-at", "payload": shared})
    with pytest.raises(UserError, match=r"teachers.robust.weights must be a list of finite numbers >= 0"):
        RunConfig(teachers={"robust": {"specs": ["file:a.pt"], "weights": [NAN]}})
    with pytest.raises(UserError, match=r"teachers.robust.weights are all zero"):
        RunConfig(teachers={"robust": {"specs": ["file:a.pt", "file:b.pt"], "weights": [0, 0.0]}})
    with pytest.raises(UserError, match=r"method.name must be a string"):
        RunConfig(method={"name": 3})


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["run.seed=nan"], "run.seed must be a finite number, got nan"),
        (["optim.lr=inf"], "optim.lr must be a finite number, got inf"),
        (["run.seed=" + "9" * 30], "run.seed must fit a 64-bit integer"),
        (["run.seed=" + "9" * 5000], "run.seed must be an integer, got '99999"),
        (["eval.n_examples=-1"], "eval.n_examples must be >= 1, got -1"),
        (['report.eps_factors=[1, "x"]'], r"report.eps_factors\[1\] must be a number or a fraction"),
        (["diagnostics.enabled=[1]"], "diagnostics.enabled must be a list of strings"),
        (['method.name="trades"', "method.beta=-inf"], "method.beta must be a finite number, got -inf"),
        (["a" + ".a" * 40 + "=1"], "the run configuration is nested more than 32 levels deep"),
        (['run.name="x y"'], "run.name is not a usable model id"),
        (["data.val_size=1e30"], "data.val_size must be <= 2147483647"),
    ],
)
def test_overrides_go_through_the_same_checks(overrides, message):
    with pytest.raises(UserError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_override_nested_too_deeply_is_one_line():
    with pytest.raises(UserError, match=r"--set value .* is nested too deeply"):
        load_config(None, ["student.options.x=" + "[" * 5000 + "]" * 5000])


def test_run_file_bounds(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("method:\n  name: pgd-at\n  values: [" + ", ".join(["1"] * 100_001) + "]\n")
    with pytest.raises(UserError, match="expands to more than 100,000 values"):
        load_config(big)
    dated = tmp_path / "dated.toml"
    dated.write_text("[model_info]\ntitle = 1979-05-27\n")
    with pytest.raises(UserError, match=r"config file .*dated.toml: model_info.title is a date"):
        load_config(dated)
    keyed = tmp_path / "keyed.yaml"
    keyed.write_text("teachers:\n  1: file:a.pt\n")
    with pytest.raises(UserError, match="the key 1 in teachers must be a string"):
        load_config(keyed)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty).method_name == "pgd-at"


def test_milestones_beyond_epochs_are_kept():
    """A run shortened with --set optim.epochs=1 keeps its file's milestones: they never fire."""
    cfg = load_config(None, ["optim.epochs=1", "optim.milestones=[100, 150]"])
    assert cfg.optim.milestones == [100, 150]


def test_onecycle_starts_at_max_lr_over_div_factor():
    """AKD's recipe: OneCycle from 0.1 (0.21 / 2.1) up to 0.21; PyTorch's default start is max_lr / 25."""
    import torch

    from robustbench_kd.training.setup import build_scheduler

    for div_factor, start in ((2.1, 0.1), (25.0, 0.21 / 25)):
        overrides = ['optim.schedule="onecycle"', "optim.max_lr=0.21", f"optim.div_factor={div_factor}"]
        config = load_config(None, [*overrides, "optim.epochs=2"])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.optim.lr, momentum=0.9)
        scheduler, per_batch = build_scheduler(config, optimizer, steps_per_epoch=10)
        assert per_batch and optimizer.param_groups[0]["lr"] == pytest.approx(start)
        for _ in range(20):
            optimizer.step()
            scheduler.step()
    with pytest.raises(UserError, match=r"optim.div_factor must be >= 1 \(the start is max_lr / div_factor\), got 0.5"):
        load_config(None, ["optim.div_factor=0.5"])
