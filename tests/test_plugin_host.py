"""Plugin host: built-ins, entry points, blocking, duplicates, check_pending, the third-party example."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

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


def install_example_plugin(tmp_path: Path, monkeypatch) -> None:
    """The real examples/third_party_plugin package, 'installed' through a dist-info."""
    install_fake_distribution(
        tmp_path, monkeypatch, dist="rbkd-mart", version="0.1.0", entry_points="[robustbench_kd]\nmart = rbkd_mart\n"
    )
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "rbkd_mart", raising=False)


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
    assert host.distribution_of("mart") == "rbkd-mart 0.1.0"


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
    with pytest.raises(UserError, match=r"plugin 'broken' from broken-plugin 0.1 failed to import"):
        PluginHost.create()


def test_firstresult_attack_override_beats_the_builtin(host):
    sentinel = object()

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
    assert "rbkd-mart 0.1.0" in row and "ICLR 2020" in row
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
