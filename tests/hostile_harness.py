"""The harness of the hostile-input catalogue: a sandbox to build bad inputs in, and the promise they keep.

A case builds its bad input under ``tmp_path`` (a run file, crafted checkpoints and data files, a fake
plugin distribution), then runs the real entry point: ``robustbench_kd.cli.main`` in-process, or
``python -m robustbench_kd.cli`` in a new interpreter for the cases marked ``fresh`` (those that could
hang, exhaust memory or must import plugins from scratch). :func:`assert_keeps_the_promise` checks the
promise every case makes: the expected exit code, exactly one stderr line ``robustbench-kd: error: ...``
holding the expected phrase, no traceback, nothing under ``tmp_path`` created or changed, and for fresh
runs no hang (a timeout) and, where a case says so, a bound on peak memory.

The catalogue itself lives in the ``test_hostile_*.py`` files, one per class of input.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from robustbench_kd.cli import main

DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {"name": "Hostile_SmallCNN", "out_dir": "run", "progress": False},
    "data": {"n_train": 64},
    "optim": {"epochs": 1},
    "eval": {"attacks": ["clean"], "final_n_examples": 16, "teachers": False, "sanity": False},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)  # strings, numbers and lists of them are valid TOML as JSON


class Sandbox:
    """Builds one case's bad input inside ``root`` (the test's working directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.site: Path | None = None  #: a directory with fake installed plugin distributions

    def config(self, sections: dict[str, dict[str, Any]] | None = None, *, name: str = "run.toml") -> str:
        merged = {k: dict(v) for k, v in DEFAULTS.items()}
        for section, values in (sections or {}).items():
            merged.setdefault(section, {}).update(values)
        text = "".join(
            f"[{s}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in vals.items()) for s, vals in merged.items()
        )
        return self.write(name, text)

    def write(self, name: str, text: str | bytes) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else textwrap.dedent(text).encode())
        return name

    def checkpoint(
        self,
        name: str = "teacher.pt",
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        record_arch: bool = True,
        **extra: Any,
    ) -> str:
        """A small-cnn checkpoint in our format (digits-shaped unless told otherwise)."""
        from robustbench_kd.storage.checkpoint import save_checkpoint
        from robustbench_kd.students import build_student

        net = build_student("small-cnn", num_classes=num_classes, in_channels=in_channels, image_size=8)
        payload: dict[str, Any] = {"student": net.state_dict()}
        if record_arch:
            payload.update(
                student_arch={"name": "small-cnn", "options": {}},
                num_classes=num_classes,
                in_channels=in_channels,
                image_size=8,
            )
        save_checkpoint(self.root / name, {**payload, **extra})
        return name

    def plugin(self, dist: str, entry_points: str, modules: dict[str, str]) -> None:
        """A fake installed distribution (dist-info + modules) whose entry points robustbench_kd loads."""
        self.site = self.root / "site"
        info = self.site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[robustbench_kd]\n{entry_points}\n")
        for module, source in modules.items():
            (self.site / f"{module}.py").write_text(textwrap.dedent(source))


@dataclass(frozen=True)
class Case:
    """One hostile input and the promise it must keep."""

    id: str
    build: Callable[[Sandbox], list[str]]  #: writes the bad input, returns the CLI argv
    expect: str  #: phrase the one-line error must contain
    fresh: bool = False  #: run in a new interpreter (python -m robustbench_kd.cli), under a timeout
    code: int = 2  #: expected exit code: 2 for a user mistake, 1 for the machine (disk, permissions)
    timeout: float = 300.0  #: seconds a fresh run may take before the case fails as a hang
    max_rss_mib: int | None = None  #: fresh runs only: peak resident memory allowed (bounded reads)
    #: paths (relative to the sandbox) that may change: files a case prepared on purpose, like a lock
    may_change: tuple[str, ...] = ()


def distill(sections: dict[str, dict[str, Any]] | None = None, *extra: str) -> Callable[[Sandbox], list[str]]:
    return lambda box: ["distill", box.config(sections), "--no-eval", *extra]


def evaluate(*extra: str, model: str | None = None) -> Callable[[Sandbox], list[str]]:
    def build(box: Sandbox) -> list[str]:
        spec = model or f"file:{box.checkpoint()}"
        return [
            "evaluate",
            spec,
            "--dataset",
            "digits",
            "--attacks",
            "clean",
            "--no-sanity",
            "--out",
            "eval",
            "--device",
            "cpu",
            *extra,
        ]

    return build


def teacher(spec_of: Callable[[Sandbox], Any], method: str = "kd") -> Callable[[Sandbox], list[str]]:
    return lambda box: [
        "distill",
        box.config({"method": {"name": method}, "teachers": {"robust": spec_of(box)}}),
        "--no-eval",
    ]


def with_files(prepare: Callable[[Sandbox], Any], then: Callable[[Sandbox], list[str]]):
    def build(box: Sandbox) -> list[str]:
        prepare(box)
        return then(box)

    return build


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` with its size and modification time."""
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns if p.is_file() else 0)
        for p in sorted(root.rglob("*"))
        if "__pycache__" not in p.parts and (p.is_file() or p.is_dir())
    }


# The child reports its own peak memory through this file (outside the sandbox, so the tree check is
# unaffected); an address-space cap keeps an unbounded read from taking the machine down with it.
_CHILD = """
import os, resource, sys
cap = int(os.environ["RBKD_TEST_AS_CAP"])
if cap:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from robustbench_kd.cli import main
try:
    code = main(sys.argv[1:])
finally:
    with open(os.environ["RBKD_TEST_RSS_FILE"], "w") as handle:
        handle.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
sys.exit(code)
"""

#: Address-space cap of fresh runs with a memory bound: torch alone maps ~3.3 GB of address space.
AS_CAP = 8 << 30


def run_fresh(
    argv: list[str], box: Sandbox, *, debug: bool = False, timeout: float = 300.0, memory_cap: bool = False
) -> tuple[int, str, str, int]:
    """Run the CLI in a new interpreter in ``box.root``; returns (exit code, stdout, stderr, peak RSS MiB)."""
    import tempfile

    env = dict(os.environ)
    paths = [str(box.site)] if box.site else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    with tempfile.TemporaryDirectory() as scratch:
        rss_file = Path(scratch) / "rss"
        env["RBKD_TEST_RSS_FILE"] = str(rss_file)
        env["RBKD_TEST_AS_CAP"] = str(AS_CAP if memory_cap else 0)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _CHILD, *(["--debug"] if debug else []), *argv],
                check=False,
                capture_output=True,
                text=True,
                cwd=box.root,
                env=env,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"the command hung: no exit within {timeout:g} s ({' '.join(argv)})")
        rss_mib = int(rss_file.read_text()) // 1024 if rss_file.is_file() else -1
    return proc.returncode, proc.stdout, proc.stderr, rss_mib


def assert_keeps_the_promise(
    case: Case,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    *,
    prepare: Callable[[Sandbox], Any] | None = None,
) -> str:
    """Build ``case`` in ``tmp_path``, run it, and assert the whole promise; returns the error line."""
    monkeypatch.chdir(tmp_path)
    box = Sandbox(tmp_path)
    if prepare is not None:
        prepare(box)
    argv = case.build(box)
    before = _tree(tmp_path)
    rss_mib = -1
    if case.fresh:
        code, out, err, rss_mib = run_fresh(argv, box, timeout=case.timeout, memory_cap=case.max_rss_mib is not None)
    else:
        if box.site is not None:
            monkeypatch.syspath_prepend(str(box.site))
        code = main(argv)
        out, err = capsys.readouterr()
    assert code == case.code, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("robustbench-kd: error: "), lines[0]
    assert case.expect in lines[0], lines[0]
    if case.max_rss_mib is not None:
        assert 0 < rss_mib <= case.max_rss_mib, f"peak memory {rss_mib} MiB, allowed {case.max_rss_mib} MiB"
    after = _tree(tmp_path)
    for path in case.may_change:
        before.pop(path, None)
        after.pop(path, None)
    assert after == before, "the failed command created, changed or removed files"
    return lines[0]


def check_catalogue(cases: list[Case]) -> None:
    """Ids are unique within and across catalogue files (they name the parametrised tests)."""
    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids), sorted(i for i in ids if ids.count(i) > 1)
