"""Hostile-input catalogue: run files read as untrusted input, every value they give, and the command line.

A run file is read bounded (a regular file, 1 MiB, 100 000 values and 32 levels counted as expanded) and
every value a run or an evaluation will use is checked when the configuration is read, so a bad one fails
in one line, exit 2, before the run directory or ``config.yaml`` exists. The command line's numbers and
output directories are checked the same way, and argparse's own refusals are one line too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hostile_harness import DEFAULTS, Case, Sandbox, _toml_value, assert_keeps_the_promise, check_catalogue, distill
from hostile_harness import evaluate as evaluate_case

from robustbench_kd.config import apply_overrides, load_file, plain_copy
from robustbench_kd.errors import UserError


def alias_bomb(levels: int, fan: int = 10) -> str:
    """A YAML run file whose ``method.payload`` expands to ``fan ** levels`` integers through nested aliases."""
    lines = ["anchors:", "  - &a0 [" + ", ".join(str(i) for i in range(fan)) + "]"]
    for level in range(1, levels):
        lines.append(f"  - &a{level} [" + ", ".join([f"*a{level - 1}"] * fan) + "]")
    lines.append(f"method: {{name: pgd-at, payload: *a{levels - 1}}}")
    return "\n".join(lines) + "\n"


def merge_bomb(levels: int, fan: int = 10) -> str:
    """A YAML run file whose merge keys (``<<: [*m, *m, ...]``) copy ``fan ** levels`` pairs when flattened."""
    lines = ["anchors:", "  - &m0 {" + ", ".join(f"k{i}: {i}" for i in range(fan)) + "}"]
    for level in range(1, levels):
        lines.append(f"  - &m{level} {{<<: [" + ", ".join([f"*m{level - 1}"] * fan) + "]}")
    lines.append(f"optim: {{<<: *m{levels - 1}}}")
    return "\n".join(lines) + "\n"


def leaves(data: Any) -> int:
    """How many scalar values ``data`` holds, counting shared parts once per place (iterative)."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        else:
            count += 1
    return count


def yaml_run(sections: dict[str, dict[str, Any]], name: str = "run.yaml"):
    """A YAML run file (the catalogue's defaults plus ``sections``): YAML writes NaN and infinity as .nan/.inf."""

    def build(box: Sandbox) -> list[str]:
        merged = {k: dict(v) for k, v in DEFAULTS.items()}
        for section, values in sections.items():
            merged.setdefault(section, {}).update(values)
        return ["distill", box.write(name, yaml.safe_dump(merged, sort_keys=False)), "--no-eval"]

    return build


def toml_run(raw: dict[str, str]):
    """A TOML run file: the catalogue's defaults, with ``raw`` lines (TOML the harness cannot write) added."""

    def build(box: Sandbox) -> list[str]:
        text = ""
        for section in dict.fromkeys([*DEFAULTS, *raw]):
            text += f"[{section}]\n"
            text += "".join(f"{k} = {_toml_value(v)}\n" for k, v in DEFAULTS.get(section, {}).items())
            text += raw.get(section, "")
        return ["distill", box.write("run.toml", text), "--no-eval"]

    return build


def fifo(box: Sandbox) -> list[str]:
    os.mkfifo(box.root / "run.yaml")
    return ["distill", "run.yaml"]


def device(box: Sandbox) -> list[str]:
    (box.root / "run.toml").symlink_to("/dev/zero")
    return ["distill", "run.toml"]


CASES = [
    # -- the run file as a file: kind, size, structure --------------------------------------------
    Case(
        "config-yaml-alias-bomb",
        lambda box: ["distill", box.write("bomb.yaml", alias_bomb(levels=9))],
        "config file bomb.yaml expands to more than 100,000 values",
        fresh=True,
        timeout=120,
        max_rss_mib=1500,
    ),
    Case(
        "config-fifo-run-file",
        fifo,
        "config file run.yaml is a FIFO (named pipe), not a regular file",
        fresh=True,
        timeout=120,
    ),
    Case(
        "config-device-run-file",
        device,
        "config file run.toml is a device, not a regular file",
        fresh=True,
        timeout=120,
        max_rss_mib=1500,
    ),
    Case(
        "config-huge-run-file",
        lambda box: ["distill", box.write("run.toml", "# " + "x" * (2 << 20) + "\n")],
        "config file run.toml is larger than 1 MiB",
    ),
    Case(
        "config-toml-nested-arrays",
        lambda box: ["distill", box.write("run.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n")],
        "config file run.toml is nested too deeply to be a run file",
        fresh=True,
        timeout=120,
    ),
    Case(
        "config-yaml-nested-tables",
        lambda box: ["distill", box.write("run.yaml", "method:" + "".join(f"\n{'  ' * i}k{i}:" for i in range(1, 60)))],
        "config file run.yaml is nested more than 32 levels deep",
    ),
    Case(
        "config-toml-integer-of-5000-digits",
        toml_run({"run": "seed = " + "9" * 5000 + "\n"}),
        "config file run.toml holds an integer of more than 4300 digits",
    ),
    Case(
        "config-yaml-date-value",
        lambda box: ["distill", box.write("run.yaml", "model_info: {title: 2024-05-01}\n")],
        "config file run.yaml: model_info.title is a date",
    ),
    # -- values: not a number, out of range, overflowing --------------------------------------------
    Case(
        "config-toml-nan-learning-rate",
        toml_run({"optim": "lr = nan\n"}),
        "config file run.toml: optim.lr must be a finite number, got nan",
    ),
    Case(
        "config-yaml-infinite-l2-eps",
        yaml_run({"threat": {"norm": "L2", "eps": float("inf"), "alpha": 0.1}}),
        "threat.eps must be a finite number, got inf",
    ),
    Case(
        "config-seed-beyond-32-bits",
        distill({"run": {"seed": 2**32}}),
        "run.seed must be an integer in [0, 4294967295] (a seed numpy and torch accept), got 4294967296",
    ),
    Case(
        "config-epochs-beyond-64-bits", distill({"optim": {"epochs": 10**30}}), "optim.epochs must fit a 64-bit integer"
    ),
    Case(
        "config-epochs-absurd",
        distill({"optim": {"epochs": 10**12}}),
        "optim.epochs must be <= 2147483647 (a larger value is a typo), got 1000000000000",
    ),
    Case("config-momentum-above-1", distill({"optim": {"momentum": 1.5}}), "optim.momentum must be in [0, 1), got 1.5"),
    Case(
        "config-milestones-unsorted",
        distill({"optim": {"epochs": 4, "milestones": [3, 2]}}),
        "optim.milestones must be increasing epochs",
    ),
    Case(
        "config-onecycle-pct-start",
        distill({"optim": {"schedule": "onecycle", "pct_start": 0}}),
        "optim.pct_start must be in (0, 1), got 0",
    ),
    Case("config-ema-decay-1", distill({"ema": {"decay": 1}}), "ema.decay must be 0 (off) or in (0, 1), e.g. 0.999"),
    Case(
        "config-final-n-examples-0",
        distill({"eval": {"final_n_examples": 0}}),
        "eval.final_n_examples must be >= 1, got 0",
    ),
    Case(
        "config-report-eps-factor-negative",
        distill({"report": {"eps_factors": [1.0, -0.5]}}),
        "report.eps_factors[1] must be >= 0, got -0.5",
    ),
    Case(
        "config-teacher-weights-all-zero",
        distill({"method": {"name": "kd"}, "teachers": {"robust": {"specs": ["file:t.pt"], "weights": [0]}}}),
        "teachers.robust.weights are all zero",
    ),
    Case(
        "config-set-method-option-nan",
        lambda box: ["distill", box.config({"method": {"name": "trades"}}), "--set", "method.beta=nan"],
        "method.beta must be a finite number, got nan",
    ),
    # -- names that become paths -------------------------------------------------------------------
    Case(
        "config-run-name-path",
        distill({"run": {"name": "../../escaped"}}),
        "run.name is not a usable model id: model id must be 1-200 characters",
    ),
    Case(
        "config-out-dir-escape-sequence",
        distill({"run": {"out_dir": "run\x1b[2J"}}),
        "run.out_dir 'run\\x1b[2J' contains the control character U+001B",
    ),
    Case("config-data-dir-empty", distill({"data": {"data_dir": " "}}), "data.data_dir is empty"),
    # -- the command line --------------------------------------------------------------------------
    Case("config-cli-quickstart-empty-out", lambda box: ["quickstart", "--out", ""], "--out is empty"),
    Case(
        "config-cli-report-out-newline",
        lambda box: ["report", "run", "--out", "rep\nort"],
        "--out 'rep\\nort' contains the control character U+000A",
    ),
    Case("config-cli-merge-shards-empty-out", lambda box: ["merge-shards", "shards/x", "--out", ""], "--out is empty"),
    Case(
        "config-cli-evaluate-seed-negative",
        evaluate_case("--seed", "-1"),
        "--seed must be an integer in [0, 4294967295]",
    ),
    Case("config-cli-evaluate-eps-overflow", evaluate_case("--eps", "1e400"), "--eps must be a finite number"),
    Case(
        "config-cli-quickstart-epochs-not-int",
        lambda box: ["quickstart", "--epochs", "nan"],
        "argument --epochs: invalid int value: 'nan' (see `robustbench-kd quickstart --help`)",
    ),
    Case(
        "config-cli-missing-argument",
        lambda box: ["distill"],
        "the following arguments are required: config",
    ),
]


def test_catalogue_ids_unique():
    from test_hostile_inputs import CASES as FIRST_ROUND

    check_catalogue(CASES + FIRST_ROUND)
    assert len(CASES) >= 12


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_config_is_one_line_exit_2_and_leaves_no_output(case, tmp_path, monkeypatch, capsys):
    assert_keeps_the_promise(case, tmp_path, monkeypatch, capsys)


# -- the severe finding: a 1 KB YAML file that expanded to gigabytes --------------------------------
def test_alias_bomb_expands_through_a_json_round_trip_and_is_now_refused(tmp_path, monkeypatch, capsys):
    # Control, at a size that is safe: safe_load keeps the aliases shared (cheap), a JSON round trip, as
    # the overrides and to_dict did, expands them: a 300-byte file becomes a million values.
    small = alias_bomb(levels=6)
    data = yaml.safe_load(small)
    expanded = json.dumps(data)
    assert len(small) < 400
    assert leaves(json.loads(expanded)) >= 10**6
    assert len(expanded) > 10_000 * len(small)  # x10 per level: 9 levels is ~30 GB of JSON
    # The same data is refused before any copy, by the function the overrides now copy with ...
    with pytest.raises(UserError, match="expands to more than 100,000 values"):
        apply_overrides(data, [])
    # ... and the 10**9-value file, through the real command in a new interpreter, under a memory bound.
    assert_keeps_the_promise(CASES[0], tmp_path, monkeypatch, capsys)


def _flatten_without_dedup(self: Any, node: Any) -> None:
    """Merge-key flattening as older PyYAML releases do it (``pyyaml>=6`` allows them): pairs copied, not deduped."""
    merge: list[Any] = []
    index = 0
    while index < len(node.value):
        key_node, value_node = node.value[index]
        if key_node.tag != "tag:yaml.org,2002:merge":
            index += 1
            continue
        del node.value[index]
        subnodes = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for subnode in reversed(subnodes):
            self.flatten_mapping(subnode)
            merge.extend(subnode.value)
    if merge:
        node.value = merge + node.value


def test_merge_key_bomb_is_refused_while_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(yaml.constructor.SafeConstructor, "flatten_mapping", _flatten_without_dedup)
    # Control: with such a PyYAML, 5 levels of merge keys copy 10**5 pairs while parsing, before any check
    # on the result could run (the result itself is small: the keys repeat).
    seen: list[int] = []

    def recording(self: Any, node: Any) -> None:
        _flatten_without_dedup(self, node)
        seen.append(len(node.value))

    with monkeypatch.context() as m:
        m.setattr(yaml.constructor.SafeConstructor, "flatten_mapping", recording)
        assert yaml.safe_load(merge_bomb(levels=5))["optim"] == {f"k{i}": i for i in range(10)}
    assert max(seen) >= 10**5
    # The run-file loader counts the pairs before they are copied: 7 levels (10**7 pairs) fail at once.
    bomb = tmp_path / "merge.yaml"
    bomb.write_text(merge_bomb(levels=7))
    with pytest.raises(UserError, match=r"config file .*merge.yaml expands to more than 100,000 values through YAML"):
        load_file(bomb)
    # An ordinary merge key still works.
    ok = tmp_path / "ok.yaml"
    ok.write_text("base: &b {epochs: 2, lr: 0.1}\noptim: {<<: *b, lr: 0.2}\n")
    assert load_file(ok)["optim"] == {"epochs": 2, "lr": 0.2}


def test_aliases_are_unshared_by_the_copy():
    data = yaml.safe_load("common: &c {lr: 0.1}\noptim: *c\n")
    assert data["optim"] is data["common"]
    copy = plain_copy(data, what="run file")
    copy["optim"]["lr"] = 0.5  # what --set optim.lr=0.5 does
    assert copy["common"]["lr"] == 0.1


def test_a_bad_value_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    """A value that used to fail after config.yaml was written (eval.n_examples = 0 with eval.every)."""
    case = Case(
        "eval-n-examples-0",
        distill({"eval": {"every": 1, "n_examples": 0}, "data": {"val_size": 10}}),
        "eval.n_examples must be >= 1, got 0",
    )
    assert_keeps_the_promise(case, tmp_path, monkeypatch, capsys)
    assert not Path(tmp_path / "run").exists()
