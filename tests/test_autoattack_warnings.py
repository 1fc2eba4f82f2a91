"""AutoAttack's warnings become flags, ``unreliable`` and the footnote, with either AutoAttack backend.

The backends report their checks differently: pyautoattack through the ``auto-attack`` logger, fra31's
package (what RobustBench installs) through its own ``other_utils.Logger``, which prints and appends to
``log_path``. Three backends are run:

* ``pyautoattack``: the installed one, through the compat shim;
* ``fra31``: fra31's package itself, when an ``autoattack`` distribution is installed (it is not on
  PyPI, so these tests skip where it is absent);
* ``fra31-logger``: a fra31-shaped package built from pyautoattack's files, for every machine. fra31's
  ``other_utils.py`` (its ``Logger``) and attack modules are byte-identical to pyautoattack's up to
  whitespace and absolute imports, and its ``checks.py`` differs only in reporting
  ``logger.log(f'Warning: {msg}')`` where pyautoattack has ``logger.warning(msg)``; that one difference
  is re-applied. The wrapper (:data:`FRA31_WRAPPER`) is fra31's ``autoattack.py`` cut down to its
  PyTorch path: the same constructor, one ``Logger`` shared with APGD, the same checks called with it,
  the same attack loop and progress lines.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import json
import logging
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from robustbench_kd.evaluation.autoattack import (
    AUTOATTACK_WARNINGS,
    autoattack_warning,
    describe_autoattack_flag,
    run_autoattack,
)
from robustbench_kd.evaluation.final_report import evaluate_and_write
from robustbench_kd.zoo import compat
from robustbench_kd.zoo.autoattack_resume import read_autoattack_state

pytestmark = pytest.mark.single_thread

EPS = 0.5  # large enough for APGD-CE to break every point of these linear models: the later attacks are skipped

# fra31's autoattack/autoattack.py, PyTorch path only (no TensorFlow branch, no individual runs).
FRA31_WRAPPER = """
import time

import numpy as np
import torch

from .other_utils import Logger
from autoattack import checks
from autoattack.state import EvaluationState


class AutoAttack():
    def __init__(self, model, norm='Linf', eps=.3, seed=None, verbose=True,
                 attacks_to_run=[], version='standard', is_tf_model=False,
                 device='cuda', log_path=None):
        self.model = model
        self.norm = norm
        assert norm in ['Linf', 'L2', 'L1']
        self.epsilon = eps
        self.seed = seed
        self.verbose = verbose
        self.attacks_to_run = attacks_to_run
        self.version = version
        self.is_tf_model = is_tf_model
        self.device = device
        self.logger = Logger(log_path)

        if version in ['standard', 'plus', 'rand'] and attacks_to_run != []:
            raise ValueError("attacks_to_run will be overridden unless you use version='custom'")

        from .autopgd_base import APGDAttack
        self.apgd = APGDAttack(self.model, n_restarts=5, n_iter=100, verbose=False,
            eps=self.epsilon, norm=self.norm, eot_iter=1, rho=.75, seed=self.seed,
            device=self.device, logger=self.logger)

        from .fab_pt import FABAttack_PT
        self.fab = FABAttack_PT(self.model, n_restarts=5, n_iter=100, eps=self.epsilon, seed=self.seed,
            norm=self.norm, verbose=False, device=self.device)

        from .square import SquareAttack
        self.square = SquareAttack(self.model, p_init=.8, n_queries=5000, eps=self.epsilon, norm=self.norm,
            n_restarts=1, seed=self.seed, verbose=False, device=self.device, resc_schedule=False)

        from .autopgd_base import APGDAttack_targeted
        self.apgd_targeted = APGDAttack_targeted(self.model, n_restarts=1, n_iter=100, verbose=False,
            eps=self.epsilon, norm=self.norm, eot_iter=1, rho=.75, seed=self.seed, device=self.device,
            logger=self.logger)

        if version in ['standard', 'plus', 'rand']:
            self.set_version(version)

    def get_logits(self, x):
        return self.model(x)

    def get_seed(self):
        return time.time() if self.seed is None else self.seed

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False, state_path=None):
        state = EvaluationState(set(self.attacks_to_run), path=state_path)
        state.to_disk()
        attacks_to_run = list(filter(lambda attack: attack not in state.run_attacks, self.attacks_to_run))
        if self.verbose:
            self.logger.log('using {} version including {}.'.format(self.version,
                  ', '.join(attacks_to_run)))

        # checks on type of defense
        if self.version != 'rand':
            checks.check_randomized(self.get_logits, x_orig[:bs].to(self.device),
                y_orig[:bs].to(self.device), bs=bs, logger=self.logger)
        n_cls = checks.check_range_output(self.get_logits, x_orig[:bs].to(self.device),
            logger=self.logger)
        checks.check_dynamic(self.model, x_orig[:bs].to(self.device), self.is_tf_model,
            logger=self.logger)
        checks.check_n_classes(n_cls, self.attacks_to_run, self.apgd_targeted.n_target_classes,
            self.fab.n_target_classes, logger=self.logger)

        with torch.no_grad():
            n_batches = int(np.ceil(x_orig.shape[0] / bs))
            robust_flags = torch.zeros(x_orig.shape[0], dtype=torch.bool, device=x_orig.device)
            y_adv = torch.empty_like(y_orig)
            for batch_idx in range(n_batches):
                start_idx = batch_idx * bs
                end_idx = min( (batch_idx + 1) * bs, x_orig.shape[0])
                x = x_orig[start_idx:end_idx, :].clone().to(self.device)
                y = y_orig[start_idx:end_idx].clone().to(self.device)
                output = self.get_logits(x).max(dim=1)[1]
                y_adv[start_idx: end_idx] = output
                correct_batch = y.eq(output)
                robust_flags[start_idx:end_idx] = correct_batch.detach().to(robust_flags.device)
            state.robust_flags = robust_flags
            robust_accuracy = torch.sum(robust_flags).item() / x_orig.shape[0]
            robust_accuracy_dict = {'clean': robust_accuracy}
            state.clean_accuracy = robust_accuracy
            if self.verbose:
                self.logger.log('initial accuracy: {:.2%}'.format(robust_accuracy))

            x_adv = x_orig.clone().detach()
            startt = time.time()
            for attack in attacks_to_run:
                num_robust = torch.sum(robust_flags).item()
                if num_robust == 0:
                    break
                n_batches = int(np.ceil(num_robust / bs))
                robust_lin_idcs = torch.nonzero(robust_flags, as_tuple=False)
                if num_robust > 1:
                    robust_lin_idcs.squeeze_()
                for batch_idx in range(n_batches):
                    start_idx = batch_idx * bs
                    end_idx = min((batch_idx + 1) * bs, num_robust)
                    batch_datapoint_idcs = robust_lin_idcs[start_idx:end_idx]
                    if len(batch_datapoint_idcs.shape) > 1:
                        batch_datapoint_idcs.squeeze_(-1)
                    x = x_orig[batch_datapoint_idcs, :].clone().to(self.device)
                    y = y_orig[batch_datapoint_idcs].clone().to(self.device)
                    if len(x.shape) == 3:
                        x.unsqueeze_(dim=0)
                    if attack == 'apgd-ce':
                        self.apgd.loss = 'ce'
                        self.apgd.seed = self.get_seed()
                        adv_curr = self.apgd.perturb(x, y)
                    elif attack == 'apgd-dlr':
                        self.apgd.loss = 'dlr'
                        self.apgd.seed = self.get_seed()
                        adv_curr = self.apgd.perturb(x, y)
                    elif attack == 'fab':
                        self.fab.targeted = False
                        self.fab.seed = self.get_seed()
                        adv_curr = self.fab.perturb(x, y)
                    elif attack == 'square':
                        self.square.seed = self.get_seed()
                        adv_curr = self.square.perturb(x, y)
                    elif attack == 'apgd-t':
                        self.apgd_targeted.seed = self.get_seed()
                        adv_curr = self.apgd_targeted.perturb(x, y)
                    elif attack == 'fab-t':
                        self.fab.targeted = True
                        self.fab.n_restarts = 1
                        self.fab.seed = self.get_seed()
                        adv_curr = self.fab.perturb(x, y)
                    else:
                        raise ValueError('Attack not supported')
                    output = self.get_logits(adv_curr).max(dim=1)[1]
                    false_batch = ~y.eq(output).to(robust_flags.device)
                    non_robust_lin_idcs = batch_datapoint_idcs[false_batch]
                    robust_flags[non_robust_lin_idcs] = False
                    state.robust_flags = robust_flags
                    x_adv[non_robust_lin_idcs] = adv_curr[false_batch].detach().to(x_adv.device)
                    y_adv[non_robust_lin_idcs] = output[false_batch].detach().to(x_adv.device)
                    if self.verbose:
                        num_non_robust_batch = torch.sum(false_batch)
                        self.logger.log('{} - {}/{} - {} out of {} successfully perturbed'.format(
                            attack, batch_idx + 1, n_batches, num_non_robust_batch, x.shape[0]))
                robust_accuracy = torch.sum(robust_flags).item() / x_orig.shape[0]
                robust_accuracy_dict[attack] = robust_accuracy
                state.add_run_attack(attack)
                if self.verbose:
                    self.logger.log('robust accuracy after {}: {:.2%} (total time {:.1f} s)'.format(
                        attack.upper(), robust_accuracy, time.time() - startt))

            checks.check_square_sr(robust_accuracy_dict, logger=self.logger)
            state.to_disk(force=True)
            if self.verbose:
                self.logger.log('robust accuracy: {:.2%}'.format(robust_accuracy))
        if return_labels:
            return x_adv, y_adv
        else:
            return x_adv

    def set_version(self, version='standard'):
        if self.verbose:
            print('setting parameters for {} version'.format(version))
        if version == 'standard':
            self.attacks_to_run = ['apgd-ce', 'apgd-t', 'fab-t', 'square']
            if self.norm in ['Linf', 'L2']:
                self.apgd.n_restarts = 1
                self.apgd_targeted.n_target_classes = 9
            elif self.norm in ['L1']:
                self.apgd.use_largereps = True
                self.apgd_targeted.use_largereps = True
                self.apgd.n_restarts = 5
                self.apgd_targeted.n_target_classes = 5
            self.fab.n_restarts = 1
            self.apgd_targeted.n_restarts = 1
            self.fab.n_target_classes = 9
            self.square.n_queries = 5000
        elif version == 'plus':
            self.attacks_to_run = ['apgd-ce', 'apgd-dlr', 'fab', 'square', 'apgd-t', 'fab-t']
            self.apgd.n_restarts = 5
            self.fab.n_restarts = 5
            self.apgd_targeted.n_restarts = 1
            self.fab.n_target_classes = 9
            self.apgd_targeted.n_target_classes = 9
            self.square.n_queries = 5000
        elif version == 'rand':
            self.attacks_to_run = ['apgd-ce', 'apgd-dlr']
            self.apgd.n_restarts = 1
            self.apgd.eot_iter = 20
"""

# pyautoattack's modules that fra31's package holds unchanged (up to whitespace and import style).
_SHARED_MODULES = ("other_utils", "autopgd_base", "fab_base", "fab_projections", "fab_pt", "square", "state")


def fra31_checks_source() -> str:
    """fra31's ``checks.py``: pyautoattack's with fra31's way of reporting put back."""
    import pyautoattack.checks

    source = Path(pyautoattack.checks.__file__).read_text(encoding="utf-8")
    fra31 = source.replace("logger.warning(msg)", "logger.log(f'Warning: {msg}')")
    # One per message-emitting branch: randomized, range_output, zero_gradients, square_sr, dynamic, n_classes.
    assert fra31.count("logger.log(f'Warning: {msg}')") == 6
    return fra31


def build_fra31_package(root: Path) -> Path:
    """Write the fra31-shaped ``autoattack`` package (see the module docstring) under ``root``."""
    import pyautoattack

    source_dir = Path(pyautoattack.__file__).parent
    package = root / "autoattack"
    package.mkdir(parents=True)
    for name in _SHARED_MODULES:
        shutil.copy(source_dir / f"{name}.py", package / f"{name}.py")
    (package / "checks.py").write_text(fra31_checks_source(), encoding="utf-8")
    (package / "autoattack.py").write_text(FRA31_WRAPPER, encoding="utf-8")
    (package / "__init__.py").write_text("from .autoattack import AutoAttack\n", encoding="utf-8")
    return package


def _forget_autoattack() -> None:
    for key in [k for k in sys.modules if k == "autoattack" or k.startswith("autoattack.")]:
        del sys.modules[key]


def _real_fra31_installed() -> bool:
    # Look on sys.path only: sys.modules may hold the compat shim under the same name.
    return importlib.machinery.PathFinder.find_spec("autoattack") is not None


@pytest.fixture(params=["pyautoattack", "fra31", "fra31-logger"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """Make compat use one AutoAttack backend for the test; the previous ``autoattack`` modules come back after."""
    saved = {k: v for k, v in sys.modules.items() if k == "autoattack" or k.startswith("autoattack.")}
    name = request.param
    if name == "fra31" and not _real_fra31_installed():
        pytest.skip("fra31's autoattack is not installed (pip install git+https://github.com/fra31/auto-attack)")
    _forget_autoattack()
    if name == "pyautoattack":
        sys.modules["autoattack"] = None  # type: ignore[assignment]  # hides an installed fra31 package
    elif name == "fra31-logger":
        build_fra31_package(tmp_path / "site")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
    compat.install()
    if name == "pyautoattack":
        assert compat.autoattack_version().startswith("pyautoattack")
    else:
        assert "fra31" in compat.autoattack_version()
        # check_dynamic's sys.settrace(None) would switch coverage off (conftest does this for pyautoattack).
        monkeypatch.setattr(sys.modules["autoattack.checks"], "check_dynamic", lambda *a, **k: None)
    try:
        yield name
    finally:
        _forget_autoattack()
        sys.modules.update(saved)


class NoisyLinear(nn.Module):
    """3x8x8 -> 10 logits with fresh input noise on every call, in eval mode too: a randomised defence."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor, noise: float = 1e-2) -> torch.Tensor:
        return self.head((x + noise * torch.randn_like(x)).flatten(1))


class SoftmaxLinear(nn.Module):
    """3x8x8 -> 10 probabilities (AutoAttack asks for logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.flatten(1)).softmax(dim=1)


def _data(model: nn.Module, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 8, 8, generator=gen)
    with torch.no_grad():
        y = model.head(x.flatten(1)).argmax(1)  # labels = noise-free predictions: clean accuracy ~100%
    return x, y


def _model(cls: type[nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return cls().eval()


# ------------------------------------------------------------------------------ the recognition table


def _emit_every_check_warning(checks: types.ModuleType, logger: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Call each of AutoAttack's checks so that it emits its warning(s) through ``logger``."""
    noisy, probs = _model(NoisyLinear), _model(SoftmaxLinear)
    x, y = _data(noisy)
    checks.check_randomized(noisy, x, y, logger=logger)
    checks.check_range_output(probs, x, logger=logger)
    checks.check_zero_gradients(torch.zeros(2, 3), logger=logger)
    checks.check_square_sr({"clean": 1.0, "apgd-ce": 0.5, "apgd-t": 0.5, "square": 0.25}, logger=logger)
    checks.check_dynamic(noisy, x, True, logger=logger)  # the TensorFlow branch: not traced
    # The traced branch, without touching the interpreter's trace function (coverage's): a forward
    # pass that called grad() is simulated through the counter the tracer fills.
    monkeypatch.setattr(checks, "sys", types.SimpleNamespace(settrace=lambda function: None))
    monkeypatch.setitem(checks.funcs, "grad", 1)
    checks.check_dynamic(noisy, x, False, logger=logger)
    checks.check_n_classes(2, ["apgd-ce", "apgd-dlr"], 9, 9, logger=logger)
    checks.check_n_classes(3, ["apgd-ce", "apgd-t"], 9, 9, logger=logger)
    checks.check_n_classes(5, ["apgd-ce", "apgd-t", "fab-t"], 9, 9, logger=logger)
    checks.check_n_classes(5, ["apgd-ce", "fab-t"], 9, 9, logger=logger)


_EXPECTED_CHECKS = [
    "check_randomized",
    "check_range_output",
    "check_zero_gradients",
    "check_square_sr",
    "check_dynamic",
    "check_dynamic",
    "check_n_classes",
    "check_n_classes",
    "check_n_classes",
    "check_n_classes",
]


def _fresh_module(name: str, path: Path, package: str) -> types.ModuleType:
    """A private copy of a checks module (own counters and globals), importable relative to ``package``."""
    spec = importlib.util.spec_from_file_location(f"{package}.{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(message: str) -> str:
    (check,) = [check for check, pattern, _ in AUTOATTACK_WARNINGS if pattern.search(message)][:1]
    return check


def test_table_recognises_every_pyautoattack_check_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyautoattack.checks

    checks = _fresh_module("_checks_under_test", Path(pyautoattack.checks.__file__), "pyautoattack")
    records: list[str] = []
    logger = logging.getLogger("robustbench_kd.tests.aa-checks")
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    monkeypatch.setattr(logger, "propagate", False)
    try:
        _emit_every_check_warning(checks, logger, monkeypatch)
    finally:
        logger.removeHandler(handler)
    assert [_row(message) for message in records] == _EXPECTED_CHECKS
    for message in records:
        assert autoattack_warning(message) == message
        assert describe_autoattack_flag(message) != "a possible problem"


def test_table_recognises_every_fra31_check_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyautoattack.other_utils

    # fra31's Logger, as published: it prints the line and appends it to log_path.
    logger_cls = pyautoattack.other_utils.Logger
    assert "print(str_to_log)" in inspect.getsource(logger_cls.log)
    (tmp_path / "checks_fra31.py").write_text(fra31_checks_source(), encoding="utf-8")
    checks = _fresh_module("_fra31_checks_under_test", tmp_path / "checks_fra31.py", "pyautoattack")
    log_path = tmp_path / "aa.log"
    _emit_every_check_warning(checks, logger_cls(str(log_path)), monkeypatch)
    lines = log_path.read_text(encoding="utf-8").splitlines()
    assert all(line.startswith("Warning: ") for line in lines)
    messages = [autoattack_warning(line) for line in lines]
    assert [_row(str(message)) for message in messages] == _EXPECTED_CHECKS
    assert all(message and not message.startswith("Warning") for message in messages)


def test_progress_lines_are_not_flags() -> None:
    for line in (
        "using standard version including apgd-ce, apgd-t, fab-t, square.",
        "initial accuracy: 100.00%",
        "apgd-ce - 1/1 - 8 out of 8 successfully perturbed",
        "robust accuracy after APGD-CE: 0.00% (total time 0.3 s)",
        "max Linf perturbation: 0.03137, nan in tensor: 0, max: 1.00000, min: 0.00000",
        "robust accuracy: 0.00%",
    ):
        assert autoattack_warning(line) is None
    assert autoattack_warning("Warning: a check added later") == "a check added later"
    assert describe_autoattack_flag("something new") == "a possible problem"


# ----------------------------------------------------------------------- end to end, per backend


class PlainLinear(NoisyLinear):
    """The same network without the noise: nothing for AutoAttack to flag."""

    def forward(self, x: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
        return super().forward(x, noise=0.0)


def _evaluate(model: nn.Module, out_dir: Path) -> tuple[object, dict]:
    x, y = _data(model)
    report = evaluate_and_write(
        model, x, y, label="tiny", model_id="tiny", dataset="cifar10", norm="Linf", eps=EPS,
        attacks=["clean", "autoattack"], out_dir=out_dir, batch_size=8, sanity=False, progress=False,
    )  # fmt: skip
    assert report.model_info_path is not None
    return report, json.loads(report.model_info_path.read_text(encoding="utf-8"))


def test_randomised_model_is_marked_unreliable(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report, info = _evaluate(_model(NoisyLinear), tmp_path / "noisy")
    randomised = [flag for flag in report.flags if "it seems to be a randomized defense!" in flag]
    assert randomised and not randomised[0].startswith("Warning")  # the same text from both backends
    assert info["unreliable"] is True
    assert info["footnote"] and "AutoAttack" in info["footnote"]
    results = json.loads((tmp_path / "noisy" / "results" / "tiny.json").read_text(encoding="utf-8"))
    assert results["autoattack_flags"] == report.flags
    assert ("fra31" in results["autoattack_version"]) is (backend != "pyautoattack")
    # AutoAttack's own log keeps the warning and the progress, as each backend writes them.
    assert report.bundle_path is not None
    log = (report.bundle_path / "autoattack.log").read_text(encoding="utf-8")
    assert "apgd-ce" in log
    if backend == "pyautoattack":
        assert "it seems to be a randomized defense!" in log
    else:
        assert "Warning: it seems to be a randomized defense!" in log
        assert "Warning: it seems to be a randomized defense!" in capsys.readouterr().out  # still printed

    # The same network without the noise: no flag, so neither unreliable nor a footnote.
    report, info = _evaluate(_model(PlainLinear), tmp_path / "plain")
    assert report.flags == []
    assert info["unreliable"] is False and info.get("footnote") is None


def test_warnings_are_kept_by_resumable_runs(backend: str, tmp_path: Path) -> None:
    model = _model(SoftmaxLinear)
    x, y = _data(model)
    state = tmp_path / "aa_state.json"
    result = run_autoattack(model, x, y, norm="Linf", eps=EPS, version="quick", state_path=state)
    assert any("it seems that the output is a probability distribution" in flag for flag in result.flags)
    saved = read_autoattack_state(state).warnings
    assert saved and all(not flag.startswith("Warning") for flag in saved)
    assert any("probability distribution" in flag for flag in saved)
