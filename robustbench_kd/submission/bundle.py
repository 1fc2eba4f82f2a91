"""Submission bundles: everything needed to put one evaluated model on the RobustBench leaderboard.

For a model id ``ID`` evaluated with standard AutoAttack, :func:`write_submission_bundle` writes
``<out>/submission/<ID>/`` when every leaderboard requirement holds (:mod:`.readiness`: a leaderboard for
the dataset, threat model and eps; the full test set; standard AutoAttack; complete metadata; the sanity
suite passed or recorded; a zoo entry that needs only RobustBench and timm), and otherwise the *preview*
``<out>/submission/<ID>.preview/``, whose README and issue text open with the unmet requirements:

* ``<ID>.json`` - byte-for-byte copy of the leaderboard entry ``<out>/model_info/<dataset>/<threat>/<ID>.json``
  (the canonical file, which stays where it is);
* ``autoattack.log`` - AutoAttack's full log of the run that produced the robust accuracy (of every shard,
  in order, for a sharded evaluation);
* ``checkpoint.sha256`` - SHA-256 of the zoo-layout checkpoint ``<out>/models/<dataset>/<threat>/<ID>.pt``
  in ``sha256sum`` format, with the path relative to the bundle (``sha256sum -c checkpoint.sha256``
  run inside the bundle checks it);
* ``zoo_entry.py`` - the entry for RobustBench's ``robustbench/model_zoo/<dataset>.py`` (import lines
  plus an ``ENTRY = ('ID', {'model': lambda: ..., 'gdrive_id': '<fill in>'})`` tuple); executing the
  file defines ``ENTRY``; with, for an architecture RobustBench does not have, its self-contained source
  for ``robustbench/model_zoo/architectures/``;
* ``new_model_issue.md`` - RobustBench's "New Model(s)" issue template, filled in;
* ``bundle.json`` - the evaluation behind the bundle and its status, read by ``check-submission``;
* ``README.md`` - the status, what each file is, the command that produced it, and what is left to do.

Each file has its own module: :mod:`.layout` (the directory and file names), :mod:`.autoattack_log`,
:mod:`.zoo_entry` (the architecture's constructor as source), :mod:`.issue`, :mod:`.readiness`; this module
writes them all, with the checksum, the manifest and the README. Import the names of those modules from the
modules themselves.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_bytes, atomic_write_text
from robustbench_kd.storage.bounded import MiB, read_bytes_bounded
from robustbench_kd.storage.hashing import sha256_of
from robustbench_kd.submission.autoattack_log import bundle_log, check_logs, log_paths
from robustbench_kd.submission.issue import format_new_model_issue
from robustbench_kd.submission.layout import (
    AUTOATTACK_LOG,
    CHECKSUM_FILE,
    ISSUE_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    README_FILE,
    ZOO_ENTRY_FILE,
    bundle_dir,
    preview_dir,
)
from robustbench_kd.submission.readiness import EvaluationRecord, unmet_requirements
from robustbench_kd.submission.zoo_entry import (
    ZOO_DICT_NAMES,
    ZooConstructor,
    format_zoo_entry,
    placeholder_constructor,
)

__all__ = [
    "SubmissionBundle",
    "distill_command",
    "write_submission_bundle",
]

log = logging.getLogger(__name__)


def distill_command(run: Any) -> str:
    """The command that reproduces a trained run: ``robustbench-kd distill <out_dir>/config.yaml``.

    That file is the run's resolved configuration (every override applied), written when training starts.
    """
    return shlex.join(["robustbench-kd", "distill", str(Path(run.out_dir) / "config.yaml")])


@dataclass
class SubmissionBundle:
    """The files of one submission bundle (all under ``directory``)."""

    directory: Path
    model_info: Path
    autoattack_log: Path | None
    checksum: Path
    zoo_entry: Path
    issue: Path
    readme: Path
    manifest: Path
    sha256: str
    ready: bool = False
    unmet: list[str] = field(default_factory=list)  #: requirements a preview does not meet
    missing: list[str] = field(default_factory=list)  #: what the submitter still has to do, in order

    def status_line(self) -> str:
        """One line for the console: which kind of bundle was written, and why."""
        if self.ready:
            return f"submission bundle {self.directory} (ready: every leaderboard requirement holds)"
        return f"submission bundle PREVIEW {self.directory} (not submittable: {'; '.join(self.unmet)})"


def entry_is_standalone(constructor: ZooConstructor) -> tuple[bool, str]:
    """Whether the zoo entry works in RobustBench as it is (no import of this project, a known ImageNet
    preprocessing, not a placeholder), and why not (empty when it does)."""
    return constructor.standalone, constructor.standalone_problem or ""


def architecture_files(constructor: ZooConstructor) -> Mapping[str, str]:
    """Architecture source files the entry needs in ``robustbench/model_zoo/architectures/`` (path -> text).

    Each name becomes a file of the bundle, so it must be a plain module file name (``rbkd_small_cnn_1a2b.py``):
    a constructor read back from a shard file is not trusted to keep its files inside the bundle.
    """
    files = dict(constructor.files)
    for name in files:
        if not _MODULE_FILE.fullmatch(name):
            raise UserError(
                f"architecture file name {name[:80]!r} of the zoo entry is not a plain module file name "
                "(letters, digits and '_', then .py)"
            )
    return files


_MODULE_FILE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\.py")
#: A leaderboard entry is a dozen short fields: 1 MiB is far above any, and bounds what a damaged one costs.
ENTRY_LIMIT = 1 * MiB


def _read_entry(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The leaderboard entry's bytes (copied byte for byte) and its content, read within :data:`ENTRY_LIMIT`."""
    raw = read_bytes_bounded(path, limit=ENTRY_LIMIT, what="model_info entry")
    try:
        info = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"model_info entry {path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or not isinstance(info.get("dataset"), str):
        raise UserError(f"model_info entry {path} is not a leaderboard entry (a JSON object with a dataset)")
    return raw, info


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _tool_version() -> str | None:
    try:
        return importlib.metadata.version("robustbench_kd")
    except importlib.metadata.PackageNotFoundError:
        return None


def evaluation_record(info: Mapping[str, Any], results: Mapping[str, Any], *, threat_model: str) -> EvaluationRecord:
    """The :class:`EvaluationRecord` of an evaluation summary (``results/<ID>.json``) and its entry."""
    sanity = results.get("sanity")
    return EvaluationRecord(
        dataset=str(info["dataset"]),
        threat_model=threat_model,
        eps=str(info.get("eps") or results.get("eps_str") or results.get("eps")),
        n_examples=int(results["n_examples"]),
        # The entry is written only for the standard version (the results' "autoattack" key).
        autoattack_version="standard" if "autoattack" in results.get("accuracy", {}) else "none",
        sanity_ran=isinstance(sanity, Mapping),
        sanity_passed=isinstance(sanity, Mapping) and bool(sanity.get("reliable")),
    )


def write_submission_bundle(
    out_dir: str | os.PathLike[str],
    *,
    model_id: str,
    threat_model: str,
    info_path: str | os.PathLike[str],
    checkpoint_path: str | os.PathLike[str],
    results: Mapping[str, Any],
    constructor: ZooConstructor | None,
    autoattack_log: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None,
    command: str | None = None,
    batch_size: int | None = None,
    keep_logs: bool = False,
) -> SubmissionBundle:
    """Write the bundle of ``model_id`` (see the module docstring) and return its files.

    The bundle is ``<out_dir>/submission/<model_id>/`` when every leaderboard requirement holds
    (:mod:`.readiness`), else the preview ``<out_dir>/submission/<model_id>.preview/``; the other one, left
    by an earlier evaluation of the same id, is removed (it describes other numbers).

    Args:
        info_path: the canonical leaderboard entry (``model_info/...``), copied byte for byte.
        checkpoint_path: the zoo-layout checkpoint written by ``save_zoo_checkpoint``; hashed.
        results: the evaluation summary (``results/<ID>.json``): ``n_examples``, ``seed``, ``eps_str``,
            ``accuracy``, ``sanity`` and ``autoattack_version`` are used.
        constructor: how to rebuild the architecture; None gives a placeholder zoo entry.
        autoattack_log: AutoAttack's log file(s) of this evaluation, moved into the bundle as
            ``autoattack.log`` (several - e.g. one per shard - are concatenated in order, each under a
            header, and removed). None: no log is bundled and the README says so.
        command: the command line that produced the evaluation (recorded in the README).
        batch_size: AutoAttack's batch size (stated in the issue).
        keep_logs: copy the AutoAttack logs instead of moving them (merged shards keep their own).

    Every file is written atomically. Raises UserError if the entry or checkpoint does not exist.
    """
    info_path, checkpoint_path = Path(info_path), Path(checkpoint_path)
    for what, path in (("model_info entry", info_path), ("checkpoint", checkpoint_path)):
        if not path.is_file():
            raise UserError(f"submission bundle for {model_id}: the {what} {path} does not exist")
    # Everything read or named from outside is checked before the bundle directory is touched.
    raw_info, info = _read_entry(info_path)
    if autoattack_log is not None:
        check_logs(log_paths(autoattack_log))
    constructor = constructor or placeholder_constructor("the architecture is unknown; write its constructor by hand")
    standalone, entry_note = entry_is_standalone(constructor)
    record = dataclasses.replace(
        evaluation_record(info, results, threat_model=threat_model), standalone_entry=standalone, entry_note=entry_note
    )
    files = architecture_files(constructor)
    unmet = unmet_requirements(info, record)
    ready_dir, preview = bundle_dir(out_dir, model_id), preview_dir(out_dir, model_id)
    directory, stale = (ready_dir, preview) if not unmet else (preview, ready_dir)
    directory.mkdir(parents=True, exist_ok=True)

    info_copy = atomic_write_bytes(directory / f"{model_id}.json", raw_info)
    log_file = bundle_log(directory, autoattack_log, keep_sources=keep_logs)
    sha256 = sha256_of(checkpoint_path)
    relative = Path(os.path.relpath(checkpoint_path.resolve(), directory.resolve())).as_posix()
    checksum = atomic_write_text(directory / CHECKSUM_FILE, f"{sha256}  {relative}\n")
    dataset = str(info["dataset"])
    zoo_entry = atomic_write_text(
        directory / ZOO_ENTRY_FILE, format_zoo_entry(model_id, constructor, dataset=dataset, threat_model=threat_model)
    )
    written = [atomic_write_text(directory / name, source) for name, source in files.items()]
    n_examples = int(results["n_examples"])
    issue = atomic_write_text(
        directory / ISSUE_FILE,
        format_new_model_issue(
            info,
            model_id=model_id,
            threat_model=threat_model,
            n_examples=n_examples,
            seed=results.get("seed"),
            autoattack_version=results.get("autoattack_version"),
            batch_size=batch_size,
            sha256=sha256,
            constructor=constructor,
            tool_version=_tool_version(),
            unmet=unmet,
            architecture_file=next(iter(files), None),
        ),
    )
    todo = list(unmet)
    if constructor.placeholder:
        todo.append(f"write the architecture constructor into {ZOO_ENTRY_FILE} ({constructor.note})")
    todo += [
        f"upload the checkpoint and put its Google Drive id into {ZOO_ENTRY_FILE}",
        f"fill in the checkpoint/code URLs in {ISSUE_FILE}, and tick the Model Zoo and license boxes you agree to",
    ]
    manifest = atomic_write_text(
        directory / MANIFEST_FILE,
        json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "format_version": MANIFEST_VERSION,
                "model_id": model_id,
                "status": "ready" if not unmet else "preview",
                "unmet": unmet,
                "evaluation": record.to_dict(),
                "checkpoint": {"path": relative, "sha256": sha256},
                "architecture_files": list(files),
                "robustbench_kd_version": _tool_version(),
            },
            indent=2,
        )
        + "\n",
    )
    readme = atomic_write_text(
        directory / README_FILE,
        _readme(
            model_id,
            dataset=dataset,
            threat_model=threat_model,
            info_path=info_path,
            info_copy=info_copy,
            checkpoint_path=checkpoint_path,
            log_file=log_file,
            sha256=sha256,
            command=command,
            todo=todo,
            unmet=unmet,
            n_examples=n_examples,
            results=results,
            architecture_files=[path.relative_to(directory).as_posix() for path in written],
        ),
    )
    if stale.is_dir():
        shutil.rmtree(stale)  # the other kind of bundle, from an earlier evaluation of this id
    bundle = SubmissionBundle(
        directory=directory,
        model_info=info_copy,
        autoattack_log=log_file,
        checksum=checksum,
        zoo_entry=zoo_entry,
        issue=issue,
        readme=readme,
        manifest=manifest,
        sha256=sha256,
        ready=not unmet,
        unmet=unmet,
        missing=todo,
    )
    log.info("%s", bundle.status_line())
    return bundle


def _readme(
    model_id: str,
    *,
    dataset: str,
    threat_model: str,
    info_path: Path,
    info_copy: Path,
    checkpoint_path: Path,
    log_file: Path | None,
    sha256: str,
    command: str | None,
    todo: list[str],
    unmet: list[str],
    n_examples: int,
    results: Mapping[str, Any],
    architecture_files: list[str],
) -> str:
    produced = f"`{command}`" if command else "(command not recorded)"
    version = _tool_version()
    log_line = (
        f"| `{AUTOATTACK_LOG}` | AutoAttack's full log (every attack, robust accuracy after each) of the run "
        "that produced the robust accuracy; attach it to the issue |"
        if log_file is not None
        else f"| (`{AUTOATTACK_LOG}` missing) | no AutoAttack log was recorded for this evaluation |"
    )
    if unmet:
        status = [
            f"# PREVIEW submission bundle for {model_id}: not ready to submit",
            "",
            "This bundle shows what a submission of this model would look like. It does not meet these "
            "requirements of a RobustBench leaderboard entry:",
            "",
            *[f"- {item}" for item in unmet],
        ]
    else:
        status = [
            f"# Submission bundle for {model_id}",
            "",
            "Ready: every requirement of a RobustBench leaderboard entry holds (a leaderboard for this dataset, "
            "threat model and eps; the full test set; standard AutoAttack; complete metadata; the sanity suite "
            "passed or its findings recorded; a zoo entry that needs only RobustBench and timm). "
            "`robustbench-kd check-submission` on this directory says the same.",
        ]
    arch_lines = [
        f"| `{name}` | the architecture's source, self-contained (torch only), for "
        f"`robustbench/model_zoo/architectures/{Path(name).name}` |"
        for name in architecture_files
    ]
    lines = [
        *status,
        "",
        f"Produced by {produced}" + (f" with robustbench_kd {version}" if version else "") + ".",
        f"Evaluation: {n_examples} {dataset} test points, threat model {threat_model}, "
        f"eps {results.get('eps_str', '')}, "
        f"AutoAttack standard ({results.get('autoattack_version')}), seed {results.get('seed')}.",
        "",
        "| file | what it is |",
        "|---|---|",
        f"| `{info_copy.name}` | the RobustBench leaderboard entry (copy of `{info_path}`); it goes to "
        f"`model_info/{dataset}/{threat_model}/{model_id}.json` in the RobustBench repository |",
        log_line,
        f"| `{CHECKSUM_FILE}` | SHA-256 of the checkpoint `{checkpoint_path}` (`{sha256}`); check it with "
        f"`sha256sum -c {CHECKSUM_FILE}` in this directory |",
        f"| `{ZOO_ENTRY_FILE}` | the entry for `robustbench/model_zoo/{dataset}.py` (imports + `ENTRY` tuple for the "
        f"`{ZOO_DICT_NAMES.get(threat_model, threat_model)}` OrderedDict) |",
        *arch_lines,
        f'| `{ISSUE_FILE}` | RobustBench\'s "New Model(s)" issue, filled in; open it at '
        "https://github.com/RobustBench/robustbench/issues/new/choose (or send the checkpoint by e-mail for a "
        "private submission, as the issue text says) |",
        f"| `{MANIFEST_FILE}` | what `check-submission` reads: the evaluation behind the bundle and its status |",
        f"| `{README_FILE}` | this file |",
        "",
        "## Before submitting",
        "",
        *[f"- {item}" for item in todo],
        "",
    ]
    return "\n".join(lines)
