"""Plugin host: built-ins, entry points, blocking, duplicates, check_pending, the third-party example."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

from robustbench_kd import hookimpl
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import BUILTIN_PLUGINS, PluginHost

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "third_party_plugin"


def install_fake_distribution(
    tmp_path: Path, monkeypatch, *, dist: str, version: str, entry_points: str, modules: dict[str, str] | None = None
) -> None:
    """Make an importable 'installed' distribution: a dist-info with entry_points.txt on sys.path."""
    info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, source in (modules or {}).items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))


#: A third-party plugin with one method, for the tests that find one distribution in two places.
TWICE_PLUGIN = """
    from robustbench_kd import Distiller, hookimpl


    class Twice(Distiller):
        \"\"\"A method whose distribution is found twice on sys.path.\"\"\"

        name = "twice"
        paper = "Nobody. Found Twice. 2025"

        def attack_spec(self, threat):
            return None

        def loss(self, ctx):
            raise NotImplementedError


    @hookimpl
    def rbkd_register_methods(registry):
        registry.add(Twice)
"""


def write_egg_info(folder: Path, *, dist: str, version: str, entry_points: str) -> Path:
    """The ``X.egg-info`` a setuptools build (``pip install -e .``) leaves in a plugin's source folder."""
    info = folder / f"{dist.replace('-', '_')}.egg-info"
    info.mkdir(parents=True)
    (info / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    return info


def forget_modules_after_test(monkeypatch, *names: str) -> None:
    """Unload the named fake plugin modules when the test ends, so no other test sees this test's copy."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # monkeypatch remembers the name was absent...
        del sys.modules[name]  # ...and removes whatever the test imports under it


def install_example_plugin(tmp_path: Path, monkeypatch) -> None:
    """The real examples/third_party_plugin package, 'installed' through a dist-info made from its pyproject."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    points = project["entry-points"]["robustbench_kd"]
    install_fake_distribution(
        tmp_path,
        monkeypatch,
        dist=project["name"],
        version=project["version"],
        entry_points="[robustbench_kd]\n" + "".join(f"{name} = {module}\n" for name, module in points.items()),
    )
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for module in points.values():
        monkeypatch.delitem(sys.modules, module, raising=False)


def test_builtins_come_from_the_explicit_tuple(host):
    assert [n for n, _ in BUILTIN_PLUGINS] == [n for n in host.plugin_names()]
    assert host.distribution_of("rslad").startswith("robustbench_kd")


def test_each_host_is_fresh():
    a, b = PluginHost.create(autoload=False), PluginHost.create(autoload=False)
    assert a.pm is not b.pm and a.methods is not b.methods


def test_third_party_example_is_discovered_through_its_entry_point(tmp_path, monkeypatch):
    install_example_plugin(tmp_path, monkeypatch)
    host = PluginHost.create()
    assert "mart" in host.methods
    entry = host.methods.entry("mart")
    assert entry.plugin == "mart"
    assert host.distribution_of("mart") == host.distribution_of("lbgat") == "rbkd-examples 0.1.0"


def test_third_party_example_passes_the_contract(tmp_path, monkeypatch):
    from robustbench_kd.testing import check_distiller

    install_example_plugin(tmp_path, monkeypatch)
    check_distiller(PluginHost.create().methods.get("mart"))


def test_autoload_can_be_disabled_by_env(tmp_path, monkeypatch):
    install_example_plugin(tmp_path, monkeypatch)
    monkeypatch.setenv("RBKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "mart" not in PluginHost.create().methods


def test_plugins_can_be_blocked_by_env(tmp_path, monkeypatch):
    install_example_plugin(tmp_path, monkeypatch)
    monkeypatch.setenv("RBKD_DISABLE_PLUGINS", "mart,trades")
    methods = PluginHost.create().methods
    assert "mart" not in methods and "trades" not in methods and "rslad" in methods


def test_duplicate_plugin_names_name_both_distributions(tmp_path, monkeypatch):
    install_fake_distribution(
        tmp_path,
        monkeypatch,
        dist="evil-rslad",
        version="9.9",
        entry_points="[robustbench_kd]\nrslad = fake_rslad\n",
        modules={"fake_rslad": "X = 1\n"},
    )
    with pytest.raises(UserError) as info:
        PluginHost.create()
    message = str(info.value)
    assert "'rslad'" in message and "evil-rslad 9.9" in message and "robustbench_kd" in message
    # The advice removes the newcomer, says where it lives, and warns that blocking by name drops both.
    assert str(tmp_path / "evil_rslad-9.9.dist-info") in message and "pip uninstall evil-rslad" in message
    assert "RBKD_DISABLE_PLUGINS=rslad would skip both" in message and "\n" not in message


def test_one_distribution_found_in_two_metadata_folders_is_one_plugin(tmp_path, monkeypatch):
    """An egg-info in the source folder plus the installed dist-info of the same release: registered once."""
    forget_modules_after_test(monkeypatch, "rbkd_twice")
    entry_points = "[robustbench_kd]\ntwice = rbkd_twice\n"
    install_fake_distribution(
        tmp_path / "site",
        monkeypatch,
        dist="rbkd-twice",
        version="0.1.0",
        entry_points=entry_points,
        modules={"rbkd_twice": TWICE_PLUGIN},
    )
    # Spelt with an underscore here: the same distribution under its PEP 503 name.
    write_egg_info(tmp_path / "src", dist="rbkd_twice", version="0.1.0", entry_points=entry_points)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    host = PluginHost.create()
    assert host.plugin_names().count("twice") == 1
    assert "twice" in host.methods and host.methods.entry("twice").plugin == "twice"


def test_methods_runs_from_an_installed_plugins_source_folder(tmp_path):
    """`robustbench-kd methods` in the source folder of a plugin installed with `pip install -e .`.

    The folder holds the plugin module and the egg-info of its build; the installed copy's dist-info is
    elsewhere on the path. The current directory is on sys.path, so both metadata copies are found.
    """
    source, site = tmp_path / "rbkd-twice", tmp_path / "site"
    entry_points = "[robustbench_kd]\ntwice = rbkd_twice\n"
    source.mkdir()
    (source / "rbkd_twice.py").write_text(textwrap.dedent(TWICE_PLUGIN))
    write_egg_info(source, dist="rbkd-twice", version="0.1.0", entry_points=entry_points)
    info = site / "rbkd_twice-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rbkd-twice\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBKD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "robustbench_kd.cli", "methods"],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    row = next((line for line in proc.stdout.splitlines() if line.startswith("twice ")), "")
    assert "rbkd-twice 0.1.0" in row and "Found Twice" in row


def test_two_versions_of_one_distribution_name_both_metadata_folders(tmp_path, monkeypatch):
    """A stale egg-info (0.1.0) next to the installed 0.2.0: one line saying where each copy lives."""
    forget_modules_after_test(monkeypatch, "rbkd_twice")
    entry_points = "[robustbench_kd]\ntwice = rbkd_twice\n"
    install_fake_distribution(
        tmp_path / "site",
        monkeypatch,
        dist="rbkd-twice",
        version="0.2.0",
        entry_points=entry_points,
        modules={"rbkd_twice": TWICE_PLUGIN},
    )
    stale = write_egg_info(tmp_path / "src", dist="rbkd-twice", version="0.1.0", entry_points=entry_points)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    with pytest.raises(UserError) as info:
        PluginHost.create()
    message = str(info.value)
    installed = tmp_path / "site" / "rbkd_twice-0.2.0.dist-info"
    assert message.startswith("plugin 'twice' is provided by two copies of rbkd-twice: ")
    assert f"0.1.0 ({stale})" in message and f"0.2.0 ({installed})" in message
    assert "delete the stale one of these metadata folders" in message and "pip uninstall rbkd-twice" in message
    # Both copies carry the same plugin name: blocking it would leave neither.
    assert "RBKD_DISABLE_PLUGINS" not in message and "\n" not in message


def test_two_entry_points_loading_one_module_are_one_line(tmp_path, monkeypatch):
    forget_modules_after_test(monkeypatch, "rbkd_twice")
    install_fake_distribution(
        tmp_path,
        monkeypatch,
        dist="rbkd-twice",
        version="0.1.0",
        entry_points="[robustbench_kd]\ntwice = rbkd_twice\nagain = rbkd_twice\n",
        modules={"rbkd_twice": TWICE_PLUGIN},
    )
    with pytest.raises(UserError) as info:
        PluginHost.create()
    message = str(info.value)
    assert "plugins 'twice' from rbkd-twice 0.1.0" in message and "'again' from rbkd-twice 0.1.0" in message
    assert "load the same object 'rbkd_twice'" in message and "RBKD_DISABLE_PLUGINS=again" in message
    assert "\n" not in message


def test_duplicate_method_keys_name_both_plugins():
    class Impostor:
        @staticmethod
        @hookimpl
        def rbkd_register_methods(registry):
            from robustbench_kd_plugins.rslad import RSLAD

            registry.add(RSLAD)

    host = PluginHost.create(autoload=False, extra=[Impostor])
    with pytest.raises(UserError, match=r"registered twice: by plugin 'rslad' and by plugin 'Impostor'"):
        _ = host.methods


def test_unknown_hook_fails_check_pending():
    class Typo:
        @staticmethod
        @hookimpl
        def rbkd_register_method(registry):  # missing "s"
            pass

    with pytest.raises(UserError, match="unknown hook"):
        PluginHost.create(autoload=False, extra=[Typo])


def test_plugin_that_raises_at_import_is_named(tmp_path, monkeypatch):
    install_fake_distribution(
        tmp_path,
        monkeypatch,
        dist="broken-plugin",
        version="0.1",
        entry_points="[robustbench_kd]\nbroken = broken_mod\n",
        modules={"broken_mod": "raise ImportError('needs torch 9')\n"},
    )
    with pytest.raises(UserError, match=r"plugin 'broken' from broken-plugin 0.1 failed to import") as info:
        PluginHost.create()
    assert str(info.value).endswith("; run with --debug for the traceback")
    assert isinstance(info.value.__cause__, ImportError)  # what --debug shows


def test_import_failure_with_a_multi_line_message_is_one_line(tmp_path, monkeypatch):
    forget_modules_after_test(monkeypatch, "broken_lines")
    install_fake_distribution(
        tmp_path,
        monkeypatch,
        dist="broken-lines",
        version="0.1",
        entry_points="[robustbench_kd]\nlines = broken_lines\n",
        modules={"broken_lines": "raise RuntimeError('first line\\n  second line')\n"},
    )
    with pytest.raises(UserError) as info:
        PluginHost.create()
    message = str(info.value)
    assert "failed to import (RuntimeError: first line second line)" in message and "\n" not in message


def test_firstresult_attack_override_beats_the_builtin(host):
    def sentinel(x, y):  # an attack is a callable attack(x, y)
        return x

    class MyAttack:
        @staticmethod
        @hookimpl
        def rbkd_make_attack(spec):
            return sentinel

    host = PluginHost.create(autoload=False, extra=[MyAttack])
    assert host.make_attack(distiller=None, student=None, spec=None, loss_fn=None) is sentinel


def test_unknown_method_lists_close_matches(host):
    with pytest.raises(UserError, match=r"unknown method 'rslda' \(did you mean: rslad"):
        host.methods.get("rslda")


def test_every_hook_is_documented_and_has_a_facade_call():
    """datasette-style meta-test: hookspecs stay documented and reachable through PluginHost."""
    from robustbench_kd import hookspecs

    specs = [n for n in dir(hookspecs) if n.startswith("rbkd_")]
    assert specs
    facade = {n for n in dir(PluginHost) if not n.startswith("_")}
    for name in specs:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"
        short = name.removeprefix("rbkd_").removeprefix("register_")
        assert short in facade, f"PluginHost has no method for {name}"


def test_third_party_example_shows_in_methods_and_trains(tmp_path, monkeypatch, capsys):
    """The example package: listed by `robustbench-kd methods` with its distribution, trained by `distill`."""
    from robustbench_kd.cli import main

    install_example_plugin(tmp_path / "site", monkeypatch)
    assert main(["methods"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("mart "))
    assert "rbkd-examples 0.1.0" in row and "ICLR 2020" in row
    config = tmp_path / "run.toml"
    config.write_text(
        f'[run]\nname = "MartExample"\nout_dir = "{tmp_path / "run"}"\nprogress = false\n'
        '[data]\nn_train = 128\n[threat]\nsteps = 2\nalpha = 0.1\n[method]\nname = "mart"\n'
        '[optim]\nepochs = 1\n[eval]\nattacks = ["clean", "pgd"]\nfinal_n_examples = 32\npgd_steps = 2\n'
    )
    assert main(["distill", str(config)]) == 0
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"bce"' in metrics and '"kl_weighted"' in metrics


def test_readme_documents_every_hook():
    from robustbench_kd import hookspecs

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in (n for n in dir(hookspecs) if n.startswith("rbkd_")):
        assert f"`{name}(" in readme, f"README's hook table misses {name}"


def test_a_factory_is_handed_out_checked_and_kept_as_registered():
    """``get`` wraps a factory in the check of its result (attributes and signature kept); ``entry`` keeps it."""
    import inspect

    from robustbench_kd.registry import PluginFailure, Registry

    def loader(spec, ctx, *, strict=False):
        return spec

    loader.verifies_sha256 = True
    registry = Registry("teacher source", origins=lambda plugin: "rbkd-x 0.1")
    registry.bound("x").add("x", loader)
    checked = registry.get("x")
    assert registry.entry("x").value is loader
    assert checked.verifies_sha256 is True and inspect.signature(checked) == inspect.signature(loader)
    net = torch.nn.Linear(2, 2)
    assert checked(net, None) is net
    with pytest.raises(PluginFailure) as info:
        checked("not a network", None)
    assert str(info.value).startswith(
        "plugin 'x' from rbkd-x 0.1: its teacher source 'x' returned 'not a network' (str), not a torch.nn.Module"
    )


@pytest.mark.parametrize(
    ("name", "value", "phrase"),
    [
        ("with space", lambda **kw: None, "under the name 'with space' (str)"),
        ("", lambda **kw: None, "under the name '' (str)"),
        ("a:b", lambda **kw: None, "under the name 'a:b' (str)"),
        ("ok", "not callable", "as 'not callable' (str), which is not callable"),
    ],
)
def test_registered_names_and_values_are_checked_when_registered(name, value, phrase):
    from robustbench_kd.registry import Registry

    registry = Registry("student architecture", origins=lambda plugin: "rbkd-x 0.1")
    with pytest.raises(UserError, match=r"^plugin 'x' from rbkd-x 0\.1 registers") as info:
        registry.bound("x").add(name, value)
    assert phrase in str(info.value) and "RBKD_DISABLE_PLUGINS=x" in str(info.value)


def test_an_attack_that_is_not_callable_names_the_plugins_that_build_attacks():
    from robustbench_kd.plugin_host import plugin_failure
    from robustbench_kd.registry import PluginFailure

    class NotAnAttack:
        @staticmethod
        @hookimpl
        def rbkd_make_attack(spec):
            return "pgd"

    host = PluginHost.create(autoload=False, extra=[NotAnAttack])
    with pytest.raises(PluginFailure) as info:
        host.make_attack(distiller=None, student=None, spec=None, loss_fn=None)
    message = plugin_failure(info.value)
    assert message is not None and message.startswith("rbkd_make_attack returned 'pgd' (str), not a callable")
    assert "the plugins 'NotAnAttack' from (registered in code);" in message and "\n" not in message
