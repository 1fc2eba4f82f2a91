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
