"""Submission bundles: everything needed to put one evaluated model on the RobustBench leaderboard.

For a model id ``ID`` evaluated with standard AutoAttack, :func:`write_submission_bundle` writes
``<out>/submission/<ID>/``:

* ``<ID>.json`` - byte-for-byte copy of the leaderboard entry ``<out>/model_info/<dataset>/<threat>/<ID>.json``
  (the canonical file, which stays where it is);
* ``autoattack.log`` - AutoAttack's full log of the run that produced the robust accuracy;
* ``checkpoint.sha256`` - SHA-256 of the zoo-layout checkpoint ``<out>/models/<dataset>/<threat>/<ID>.pt``
  in ``sha256sum`` format, with the path relative to the bundle (``sha256sum -c checkpoint.sha256``
  run inside the bundle checks it);
* ``zoo_entry.py`` - the entry for RobustBench's ``robustbench/model_zoo/<dataset>.py`` (import lines
  plus an ``ENTRY = ('ID', {'model': lambda: ..., 'gdrive_id': '<fill in>'})`` tuple); executing the
  file defines ``ENTRY``;
* ``new_model_issue.md`` - RobustBench's "New Model(s)" issue template, filled in;
* ``README.md`` - what each file is, the command that produced it, and what is left to fill in.

Each file has its own module: :mod:`.layout` (the directory and file names), :mod:`.autoattack_log`,
:mod:`.zoo_entry` (the architecture's constructor as source), :mod:`.issue`; this module writes them
all, with the checksum and the README. Import the names of those modules from the modules themselves.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_bytes, atomic_write_text
from robustbench_kd.storage.hashing import sha256_of
from robustbench_kd.submission.autoattack_log import bundle_log
from robustbench_kd.submission.issue import format_new_model_issue, or_fill_in
from robustbench_kd.submission.layout import (
    AUTOATTACK_LOG,
    CHECKSUM_FILE,
    ISSUE_FILE,
    LEADERBOARD_N_EXAMPLES,
    README_FILE,
    ZOO_ENTRY_FILE,
    bundle_dir,
)
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
    sha256: str
    missing: list[str] = field(default_factory=list)  #: what the submitter still has to fill in


def _tool_version() -> str | None:
    try:
        return importlib.metadata.version("robustbench_kd")
    except importlib.metadata.PackageNotFoundError:
        return None


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
) -> SubmissionBundle:
    """Write ``<out_dir>/submission/<model_id>/`` (see the module docstring) and return its files.

    Args:
        info_path: the canonical leaderboard entry (``model_info/...``), copied byte for byte.
        checkpoint_path: the zoo-layout checkpoint written by ``save_zoo_checkpoint``; hashed.
        results: the evaluation summary (``EvalResult.to_dict()``): ``n_examples``, ``seed``,
            ``eps_str`` and ``autoattack_version`` are used.
        constructor: how to rebuild the architecture; None gives a placeholder zoo entry.
        autoattack_log: AutoAttack's log file(s) of this evaluation, moved into the bundle as
            ``autoattack.log`` (several - e.g. one per shard - are concatenated in order, each under a
            header, and removed). None: no log is bundled and the README says so.
        command: the command line that produced the evaluation (recorded in the README).
        batch_size: AutoAttack's batch size (stated in the issue).

    Every file is written atomically. Raises UserError if the entry or checkpoint does not exist.
    """
    info_path, checkpoint_path = Path(info_path), Path(checkpoint_path)
    for what, path in (("model_info entry", info_path), ("checkpoint", checkpoint_path)):
        if not path.is_file():
            raise UserError(f"submission bundle for {model_id}: the {what} {path} does not exist")
    directory = bundle_dir(out_dir, model_id)
    directory.mkdir(parents=True, exist_ok=True)
    raw_info = info_path.read_bytes()
    info = json.loads(raw_info)
    constructor = constructor or placeholder_constructor("the architecture is unknown; write its constructor by hand")

    info_copy = atomic_write_bytes(directory / f"{model_id}.json", raw_info)
    log_file = bundle_log(directory, autoattack_log)
    sha256 = sha256_of(checkpoint_path)
    relative = Path(os.path.relpath(checkpoint_path.resolve(), directory.resolve())).as_posix()
    checksum = atomic_write_text(directory / CHECKSUM_FILE, f"{sha256}  {relative}\n")
    dataset = str(info["dataset"])
    zoo_entry = atomic_write_text(
        directory / ZOO_ENTRY_FILE, format_zoo_entry(model_id, constructor, dataset=dataset, threat_model=threat_model)
    )
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
        ),
    )

    missing = [key for key in ("name", "authors", "venue", "link", "architecture") if info.get(key) in (None, "")]
    todo = (
        [
            f"model_info fields still null: {', '.join(missing)} (set them in [model_info] or with the "
            "evaluate flags --title/--authors/--venue/--link/--architecture and re-run, or edit "
            f"{info_copy.name} and the canonical file)"
        ]
        if missing
        else []
    )
    full = LEADERBOARD_N_EXAMPLES.get(dataset)
    if full is None:
        todo.append(f"RobustBench has no {dataset!r} leaderboard; this bundle shows the format only")
    elif n_examples != full:
        todo.append(f"evaluated on {n_examples} test points; the leaderboard needs all {full}")
    if info.get("unreliable"):
        todo.append(
            "the entry is marked unreliable (AutoAttack's flags or failed sanity checks): "
            + or_fill_in(info.get("footnote"))
        )
    if constructor.placeholder:
        todo.append(f"write the architecture constructor into {ZOO_ENTRY_FILE} ({constructor.note})")
    todo += [
        f"upload the checkpoint and put its Google Drive id into {ZOO_ENTRY_FILE}",
        f"fill in the checkpoint/code URLs and the license choice in {ISSUE_FILE}",
    ]
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
            n_examples=n_examples,
            results=results,
        ),
    )
    if missing:
        log.warning(
            "submission bundle %s: model_info fields %s are null; fill them in before submitting",
            model_id,
            ", ".join(missing),
        )
    return SubmissionBundle(
        directory=directory,
        model_info=info_copy,
        autoattack_log=log_file,
        checksum=checksum,
        zoo_entry=zoo_entry,
        issue=issue,
        readme=readme,
        sha256=sha256,
        missing=todo,
    )


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
    n_examples: int,
    results: Mapping[str, Any],
) -> str:
    produced = f"`{command}`" if command else "(command not recorded)"
    version = _tool_version()
    log_line = (
        f"| `{AUTOATTACK_LOG}` | AutoAttack's full log (every attack, robust accuracy after each) of the run "
        "that produced the robust accuracy |"
        if log_file is not None
        else f"| (`{AUTOATTACK_LOG}` missing) | no AutoAttack log was recorded for this evaluation |"
    )
    lines = [
        f"# Submission bundle for {model_id}",
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
        f'| `{ISSUE_FILE}` | RobustBench\'s "New Model(s)" issue, filled in; open it at '
        "https://github.com/RobustBench/robustbench/issues/new/choose |",
        f"| `{README_FILE}` | this file |",
        "",
        "## Before submitting",
        "",
        *[f"- {item}" for item in todo],
        "",
    ]
    return "\n".join(lines)
