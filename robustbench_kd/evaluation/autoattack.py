"""AutoAttack, run through the official implementation: fra31's package when installed, else pyautoattack.

Leaderboard numbers must come from this code path, never from ``torchattacks.AutoAttack``, whose
numbers differ from the official code's. The robust flags are recomputed from the returned adversarial
examples with the model in eval mode, the way ``robustbench.eval.benchmark`` computes its robust
accuracy, and every warning AutoAttack's checks emit about the defence (randomness, probability
outputs, zero gradients, dynamic forward, Square beating the gradient attacks) is collected so that a
report can mark the evaluation as possibly unreliable. The two backends report those warnings
differently (pyautoattack through :mod:`logging`, fra31's package through its own ``Logger``, which
prints); both end up as the same flags (:data:`AUTOATTACK_WARNINGS`).

Resumable runs (``state_path``) do not use AutoAttack's own state file, whose resume is broken; they go
through :func:`robustbench_kd.zoo.autoattack_resume.run_resumable` (the state file format, the
batch-by-batch driver and why, are described there; import its names from there).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.attacks import check_inputs
from robustbench_kd.evaluation.autoattack_stages import StageRecorder, stage_flags
from robustbench_kd.threat import NORMS, parse_number, validate_eps
from robustbench_kd.zoo import compat
from robustbench_kd.zoo.autoattack_resume import (
    AA_LOGGER_NAME,
    ResumableRun,
    capture_autoattack_warnings,
    run_resumable,
)

__all__ = [
    "AUTOATTACK_VERSIONS",
    "AUTOATTACK_WARNINGS",
    "AutoAttackResult",
    "autoattack_state",
    "autoattack_warning",
    "describe_autoattack_flag",
    "run_autoattack",
]

logger = logging.getLogger(__name__)

AUTOATTACK_VERSIONS = ("standard", "quick", "plus", "rand")
QUICK_ATTACKS = ("apgd-ce", "apgd-dlr")

# Prefix of the flag we add ourselves (not emitted by AutoAttack) when AA's own verdict and the
# re-evaluation of its adversarial examples disagree.
MISMATCH_FLAG_PREFIX = "robustbench_kd:"

# Every warning AutoAttack's checks emit, one row per message: (the function in AutoAttack's checks.py,
# a pattern found in its message, what it says about the defence). fra31's autoattack/checks.py and
# pyautoattack/checks.py emit the same texts and differ only in how: fra31's calls its own
# ``Logger.log(f"Warning: {msg}")`` (print, and append to log_path), pyautoattack's
# ``logging.getLogger("auto-attack").warning(msg)``.
AUTOATTACK_WARNINGS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    # Five forward passes of the first batch disagree (prediction, or outputs by > 1e-4 once normalised).
    ("check_randomized", re.compile(r"it seems to be a randomized defense!"), "a randomised forward pass"),
    # Outputs in [0, 1] that sum to 1.
    (
        "check_range_output",
        re.compile(r"it seems that the output is a probability distribution"),
        "probability outputs instead of logits",
    ),
    # APGD with a DLR loss (apgd-dlr, apgd-t) found input gradients that are exactly zero at its start.
    (
        "check_zero_gradients",
        re.compile(r"there are \d+ points with zero gradient!"),
        "zero input gradients (gradient masking)",
    ),
    # Square, the black-box attack, got robust accuracy more than 0.2 points below the best other attack.
    (
        "check_square_sr",
        re.compile(r"Square Attack has decreased the robust accuracy"),
        "the black-box Square attack beat the white-box attacks (gradient masking)",
    ),
    # The forward pass calls grad/backward (seen by tracing one forward pass).
    (
        "check_dynamic",
        re.compile(r"it seems to be a dynamic defense!"),
        "a forward pass that computes gradients (dynamic defence)",
    ),
    # fra31's package only, for a TensorFlow model (is_tf_model=True), whose forward it cannot trace.
    (
        "check_dynamic",
        re.compile(r"the check for dynamic defenses is not currently supported"),
        "a forward pass that could not be checked for gradient computations",
    ),
    # Two or three classes: the DLR losses (apgd-dlr, apgd-t) need more.
    (
        "check_n_classes",
        re.compile(r"with only \d+ classes it is not possible to use the (targeted )?DLR loss!"),
        "too few classes for the DLR losses",
    ),
    # apgd-t / fab-t configured with more target classes than the model has classes other than the label.
    (
        "check_n_classes",
        re.compile(r"it seems that more target classes \(\d+\) than possible \(\d+\) are used in"),
        "more target classes than the model has",
    ),
)

# fra31's checks prefix every warning with this when they log it (pyautoattack's do not).
_LOGGER_WARNING_PREFIX = "Warning:"


@dataclass
class _StateFiles:
    """The state files of one :func:`autoattack_state` block: one per AutoAttack version run in it."""

    base: Path
    by_version: dict[str, Path] = field(default_factory=dict)

    def path_for(self, version: str) -> Path:
        if version not in self.by_version:
            # The first version run gets the path as given; a second one (e.g. "quick" next to
            # "standard" in one evaluation) gets <stem>-<version><suffix> beside it.
            self.by_version[version] = (
                self.base
                if not self.by_version
                else self.base.with_name(f"{self.base.stem}-{version}{self.base.suffix}")
            )
        return self.by_version[version]


_STATE_FILES: contextvars.ContextVar[_StateFiles | None] = contextvars.ContextVar(
    "robustbench_kd_autoattack_state", default=None
)


@contextlib.contextmanager
def autoattack_state(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Make every :func:`run_autoattack` call in the block resumable through the state file ``path``.

    For callers that reach AutoAttack through other code (``evaluate_model``, the report writer):
    a call without its own ``state_path`` uses ``path`` for the first AutoAttack version run in the
    block and ``<stem>-<version><suffix>`` for any other version. Meant for one evaluation (one model,
    one set of examples) per block: a second call of the same version on other data finds the file
    made for the first and raises UserError. Context-local (``contextvars``), so threads and async
    tasks do not see each other's blocks. Yields ``Path(path)``.
    """
    token = _STATE_FILES.set(_StateFiles(Path(path)))
    try:
        yield Path(path)
    finally:
        _STATE_FILES.reset(token)


@dataclass
class AutoAttackResult:
    """Outcome of one AutoAttack run.

    Attributes:
        robust: per-example robust flags (bool, on CPU): the model still predicts the label on the
            adversarial example AutoAttack returned.
        accuracy: robust accuracy in [0,1] (mean of ``robust``).
        version: version string of the AutoAttack backend that ran.
        seed: the seed given to AutoAttack (``None``: AutoAttack seeded itself from the clock).
        flags: every warning AutoAttack's checks emitted during the run, in order, whichever backend
            ran (see :data:`AUTOATTACK_WARNINGS`), plus a ``"robustbench_kd: ..."`` entry if its own
            verdict disagreed with the re-evaluation.
        attacks: the attacks AutoAttack was configured to run, in order (later ones are skipped
            automatically once no robust points remain).
        mode: ``"standard"``, ``"quick"``, ``"plus"`` or ``"rand"``, as requested.
        stages: attack -> bool [n]: still robust after that attack and the ones before it, by AutoAttack's
            own verdict (:mod:`robustbench_kd.evaluation.autoattack_stages`); empty when the run could not
            tell (a state file that does not record it, or a replay that did not match).
    """

    robust: Tensor
    accuracy: float
    version: str
    seed: int | None
    flags: list[str] = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)
    mode: str = "standard"
    stages: dict[str, Tensor] = field(default_factory=dict)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless model."""
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def rng_devices(device: torch.device) -> list[int]:
    """CUDA device indices whose RNG state ``fork_rng`` has to save around work on ``device``.

    All of them, not just ``device``: AutoAttack calls ``torch.random.manual_seed``, which re-seeds
    every CUDA device. For CPU work they are saved only if CUDA is already initialised, so that a
    CPU evaluation does not create a CUDA context just to save its RNG.
    """
    if device.type == "cuda" or (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return list(range(torch.cuda.device_count()))
    return []


def autoattack_warning(line: str) -> str | None:
    """The warning in one line of AutoAttack's log, without fra31's ``"Warning: "`` prefix; None otherwise.

    A line is a warning when it matches a row of :data:`AUTOATTACK_WARNINGS`, or when it carries the
    prefix fra31's checks put on every warning (so a check added in a later AutoAttack release is not
    mistaken for progress). Progress lines ("apgd-ce - 1/1 - ...", "robust accuracy: ...") give None.
    """
    text = str(line).strip()
    prefixed = text.startswith(_LOGGER_WARNING_PREFIX)
    if prefixed:
        text = text[len(_LOGGER_WARNING_PREFIX) :].strip()
    if prefixed or any(pattern.search(text) for _, pattern, _ in AUTOATTACK_WARNINGS):
        return text
    return None


def describe_autoattack_flag(flag: str) -> str:
    """What an AutoAttack flag says about the defence (the last column of :data:`AUTOATTACK_WARNINGS`).

    Our own disagreement flag (``MISMATCH_FLAG_PREFIX``) is described too; a warning no row knows is
    ``"a possible problem"``.
    """
    if flag.startswith(MISMATCH_FLAG_PREFIX):
        return "its verdict disagreeing with a re-evaluation (non-deterministic forward)"
    return next((meaning for _, pattern, meaning in AUTOATTACK_WARNINGS if pattern.search(flag)), "a possible problem")


def _forwarding_log(log: Callable[[str], Any]) -> Callable[[str], Any]:
    aa_logger = logging.getLogger(AA_LOGGER_NAME)

    def forward(str_to_log: str) -> Any:
        # AutoAttack's own output first and unchanged: the line is printed and appended to log_path
        # (the submission's autoattack.log) exactly as without us.
        result = log(str_to_log)
        message = autoattack_warning(str_to_log)
        if message is not None:
            aa_logger.warning(message)
        return result

    return forward


def _forward_logger_warnings(adversary: Any) -> None:
    """Pass the warnings fra31's AutoAttack writes with its own ``Logger`` on to the ``auto-attack`` logger.

    fra31's package (what RobustBench installs) reports its checks through ``other_utils.Logger.log``,
    which prints and appends to ``log_path`` but never reaches :mod:`logging`, so the capture of the
    ``auto-attack`` logger (:func:`capture_autoattack_warnings`, and the resumable driver's own, which
    saves them in the state file) would see none of them. The ``log`` of every such Logger held by
    ``adversary`` and its attacks is wrapped on the instance, so no other AutoAttack object changes:
    each line is logged as before, then a warning (:func:`autoattack_warning`) is also logged at WARNING
    on the ``auto-attack`` logger, where pyautoattack logs the same texts. pyautoattack's objects hold a
    :class:`logging.Logger`, which is left alone.
    """
    seen: set[int] = set()
    owners = [adversary, *(getattr(adversary, name, None) for name in ("apgd", "apgd_targeted", "fab", "square"))]
    for owner in owners:
        target = getattr(owner, "logger", None)
        if (
            target is None
            or isinstance(target, (logging.Logger, logging.LoggerAdapter))
            or id(target) in seen
            or not callable(getattr(target, "log", None))
        ):
            continue
        seen.add(id(target))
        target.log = _forwarding_log(target.log)


@torch.no_grad()
def predict_correct(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int, device: torch.device) -> Tensor:
    """Per-example ``argmax(model(x)) == y`` in batches, as ``robustbench.utils.clean_accuracy``.

    Returns a bool tensor on CPU.
    """
    flags = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        flags.append((model(xb).max(1)[1] == yb).cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def run_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float | str,
    version: str = "standard",
    seed: int | None = 0,
    batch_size: int = 250,
    state_path: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
) -> AutoAttackResult:
    """Run AutoAttack on ``(x, y)`` and return per-example robust flags, accuracy and AA's flags.

    Args:
        model: maps [0,1] inputs to logits; must be in eval mode (``ValueError`` otherwise: a model in
            train mode gives BN-batch-dependent, unreproducible numbers and trips AA's randomness
            check).
        x, y: inputs in [0,1] and integer labels (any device; batches are moved to ``device``).
        norm: ``"Linf"`` or ``"L2"``. eps: radius in [0,1] units (a number or e.g. ``"8/255"``).
        version: ``"standard"`` (the leaderboard's APGD-CE, APGD-T, FAB-T, Square), ``"quick"``
            (APGD-CE + APGD-DLR with one restart; a cheap check, not a leaderboard number),
            ``"plus"`` or ``"rand"`` (AA's versions of those names).
        seed: passed to AutoAttack, which re-seeds the global RNG with it in every attack; the
            caller's RNG state is preserved (``torch.random.fork_rng``).
        batch_size: AutoAttack's batch size.
        state_path: a JSON file that makes the run resumable (see :func:`run_resumable`): the
            robust flags are saved atomically after every batch of every attack, and a run given an
            existing file continues where it stopped, giving the same flags as an uninterrupted run.
            A file written for another model, data, eps, norm, seed or attack set is a UserError.
            With a state file the flags are AutoAttack's own verdict, accumulated over all sessions
            (as ``benchmark(aa_state_path=...)`` reports them). Inside an :func:`autoattack_state`
            block the default is that block's file.
        log_path: if given, AutoAttack's full log (DEBUG progress included) is appended there
            (fra31's ``log_path``).
        device: where AutoAttack runs; defaults to the device of the model's parameters.

    Without ``state_path`` the robust flags are recomputed from the returned adversarial examples
    (``argmax model(x_adv) == y``), which is how ``robustbench.eval.benchmark`` scores a model. If
    that disagrees with AutoAttack's own verdict for some points (a non-deterministic forward
    pass), a ``"robustbench_kd: ..."`` flag is added (with ``state_path``: for the points fooled in
    this session, whose adversarial examples are at hand).
    """
    if any(module.training for module in model.modules()):
        raise ValueError(
            "run_autoattack needs the model (and all its submodules) in eval mode; call "
            "model.eval() first: in train mode BatchNorm/Dropout make the forward pass "
            "batch-dependent and random"
        )
    if norm not in NORMS:
        raise UserError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    eps = parse_number(eps, what="eps")
    validate_eps(eps, norm, what="eps")
    if version not in AUTOATTACK_VERSIONS:
        raise UserError(f"unknown AutoAttack version {version!r}; valid: {', '.join(AUTOATTACK_VERSIONS)}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    check_inputs(x, y)
    y = y.long()  # AA's DLR/targeted losses index with the labels
    device = torch.device(device) if device is not None else model_device(model)
    files = _STATE_FILES.get()
    if state_path is None and files is not None:
        state_path = files.path_for(version)
    state = Path(state_path) if state_path is not None else None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)

    compat.install()
    if version == "quick":
        aa_version, to_run = "custom", list(QUICK_ATTACKS)
    else:
        aa_version, to_run = version, []

    with capture_autoattack_warnings() as messages, torch.random.fork_rng(devices=rng_devices(device)):
        adversary = compat.AutoAttack(
            model,
            norm=norm,
            eps=eps,
            seed=seed,
            # Progress is wanted in log_path only (pyautoattack logs it at DEBUG, fra31's package
            # prints it and appends it there); the checks' warnings are emitted either way.
            verbose=log_path is not None,
            attacks_to_run=to_run,
            version=aa_version,
            device=device,
            log_path=None if log_path is None else str(log_path),
        )
        _forward_logger_warnings(adversary)
        if version == "quick":
            # version='custom' keeps the constructor's 5 restarts; "quick" means one.
            adversary.apgd.n_restarts = 1
        attacks = list(adversary.attacks_to_run)
        resumed: ResumableRun | None = None
        recorder = StageRecorder(adversary)
        if state is None:
            with recorder.recording():
                x_adv, y_adv = adversary.run_standard_evaluation(x, y, bs=batch_size, return_labels=True)
        else:
            resumed = run_resumable(
                adversary, x, y, batch_size=batch_size, state_path=state, backend=compat.autoattack_version()
            )

    stages: dict[str, Tensor] = {}
    if resumed is not None:
        # Every warning of every session (saved in the state file), not just this session's.
        flags = list(resumed.warnings)
        robust = resumed.robust.clone()
        if resumed.state.fooled_by is not None:
            stages = stage_flags(resumed.robust, resumed.state.fooled_by, resumed.state.attacks)
        fooled_now = resumed.fooled_now.nonzero().flatten()
        recheck = predict_correct(model, resumed.x_adv[fooled_now], y[fooled_now], batch_size=batch_size, device=device)
        disagree = int(recheck.sum())
    else:
        flags = list(messages)
        robust = predict_correct(model, x_adv, y, batch_size=batch_size, device=device)
        aa_robust = (y_adv.to(y.device) == y).cpu()
        disagree = int((aa_robust != robust).sum())
        clean_correct = predict_correct(model, x, y, batch_size=batch_size, device=device)
        fooled_by = recorder.fooled_by(
            attacks, clean_correct=clean_correct, y=y, batch_size=batch_size, final_robust=aa_robust
        )
        if fooled_by is not None:
            stages = stage_flags(aa_robust, fooled_by, attacks)
    if disagree:
        message = (
            f"{MISMATCH_FLAG_PREFIX} AutoAttack's own robust flags and the re-evaluation of its "
            f"adversarial examples disagree on {disagree} point(s): the forward pass is "
            "random or batch-dependent, or these points sit on a decision boundary; the "
            + (
                "reported accuracy is AutoAttack's own verdict (resumable runs keep no "
                "adversarial examples from earlier sessions to re-evaluate)"
                if resumed is not None
                else "reported accuracy is the re-evaluation (as robustbench's benchmark computes it)"
            )
        )
        logger.warning(message)
        flags.append(message)
    n = robust.numel()
    return AutoAttackResult(
        robust=robust,
        accuracy=float(robust.sum().item()) / n,
        version=compat.autoattack_version(),
        seed=seed,
        flags=flags,
        attacks=attacks,
        mode=version,
        stages=stages,
    )
