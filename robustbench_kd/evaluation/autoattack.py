"""AutoAttack, run through the official implementation (fra31's code as packaged by ``pyautoattack``).

Leaderboard numbers must come from this code path, never from ``torchattacks.AutoAttack``, whose
numbers differ (Harry24k/adversarial-attacks-pytorch#188). The robust flags are recomputed from the
returned adversarial examples with the model in eval mode, the way ``robustbench.eval.benchmark``
computes its robust accuracy, and every warning AutoAttack logs about the defence (randomness,
probability outputs, zero gradients, dynamic forward, Square beating the gradient attacks) is
collected so that a report can mark the evaluation as possibly unreliable.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import UserError
from ..threat import NORMS, parse_number, validate_eps
from .attacks import check_inputs

__all__ = ["AA_LOGGER_NAME", "AUTOATTACK_VERSIONS", "AutoAttackResult", "run_autoattack"]

logger = logging.getLogger(__name__)

AA_LOGGER_NAME = "auto-attack"
AUTOATTACK_VERSIONS = ("standard", "quick", "plus", "rand")
QUICK_ATTACKS = ("apgd-ce", "apgd-dlr")

# Prefix of the flag we add ourselves (not emitted by AutoAttack) when AA's own verdict and the
# re-evaluation of its adversarial examples disagree.
MISMATCH_FLAG_PREFIX = "robustbench_kd:"


@dataclass
class AutoAttackResult:
    """Outcome of one AutoAttack run.

    Attributes:
        robust: per-example robust flags (bool, on CPU): the model still predicts the label on the
            adversarial example AutoAttack returned.
        accuracy: robust accuracy in [0,1] (mean of ``robust``).
        version: version string of the AutoAttack backend that ran.
        seed: the seed given to AutoAttack (``None``: AutoAttack seeded itself from the clock).
        flags: every WARNING logged by AutoAttack during the run, in order, plus a
            ``"robustbench_kd: ..."`` entry if its own verdict disagreed with the re-evaluation.
        attacks: the attacks AutoAttack was configured to run, in order (later ones are skipped
            automatically once no robust points remain).
        mode: ``"standard"``, ``"quick"``, ``"plus"`` or ``"rand"``, as requested.
    """

    robust: Tensor
    accuracy: float
    version: str
    seed: int | None
    flags: list[str] = field(default_factory=list)
    attacks: list[str] = field(default_factory=list)
    mode: str = "standard"


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
def _capture_autoattack_warnings() -> Iterator[list[str]]:
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


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
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


@torch.no_grad()
def predict_correct(
    model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int, device: torch.device
) -> Tensor:
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
        state_path: AutoAttack's JSON state file (robust flags saved after each attack). When
            given, the robust flags are read back from it after the run, as ``benchmark`` does.
            Resuming from an existing file fails in pyautoattack 0.2.0 (it stores the attack set
            as a string); that case raises UserError.
        log_path: if given, AutoAttack's full log (DEBUG progress included) is appended there
            (fra31's ``log_path``).
        device: where AutoAttack runs; defaults to the device of the model's parameters.

    Without ``state_path`` the robust flags are recomputed from the returned adversarial examples
    (``argmax model(x_adv) == y``), which is how ``robustbench.eval.benchmark`` scores a model. If
    that disagrees with AutoAttack's own verdict for some points (a non-deterministic forward
    pass), a ``"robustbench_kd: ..."`` flag is added.
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
        raise UserError(
            f"unknown AutoAttack version {version!r}; valid: {', '.join(AUTOATTACK_VERSIONS)}"
        )
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    check_inputs(x, y)
    y = y.long()  # AA's DLR/targeted losses index with the labels
    device = torch.device(device) if device is not None else model_device(model)
    state = Path(state_path) if state_path is not None else None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)

    from .. import compat

    compat.install()
    if version == "quick":
        aa_version, to_run = "custom", list(QUICK_ATTACKS)
    else:
        aa_version, to_run = version, []

    with _capture_autoattack_warnings() as messages, torch.random.fork_rng(
        devices=rng_devices(device)
    ):
        adversary = compat.AutoAttack(
            model,
            norm=norm,
            eps=eps,
            seed=seed,
            # pyautoattack only logs (never prints), and its DEBUG progress is what log_path is for.
            verbose=log_path is not None,
            attacks_to_run=to_run,
            version=aa_version,
            device=device,
            log_path=None if log_path is None else str(log_path),
        )
        if version == "quick":
            # version='custom' keeps the constructor's 5 restarts; "quick" means one.
            adversary.apgd.n_restarts = 1
        attacks = list(adversary.attacks_to_run)
        resuming = state is not None and state.exists()
        try:
            x_adv, y_adv = adversary.run_standard_evaluation(
                x, y, bs=batch_size, return_labels=True, state_path=state
            )
        except ValueError as exc:
            if resuming and "different set of attacks" in str(exc):
                raise UserError(
                    f"AutoAttack could not resume from {state}: its EvaluationState writes the "
                    "attack set as a string, so every resume fails this check (pyautoattack "
                    "0.2.0). Delete the state file or use a new path"
                ) from exc
            raise

    flags = list(messages)
    if state is not None:
        try:
            from autoattack.state import EvaluationState
        except ImportError:
            from pyautoattack.state import EvaluationState

        robust = EvaluationState.from_disk(state).robust_flags.to(torch.bool).cpu()
    else:
        robust = predict_correct(model, x_adv, y, batch_size=batch_size, device=device)
        aa_robust = (y_adv.to(y.device) == y).cpu()
        disagree = int((aa_robust != robust).sum())
        if disagree:
            message = (
                f"{MISMATCH_FLAG_PREFIX} AutoAttack's own robust flags and the re-evaluation of its "
                f"adversarial examples disagree on {disagree} point(s): the forward pass is "
                "random or batch-dependent, or these points sit on a decision boundary; the "
                "reported accuracy is the re-evaluation (as robustbench's benchmark computes it)"
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
    )
