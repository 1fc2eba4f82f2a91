"""plugin_failure: an exception raised in a third-party plugin's code becomes one line naming the plugin.

Each test installs a fake distribution (a dist-info whose entry point names a package written to a
temporary folder on sys.path), loads it through ``PluginHost.create()``, calls into its code for real
and hands the exception to :func:`plugin_failure`, as the command line's last-resort handler does.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost, plugin_failure

#: The package of the fake plugin 'crashy': every kind of plugin code, each failing in its own way.
CRASHY = {
    "__init__.py": """
        from robustbench_kd import Distiller, hookimpl
        from robustbench_kd.errors import UserError

        from rbkd_crashy import parts


        class Crashy(Distiller):
            \"\"\"A method that fails in __init__ (without classes) and in loss.\"\"\"

            name = "crashy"

            def __init__(self, config=None, *, num_classes=10):
                super().__init__(config, num_classes=num_classes)
                if num_classes < 2:
                    raise ValueError(f"needs two classes, got {num_classes}")

            def attack_spec(self, threat):
                return None

            def loss(self, ctx):
                return parts.ratio(1.0, 0)

            def after_step(self, ctx, out):
                from robustbench_kd_plugins.trades import TRADES

                TRADES().loss(ctx)  # a built-in method's code, called by this plugin with a bad context


        def student(*, num_classes, in_channels, image_size, **options):
            raise RuntimeError("CUDA error: an illegal memory access was encountered\\n  compile with TORCH_USE_DSA")


        def teacher(spec, ctx):
            raise KeyError("state_dict")


        def dataset(config):
            return parts.load(config)


        @hookimpl
        def rbkd_register_methods(registry):
            registry.add(Crashy)


        @hookimpl
        def rbkd_register_students(registry):
            registry.add("crashy-net", student)


        @hookimpl
        def rbkd_register_teacher_sources(registry):
            registry.add("crashy", teacher)


        @hookimpl
        def rbkd_register_datasets(registry):
            registry.add("crashy-data", dataset)


        @hookimpl
        def rbkd_epoch_end(run, epoch, metrics):
            metrics["crashy.mean"] = metrics["loss"] / epoch


        @hookimpl
        def rbkd_train_start(run):
            raise KeyboardInterrupt


        @hookimpl
        def rbkd_train_end(run, metrics):
            raise SystemExit(3)


        @hookimpl
        def rbkd_model_info(info, run):
            raise UserError("model_info needs a paper link")
    """,
    "parts.py": """
        def ratio(a, b):
            return a / b


        def load(config):
            return config.images[0]
    """,
}


def install_plugin(
    root: Path, monkeypatch, *, dist: str, version: str, entry_points: str, files: dict[str, str]
) -> None:
    """An 'installed' distribution in ``root``: its dist-info and its source files, ``root`` on sys.path."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[robustbench_kd]\n{entry_points}\n")
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(root))
    for name in map(module_name, files):
        # Remembered as absent and removed when the test ends, so the next test imports its own copy.
        monkeypatch.setitem(sys.modules, name, None)
        del sys.modules[name]


def module_name(relative: str) -> str:
    """``pkg/sub.py`` -> ``pkg.sub``; ``pkg/__init__.py`` -> ``pkg``."""
    parts = Path(relative).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.fixture
def crashy(tmp_path, monkeypatch) -> PluginHost:
    """A host with the plugin 'crashy' of the distribution rbkd-crashy 0.3.1 loaded."""
    install_plugin(
        tmp_path,
        monkeypatch,
        dist="rbkd-crashy",
        version="0.3.1",
        entry_points="crashy = rbkd_crashy",
        files={f"rbkd_crashy/{name}": source for name, source in CRASHY.items()},
    )
    host = PluginHost.create()
    assert host.distribution_of("crashy") == "rbkd-crashy 0.3.1"
    return host


def raised_by(call, *args, **kwargs) -> BaseException:
    """The exception ``call`` raises (BaseException included, as the CLI would see it)."""
    try:
        call(*args, **kwargs)
    except BaseException as exc:
        return exc
    raise AssertionError(f"{call} did not raise")


SUFFIX = "; run with --debug for the traceback"


def test_a_method_loss_names_the_plugin_distribution_and_innermost_function(crashy):
    method = crashy.methods.get("crashy")()
    exc = raised_by(method.loss, None)
    assert isinstance(exc, ZeroDivisionError)
    assert plugin_failure(exc) == (
        "plugin 'crashy' from rbkd-crashy 0.3.1 failed in rbkd_crashy.parts.ratio "
        "(ZeroDivisionError: float division by zero)" + SUFFIX
    )


def test_a_method_init_is_named_by_its_qualified_name(crashy):
    exc = raised_by(crashy.methods.get("crashy"), num_classes=1)
    assert plugin_failure(exc) == (
        "plugin 'crashy' from rbkd-crashy 0.3.1 failed in rbkd_crashy.Crashy.__init__ "
        "(ValueError: needs two classes, got 1)" + SUFFIX
    )


def test_a_student_factory_with_a_multi_line_message_is_one_line(crashy):
    exc = raised_by(crashy.students.get("crashy-net"), num_classes=10, in_channels=3, image_size=32)
    message = plugin_failure(exc)
    assert message is not None and "\n" not in message
    expected = "failed in rbkd_crashy.student (RuntimeError: CUDA error: an illegal memory access was encountered "
    assert expected in message
    assert "compile with TORCH_USE_DSA)" in message


def test_a_teacher_source_and_a_dataset_loader_are_named(crashy):
    teacher = plugin_failure(raised_by(crashy.teacher_sources.get("crashy"), None, None))
    assert teacher == (
        "plugin 'crashy' from rbkd-crashy 0.3.1 failed in rbkd_crashy.teacher (KeyError: 'state_dict')" + SUFFIX
    )
    dataset = plugin_failure(raised_by(crashy.datasets.get("crashy-data"), object()))
    assert dataset is not None
    assert "failed in rbkd_crashy.parts.load (AttributeError: 'object' object has no attribute 'images')" in dataset


def test_an_observer_hook_called_through_pluggy_is_named(crashy):
    exc = raised_by(crashy.epoch_end, None, 0, {"loss": 1.0})
    assert plugin_failure(exc) == (
        "plugin 'crashy' from rbkd-crashy 0.3.1 failed in rbkd_crashy.rbkd_epoch_end "
        "(ZeroDivisionError: float division by zero)" + SUFFIX
    )


def test_built_in_code_called_by_the_plugin_is_blamed_on_the_plugin(crashy):
    """The innermost third-party frame counts: the built-in TRADES failed because the plugin misused it."""
    exc = raised_by(crashy.methods.get("crashy")().after_step, None, None)
    message = plugin_failure(exc)
    assert message is not None and message.startswith(
        "plugin 'crashy' from rbkd-crashy 0.3.1 failed in rbkd_crashy.Crashy.after_step (AttributeError: "
    )


def test_a_crash_in_built_in_code_keeps_its_traceback(crashy):
    """No third-party frame on the stack: a bug of the project, re-raised by the caller (None)."""
    exc = raised_by(crashy.methods.get("trades")().loss, None)
    assert isinstance(exc, AttributeError)
    assert plugin_failure(exc) is None
    assert plugin_failure(raised_by(crashy.students.get("small-cnn"), num_classes=10, in_channels=1)) is None


def test_an_exception_raised_from_a_plugin_error_names_the_plugin(crashy):
    """Code that wraps a plugin's exception (``raise ... from exc``) still points at the plugin."""
    method = crashy.methods.get("crashy")()
    try:
        try:
            method.loss(None)
        except ZeroDivisionError as exc:
            raise RuntimeError("the step failed") from exc
    except RuntimeError as wrapped:
        message = plugin_failure(wrapped)
    assert message is not None and "failed in rbkd_crashy.parts.ratio (ZeroDivisionError: " in message


def test_interrupts_and_user_errors_from_a_plugin_are_not_reported(crashy):
    """KeyboardInterrupt keeps its own handling (Ctrl-C interrupts); a UserError is already one line."""
    interrupt = raised_by(crashy.train_start, None)
    assert isinstance(interrupt, KeyboardInterrupt) and plugin_failure(interrupt) is None
    user_error = raised_by(crashy.model_info, {}, None)
    assert isinstance(user_error, UserError) and plugin_failure(user_error) is None


def test_sys_exit_in_a_plugin_is_a_failure_naming_it(crashy):
    """A plugin calling sys.exit() must not end the command with its exit code and no word of why."""
    exit_ = raised_by(crashy.train_end, None, {})
    assert isinstance(exit_, SystemExit)
    assert plugin_failure(exit_) == (
        "plugin 'crashy' from rbkd-crashy 0.3.1 failed in rbkd_crashy.rbkd_train_end (SystemExit: 3)" + SUFFIX
    )
    # This project's own SystemExit (none is raised today) keeps its exit code: the caller re-raises it.
    assert plugin_failure(raised_by(sys.exit, 4)) is None


def test_an_exception_without_plugin_frames_is_none(crashy):
    assert plugin_failure(raised_by(int, "x")) is None
    assert plugin_failure(ValueError("never raised, so no traceback")) is None


def test_plugins_sharing_a_package_are_told_apart(tmp_path, monkeypatch):
    """Two entry points in one namespace package: the most specific module prefix names the plugin."""
    hooks = """
        from robustbench_kd import hookimpl


        @hookimpl
        def rbkd_epoch_start(run, epoch):
            if epoch == {epoch}:
                raise OSError("{name} cannot write")
    """
    install_plugin(
        tmp_path,
        monkeypatch,
        dist="acme-tools",
        version="2.0",
        entry_points="alpha = acme_rbkd.alpha\nbeta = acme_rbkd.beta",
        files={
            "acme_rbkd/__init__.py": "",
            "acme_rbkd/alpha.py": hooks.format(epoch=1, name="alpha"),
            "acme_rbkd/beta.py": hooks.format(epoch=2, name="beta"),
        },
    )
    host = PluginHost.create()
    message = plugin_failure(raised_by(host.epoch_start, None, 2))
    assert message == (
        "plugin 'beta' from acme-tools 2.0 failed in acme_rbkd.beta.rbkd_epoch_start (OSError: beta cannot write)"
        + SUFFIX
    )
