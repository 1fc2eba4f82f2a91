"""``robustbench-kd check-submission DIR``: a bundle checked the way a RobustBench maintainer reviews it.

Each check gives findings of one line; the bundle passes only when nothing is wrong and every leaderboard
requirement (:mod:`.readiness`) holds. The checks:

* the files: the entry ``<ID>.json``, ``autoattack.log``, ``checkpoint.sha256``, ``zoo_entry.py``,
  ``new_model_issue.md``, ``bundle.json`` and ``README.md`` are there;
* the entry: RobustBench's format (fields, types, key order, two-decimal percentages) and non-empty
  metadata, by the same validator that accepts every file of RobustBench's repository;
* the checkpoint: it exists where ``checkpoint.sha256`` says and has that SHA-256;
* AutoAttack's log: it is the ``standard`` version, and its last robust accuracy is the entry's;
* the zoo entry: it imports nothing of this project (nor do the architecture files beside it), and in a
  separate Python process where ``import robustbench_kd`` fails, a temporary copy of the installed
  ``robustbench`` with the architecture files and the entry added (as a maintainer would) loads the
  checkpoint with ``robustbench.utils.load_model``; for ImageNet, the preprocessing ``benchmark`` looks up
  exists;
* readiness: the requirements recomputed from the entry and ``bundle.json`` agree with the status the
  writer gave the bundle and with its directory name (``<ID>.preview`` for a preview).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustbench_kd.errors import UserError
from robustbench_kd.storage.bounded import MiB, load_json_bounded, read_text_bounded
from robustbench_kd.storage.hashing import sha256_of
from robustbench_kd.submission.autoattack_log import read_log
from robustbench_kd.submission.layout import (
    AUTOATTACK_LOG,
    CHECKSUM_FILE,
    ISSUE_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    PREVIEW_SUFFIX,
    README_FILE,
    ZOO_ENTRY_FILE,
)
from robustbench_kd.submission.readiness import REQUIRED_METADATA, EvaluationRecord, unmet_requirements
from robustbench_kd.zoo.names import validate_model_id

__all__ = ["SubmissionCheck", "check_submission"]

_ROBUST = re.compile(r"robust accuracy: ([0-9.]+)%")
#: how long the standalone load of the zoo entry may take (it imports torch and robustbench)
STANDALONE_TIMEOUT_S = 300


@dataclass
class SubmissionCheck:
    """What ``check-submission`` found: ``problems`` (wrong), ``unmet`` (requirements), ``passed`` (fine),
    ``skipped`` (checks that cannot apply to this bundle)."""

    directory: Path
    problems: list[str] = field(default_factory=list)
    unmet: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  #: checks that cannot apply (e.g. no zoo for the dataset)

    @property
    def ready(self) -> bool:
        return not self.problems and not self.unmet

    def lines(self) -> list[str]:
        """One line per finding, then the verdict."""
        out = [f"ok       {text}" for text in self.passed]
        out += [f"skipped  {text}" for text in self.skipped]
        out += [f"PROBLEM  {text}" for text in self.problems]
        out += [f"UNMET    {text}" for text in self.unmet]
        if self.ready:
            out.append(f"READY    {self.directory} can be submitted")
        else:
            out.append(
                f"NOT READY {self.directory}: {len(self.problems)} problem(s), {len(self.unmet)} unmet requirement(s)"
            )
        return out


def _weights_only_env() -> dict[str, str]:
    """The child's environment with every ``torch.load`` forced to ``weights_only``.

    robustbench's ``load_model`` calls ``torch.load`` without ``weights_only``; torch >= 2.6 then defaults to
    the safe loader, unless ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set in the reviewer's shell. The bundle's
    checkpoint is untrusted input, so the child overrides both.
    """
    env = {k: v for k, v in os.environ.items() if k != "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"}
    env["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    return env


def check_submission(directory: str | Path, *, load_entry: bool = True) -> SubmissionCheck:
    """Check the bundle in ``directory`` (see the module docstring); ``load_entry=False`` skips the subprocess."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory; give a bundle directory, e.g. <out>/submission/<ID>")
    check = SubmissionCheck(directory)
    manifest = _read_json(directory / MANIFEST_FILE, check)
    if manifest is None:
        return check
    if manifest.get("format") != MANIFEST_FORMAT:
        check.problems.append(f"{MANIFEST_FILE} is not a robustbench_kd bundle manifest")
        return check
    try:
        model_id = validate_model_id(manifest.get("model_id"), what=f"the model_id in {MANIFEST_FILE}")
    except UserError as exc:  # it names a file of the bundle: ../x would send the checks outside it
        check.problems.append(str(exc))
        return check
    for name in (f"{model_id}.json", AUTOATTACK_LOG, CHECKSUM_FILE, ZOO_ENTRY_FILE, ISSUE_FILE, README_FILE):
        if not (directory / name).exists():  # a FIFO or device is there: reading it reports what it is
            check.problems.append(f"{name} is missing")
    info = _check_entry(directory / f"{model_id}.json", check)
    checkpoint = _check_checksum(directory, check)
    if info is not None:
        _check_log(directory / AUTOATTACK_LOG, info, check)
        _check_readiness(directory, manifest, info, check)
    files = _architecture_files(manifest, check)
    if (
        files is not None
        and _check_imports(directory, files, check)
        and load_entry
        and checkpoint is not None
        and info is not None
    ):
        _check_standalone_load(directory, files, checkpoint, info, check)
    return check


#: Each file of a bundle is small text: these limits are far above any real one and bound what a
#: damaged or hostile bundle can make the check read (``/dev/zero`` linked in as a file reads forever).
JSON_LIMIT = 1 * MiB
TEXT_LIMIT = 4 * MiB
_MODULE_FILE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.py")


def _read_text(path: Path, check: SubmissionCheck, *, limit: int = TEXT_LIMIT) -> str | None:
    """The text of a bundle file, or None with a problem line (not a regular file, too large, not UTF-8)."""
    try:
        return read_text_bounded(path, limit=limit, what="bundle file")
    except UserError as exc:
        check.problems.append(str(exc))
        return None


def _read_json(path: Path, check: SubmissionCheck) -> Any:
    if not path.exists():
        check.problems.append(f"{path.name} is missing (not a bundle written by robustbench_kd?)")
        return None
    try:
        data = load_json_bounded(path, limit=JSON_LIMIT, what="bundle file")
    except UserError as exc:
        check.problems.append(str(exc))
        return None
    if not isinstance(data, dict):
        check.problems.append(f"{path.name} is not a JSON object")
        return None
    return data


def _architecture_files(manifest: dict[str, Any], check: SubmissionCheck) -> list[str] | None:
    """The manifest's architecture files: plain module file names in the bundle (None: a problem was found)."""
    files = manifest.get("architecture_files", [])
    if not isinstance(files, list) or not all(isinstance(name, str) and _MODULE_FILE.fullmatch(name) for name in files):
        check.problems.append(
            f"{MANIFEST_FILE} lists architecture_files {str(files)[:80]}, not plain module file names "
            "(letters, digits and '_', then .py) in the bundle"
        )
        return None
    return files


def _check_entry(path: Path, check: SubmissionCheck) -> dict[str, Any] | None:
    from robustbench_kd.evaluation.model_info import validate_model_info

    if not path.exists():
        return None
    info = _read_json(path, check)
    if info is None:
        return None
    try:
        # Missing metadata is an unmet requirement (reported with the others), not a format error.
        validate_model_info({**info, **{key: "-" for key in REQUIRED_METADATA if not info.get(key)}})
    except (ValueError, UserError) as exc:
        check.problems.append(f"{path.name}: {exc}")
        return None
    clean, robust = _percent(info.get("clean_acc")), _percent(info.get("autoattack_acc"))
    if clean is not None and robust is not None and robust > clean:
        check.problems.append(
            f"{path.name}: autoattack_acc {info['autoattack_acc']}% is above clean_acc {info['clean_acc']}%, which "
            "AutoAttack cannot give (it counts every misclassified clean point as not robust)"
        )
        return None
    check.passed.append(f"{path.name} has RobustBench's leaderboard format")
    return dict(info)


def _percent(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _check_checksum(directory: Path, check: SubmissionCheck) -> Path | None:
    path = directory / CHECKSUM_FILE
    if not path.exists():
        return None
    text = _read_text(path, check, limit=JSON_LIMIT)
    if text is None:
        return None
    parts = text.strip().split("  ", 1)
    if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]) or not parts[1].isprintable():
        check.problems.append(f"{CHECKSUM_FILE} is not in sha256sum format ('<hex>  <path>')")
        return None
    digest, relative = parts
    checkpoint = (directory / relative).resolve()
    if not checkpoint.is_file():
        check.problems.append(f"the checkpoint {checkpoint} named in {CHECKSUM_FILE} does not exist")
        return None
    if sha256_of(checkpoint) != digest:
        check.problems.append(f"the checkpoint {checkpoint} does not have the SHA-256 in {CHECKSUM_FILE}")
        return None
    check.passed.append(f"checkpoint {relative} has the SHA-256 in {CHECKSUM_FILE}")
    return checkpoint


def _check_log(path: Path, info: dict[str, Any], check: SubmissionCheck) -> None:
    if not path.exists():
        return
    try:
        text = read_log(path)
    except UserError as exc:
        check.problems.append(str(exc))
        return
    shards = text.count("===== ")
    # AutoAttack opens every run with "using <version> version including <attacks>" (the attacks it still
    # runs: it drops the later ones once no point is left to attack).
    if text.count("using standard version including") < max(shards, 1):
        check.problems.append(f"{AUTOATTACK_LOG} is not a log of AutoAttack's standard version (of every shard)")
        return
    found = _ROBUST.findall(text)
    if shards == 0 and (not found or abs(float(found[-1]) - float(info.get("autoattack_acc", "nan"))) > 0.006):
        last = found[-1] if found else "none"
        check.problems.append(
            f"{AUTOATTACK_LOG} ends at robust accuracy {last}% but the entry says {info.get('autoattack_acc')}%"
        )
        return
    check.passed.append(f"{AUTOATTACK_LOG} is AutoAttack standard" + (f" ({shards} shards)" if shards else ""))


def _check_readiness(directory: Path, manifest: dict[str, Any], info: dict[str, Any], check: SubmissionCheck) -> None:
    record = EvaluationRecord.from_dict(manifest.get("evaluation", {}))
    unmet = unmet_requirements(info, record)
    check.unmet.extend(unmet)
    status = manifest.get("status")
    if (status == "ready") != (not unmet):
        check.problems.append(
            f"{MANIFEST_FILE} says {status!r} but the requirements give {'preview' if unmet else 'ready'}"
        )
    if directory.name.endswith(PREVIEW_SUFFIX) != bool(unmet):
        check.problems.append(
            f"the directory name {directory.name!r} does not match the status "
            f"({'a preview ends in ' + PREVIEW_SUFFIX if unmet else 'a ready bundle is named by the model id'})"
        )
    if not unmet:
        check.passed.append("every leaderboard requirement holds")


def _own_imports(source: str) -> list[str]:
    """The import statements of ``source`` that reach this project."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [name for name in names if name.split(".")[0] in ("robustbench_kd", "robustbench_kd_plugins")]
    return found


def _check_imports(directory: Path, files: list[str], check: SubmissionCheck) -> bool:
    ok = True
    for name in (ZOO_ENTRY_FILE, *files):
        path = directory / name
        if not path.exists():
            check.problems.append(f"{name} is missing")
            ok = False
            continue
        source = _read_text(path, check)
        if source is None:
            ok = False
            continue
        try:
            ours = _own_imports(source)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            where = f"{exc.msg}, line {exc.lineno}" if isinstance(exc, SyntaxError) else type(exc).__name__
            check.problems.append(f"{name} is not valid Python ({where})")
            ok = False
            continue
        if ours:
            check.problems.append(f"{name} imports this project ({', '.join(ours)}); RobustBench cannot run it")
            ok = False
    if ok:
        check.passed.append(f"{ZOO_ENTRY_FILE} imports only RobustBench, timm, torch and the standard library")
    return ok


# The child process, as a maintainer runs the entry: robustbench_kd cannot be imported; robustbench is a
# temporary copy holding the bundle's architecture files with the entry added to its zoo file; RobustBench's
# own load_model reads the checkpoint (strictly), and for ImageNet the preprocessing benchmark() looks up.
_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class _Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("robustbench_kd", "robustbench_kd_plugins"):
                raise ImportError("robustbench_kd is not available to RobustBench")
            return None

    sys.meta_path.insert(0, _Refuse())
    try:  # robustbench imports fra31's autoattack; where only its pyautoattack release is installed, use that
        import autoattack
    except ImportError:
        import pyautoattack, pyautoattack.state
        sys.modules["autoattack"], sys.modules["autoattack.state"] = pyautoattack, pyautoattack.state
    copy, model_id, model_dir, dataset, threat_model = sys.argv[1:6]
    sys.path.insert(0, copy)
    import robustbench
    assert robustbench.__file__.startswith(copy), robustbench.__file__
    from robustbench.utils import load_model
    model = load_model(model_name=model_id, model_dir=model_dir, dataset=dataset, threat_model=threat_model)
    preprocessing = None
    if dataset == "imagenet":
        from robustbench.data import get_preprocessing
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        preprocessing = repr(get_preprocessing(BenchmarkDataset(dataset), ThreatModel(threat_model), model_id, None))
    print(json.dumps({"type": type(model).__name__, "preprocessing": preprocessing}))
    """
)


def _check_standalone_load(
    directory: Path, files: list[str], checkpoint: Path, info: dict[str, Any], check: SubmissionCheck
) -> None:
    import shutil

    from robustbench_kd.submission.zoo_entry import ZOO_DICT_NAMES
    from robustbench_kd.zoo.compat import import_robustbench

    try:
        robustbench = import_robustbench()
    except (ImportError, UserError):
        check.problems.append("robustbench is not installed here: the zoo entry could not be loaded")
        return
    dataset, threat_model = str(info["dataset"]), checkpoint.parent.name
    model_id = checkpoint.stem
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "site"
        package = copy / "robustbench"
        shutil.copytree(Path(str(robustbench.__file__)).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
        for name in files:
            shutil.copy2(directory / name, package / "model_zoo" / "architectures" / Path(name).name)
        zoo_file = package / "model_zoo" / f"{dataset}.py"
        if not zoo_file.is_file():
            check.skipped.append(f"loading {ZOO_ENTRY_FILE}: robustbench has no model zoo for {dataset!r}")
            return
        entry = read_text_bounded(directory / ZOO_ENTRY_FILE, limit=TEXT_LIMIT, what=ZOO_ENTRY_FILE)
        dict_name = ZOO_DICT_NAMES.get(threat_model, threat_model)
        with zoo_file.open("a", encoding="utf-8") as handle:  # where a maintainer pastes it
            handle.write(f"\n\n{entry}\n{dict_name}[ENTRY[0]] = ENTRY[1]\n")
        argv = [str(copy), model_id, str(checkpoint.parents[2]), dataset, threat_model]
        try:
            done = subprocess.run(
                [sys.executable, "-c", _CHILD, *argv],
                capture_output=True,
                text=True,
                timeout=STANDALONE_TIMEOUT_S,
                cwd=tmp,
                env=_weights_only_env(),
            )
        except subprocess.TimeoutExpired:
            check.problems.append(f"loading {ZOO_ENTRY_FILE} took over {STANDALONE_TIMEOUT_S} s")
            return
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        check.problems.append(f"robustbench.utils.load_model fails on the entry without robustbench_kd: {last}")
        return
    check.passed.append(
        f"robustbench.utils.load_model loads {model_id} from {ZOO_ENTRY_FILE} and the checkpoint without "
        "robustbench_kd" + (" (ImageNet preprocessing found)" if dataset == "imagenet" else "")
    )
