"""Resumable AutoAttack runs: the state file, the batch-by-batch driver, and AutoAttack's warnings.

AutoAttack's own state file cannot be resumed from, in pyautoattack 0.2.0 and fra31's code alike: the
attack set is stored as a string, so every resume fails the "different set of attacks" check; the
resume branch never assigns ``y_adv``; the run attacks are read back as a list that ``add`` fails on.
:func:`run_resumable` instead drives the official ``run_standard_evaluation`` one attack and one batch
at a time over exactly the points and batches a single uninterrupted call would attack, and saves the
robust flags atomically after every batch (:class:`AutoAttackState`, :func:`read_autoattack_state`),
so an interrupted-then-resumed run gives the same flags as an uninterrupted one.

This module sits below :mod:`robustbench_kd.zoo.compat`, whose fra31-style ``AutoAttack`` adapter runs
``run_standard_evaluation(state_path=...)`` through :func:`run_resumable` and whose ``autoattack.state``
module reads these state files; :mod:`robustbench_kd.evaluation.autoattack` builds on both.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_write_text
from robustbench_kd.storage.bounded import MiB, check_structure, read_text_bounded

__all__ = [
    "AA_LOGGER_NAME",
    "STATE_FORMAT",
    "AutoAttackState",
    "ResumableRun",
    "capture_autoattack_warnings",
    "check_state_file",
    "data_fingerprint",
    "model_fingerprint",
    "read_autoattack_state",
    "run_resumable",
]

logger = logging.getLogger(__name__)

#: The logger pyautoattack reports progress and its checks' warnings on; fra31's package prints through its own
#: Logger instead, and ``evaluation.autoattack.run_autoattack`` forwards its warnings here.
AA_LOGGER_NAME = "auto-attack"

STATE_FORMAT = "robustbench_kd.autoattack-state"
STATE_FORMAT_VERSION = 1


class _RecordMessages(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.messages.append(record.getMessage())
        except Exception:  # a malformed record must not abort a long evaluation
            self.handleError(record)


class _ForwardToParent(logging.Handler):
    """Re-emits records to the parent loggers' handlers, standing in for ``propagate``."""

    def __init__(self, source: logging.Logger, level: int) -> None:
        super().__init__(level)
        self._source = source

    def emit(self, record: logging.LogRecord) -> None:
        parent = self._source.parent
        if parent is not None:
            # Logger.handle does not re-check the level, exactly like normal propagation.
            parent.handle(record)


@contextlib.contextmanager
def capture_autoattack_warnings() -> Iterator[list[str]]:
    """Collect the messages of WARNING+ records on the ``auto-attack`` logger while active.

    If the user raised that logger's threshold above WARNING (silencing it), the threshold is
    lowered to WARNING for the run so the checks are still captured; propagation is then replaced
    by a forwarder at the user's threshold, so their own handlers see nothing new. Everything is
    restored on exit. (``log_path`` is handled by the compat adapter, which routes existing handlers,
    this recorder included, through its own relay.)
    """
    aa_logger = logging.getLogger(AA_LOGGER_NAME)
    original_level = aa_logger.level
    original_propagate = aa_logger.propagate
    original_effective = aa_logger.getEffectiveLevel()
    lower_level = original_effective > logging.WARNING

    recorder = _RecordMessages(logging.WARNING)
    added: list[logging.Handler] = [recorder]
    if lower_level and original_propagate:
        added.append(_ForwardToParent(aa_logger, original_effective))
    for handler in added:
        aa_logger.addHandler(handler)
    if lower_level:
        aa_logger.setLevel(logging.WARNING)
        aa_logger.propagate = False
    try:
        yield recorder.messages
    finally:
        aa_logger.setLevel(original_level)
        aa_logger.propagate = original_propagate
        for handler in added:
            aa_logger.removeHandler(handler)


def _hash_tensor(digest: Any, tensor: Tensor) -> None:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
    # Raw bytes (any dtype, bfloat16 included, which numpy lacks) through a uint8 view.
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")


def data_fingerprint(x: Tensor, y: Tensor) -> str:
    """SHA-256 of the exact inputs and labels (dtype, shape and bytes), as a hex string."""
    digest = hashlib.sha256()
    _hash_tensor(digest, x)
    _hash_tensor(digest, y)
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's ``state_dict`` (names, dtypes, shapes and bytes, in name order).

    Identifies the weights whatever file format or wrapper they came from; two models with the same
    fingerprint compute the same function if their architectures (code) are the same.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        digest.update(name.encode() + b"\0")
        value = state[name]
        if isinstance(value, Tensor):
            _hash_tensor(digest, value)
        else:  # extra state (rare): its repr is the best stable description available
            digest.update(repr(value).encode())
    return digest.hexdigest()


@dataclass
class AutoAttackState:
    """The content of a resumable run's state file (see :func:`run_resumable`).

    Attributes:
        settings: what the flags depend on: attacks, version, norm, eps, seed, attack parameters,
            number of examples and the SHA-256 of the data and of the model weights. A resume with
            different settings is refused. Empty for a legacy (pyautoattack/fra31) state file.
        attacks: the attacks of the run, in order.
        robust: bool [n]: still robust after the attacks run so far (AutoAttack's own verdict).
        adv_labels: long [n]: the label predicted at the adversarial example AutoAttack kept (the
            clean prediction where nothing was found; -1 where a legacy file does not say).
        completed: attacks finished, in order.
        current, pending: the attack in progress and the indices it has not attacked yet.
        accuracy: robust accuracy after the clean pass (``"clean"``) and after each completed attack,
            over all n points (what AutoAttack's Square-attack check compares).
        warnings: AutoAttack's warnings of every session so far, without repeats.
        batch_size, backend: of the session that last wrote the file (informational; a resume with
            a different batch size batches the remaining points differently).
        finished: all attacks ran (or no robust point was left).
        legacy: read from an AutoAttack ``EvaluationState`` file rather than one of ours.
        fooled_by: long [n]: the position in ``attacks`` of the attack that fooled each point, -1 for a
            point no attack fooled (still robust, or already wrong on the clean input). None when the
            file does not say (AutoAttack's own files, and ours written before the field existed): the
            per-attack outcomes of such a run are unknown.
    """

    settings: dict[str, Any]
    attacks: list[str]
    robust: Tensor
    adv_labels: Tensor
    completed: list[str] = field(default_factory=list)
    current: str | None = None
    pending: Tensor | None = None
    accuracy: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    batch_size: int | None = None
    backend: str | None = None
    finished: bool = False
    legacy: bool = False
    fooled_by: Tensor | None = None

    @property
    def robust_accuracy(self) -> float:
        """Fraction of points still robust."""
        return float(self.robust.sum().item()) / max(1, self.robust.numel())

    def to_json(self) -> str:
        """The file content (one JSON object; flags and labels as integer lists)."""
        return (
            json.dumps(
                {
                    "format": STATE_FORMAT,
                    "format_version": STATE_FORMAT_VERSION,
                    "settings": self.settings,
                    "attacks": list(self.attacks),
                    "completed": list(self.completed),
                    "current": self.current,
                    "pending": None if self.pending is None else self.pending.tolist(),
                    "finished": bool(self.finished),
                    "accuracy": {key: float(value) for key, value in self.accuracy.items()},
                    "robust_accuracy": self.robust_accuracy,
                    "warnings": list(self.warnings),
                    "batch_size": self.batch_size,
                    "backend": self.backend,
                    "updated": datetime.now(UTC).isoformat(timespec="seconds"),
                    "robust_flags": [int(v) for v in self.robust.tolist()],
                    "adv_labels": [int(v) for v in self.adv_labels.tolist()],
                    "fooled_by": None if self.fooled_by is None else [int(v) for v in self.fooled_by.tolist()],
                },
                separators=(",", ":"),
            )
            + "\n"
        )


def _bad_state(path: Path, why: str) -> UserError:
    return UserError(
        f"AutoAttack state file {path} {why}; delete it (the run then starts over) or pass another state path"
    )


#: A state file holds two integers per example (plus the pending indices): 64 MiB is room for millions of
#: examples, far beyond any test set, while a larger file (or a device such as /dev/zero) is refused unread.
STATE_LIMIT = 64 * MiB
#: AutoAttack's own files store the attack set as the repr of a Python set: a few hundred characters.
_LEGACY_ATTACKS_LIMIT = 10_000


def check_state_file(path: str | os.PathLike[str]) -> None:
    """Refuse, before any work starts, a state file that exists but could not be resumed from.

    A missing file is fine (the run starts one). A FIFO, device, directory, oversized or damaged file
    raises the one-line UserError that :func:`read_autoattack_state` would raise after the model, the
    data and the clean pass had been paid for.
    """
    candidate = Path(path)
    if candidate.exists() or candidate.is_symlink():
        read_autoattack_state(candidate)


def read_autoattack_state(path: str | os.PathLike[str]) -> AutoAttackState:
    """Read a state file written by :func:`run_resumable`, or by AutoAttack's own ``EvaluationState``.

    AutoAttack's own files (pyautoattack 0.2.0, fra31) store the attack set as the string
    ``"{'apgd-ce', ...}"``; it is parsed back into a set here. Such a file records neither the order
    of the attacks nor what it was made for (model, data, eps), so :func:`run_resumable` can only
    check the attack set. The file is untrusted input: only a regular file of at most
    :data:`STATE_LIMIT` bytes is read, and every field's type, range and length is checked; anything
    else raises a one-line UserError naming the file.
    """
    path = Path(path)
    text = read_text_bounded(path, limit=STATE_LIMIT, what="AutoAttack state file")
    try:
        # NaN is allowed by the parser: AutoAttack's own files write a clean accuracy not yet measured as
        # NaN. The field checks below accept it there only.
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad_state(path, f"is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise _bad_state(path, "is nested too deeply to be a state file") from None
    check_structure(raw, what=f"AutoAttack state file {path}")
    if not isinstance(raw, dict):
        raise _bad_state(path, "is not a JSON object")
    check = _StateChecker(path)
    if raw.get("format") == STATE_FORMAT:
        return _read_state(raw, check)
    if "_attacks_to_run" in raw and "_robust_flags" in raw:
        return _read_legacy_state(raw, check)
    raise _bad_state(path, "is not an AutoAttack state file")


class _StateChecker:
    """Type and range checks of a state file's fields, each failure a one-line UserError naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, why: str) -> UserError:
        return _bad_state(self.path, why)

    def field(self, raw: dict[str, Any], key: str) -> Any:
        if key not in raw:
            raise self.fail(f"has no {key!r}")
        return raw[key]

    def integer(self, value: Any, key: str, *, low: int | None = None) -> int:
        # bool is an int in Python, but true/false in a count or an index is a damaged file.
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            bound = f" >= {low}" if low is not None else ""
            raise self.fail(f"has {key} = {_short(value)}, expected an integer{bound}")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"has {key} = {_short(value)}, expected true or false")
        return value

    def text(self, value: Any, key: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(f"has {key} = {_short(value)}, expected a string")
        return value

    def texts(self, value: Any, key: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(f"has {key} = {_short(value)}, expected a list of strings")
        return list(value)

    def fraction(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise self.fail(f"has {key} = {_short(value)}, expected an accuracy in [0, 1]")
        return float(value)

    def flags(self, value: Any, key: str, *, allow_bool: bool = False) -> Tensor:
        """A list of 0/1 flags (our files write integers; AutoAttack's own write true/false)."""
        allowed = (bool, int) if allow_bool else (int,)
        if not isinstance(value, list) or not all(type(v) in allowed and v in (0, 1) for v in value):
            raise self.fail(f"has {key} that is not a list of 0/1 flags")
        return torch.tensor([bool(v) for v in value], dtype=torch.bool)

    def indices(self, value: Any, key: str, *, low: int, high: int) -> Tensor:
        """A list of distinct integers in ``[low, high)``."""
        if not isinstance(value, list) or not all(
            type(v) is int and low <= v < high
            for v in value  # type(): a bool is not an index
        ):
            raise self.fail(f"has {key} that is not a list of integers in {low}..{high - 1}")
        if len(set(value)) != len(value):
            raise self.fail(f"has {key} with repeated entries")
        return torch.tensor(value, dtype=torch.long)


def _read_state(raw: dict[str, Any], check: _StateChecker) -> AutoAttackState:
    """Our own format (see :meth:`AutoAttackState.to_json`), every field checked."""
    version = raw.get("format_version")
    if version != STATE_FORMAT_VERSION or isinstance(version, bool):
        raise check.fail(f"has format version {_short(version)}, this version reads {STATE_FORMAT_VERSION}")
    settings = check.field(raw, "settings")
    if not isinstance(settings, dict):
        raise check.fail("has settings that are not a JSON object")
    robust = check.flags(check.field(raw, "robust_flags"), "robust_flags")
    n = robust.numel()
    if "n_examples" in settings and check.integer(settings["n_examples"], "settings.n_examples") != n:
        raise check.fail(f"has {n} robust flags for its {settings['n_examples']} examples")
    labels = check.field(raw, "adv_labels")
    if not isinstance(labels, list) or not all(type(v) is int and v >= -1 for v in labels):
        raise check.fail("has adv_labels that are not a list of class indices (or -1)")
    if len(labels) != n:
        raise check.fail(f"has {len(labels)} adv_labels for {n} robust flags")
    attacks = check.texts(check.field(raw, "attacks"), "attacks")
    if len(set(attacks)) != len(attacks):
        raise check.fail(f"lists an attack twice in attacks {_short(attacks)}")
    completed = check.texts(raw.get("completed", []), "completed")
    if any(name not in attacks for name in completed) or len(set(completed)) != len(completed):
        raise check.fail(f"has completed = {_short(completed)}, which is not a subset of attacks {_short(attacks)}")
    current = check.text(raw.get("current"), "current", optional=True)
    if current is not None and (current not in attacks or current in completed):
        raise check.fail(f"has current = {current!r}, which is not an unfinished attack of {_short(attacks)}")
    pending = raw.get("pending")
    fooled_by = raw.get("fooled_by")
    if fooled_by is not None and (
        not isinstance(fooled_by, list)
        or len(fooled_by) != n
        or not all(type(v) is int and -1 <= v < len(attacks) for v in fooled_by)
    ):
        raise check.fail(f"has fooled_by that is not a list of {n} attack positions in -1..{len(attacks) - 1}")
    accuracy = raw.get("accuracy", {})
    if not isinstance(accuracy, dict):
        raise check.fail("has accuracy that is not a JSON object")
    batch_size = raw.get("batch_size")
    return AutoAttackState(
        settings=dict(settings),
        attacks=attacks,
        robust=robust,
        adv_labels=torch.tensor(labels, dtype=torch.long),
        completed=completed,
        current=current,
        pending=None if pending is None else check.indices(pending, "pending", low=0, high=n),
        accuracy={str(key): check.fraction(value, f"accuracy[{key!r}]") for key, value in accuracy.items()},
        warnings=check.texts(raw.get("warnings", []), "warnings"),
        batch_size=None if batch_size is None else check.integer(batch_size, "batch_size", low=1),
        backend=check.text(raw.get("backend"), "backend", optional=True),
        finished=check.boolean(raw.get("finished", False), "finished"),
        fooled_by=None if fooled_by is None else torch.tensor(fooled_by, dtype=torch.long),
    )


def _read_legacy_state(raw: dict[str, Any], check: _StateChecker) -> AutoAttackState:
    """AutoAttack's own ``EvaluationState`` file (pyautoattack 0.2.0, fra31)."""
    attacks = raw["_attacks_to_run"]
    if isinstance(attacks, str):  # the bug this parser exists for: json.dump(default=str) of a set
        attacks = _literal_attack_set(attacks, check)
    if not isinstance(attacks, (list, set, tuple)) or not all(isinstance(a, str) for a in attacks):
        raise check.fail(f"has _attacks_to_run = {_short(attacks)}, expected a set of attack names")
    flags = raw["_robust_flags"]
    robust = check.flags(flags, "_robust_flags", allow_bool=True) if flags is not None else None
    n = 0 if robust is None else robust.numel()
    clean = raw.get("_clean_accuracy")
    if isinstance(clean, float) and math.isnan(clean):  # written before the clean pass measured it
        clean = None
    return AutoAttackState(
        settings={},
        attacks=sorted(str(a) for a in attacks),  # the order is not recorded
        robust=robust if robust is not None else torch.zeros(0, dtype=torch.bool),
        adv_labels=torch.full((n,), -1, dtype=torch.long),
        completed=check.texts(raw.get("_run_attacks", []), "_run_attacks"),
        accuracy={} if clean is None else {"clean": check.fraction(clean, "_clean_accuracy")},
        legacy=True,
    )


def _literal_attack_set(text: str, check: _StateChecker) -> Any:
    """The set AutoAttack wrote as its repr (``"{'apgd-ce', 'apgd-t'}"``); ``"set()"`` is the empty set."""
    if text in ("set()", ""):
        return set()
    if len(text) > _LEGACY_ATTACKS_LIMIT:
        raise check.fail(f"has an _attacks_to_run string of {len(text)} characters, not a set of attack names")
    try:
        return ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise check.fail(f"has _attacks_to_run = {_short(text)}, which is not a set of attack names") from None


def _adversary_settings(adversary: Any, x: Tensor, y: Tensor) -> dict[str, Any]:
    """Everything the robust flags of ``adversary`` on ``(x, y)`` depend on (see AutoAttackState)."""
    params: dict[str, Any] = {}
    for owner, names in (
        ("apgd", ("n_restarts", "n_iter", "eot_iter", "rho", "use_largereps")),
        ("apgd_targeted", ("n_restarts", "n_iter", "n_target_classes", "use_largereps")),
        ("fab", ("n_restarts", "n_iter", "n_target_classes")),
        ("square", ("n_queries", "p_init", "n_restarts")),
    ):
        sub = getattr(adversary, owner, None)
        for name in names:
            value = getattr(sub, name, None)
            if value is None or isinstance(value, (bool, int, float, str)):
                params[f"{owner}.{name}"] = value
    seed = adversary.seed
    return {
        "attacks": list(adversary.attacks_to_run),
        "version": str(adversary.version),
        "norm": str(adversary.norm),
        "eps": float(adversary.epsilon),
        "seed": None if seed is None else int(seed) if float(seed).is_integer() else float(seed),
        "params": params,
        "n_examples": int(x.shape[0]),
        "data_sha256": data_fingerprint(x, y),
        "model_sha256": model_fingerprint(adversary.model),
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_resume(state: AutoAttackState, settings: dict[str, Any], path: Path) -> None:
    """Refuse a state file made for another evaluation (one-line UserError naming the difference)."""
    if state.legacy:
        if set(state.attacks) != set(settings["attacks"]):
            raise _bad_state(
                path, f"was made for the attacks {sorted(state.attacks)}, this run has {settings['attacks']}"
            )
        if state.robust.numel() not in (0, settings["n_examples"]):
            raise _bad_state(path, f"has {state.robust.numel()} robust flags for {settings['n_examples']} examples")
        logger.warning(
            "resuming from AutoAttack's own state file %s: it does not record the model, "
            "data or eps it was made for, so only the attack set could be checked",
            path,
        )
        # Run in the order of this adversary, which is the order the file was made with.
        state.attacks = list(settings["attacks"])
        return
    for key in sorted(set(settings) | set(state.settings)):
        saved, now = state.settings.get(key), settings.get(key)
        if saved != now:
            raise _bad_state(
                path, f"was made for a different evaluation ({key} is {_short(saved)} there, {_short(now)} now)"
            )


@dataclass
class ResumableRun:
    """Outcome of :func:`run_resumable`.

    Attributes:
        x_adv: the inputs, with the adversarial examples found *in this session* substituted (points
            fooled in an earlier session keep their clean input: only their flags were saved).
        y_adv: long: the label predicted at each point's adversarial example (clean prediction where
            AutoAttack found none; -1 for points fooled in a session whose legacy file did not save it).
        robust: bool [n] on CPU: AutoAttack's verdict over all sessions.
        fooled_now: bool [n] on CPU: points fooled in this session (their ``x_adv`` is at hand).
        warnings: AutoAttack's warnings of all sessions, in order, without repeats.
        resumed: whether an existing state file was continued.
        state: the final state (also on disk); its ``fooled_by`` says which attack fooled each point.
    """

    x_adv: Tensor
    y_adv: Tensor
    robust: Tensor
    fooled_now: Tensor
    warnings: list[str]
    resumed: bool
    state: AutoAttackState


@torch.no_grad()
def _clean_predictions(adversary: Any, x: Tensor, batch_size: int) -> Tensor:
    forward = getattr(adversary, "get_logits", None) or adversary.model
    labels = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].clone().to(adversary.device)
        labels.append(forward(xb).max(dim=1)[1].cpu())
    return torch.cat(labels)


def _check_square(state: AutoAttackState, adversary: Any) -> None:
    # A single uninterrupted call ends with this check over the accuracies after every attack; the
    # per-batch calls below each see only one attack, so the check is made here once, over all.
    try:
        checks = importlib.import_module("autoattack.checks")
    except ImportError:  # pragma: no cover - compat.install() registered it
        return
    checks.check_square_sr(dict(state.accuracy), logger=getattr(adversary, "logger", None))


def run_resumable(
    adversary: Any,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    state_path: str | os.PathLike[str],
    backend: str,
) -> ResumableRun:
    """Run ``adversary``'s attacks on ``(x, y)``, resumably, through ``state_path``.

    ``adversary`` is an AutoAttack object with fra31's API (``robustbench_kd.zoo.compat.AutoAttack``, or
    fra31's own). Its official ``run_standard_evaluation`` is called with ``attacks_to_run`` set to
    one attack and the next ``batch_size`` still-robust points: exactly the batches a single
    uninterrupted call makes (it also attacks, attack by attack, the points still robust, in index
    order, ``batch_size`` at a time, re-seeding every batch), so the flags are the same. After every
    batch the state (robust flags, adversarial labels, the attack in progress and the points it
    still has to attack) is written atomically to ``state_path``; a later call with the same file
    skips the finished work. A file made for other settings (see :class:`AutoAttackState`) raises
    UserError; resuming with another batch size is allowed (with a warning: the remaining points
    are then batched, hence randomly started, differently).

    AutoAttack's per-call checks (randomness, output range, number of classes) therefore run once
    per batch; their warnings are collected once. Square's success check runs once at the end over
    the accuracies after every attack, as in a single call. ``backend`` describes the AutoAttack code that
    runs (``robustbench_kd.zoo.compat.autoattack_version()``) and is recorded in the state file.
    """
    path = Path(state_path)
    attacks = list(adversary.attacks_to_run)
    y = y.long()
    n = int(x.shape[0])
    settings = _adversary_settings(adversary, x, y)
    resumed = path.exists()
    warnings_seen: list[str] = []

    def remember(messages: list[str]) -> None:
        for message in messages:
            if message not in warnings_seen:
                warnings_seen.append(message)

    with capture_autoattack_warnings() as messages:
        if resumed:
            state = read_autoattack_state(path)
            _check_resume(state, settings, path)
            remember(state.warnings)
            if state.batch_size is not None and state.batch_size != batch_size:
                logger.warning(
                    "resuming AutoAttack from %s with batch size %d instead of %d: the "
                    "remaining points are batched differently, so borderline points may "
                    "differ from an uninterrupted run",
                    path,
                    batch_size,
                    state.batch_size,
                )
            if state.robust.numel() == 0:  # a legacy file saved before its clean pass
                resumed = False
            else:
                state.settings = settings
                logger.info(
                    "resuming AutoAttack from %s: done %s; %d of %d points still robust",
                    path,
                    ", ".join(state.completed) or "nothing",
                    int(state.robust.sum()),
                    n,
                )
        if not resumed:
            clean = _clean_predictions(adversary, x, batch_size)
            robust = clean == y.cpu()
            state = AutoAttackState(
                settings=settings,
                attacks=attacks,
                robust=robust,
                adv_labels=clean,
                accuracy={"clean": float(robust.sum()) / n},
                fooled_by=torch.full((n,), -1, dtype=torch.long),
            )
        state.batch_size, state.backend = batch_size, backend
        atomic_write_text(path, state.to_json())

        x_adv = x.clone()
        fooled_now = torch.zeros(n, dtype=torch.bool)
        try:
            for attack in state.attacks:
                if attack in state.completed:
                    continue
                if not bool(state.robust.any()):
                    logger.debug("no robust datapoints left, skipping remaining attacks")
                    break
                if state.current == attack and state.pending is not None:
                    pending = state.pending[state.robust[state.pending]]
                else:
                    pending = state.robust.nonzero().flatten()
                state.current = attack
                adversary.attacks_to_run = [attack]
                while pending.numel():
                    index = pending[:batch_size]
                    batch_x = x[index.to(x.device)]
                    batch_y = y[index.to(y.device)]
                    found_x, found_y = adversary.run_standard_evaluation(
                        batch_x, batch_y, bs=batch_size, return_labels=True
                    )
                    fooled = found_y.cpu() != batch_y.cpu()
                    hit = index[fooled]
                    state.robust[hit] = False
                    state.adv_labels[hit] = found_y.cpu()[fooled].long()
                    if state.fooled_by is not None:
                        state.fooled_by[hit] = state.attacks.index(attack)
                    x_adv[hit.to(x.device)] = found_x[fooled.to(found_x.device)].to(x_adv.device)
                    fooled_now[hit] = True
                    pending = pending[batch_size:]
                    state.pending = pending
                    remember(messages)
                    state.warnings = list(warnings_seen)
                    atomic_write_text(path, state.to_json())
                state.completed.append(attack)
                state.current, state.pending = None, None
                state.accuracy[attack] = state.robust_accuracy
                atomic_write_text(path, state.to_json())
        finally:
            adversary.attacks_to_run = attacks
        _check_square(state, adversary)
        remember(messages)
    state.warnings = list(warnings_seen)
    state.finished = True
    atomic_write_text(path, state.to_json())
    y_adv = state.adv_labels.clone().to(y.device)
    return ResumableRun(
        x_adv=x_adv,
        y_adv=y_adv,
        robust=state.robust.clone(),
        fooled_now=fooled_now,
        warnings=list(warnings_seen),
        resumed=resumed,
        state=state,
    )
