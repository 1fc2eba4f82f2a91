"""Hostile-input catalogue: damaged run directories given to ``report``, and broken third-party plugins.

``report``: a damaged file that feeds one part of a report costs that part, with one warning line naming
the file (the tests after the catalogue); what leaves nothing to report (every results file damaged, an
output directory that cannot be written, the run itself unreadable) is one error line, exit 2, and
nothing written (the catalogue).

Plugins: a plugin that cannot be loaded (it exits or raises at import, an entry point naming nothing
usable, a hook with an argument the hook does not pass, a registration of the wrong kind) is one line
naming the plugin, exit 2; plugin code that fails at run time (it calls ``sys.exit``, a factory returns
the wrong type) is one line naming the plugin, exit 1.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hostile_harness import Case, Sandbox, assert_keeps_the_promise, check_catalogue, distill, run_fresh

from robustbench_kd.cli import main

# -- a real run directory, built once and copied per case -----------------------------------------------
RUN_FILE = """
    [run]
    name = "Hostile_Report"
    out_dir = "{out}"
    progress = false
    [data]
    dataset = "digits"
    n_train = 64
    batch_size = 64
    [threat]
    eps = 0.2
    alpha = 0.1
    steps = 1
    [student]
    arch = "small-cnn"
    options = {{width = 0.5}}
    [method]
    name = "pgd-at"
    [optim]
    epochs = 2
    [eval]
    attacks = ["clean", "pgd"]
    pgd_steps = 1
    final_n_examples = 16
    teachers = false
    sanity = false
    [diagnostics]
    enabled = ["entropy", "calibration", "per_class", "trajectories"]
    n_examples = 16
    pgd_steps = 1
    bins = 5
    [report]
    enabled = false
    n_examples = 8
    n_cam = 1
    pgd_steps = 1
    eps_factors = [0, 1]
"""

#: Filled by the module fixture: the finished run every case copies.
SOURCE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def finished_run(tmp_path_factory) -> Path:
    """A 2-epoch digits run with diagnostics and a final evaluation (clean and PGD), without a report."""
    root = tmp_path_factory.mktemp("finished")
    run_file = root / "run.toml"
    run_file.write_text(RUN_FILE.format(out=root / "run"))
    assert main(["-q", "distill", str(run_file)]) == 0
    SOURCE["run"] = root / "run"
    return root / "run"


def copy_run(box: Sandbox, name: str = "run") -> Path:
    """The finished run copied to ``box.root / name``."""
    shutil.copytree(SOURCE["run"], box.root / name)
    return box.root / name


def two_runs(damage):
    """A comparison of runs A and B whose results files ``damage(path)`` has spoilt."""

    def build(box: Sandbox) -> list[str]:
        for name in ("A", "B"):
            for path in (copy_run(box, name) / "results").glob("*.json"):
                damage(path)
        return ["report", "A", "B", "--out", "cmp"]

    return build


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-40])


def _nan(path: Path) -> None:
    data = json.loads(path.read_text())
    data["accuracy"]["clean"] = float("nan")
    path.write_text(json.dumps(data))


def _wrong_shape(path: Path) -> None:
    path.write_text(json.dumps([json.loads(path.read_text())]))


def _strings(path: Path) -> None:
    data = json.loads(path.read_text())
    data["accuracy"] = {k: "high" for k in data["accuracy"]}
    path.write_text(json.dumps(data))


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _huge(path: Path) -> None:
    with path.open("ab") as handle:  # sparse: 20 GB on record, nothing on disk
        handle.truncate(20 << 30)


def _out_inside_a_file(box: Sandbox) -> list[str]:
    copy_run(box, "A")
    copy_run(box, "B")
    box.write("notes.txt", "a file, not a directory\n")
    return ["report", "A", "B", "--out", "notes.txt/cmp"]


def _run_then(prepare, argv):
    def build(box: Sandbox) -> list[str]:
        prepare(copy_run(box))
        return argv

    return build


def _cut_config(run: Path) -> None:
    text = (run / "config.yaml").read_text()  # cut mid-key, as a copy interrupted there leaves it
    (run / "config.yaml").write_text(text[: text.index("  options:") + 5])


def _garbage_checkpoint(run: Path) -> None:
    (run / "checkpoints" / "last.pt").write_bytes(bytes(range(256)) * 64)


def _report_md_is_a_directory(run: Path) -> None:
    (run / "report" / "report.md").mkdir(parents=True)


# -- plugins --------------------------------------------------------------------------------------------
def plugin(dist: str, entry_points: str, modules: dict[str, str], argv):
    """A fake installed distribution, then ``argv`` (a list, or a builder taking the sandbox)."""

    def build(box: Sandbox) -> list[str]:
        box.plugin(dist, entry_points, modules)
        return argv(box) if callable(argv) else list(argv)

    return build


HOOKS = "from robustbench_kd import Distiller, hookimpl\n"

CASES = [
    # -- report: comparisons whose every results file is damaged ---------------------------------------
    Case(
        "report-results-cut-short",
        two_runs(_cut),
        "no results file holds both a clean and a robust accuracy (results file A/results/Hostile_Report.json "
        "is not valid JSON",
    ),
    Case("report-results-nan", two_runs(_nan), "holds NaN, which is not a number JSON allows; 1 more damaged"),
    Case("report-results-wrong-shape", two_runs(_wrong_shape), "A/results/Hostile_Report.json has no 'accuracy'"),
    Case(
        "report-results-accuracy-strings", two_runs(_strings), "has accuracy 'clean' = 'high', not a fraction in [0, 1]"
    ),
    Case("report-results-fifo", two_runs(_fifo), "is a FIFO (named pipe), not a regular file", fresh=True, timeout=120),
    Case("report-results-directory", two_runs(_directory), "Hostile_Report.json is a directory"),
    Case(
        "report-results-huge-sparse",
        two_runs(_huge),
        "is larger than 4 MiB",
        fresh=True,
        timeout=120,
        max_rss_mib=1500,
    ),
    # -- report: an output directory the report cannot be written to, an unreadable run ------------------
    Case(
        "report-out-inside-a-file",
        _out_inside_a_file,
        "--out notes.txt/cmp cannot be a report directory: notes.txt is a file",
    ),
    Case(
        "report-md-is-a-directory",
        _run_then(_report_md_is_a_directory, ["report", "run"]),
        "run/report/report.md is a directory where the report writes a file",
    ),
    Case("report-config-cut-short", _run_then(_cut_config, ["report", "run"]), "run/config.yaml could not be parsed"),
    Case(
        "report-checkpoint-garbage",
        _run_then(_garbage_checkpoint, ["report", "run"]),
        "checkpoint run/checkpoints/last.pt is corrupt or truncated",
    ),
    # -- plugins that cannot be loaded: exit 2 ------------------------------------------------------------
    Case(
        "plugin-sys-exit-at-import",
        plugin("quitter", "quitter = hostile_quitter", {"hostile_quitter": "import sys\nsys.exit(3)\n"}, ["methods"]),
        "plugin 'quitter' from quitter 0.1 failed to import (SystemExit: 3)",
        fresh=True,
        timeout=120,
    ),
    Case(
        "plugin-base-exception-at-import",
        plugin(
            "odd",
            "odd = hostile_odd",
            {"hostile_odd": "class Stop(BaseException):\n    pass\n\nraise Stop('not an Exception')\n"},
            ["methods"],
        ),
        "plugin 'odd' from odd 0.1 failed to import (Stop: not an Exception)",
        fresh=True,
        timeout=120,
    ),
    Case(
        "plugin-entry-point-missing-module",
        plugin("ghost", "ghost = hostile_not_installed", {}, ["methods"]),
        "plugin 'ghost' from ghost 0.1 failed to import (ModuleNotFoundError: No module named 'hostile_not_installed')",
    ),
    Case(
        "plugin-entry-point-missing-attribute",
        plugin("attr", "attr = hostile_attr:plugin", {"hostile_attr": "PLUGIN = 1\n"}, ["methods"]),
        "failed to import (AttributeError: module 'hostile_attr' has no attribute 'plugin')",
    ),
    Case(
        "plugin-entry-point-names-a-constant",
        plugin("const", "const = hostile_const:VERSION", {"hostile_const": "VERSION = '1.0'\n"}, ["methods"]),
        "its entry point 'hostile_const:VERSION' loads '1.0' (str), which has no @hookimpl functions",
    ),
    Case(
        "plugin-hook-unknown-argument",
        plugin(
            "extra-arg",
            "extra = hostile_extra_arg",
            {"hostile_extra_arg": HOOKS + "@hookimpl\ndef rbkd_register_methods(registry, host):\n    pass\n"},
            ["methods"],
        ),
        "plugin 'extra' from extra-arg 0.1 implements rbkd_register_methods with argument(s) host that the hook "
        "does not pass; valid arguments (any subset): registry",
    ),
    Case(
        "plugin-hookwrapper-not-a-generator",
        plugin(
            "wrapper",
            "wrapper = hostile_wrapper",
            {"hostile_wrapper": HOOKS + "@hookimpl(hookwrapper=True)\ndef rbkd_train_start(run):\n    pass\n"},
            ["methods"],
        ),
        "plugin 'wrapper' from wrapper 0.1 has an invalid hook implementation (",
    ),
    Case(
        "plugin-unknown-hook-suggests-the-name",
        plugin(
            "typo2",
            "typo2 = hostile_typo2",
            {"hostile_typo2": HOOKS + "@hookimpl\ndef rbkd_register_method(registry):\n    pass\n"},
            ["methods"],
        ),
        "plugin 'typo2' from typo2 0.1 implements an unknown hook 'rbkd_register_method' "
        "(did you mean: rbkd_register_methods?)",
    ),
    Case(
        "plugin-registrar-returns-the-classes",
        plugin(
            "returner",
            "returner = hostile_returner",
            {
                "hostile_returner": HOOKS
                + "class Ret(Distiller):\n    name = 'ret'\n    def loss(self, ctx):\n        return None\n\n"
                "@hookimpl\ndef rbkd_register_methods(registry):\n    return [Ret]\n"
            },
            ["methods"],
        ),
        "plugin 'returner' from returner 0.1: its rbkd_register_methods returned [<class 'hostile_returner.Ret'>]",
    ),
    Case(
        "plugin-method-not-a-distiller",
        plugin(
            "notdist",
            "notdist = hostile_notdist",
            {
                "hostile_notdist": HOOKS + "class Plain:\n    name = 'plain'\n\n"
                "@hookimpl\ndef rbkd_register_methods(registry):\n    registry.add(Plain)\n"
            },
            ["methods"],
        ),
        "a method is a robustbench_kd.Distiller subclass",
    ),
    Case(
        "plugin-method-without-loss",
        plugin(
            "noloss",
            "noloss = hostile_noloss",
            {
                "hostile_noloss": HOOKS + "class NoLoss(Distiller):\n    name = 'no-loss'\n\n"
                "@hookimpl\ndef rbkd_register_methods(registry):\n    registry.add(NoLoss)\n"
            },
            ["methods"],
        ),
        "registers the method class NoLoss without defining loss (abstract in Distiller)",
    ),
    Case(
        "plugin-method-name-with-a-space",
        plugin(
            "spaced",
            "spaced = hostile_spaced",
            {
                "hostile_spaced": HOOKS
                + "class Spaced(Distiller):\n    name = 'my method'\n    def loss(self, ctx):\n        return None\n\n"
                "@hookimpl\ndef rbkd_register_methods(registry):\n    registry.add(Spaced)\n"
            },
            ["methods"],
        ),
        "Spaced.name must be lowercase kebab-case, got 'my method'",
    ),
    Case(
        "plugin-student-name-not-a-string",
        plugin(
            "numbered",
            "numbered = hostile_numbered",
            {
                "hostile_numbered": HOOKS + "@hookimpl\ndef rbkd_register_students(registry):\n"
                "    registry.add(7, lambda **kw: None)\n"
            },
            distill(),
        ),
        "plugin 'numbered' from numbered 0.1 registers a student architecture under the name 7 (int)",
    ),
    Case(
        "plugin-dataset-not-callable",
        plugin(
            "static",
            "static = hostile_static",
            {
                "hostile_static": HOOKS
                + "@hookimpl\ndef rbkd_register_datasets(registry):\n    registry.add('x', [1])\n"
            },
            distill(),
        ),
        "registers the dataset 'x' as [1] (list), which is not callable",
    ),
    # -- plugin code that fails at run time: exit 1 --------------------------------------------------------
    Case(
        "plugin-sys-exit-in-a-hook",
        plugin(
            "exiter",
            "exiter = hostile_exiter",
            {
                "hostile_exiter": HOOKS
                + "import sys\n\n@hookimpl\ndef rbkd_register_methods(registry):\n    sys.exit(0)\n"
            },
            ["methods"],
        ),
        "plugin 'exiter' from exiter 0.1 failed in hostile_exiter.rbkd_register_methods (SystemExit: 0)",
        code=1,
    ),
    Case(
        "plugin-student-factory-returns-none",
        plugin(
            "hollow",
            "hollow = hostile_hollow",
            {
                "hostile_hollow": HOOKS + "@hookimpl\ndef rbkd_register_students(registry):\n"
                "    registry.add('hollow-net', lambda **kw: None)\n"
            },
            distill({"student": {"arch": "hollow-net"}}),
        ),
        "plugin 'hollow' from hollow 0.1: its student architecture 'hollow-net' returned None (NoneType), "
        "not a torch.nn.Module",
        code=1,
    ),
    Case(
        "plugin-dataset-returns-a-dict",
        plugin(
            "dicty",
            "dicty = hostile_dicty",
            {
                "hostile_dicty": HOOKS + "@hookimpl\ndef rbkd_register_datasets(registry):\n"
                "    registry.add('dicty', lambda config: {'train_x': []})\n"
            },
            distill({"data": {"dataset": "dicty"}}),
        ),
        "its dataset 'dicty' returned {'train_x': []} (dict), not a DataSplits (it has no train_x, train_y",
        code=1,
    ),
]


def test_catalogue_ids_unique():
    from test_hostile_inputs import CASES as FIRST_ROUND

    check_catalogue(CASES)
    check_catalogue([*FIRST_ROUND, *CASES])
    assert len(CASES) >= 10
    assert {c.id.split("-")[0] for c in CASES} == {"report", "plugin"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_report_or_plugin_keeps_the_promise(case, tmp_path, monkeypatch, capsys):
    assert_keeps_the_promise(case, tmp_path, monkeypatch, capsys)


# -- damaged files that cost part of a report: exit 0, one warning per file, a complete report -----------
REPORT_FILES = ("report.md", "report.html", "overview.png", "analyses.json", "accuracy_vs_eps.png")


def _warnings(err: str) -> list[str]:
    lines = err.splitlines()
    assert all(line.startswith("warning: ") for line in lines), err
    return lines


def _cut_metrics(run: Path) -> None:
    _cut(run / "metrics.jsonl")  # the last line cut, as by a crash mid-write


def _tables_wrong_types(run: Path) -> None:
    path = run / "diagnostics" / "tables.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    key = next(k for k in rows[-1] if k.endswith("_class_acc"))
    rows[-1][key] = "all classes fine"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _trajectories_garbage(run: Path) -> None:
    (run / "diagnostics" / "trajectories.npz").write_bytes(bytes(range(256)) * 16)


def _metrics_fifo(run: Path) -> None:
    _fifo(run / "metrics.jsonl")


def _tables_directory(run: Path) -> None:
    _directory(run / "diagnostics" / "tables.jsonl")


def _trajectories_missing(run: Path) -> None:
    (run / "diagnostics" / "trajectories.npz").unlink()


def _metrics_binary(run: Path) -> None:
    with (run / "metrics.jsonl").open("ab") as handle:
        handle.write(b"\x00\xff\xfe garbage \x80\x81\n")


def _tables_nan(run: Path) -> None:
    path = run / "diagnostics" / "tables.jsonl"
    path.write_text(path.read_text() + '{"epoch": 3, "diag_train_student_clean_class_acc": [NaN]}\n')


def zip_bomb(path: Path, n: int) -> None:
    """An .npz whose 'epochs' is ``n`` int64 zeros, streamed into the archive (never held in memory)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (n,)})
    chunk = bytes(8 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("epochs.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for start in range(0, 8 * n, len(chunk)):
                member.write(chunk[: min(len(chunk), 8 * n - start)])


def _trajectories_zip_bomb(run: Path) -> None:
    zip_bomb(run / "diagnostics" / "trajectories.npz", 40_000_000)  # ~300 KB on disk, 320 MB expanded


DAMAGE = {
    "cut-wrong-types-garbage": (
        (_cut_metrics, "metrics file run/metrics.jsonl line 2 is not JSON"),
        (_tables_wrong_types, "_class_acc' of epoch 2 is a str, not a list of accuracies"),
        (_trajectories_garbage, "is not an .npz archive of arrays (BadZipFile"),
    ),
    "fifo-directory-missing": (
        (_metrics_fifo, "metrics file run/metrics.jsonl is a FIFO"),
        (_tables_directory, "diagnostics table file run/diagnostics/tables.jsonl is a directory"),
        (_trajectories_missing, "trajectory file run/diagnostics/trajectories.npz does not exist"),
    ),
    "binary-nan-bomb": (
        (_metrics_binary, "metrics file run/metrics.jsonl line 3 is not UTF-8 text"),
        (_tables_nan, "line 3 holds NaN, which is not a number JSON allows; the report shows epoch 2"),
        (_trajectories_zip_bomb, "expands to more than 256 MiB"),
    ),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_run_directory_gets_a_complete_report_and_one_warning_per_file(kind, tmp_path, monkeypatch):
    """Three damaged files, three warning lines naming them; every part they do not feed is drawn."""
    monkeypatch.chdir(tmp_path)
    box = Sandbox(tmp_path)
    run = copy_run(box)
    for damage, _ in DAMAGE[kind]:
        damage(run)
    code, out, err, _ = run_fresh(["-q", "report", "run"], box, timeout=300)
    assert code == 0, err
    warnings = _warnings(err)
    assert len(warnings) == 3, err
    for line, (_, expected) in zip(warnings, DAMAGE[kind], strict=True):
        assert expected in line, (expected, line)
    for name in REPORT_FILES:
        assert (run / "report" / name).is_file(), name
    assert "report: run/report/report.md" in out


def test_a_comparison_leaves_out_damaged_results_with_one_warning_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    box = Sandbox(tmp_path)
    good, bad = copy_run(box, "good"), copy_run(box, "bad")
    results = bad / "results" / "Hostile_Report.json"
    _cut(results)
    (bad / "results" / "extra.json").mkdir()
    (bad / "results" / "odd.json").write_text('{"accuracy": {"clean": 0.5, "pgd-1": 1.5}}')
    code, _, err, _ = run_fresh(["-q", "report", "good", "bad", "--out", "cmp"], box, timeout=300)
    assert code == 0, err
    warnings = _warnings(err)
    assert len(warnings) == 3
    assert "results file bad/results/Hostile_Report.json is not valid JSON" in warnings[0]
    assert "bad/results/extra.json is a directory" in warnings[1]
    assert "has accuracy 'pgd-1' = 1.5, not a fraction in [0, 1]" in warnings[2]
    assert all(line.endswith("the comparison leaves this model out") for line in warnings)
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| good/Hostile_Report |" in table and "bad/" not in table
    assert (tmp_path / "cmp" / "tradeoff.png").is_file()
    assert json.loads((good / "results" / "Hostile_Report.json").read_text())["accuracy"]


def test_a_failing_report_leaves_the_previous_report_untouched(tmp_path, monkeypatch, capsys):
    """A disk that fills up half way through a report.

    Control: the report's steps write where they are told, so run straight into a directory (as the
    command did before) they leave the figures of the steps before the failure there. The command builds
    the report in a scratch directory: the previous report stays exactly as it was.
    """
    from robustbench_kd.analysis.reports import run_report
    from robustbench_kd.analysis.reports.damage import Damage
    from robustbench_kd.jobs.pipeline import load_finished_run

    monkeypatch.chdir(tmp_path)
    run = copy_run(Sandbox(tmp_path))
    report = run / "report"
    report.mkdir()
    (report / "report.md").write_text("the previous report\n")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_report, "write_diagnostics_figures", fail)
    control = tmp_path / "control"
    loaded = load_finished_run(run)
    with pytest.raises(OSError):
        run_report._write_report(loaded, loaded.config.report, control, Damage())
    assert {"accuracy_vs_eps.png", "student_embedding.png"} <= {p.name for p in control.iterdir()}

    assert main(["-q", "report", "run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert sorted(p.name for p in report.iterdir()) == ["report.md"]
    assert (report / "report.md").read_text() == "the previous report\n"


def test_a_zip_bomb_trajectory_file_is_refused_before_it_expands(tmp_path, monkeypatch):
    """Control: numpy's own loader expands the bomb; the bounded reader refuses it from its headers."""
    from robustbench_kd.analysis.diagnostics import trajectories
    from robustbench_kd.errors import UserError

    path = tmp_path / "trajectories.npz"
    np.savez_compressed(path, epochs=np.zeros(2_000_000, dtype=np.int64))  # 16 MB expanded
    assert path.stat().st_size < 100_000
    with np.load(path) as data:
        assert data["epochs"].nbytes == 16_000_000  # the old primitive: the whole array, allocated
    monkeypatch.setattr(trajectories, "LIMIT", 1 << 20)
    with pytest.raises(UserError, match="expands to more than 1 MiB"):
        trajectories.load(path)


def test_an_array_header_claiming_more_than_its_bytes_is_refused(tmp_path):
    """An .npy member whose header declares a terabyte array in a few bytes: refused before allocating."""
    from robustbench_kd.analysis.diagnostics import trajectories
    from robustbench_kd.errors import UserError

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (1 << 37,)})
    path = tmp_path / "trajectories.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("epochs.npy", header.getvalue() + bytes(64))
    with pytest.raises(UserError, match=r"declares a \(137438953472,\) array of float64, more data than"):
        trajectories.load(path)


def test_sys_exit_at_import_no_longer_ends_the_command_with_the_plugins_code(tmp_path):
    """Control: importing the plugin really exits (code 3); ``methods`` turns it into one line, exit 2."""
    box = Sandbox(tmp_path)
    box.plugin("quitter", "quitter = hostile_quitter_control", {"hostile_quitter_control": "import sys\nsys.exit(3)\n"})
    import subprocess
    import sys

    control = subprocess.run(
        [sys.executable, "-c", "import hostile_quitter_control"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(box.site)},
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert control.returncode == 3 and not control.stderr
    code, _, err, _ = run_fresh(["methods"], box, timeout=120)
    assert code == 2 and err.count("\n") == 1
    assert "plugin 'quitter' from quitter 0.1 failed to import (SystemExit: 3)" in err
