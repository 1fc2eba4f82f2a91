"""robustbench_kd.zoo.compat: robustbench importable with PyPI's pyautoattack, fra31's AutoAttack API."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.testing.fixtures import make_tiny_cifar, patch_cifar_integrity
from robustbench_kd.zoo import compat


class TinyCNN(nn.Module):
    """[0,1] 3x32x32 in, 10 logits out; a few thousand parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def restore_autoattack_modules() -> object:
    saved = {k: v for k, v in sys.modules.items() if k == "autoattack" or k.startswith("autoattack.")}
    yield
    for key in [k for k in sys.modules if k == "autoattack" or k.startswith("autoattack.")]:
        del sys.modules[key]
    sys.modules.update(saved)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN().eval()


def test_import_robustbench_through_compat() -> None:
    import pyautoattack.state

    rb = compat.import_robustbench()
    import autoattack
    import robustbench.eval
    import robustbench.utils

    assert rb is sys.modules["robustbench"]
    assert callable(robustbench.eval.benchmark) and callable(robustbench.utils.load_model)
    assert autoattack.AutoAttack is compat.AutoAttack
    # pyautoattack's state module, with an EvaluationState whose from_disk reads resumable state files
    # and whose flags have a mean() (robustbench's benchmark(aa_state_path=...) needs both).
    assert issubclass(sys.modules["autoattack.state"].EvaluationState, pyautoattack.state.EvaluationState)
    assert compat.autoattack_version() == f"pyautoattack {pyautoattack.__version__}"


def test_install_is_idempotent() -> None:
    compat.install()
    first = sys.modules["autoattack"]
    compat.install()
    compat.install()
    assert sys.modules["autoattack"] is first


def test_missing_pkg_resources_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # makes ``import pkg_resources`` fail
    with pytest.raises(UserError, match=r"setuptools<81"):
        compat.install()


def test_bare_pyautoattack_alias_is_replaced(restore_autoattack_modules: object) -> None:
    import pyautoattack

    sys.modules["autoattack"] = pyautoattack  # what some projects' shims do; benchmark() breaks on it
    compat.install()
    assert sys.modules["autoattack"] is not pyautoattack
    assert "attacks_to_run" in compat.AutoAttack.__init__.__code__.co_varnames


def test_real_fra31_package_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_autoattack_modules: object
) -> None:
    package = tmp_path / "autoattack"
    package.mkdir()
    (package / "__init__.py").write_text(
        textwrap.dedent("""
        class AutoAttack:
            def __init__(self, model, norm='Linf', eps=.3, seed=None, verbose=True,
                         attacks_to_run=[], version='standard', is_tf_model=False,
                         device='cuda', log_path=None):
                self.model = model
    """)
    )
    for key in [k for k in sys.modules if k == "autoattack" or k.startswith("autoattack.")]:
        del sys.modules[key]
    monkeypatch.syspath_prepend(str(tmp_path))
    compat.install()
    module = sys.modules["autoattack"]
    assert Path(module.__file__).parent == package
    assert compat.AutoAttack is module.AutoAttack
    assert compat.autoattack_version() == "autoattack (fra31) unknown"


def test_adapter_has_fra31_api_and_falls_back_from_cuda() -> None:
    model = _model()
    adversary = compat.AutoAttack(
        model, norm="Linf", eps=8 / 255, version="custom", attacks_to_run=["apgd-ce"], device="cuda", verbose=False
    )
    if not torch.cuda.is_available():
        assert torch.device(adversary.device) == torch.device("cpu")
    assert adversary.attacks_to_run == ["apgd-ce"]
    for attribute in ("apgd", "apgd_targeted", "fab", "square"):
        assert hasattr(adversary, attribute)
    standard = compat.AutoAttack(model, eps=8 / 255, device="cpu")
    assert standard.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert standard.apgd.n_restarts == 1


def test_adapter_runs_and_returns_like_fra31(tmp_path: Path) -> None:
    model = _model()
    torch.manual_seed(1)
    x = torch.rand(6, 3, 32, 32)
    y = model(x).argmax(1)  # all correctly classified, so the attack really has work to do
    eps = 8 / 255
    adversary = compat.AutoAttack(model, eps=eps, version="custom", attacks_to_run=["apgd-ce"], device="cpu", seed=0)
    adversary.apgd.n_restarts, adversary.apgd.n_iter = 1, 5
    x_adv = adversary.run_standard_evaluation(x, y, bs=6)
    assert isinstance(x_adv, torch.Tensor) and x_adv.shape == x.shape
    assert (x_adv - x).abs().max() <= eps + 1e-6
    x_adv2, y_adv = adversary.run_standard_evaluation(
        x, y, bs=6, return_labels=True, state_path=str(tmp_path / "state.json")
    )
    assert y_adv.shape == y.shape and (tmp_path / "state.json").exists()
    assert 0.0 <= adversary.clean_accuracy(x_adv2, y, bs=6) <= 1.0

    adversary = compat.AutoAttack(
        model, eps=eps, version="custom", attacks_to_run=["apgd-ce", "apgd-dlr"], device="cpu", seed=0
    )
    adversary.apgd.n_restarts, adversary.apgd.n_iter = 1, 3
    per_attack = adversary.run_standard_evaluation_individual(x, y, bs=6)
    assert set(per_attack) == {"apgd-ce", "apgd-dlr"}
    assert all(isinstance(v, torch.Tensor) for v in per_attack.values())
    with_labels = adversary.run_standard_evaluation_individual(x, y, bs=6, return_labels=True)
    assert all(isinstance(v, tuple) and len(v) == 2 for v in with_labels.values())
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-dlr"] and adversary.verbose is True


def test_adapter_log_path_writes_progress_without_flooding_handlers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model()
    x = torch.rand(4, 3, 32, 32)
    y = model(x).argmax(1)
    log_file = tmp_path / "aa.log"
    caplog.set_level(logging.WARNING)
    adversary = compat.AutoAttack(
        model, eps=8 / 255, version="custom", attacks_to_run=["apgd-ce"], device="cpu", seed=0, log_path=str(log_file)
    )
    adversary.apgd.n_restarts, adversary.apgd.n_iter = 1, 3
    adversary.run_standard_evaluation(x, y, bs=4)
    assert "robust accuracy" in log_file.read_text()
    assert not [r for r in caplog.records if r.name == "auto-attack" and r.levelno < logging.WARNING]
    aa_logger = logging.getLogger("auto-attack")
    assert aa_logger.propagate and not any(isinstance(h, logging.FileHandler) for h in aa_logger.handlers)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"version": "custom", "attacks_to_run": ["apgd-c"]}, r"did you mean: apgd-ce"),
        ({"attacks_to_run": ["apgd-ce"]}, r"version='custom'"),
        ({"version": "fast"}, r"unknown version"),
        ({"norm": "linf"}, r"did you mean: Linf"),
        ({"is_tf_model": True}, r"fra31"),
    ],
)
def test_adapter_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        compat.AutoAttack(_model(), device="cpu", **kwargs)


def test_benchmark_runs_offline_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: None) -> None:
    compat.import_robustbench()
    from robustbench.eval import benchmark

    data_dir = make_tiny_cifar(tmp_path / "data", n_train_per_batch=2, n_test=24)
    monkeypatch.chdir(tmp_path)
    with patch_cifar_integrity():
        clean, robust = benchmark(
            _model(),
            n_examples=20,
            dataset="cifar10",
            threat_model="Linf",
            to_disk=True,
            model_name="RbkdTinyCNN",
            data_dir=str(data_dir),
            device=torch.device("cpu"),
            batch_size=20,
            eps=8 / 255,
        )
    assert 0.0 <= robust <= clean <= 1.0
    info = json.loads((tmp_path / "model_info" / "cifar10" / "Linf" / "RbkdTinyCNN.json").read_text())
    assert info["eps"] == pytest.approx(8 / 255)
    assert float(info["clean_acc"]) == pytest.approx(round(clean * 100, 2))
    assert float(info["autoattack_acc"]) == pytest.approx(round(robust * 100, 2))
