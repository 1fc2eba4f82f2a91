"""Method options: the kinds annotations declare, checked once for every Config; ``methods --options``."""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pytest
import yaml

from robustbench_kd.cli import main
from robustbench_kd.config import load_config
from robustbench_kd.distiller import Distiller, LossOutput, MethodConfig, describe_options, option, option_types
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.testing.runs import tiny_digits_raw
from robustbench_kd.training.builders import build_distiller

if TYPE_CHECKING:
    from decimal import Decimal  # never imported at run time: the annotation below cannot be resolved


class Kinds(Distiller):
    """A method with one option of every kind."""

    name = "kinds"
    paper = "test"

    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        flag: bool = option(False, help="a switch")
        count: int = option(3, low=0, integer=True, help="a count")
        rate: float = option(0.5, help="a rate")
        label: str = option("a", help="a label")
        mode: Literal["fast", "slow"] = option("fast", help="a mode")
        limit: float | None = option(None, help="an optional number")
        steps: int | None = option(7, low=0, help="an optional count with a default")
        weights: list[float] = option(default_factory=list, low=0, help="a list")
        milestones: tuple[int, ...] = option((), help="a tuple")
        table: dict[str, float] = option(default_factory=dict, help="a table")
        extras: Mapping[str, Any] = option(default_factory=dict, help="a table of anything")
        anything: Any = option(None, help="anything")
        natural_options: dict[str, float] = None  # type: ignore[assignment]  # a None default: None is accepted

    def loss(self, ctx: Any) -> LossOutput:
        raise NotImplementedError


ACCEPTED = [
    ("flag", True, True),
    ("count", 4, 4),
    ("rate", 2, 2.0),  # an int for a float: stored as a float
    ("rate", 0.25, 0.25),
    ("label", "b", "b"),
    ("mode", "slow", "slow"),
    ("limit", None, None),
    ("limit", 1, 1.0),
    ("steps", None, None),
    ("weights", [1, 2.5], [1.0, 2.5]),
    ("weights", (1,), [1.0]),
    ("milestones", [3, 4], (3, 4)),  # a TOML array for a tuple option: stored as a tuple
    ("table", {"a": 1}, {"a": 1.0}),
    ("extras", {"x": [1, "y"]}, {"x": [1, "y"]}),
    ("anything", [object], [object]),
    ("natural_options", {"a": 0.5}, {"a": 0.5}),
    ("natural_options", None, None),
]

REFUSED = [
    ("flag", 1, "true or false (default False), got 1"),
    ("count", True, "an integer (default 3), got True"),
    ("count", 2.5, "an integer (default 3), got 2.5"),
    ("rate", True, "a number (default 0.5), got True"),
    ("rate", "0.5", "a number (default 0.5), got '0.5'"),
    ("label", 3, "a string (default 'a'), got 3"),
    ("mode", "medium", "one of 'fast', 'slow' (default 'fast'), got 'medium'"),
    ("limit", "x", "a number or none (default None), got 'x'"),
    ("steps", 1.5, "an integer or none (default 7), got 1.5"),
    ("weights", [1, "x"], "a list of numbers (default []), got [1, 'x']"),
    ("weights", "1, 2", "a list of numbers (default []), got '1, 2'"),
    ("milestones", [1.5], "a list of integers (default ()), got [1.5]"),
    ("table", {"a": "x"}, "a table of strings to numbers (default {}), got {'a': 'x'}"),
    ("table", [1], "a table of strings to numbers (default {}), got [1]"),
    ("extras", 3, "a table (default {}), got 3"),
    ("natural_options", 7, "a table of strings to numbers or none (default None), got 7"),
    # Whatever the annotation and rule: no NaN, no infinity, no integer beyond 64 bits (torch overflows).
    ("rate", float("nan"), "a finite number (default 0.5), got nan"),
    ("limit", float("-inf"), "a finite number (default None), got -inf"),
    ("count", 2**64, "an integer that fits 64 bits (default 3), got 18446744073709551616"),
    ("weights", [1, float("inf")], "finite numbers only (default []), got [1, inf]"),
    ("extras", {"x": [float("nan")]}, "finite numbers only (default {}), got {'x': [nan]}"),
    ("anything", -(2**70), "an integer that fits 64 bits (default None), got -1180591620717411303424"),
]


@pytest.mark.parametrize("key,value,stored", ACCEPTED, ids=[f"{k}={v!r}" for k, v, _ in ACCEPTED])
def test_each_kind_is_accepted_and_stored_as_declared(key, value, stored):
    for config in (Kinds.config_from_mapping({key: value}), Kinds.Config(**{key: value})):
        assert getattr(config, key) == stored
        assert type(getattr(config, key)) is type(stored)


@pytest.mark.parametrize("key,value,tail", REFUSED, ids=[f"{k}={v!r}" for k, v, _ in REFUSED])
def test_each_kind_refuses_other_values_in_one_line(key, value, tail):
    with pytest.raises(UserError) as info:
        Kinds.config_from_mapping({key: value})
    assert str(info.value) == f"method.{key} of method 'kinds' must be {tail}"
    with pytest.raises(UserError) as info:
        Kinds.Config(**{key: value})  # built in Python: the Config does not know its method's key
    assert str(info.value) == f"method.{key} must be {tail}"


def test_rules_apply_after_the_kind_and_to_each_value_of_a_list():
    with pytest.raises(UserError, match=re.escape("method.count must be a non-negative integer, got -1")):
        Kinds.Config(count=-1)
    with pytest.raises(UserError, match=re.escape("method.weights: each value must be >= 0, got -1.0 in [1.0, -1.0]")):
        Kinds.config_from_mapping({"weights": [1, -1]})
    assert Kinds.Config(steps=None).steps is None  # None is never checked against the rule


def test_defaults_keep_their_values_and_types():
    config = Kinds.Config()
    for f in dataclasses.fields(config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        assert getattr(config, f.name) == default and type(getattr(config, f.name)) is type(default)


def test_every_built_in_default_is_of_its_declared_kind(host):
    for entry in host.methods.entries():
        config = entry.value.Config()
        for f in dataclasses.fields(config):
            assert getattr(config, f.name) == f.default, (entry.name, f.name)
            assert type(getattr(config, f.name)) is type(f.default), (entry.name, f.name)


def test_tuple_options_keep_the_config_hashable():
    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        milestones: tuple[int, ...] = option((), help="epochs")

    assert hash(Config(milestones=[1, 2])) == hash(Config(milestones=(1, 2)))


def test_option_needs_exactly_one_default():
    with pytest.raises(TypeError, match="exactly one of a default or a default_factory"):
        option()
    with pytest.raises(TypeError, match="exactly one of a default or a default_factory"):
        option(1, default_factory=list)


class Plain(Distiller):
    """A method whose Config is a plain dataclass, not a MethodConfig."""

    name = "plain"

    @dataclass(frozen=True)
    class Config:
        beta: float = 6.0

    def loss(self, ctx: Any) -> LossOutput:
        raise NotImplementedError


def test_plain_dataclass_configs_are_checked_too():
    with pytest.raises(UserError) as info:
        Plain.config_from_mapping({"beta": "six"})
    assert str(info.value) == "method.beta of method 'plain' must be a number (default 6.0), got 'six'"
    with pytest.raises(UserError, match=re.escape("method.beta must be a number (default 6.0), got True")):
        Plain(Plain.Config(beta=True))
    assert Plain(Plain.Config(beta=2)).config.beta == 2.0


def test_an_annotation_that_cannot_be_resolved_falls_back_to_the_default():
    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        price: Decimal = 2.0  # type: ignore[assignment]
        rate: float = 0.5

    kinds = option_types(Config)
    assert kinds["price"].words == "a number" and kinds["rate"].words == "a number"
    with pytest.raises(UserError, match="must be a number"):
        Config(price="cheap")


# -- a third-party method with table options, installed as a distribution ------------------------
TABLED = '''
    from __future__ import annotations

    from dataclasses import dataclass

    from torch import nn

    from robustbench_kd import Distiller, LossOutput, MethodConfig, hookimpl, option


    class Tabled(Distiller):
        """Clean cross-entropy with table-valued options.

        Arguments (``Tabled.Config``):
            milestones (tuple[int, ...]): epochs where nothing happens. (Default: ().)
        """

        name = "tabled"
        paper = "test"

        @dataclass(frozen=True, kw_only=True)
        class Config(MethodConfig):
            natural_options: dict[str, float] | None = option(None, help="options of the natural teacher")
            milestones: tuple[int, ...] = ()

        def attack_spec(self, threat):
            return None

        def loss(self, ctx):
            return LossOutput(nn.functional.cross_entropy(ctx.student(ctx.x), ctx.y))


    @hookimpl
    def rbkd_register_methods(registry):
        registry.add(Tabled)
'''


@pytest.fixture
def tabled(tmp_path, monkeypatch):
    """The ``tabled`` method, installed as the distribution ``rbkd-tabled`` (entry point ``rbkd_tabled``)."""
    site = tmp_path / "site"
    info = site / "rbkd_tabled-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rbkd-tabled\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[robustbench_kd]\ntabled = rbkd_tabled\n")
    (site / "rbkd_tabled.py").write_text(textwrap.dedent(TABLED))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "rbkd_tabled", raising=False)
    return PluginHost.create()


def _toml_run(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        textwrap.dedent("""
        [method]
        name = "tabled"
        milestones = [100, 150]

        [method.natural_options]
        a = 1
        b = 0.5
    """)
    )
    return path


def test_table_option_from_a_toml_run_file(tabled, tmp_path):
    path = _toml_run(tmp_path)
    distiller = build_distiller(tabled, load_config(path), num_classes=10)
    assert distiller.config.natural_options == {"a": 1.0, "b": 0.5}
    assert type(distiller.config.natural_options["a"]) is float
    assert distiller.config.milestones == (100, 150)
    # --set: a TOML inline table replaces it; a dotted key sets one entry of it.
    for overrides, expected in (
        (["method.natural_options={c = 2.0}"], {"c": 2.0}),
        (["method.natural_options.c=2"], {"a": 1.0, "b": 0.5, "c": 2.0}),
    ):
        distiller = build_distiller(tabled, load_config(path, overrides), num_classes=10)
        assert distiller.config.natural_options == expected


def test_cli_refuses_a_number_for_a_table_in_one_line(tabled, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_digits_raw(tmp_path / "run", method={"name": "tabled"})))
    assert main(["distill", str(path), "--no-eval", "--set", "method.natural_options=7"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "robustbench-kd: error: method.natural_options of method 'tabled' must be a table of strings to numbers "
        "or none (default None), got 7\n"
    )


def test_cli_options_of_a_third_party_method(tabled, capsys):
    assert main(["methods", "--options", "tabled"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tabled  (plugin tabled, rbkd-tabled 0.1.0) - test"
    assert out[1:] == [
        "  method.natural_options  table[str, float] | None  = None  options of the natural teacher",
        "  method.milestones       list[int]                 = []    epochs where nothing happens",
    ]


# -- methods --options ---------------------------------------------------------------------------
_LINE = re.compile(r"^  method\.(\S+)\s+(.+?)\s+= (\S+)\s+(.*)$")


def test_describe_options_of_rslad(host):
    rslad = host.methods.get("rslad")
    lines = describe_options(rslad, "plugin rslad, robustbench_kd 0.1.0")
    assert lines[0] == f"rslad  (plugin rslad, robustbench_kd 0.1.0) - {rslad.paper}"
    rows = {m.group(1): m.groups()[1:] for m in map(_LINE.match, lines[1:]) if m}
    assert len(rows) == len(lines) - 1 == len(dataclasses.fields(rslad.Config))
    assert rows["adv_weight"][:2] == ("float", "0.8333333333333334")
    assert rows["kl_scale"][:2] == ("float | None", "None")
    assert rows["kl_reduction"][:2] == ("str", '"mean_all"')
    assert rows["mix_in_attack"][:2] == ("bool", "false")
    assert rows["ikl_class_prior"][:2] == ("bool", "true")
    assert all(help_text for _, _, help_text in rows.values())
    assert len({line.index(" = ") for line in lines[1:]}) == 1  # the defaults line up


def test_every_built_in_option_has_a_help_line(host):
    for entry in host.methods.entries():
        for line in describe_options(entry.value)[1:]:
            match = _LINE.match(line)
            assert match is not None and match.group(4), (entry.name, line)


def test_help_falls_back_to_the_docstring_sections():
    class Documented(Distiller):
        """A method documented the Google way.

        Args:
            alpha (float): weight of the first term, in [0, 1]. (Default: 0.5,
                the paper.)
            beta, gamma: the two ``temperatures`` of :func:`kl`
                (both positive).

        Teacher roles:
            none.
        """

        name = "documented"

        @dataclass(frozen=True, kw_only=True)
        class Config(MethodConfig):
            """Options.

            Attributes:
                delta: documented on the Config.
            """

            alpha: float = 0.5
            beta: float = 1.0
            gamma: float = option(2.0, help="its own help wins")
            delta: int = 0
            epsilon: str = "x"

        def loss(self, ctx: Any) -> LossOutput:
            raise NotImplementedError

    assert describe_options(Documented) == [
        "documented - A method documented the Google way.",
        "  method.alpha    float  = 0.5  weight of the first term, in [0, 1]",
        "  method.beta     float  = 1.0  the two temperatures of kl (both positive)",
        "  method.gamma    float  = 2.0  its own help wins",
        "  method.delta    int    = 0    documented on the Config",
        '  method.epsilon  str    = "x"',
    ]
