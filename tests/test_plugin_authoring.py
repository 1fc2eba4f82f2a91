"""Writing a method that owns a network: the set-up order, the contract's traps, resume and failure messages."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from robustbench_kd.cli import main
from robustbench_kd.context import BatchContext, SetupContext
from robustbench_kd.distiller import Distiller, LossOutput
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.storage.checkpoint import load_checkpoint
from robustbench_kd.testing import check_distiller
from robustbench_kd.testing.runs import tiny_digits_config, tiny_digits_raw
from robustbench_kd.training import checkpoints
from robustbench_kd.training.loop import train

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"


def install_plugin(folder: Path, monkeypatch, *, dist: str, entry_points: dict[str, str], source: str = "") -> None:
    """An 'installed' distribution: a dist-info whose entry points name modules importable from ``folder``."""
    info = folder / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
    (info / "entry_points.txt").write_text("[robustbench_kd]\n" + lines)
    if source:
        (folder / f"{next(iter(entry_points.values()))}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(folder))
    for module in entry_points.values():
        monkeypatch.delitem(sys.modules, module, raising=False)


def run_file(tmp_path: Path, out_dir: Path, method: dict, **merge: dict) -> Path:
    path = tmp_path / f"{out_dir.name}.yaml"
    raw = tiny_digits_raw(out_dir, merge={"data": {"n_train": 200}, **merge}, method=method)  # merge may replace data
    raw["eval"] = {"attacks": ["clean", "pgd"], "final_n_examples": 100, "pgd_steps": 2}
    path.write_text(yaml.safe_dump(raw))
    return path


# -- the set-up hook -----------------------------------------------------------------------------------
class OwnsNetwork(Distiller):
    """A test method: cross-entropy of the student plus a second network of the student's shape."""

    name = "owns-network"
    paper = "test"
    calls: list[str] = []  # noqa: RUF012 - a record shared by the test's instances

    def on_setup(self, setup: SetupContext) -> None:
        OwnsNetwork.calls.append("on_setup")
        self.seen = setup
        self.second = setup.new_student()

    def load_method_state(self, state) -> None:
        OwnsNetwork.calls.append("load_method_state")

    def on_train_start(self, run) -> None:
        OwnsNetwork.calls.append("on_train_start")
        self.run = run

    def attack_spec(self, threat):
        return None

    def loss(self, ctx: BatchContext) -> LossOutput:
        total = nn.functional.cross_entropy(ctx.student(ctx.x), ctx.y) + nn.functional.cross_entropy(
            self.second(ctx.x), ctx.y
        )
        return LossOutput(total)


def test_on_setup_sees_the_real_run_before_the_optimiser_and_before_a_resume(tmp_path):
    host = PluginHost.create(autoload=False, extra=[_registering(OwnsNetwork)])
    config = tiny_digits_config(tmp_path / "run", method={"name": "owns-network"}, optim={"epochs": 1, "lr": 0.05})
    OwnsNetwork.calls.clear()
    run = train(config, host=host)
    method = run.distiller
    assert isinstance(method, OwnsNetwork)
    setup = method.seen
    # the real student and teachers, the data's shape
    assert setup.student is run.student and setup.teachers is run.teachers
    assert (setup.num_classes, setup.in_channels, setup.image_size) == (10, 1, 8)
    assert setup.example_input(3).shape == (3, 1, 8, 8)
    # a fresh network like the student: same architecture and parameter shapes, other weights
    assert type(method.second) is type(run.student)
    shapes = [p.shape for p in run.student.parameters()]
    assert [p.shape for p in method.second.parameters()] == shapes
    # ... and it is in the optimiser
    optimised = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in optimised for p in method.second.parameters())
    assert OwnsNetwork.calls == ["on_setup", "on_train_start"]
    OwnsNetwork.calls.clear()
    config = tiny_digits_config(tmp_path / "run", method={"name": "owns-network"}, optim={"epochs": 2, "lr": 0.05})
    resumed = train(config, host=host, resume=True)
    assert OwnsNetwork.calls == ["on_setup", "load_method_state", "on_train_start"]
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert any(key.startswith("second.") for key in saved["distiller"])
    assert resumed.epoch == 2


def _registering(cls: type[Distiller]) -> object:
    class Plugin:
        @staticmethod
        def rbkd_register_methods(registry):
            registry.add(cls)

    from robustbench_kd.hookspecs import hookimpl

    Plugin.rbkd_register_methods = hookimpl(Plugin.rbkd_register_methods)  # type: ignore[method-assign]
    Plugin.__name__ = f"test-{cls.name}"
    return Plugin


# -- the contract catches a network outside the optimiser ------------------------------------------------
class LazyNatural(Distiller):
    """The trap: a network built from ``ctx.student`` on the first batch, after the optimiser exists."""

    name = "lazy-natural"
    paper = "test"

    def attack_spec(self, threat):
        return None

    def loss(self, ctx: BatchContext) -> LossOutput:
        if not hasattr(self, "natural"):
            self.natural = type(ctx.student)(num_classes=4)  # TinyNet: trains, never optimised
        total = nn.functional.cross_entropy(ctx.student(ctx.x), ctx.y) + nn.functional.cross_entropy(
            self.natural(ctx.x), ctx.y
        )
        return LossOutput(total)


class HiddenNatural(LazyNatural):
    """The same trap with the network kept where no attribute walk finds it."""

    name = "hidden-natural"

    def loss(self, ctx: BatchContext) -> LossOutput:
        hidden = self.__dict__.setdefault("_hidden", [type(ctx.student)(num_classes=4)])
        total = nn.functional.cross_entropy(ctx.student(ctx.x), ctx.y) + nn.functional.cross_entropy(
            hidden[0](ctx.x), ctx.y
        )
        return LossOutput(total)


def test_contract_fails_a_network_built_lazily_and_names_its_parameters(host):
    with pytest.raises(AssertionError) as failure:
        check_distiller(LazyNatural, host=host)
    message = str(failure.value)
    assert message.startswith("lazy-natural: parameters received a gradient but are not in the optimiser: ")
    assert "natural.conv.weight" in message and "natural.fc.bias" in message and "on_setup()" in message


def test_contract_fails_a_trained_tensor_held_outside_the_distiller(host):
    with pytest.raises(AssertionError, match=r"hidden-natural: .* a tensor of shape \(8, 1, 3, 3\) held outside"):
        check_distiller(HiddenNatural, host=host)


class ForgetsState(Distiller):
    """Keeps a running count in a plain attribute: a resume would lose it."""

    name = "forgets-state"
    paper = "test"

    def __init__(self, config=None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        self.steps = 0

    def attack_spec(self, threat):
        return None

    def loss(self, ctx: BatchContext) -> LossOutput:
        return LossOutput(nn.functional.cross_entropy(ctx.student(ctx.x), ctx.y) * (1 + self.steps))

    def after_step(self, ctx, out) -> None:
        self.steps += 1


def test_contract_fails_state_a_resume_would_lose(host):
    with pytest.raises(AssertionError, match=r"forgets-state: after a resume the next step's loss differs"):
        check_distiller(ForgetsState, host=host)


def test_the_example_lbgat_passes_the_contract(host, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from rbkd_lbgat import LBGAT

    check_distiller(LBGAT, host=host)


# -- the example method that owns a network, through the CLI -----------------------------------------------
def test_lbgat_resumes_bitwise_through_the_cli_and_learns(tmp_path, monkeypatch, capsys):
    """Interrupted after epoch 1 and resumed = uninterrupted: student, natural classifier, optimiser state."""
    install_plugin(tmp_path / "site", monkeypatch, dist="rbkd-examples", entry_points={"lbgat": "rbkd_lbgat"})
    monkeypatch.syspath_prepend(str(EXAMPLE))
    method = {"name": "lbgat", "beta": 6.0}
    data = {"n_train": 1500, "batch_size": 50}  # 60 steps: enough to leave chance on the digits
    whole = run_file(tmp_path, tmp_path / "whole", method, data=data, optim={"lr": 0.1})
    assert main(["distill", str(whole)]) == 0

    real = checkpoints.write_checkpoints

    def interrupt_after_epoch_one(run, *, improved=False):
        real(run, improved=improved)
        if run.epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_checkpoints", interrupt_after_epoch_one)
    parts = run_file(tmp_path, tmp_path / "parts", method, data=data, optim={"lr": 0.1})
    assert main(["distill", str(parts)]) == 130
    monkeypatch.setattr(checkpoints, "write_checkpoints", real)
    assert main(["distill", str(parts), "--resume"]) == 0

    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "parts" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    natural = [key for key in a["distiller"] if key.startswith("natural.")]
    assert natural and all(torch.equal(a["distiller"][k], b["distiller"][k]) for k in a["distiller"])
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    parameters = len(a["student"]) - _buffers(a["student"]) + len(natural) - _buffers(natural)
    assert len(state_a) == parameters  # one momentum buffer per parameter: the natural classifier's are there
    assert all(torch.equal(state_a[i]["momentum_buffer"], state_b[i]["momentum_buffer"]) for i in state_a)
    result = json.loads((tmp_path / "whole" / "results" / "rbkd_student.json").read_text())
    assert result["accuracy"]["clean"] > 0.2  # ten classes: chance is 0.1


def _buffers(state) -> int:
    return sum(1 for key in state if key.endswith(("running_mean", "running_var", "num_batches_tracked")))


# -- what a user sees when a plugin fails -------------------------------------------------------------------
BROKEN = """
    from dataclasses import dataclass

    from torch import nn

    from robustbench_kd import Distiller, LossOutput, MethodConfig, UserError, hookimpl, option


    class Broken(Distiller):
        name = "broken"
        paper = "test"

        @dataclass(frozen=True, kw_only=True)
        class Config(MethodConfig):
            fail_in: str = option("nothing", help="where to fail")
            layers: int = option(1, integer=True, low=1, help="layers of the owned network")

        def on_setup(self, setup):
            self.head = nn.Sequential(*[nn.Linear(10, 10) for _ in range(self.config.layers)])

        def on_train_start(self, run):
            if self.config.fail_in == "on_train_start-user":
                raise UserError("broken: this run cannot start (a reason the method gives)")
            if self.config.fail_in == "on_train_start":
                raise ZeroDivisionError("division by zero")

        def attack_spec(self, threat):
            return None

        def loss(self, ctx):
            if self.config.fail_in == "loss":
                {}["missing"]
            return LossOutput(nn.functional.cross_entropy(self.head(ctx.student(ctx.x)), ctx.y))


    @hookimpl
    def rbkd_register_methods(registry):
        registry.add(Broken)
"""


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    install_plugin(
        tmp_path / "site", monkeypatch, dist="rbkd-broken", entry_points={"broken": "rbkd_broken"}, source=BROKEN
    )


def test_user_error_in_on_train_start_writes_nothing(tmp_path, broken_plugin, capsys):
    out = tmp_path / "run"
    assert main(["distill", str(run_file(tmp_path, out, {"name": "broken", "fail_in": "on_train_start-user"}))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "robustbench-kd: error: broken: this run cannot start (a reason the method gives)"
    assert not out.exists()


def test_resume_with_a_changed_method_is_one_line_naming_method_distribution_and_keys(tmp_path, broken_plugin, capsys):
    out = tmp_path / "run"
    path = run_file(tmp_path, out, {"name": "broken"}, optim={"epochs": 1})
    assert main(["distill", str(path), "--no-eval"]) == 0
    # The plugin's next version builds a deeper head: the checkpoint no longer fits.
    raw = yaml.safe_load(path.read_text())
    raw["optim"]["epochs"] = 2
    path.write_text(yaml.safe_dump(raw))
    module = sys.modules["rbkd_broken"]
    original = module.Broken.on_setup
    module.Broken.on_setup = lambda self, setup: setattr(
        self, "head", nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 10))
    )
    try:
        assert main(["distill", str(path), "--resume", "--no-eval"]) == 2
    finally:
        module.Broken.on_setup = original
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "method 'broken' (plugin 'broken' from rbkd-broken 0.1.0)" in err
    assert "missing key(s) head.1.weight, head.1.bias" in err


def test_resume_into_a_network_of_another_shape_is_one_line(tmp_path, monkeypatch):
    host = PluginHost.create(autoload=False, extra=[_registering(OwnsNetwork)])
    config = tiny_digits_config(tmp_path / "run", method={"name": "owns-network"}, optim={"epochs": 1})
    train(config, host=host)
    monkeypatch.setattr(OwnsNetwork, "on_setup", lambda self, setup: setattr(self, "second", nn.Linear(3, 10)))
    config = tiny_digits_config(tmp_path / "run", method={"name": "owns-network"}, optim={"epochs": 2})
    with pytest.raises(UserError) as failure:
        train(config, host=host, resume=True)
    message = str(failure.value)
    assert "\n" not in message and message.startswith("cannot resume ")
    assert "method 'owns-network' (plugin 'test-owns-network' from (registered in code))" in message


def test_adopt_attributes_brings_back_what_loss_set_on_the_ddp_view():
    ctx = BatchContext(
        x=torch.zeros(2, 1), y=torch.zeros(2, dtype=torch.long), student=nn.Identity(), teachers=None, threat=None
    )  # type: ignore[arg-type]
    view = ctx.with_student(nn.Linear(1, 1))
    view.extras["k"] = 1
    view.cached = "from loss"  # type: ignore[attr-defined]
    ctx.adopt_attributes(view)
    assert ctx.cached == "from loss" and ctx.extras == {"k": 1}  # type: ignore[attr-defined]
    assert isinstance(ctx.student, nn.Identity)


@pytest.mark.parametrize("where", ["loss", "on_train_start"])
def test_a_crash_in_plugin_code_is_one_line_naming_plugin_distribution_and_function(
    tmp_path, broken_plugin, capsys, where
):
    out = tmp_path / "run"
    assert main(["distill", str(run_file(tmp_path, out, {"name": "broken", "fail_in": where}))]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(
        f"robustbench-kd: error: plugin 'broken' from rbkd-broken 0.1.0 failed in rbkd_broken.Broken.{where} ("
    )
    assert err.endswith("; run with --debug for the traceback")
    assert out.exists() == (where == "loss")  # a run that never finished its set-up leaves nothing behind


def test_debug_shows_the_plugin_traceback(tmp_path, broken_plugin):
    with pytest.raises(ZeroDivisionError):
        main(
            [
                "--debug",
                "distill",
                str(run_file(tmp_path, tmp_path / "run", {"name": "broken", "fail_in": "on_train_start"})),
            ]
        )
