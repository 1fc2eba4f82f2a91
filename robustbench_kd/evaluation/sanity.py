"""Evaluation sanity suite: is a robust-accuracy number trustworthy, or are gradients masked?

A robust accuracy is only meaningful if the white-box attacks that produced it actually worked.
These cheap checks (PGD-10 on at most a few hundred points; seconds for a small model, negligible
next to AutoAttack) look for the usual signs that they did not (Athalye et al. 2018; Carlini et
al. 2019, "On Evaluating Adversarial Robustness"; AutoAttack's flags):

* ``eval_mode``: after ``model.eval()`` no submodule is still in training mode;
* ``deterministic``: two identical forward passes give the same output (no dropout or other
  randomness left in the forward), and an example's output does not depend on the rest of its batch
  (no train-mode BatchNorm);
* ``logits``: the outputs are not probabilities (rows in [0,1] summing to 1 make CE gradients
  vanish);
* ``gradients``: the input gradient of the cross-entropy is finite and non-zero at the clean points;
* ``monotone``: PGD accuracy does not rise along an eps sweep (``0, eps/4, eps/2, eps, 2 eps``);
* ``unbounded``: PGD with an unbounded radius (L_inf 1, or L2 the diameter of the input cube, so
  any image is reachable) drives accuracy to about 0;
* ``single_step``: FGSM is not stronger than PGD at eps (an iterative attack that does worse than
  one step is not following the gradient);
* ``transfer`` (given a teacher): PGD adversarials crafted on the teacher and evaluated on the model
  are not clearly more successful than the white-box attacks on the model itself;
* ``autoattack``: every flag AutoAttack raised (zero gradients, Square beating the white-box
  attacks, randomness, probability outputs, dynamic forward) becomes a reason.

Any failed check makes the report unreliable, with a one-line reason each, and is logged as a
warning; :func:`robustbench_kd.evaluation.final_report.evaluate_and_write` then writes ``"unreliable": true`` and the
reasons into the leaderboard entry's ``footnote``. Checks that could not run (no teacher, eps = 0)
are listed in ``skipped`` and do not count against the model.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_kd.errors import UserError
from robustbench_kd.evaluation.attacks import check_inputs, fgsm, pgd
from robustbench_kd.evaluation.autoattack import (
    describe_autoattack_flag,
    model_device,
    predict_correct,
    rng_devices,
)
from robustbench_kd.evaluation.runner import EvalResult
from robustbench_kd.threat import NORMS, format_eps, parse_number, validate_eps

__all__ = ["SANITY_CHECKS", "SanityReport", "check_eps_units", "check_evaluation", "run_sanity_checks"]

logger = logging.getLogger(__name__)

SANITY_CHECKS = (
    "eval_mode",
    "deterministic",
    "logits",
    "gradients",
    "monotone",
    "unbounded",
    "single_step",
    "transfer",
    "autoattack",
)

# Relative output change treated as "different" by the randomness check: AutoAttack's own threshold
# (check_randomized, on L2-normalised outputs).
_RANDOM_TOL = 1e-4
# Batch-independence is looser: cuDNN/TF32 may pick another kernel for another batch size (~1e-3
# relative), while train-mode BatchNorm changes outputs by O(0.1).
_BATCH_TOL = 1e-2
_PROB_TOL = 1e-5
_MAX_NAMES = 3


@dataclass
class SanityReport:
    """Outcome of :func:`run_sanity_checks`.

    Attributes:
        reliable: True when no check failed (``reasons`` is empty).
        reasons: one line per failed check, saying what was seen and what it suggests.
        checks: check name (see ``SANITY_CHECKS``) -> True (passed), False (failed) or None (skipped).
        skipped: why each skipped check did not run.
        n_examples: how many points (the first ones of the evaluation set) the attacks ran on.
        norm, eps: the threat model.
        sweep: eps string (``"2/255"``, ``"0.1"``) -> PGD accuracy there, in increasing eps order.
        unbounded_eps, unbounded_accuracy: the unbounded radius and PGD accuracy within it.
        fgsm_accuracy: FGSM accuracy at eps.
        transfer_accuracy: accuracy on adversarials crafted on the teacher (None without teacher).
        whitebox_accuracy: the white-box accuracy the transfer accuracy was compared with: the
            point-wise worst case of the sweep's PGD at eps and the caller's white-box results on
            the same points (or the caller's number, if only a number was given).
        zero_gradient_fraction: share of points whose cross-entropy input gradient is exactly zero.
        autoattack_flags: AutoAttack's warnings, as given.
        settings: the attack budgets and tolerances used.
    """

    reliable: bool
    reasons: list[str]
    checks: dict[str, bool | None]
    n_examples: int
    norm: str
    eps: float
    sweep: dict[str, float] = field(default_factory=dict)
    unbounded_eps: float | None = None
    unbounded_accuracy: float | None = None
    fgsm_accuracy: float | None = None
    transfer_accuracy: float | None = None
    whitebox_accuracy: float | None = None
    zero_gradient_fraction: float | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    autoattack_flags: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (floats, strings, bools, None)."""

        def opt(value: float | None) -> float | None:
            return None if value is None else float(value)

        return {
            "reliable": bool(self.reliable),
            "reasons": list(self.reasons),
            "checks": dict(self.checks),
            "skipped": dict(self.skipped),
            "n_examples": int(self.n_examples),
            "norm": self.norm,
            "eps": float(self.eps),
            "eps_str": format_eps(self.eps),
            "sweep": {key: float(value) for key, value in self.sweep.items()},
            "unbounded_eps": opt(self.unbounded_eps),
            "unbounded_accuracy": opt(self.unbounded_accuracy),
            "fgsm_accuracy": opt(self.fgsm_accuracy),
            "transfer_accuracy": opt(self.transfer_accuracy),
            "whitebox_accuracy": opt(self.whitebox_accuracy),
            "zero_gradient_fraction": opt(self.zero_gradient_fraction),
            "autoattack_flags": list(self.autoattack_flags),
            "settings": dict(self.settings),
        }


def check_eps_units(eps: float, norm: str, x: Tensor | None = None, *, what: str = "eps") -> None:
    """Raise UserError for a radius that cannot be meant for [0,1] inputs.

    On top of :func:`robustbench_kd.threat.validate_eps` (negative eps; L_inf eps > 1, i.e. ``8``
    for ``8/255``), an L2 radius larger than the diameter of the input cube, ``sqrt(d)`` for inputs
    with ``d`` values (``x`` gives ``d``), is rejected: every image is then reachable, so it is
    almost surely a radius in 0-255 pixel units.
    """
    validate_eps(eps, norm, what=what)
    if norm == "L2" and isinstance(x, Tensor) and x.ndim >= 2:
        dim = int(x[0].numel())
        if eps > math.sqrt(dim):
            raise UserError(
                f"{what}={eps:g} is larger than the diameter sqrt({dim})={math.sqrt(dim):.4g} of the "
                f"[0,1] input cube for an L2 threat; give it in [0,1] pixel units (e.g. {eps / 255:.4g} "
                f"for {eps:g}/255)"
            )


def _unbounded_eps(norm: str, x: Tensor) -> float:
    # L_inf 1 / L2 sqrt(d): the whole [0,1] cube lies in the ball around any input.
    return 1.0 if norm == "Linf" else math.sqrt(int(x[0].numel()))


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return value


def _fraction(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise UserError(f"{what} must be a fraction in [0,1] (0.01 = 1 point), got {value!r}")
    return float(value)


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_NAMES])
    return shown + (f" and {len(items) - _MAX_NAMES} more" if len(items) > _MAX_NAMES else "")


def _normalised(out: Tensor) -> Tensor:
    out = out.flatten(1).float()
    return out / (out.norm(dim=1, keepdim=True) + 1e-10)


def _batches(x: Tensor, y: Tensor, batch_size: int, device: torch.device):
    for start in range(0, x.shape[0], batch_size):
        yield x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)


def _attacked_correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Callable[[Tensor, Tensor], Tensor],
    *,
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """Per-example correctness of ``model`` on ``attack(xb, yb)`` (crafted on any net), on CPU."""
    flags = []
    for xb, yb in _batches(x, y, batch_size, device):
        x_adv = attack(xb, yb)
        flags.append(predict_correct(model, x_adv, yb, batch_size=batch_size, device=device))
    return torch.cat(flags)


def _zero_gradient_fraction(
    model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int, device: torch.device
) -> tuple[float, int]:
    """(share of points with an all-zero CE input gradient, number of points with a non-finite one)."""
    zero = nonfinite = 0
    for xb, yb in _batches(x, y, batch_size, device):
        xb = xb.detach().requires_grad_(True)
        with torch.enable_grad():
            # Summed, not averaged: the mean would scale per-example gradients by 1/batch and
            # could underflow to an exact zero that the model itself does not produce.
            loss = F.cross_entropy(model(xb), yb.long(), reduction="sum")
            (grad,) = torch.autograd.grad(loss, xb)
        per_example = grad.flatten(1)
        finite = torch.isfinite(per_example).all(dim=1)
        nonfinite += int((~finite).sum())
        zero += int(((per_example.abs().sum(dim=1) == 0) & finite).sum())
    return zero / x.shape[0], nonfinite


def _forward_checks(model: nn.Module, xb: Tensor, reasons: list[str], checks: dict[str, bool | None]) -> Tensor:
    """Randomness, batch dependence and probability outputs on one batch; returns its outputs."""
    with torch.no_grad():
        model(xb)  # warm-up: cuDNN autotuning may pick its kernel during the first call
        first, second = model(xb), model(xb)
        random_diff = (_normalised(first) - _normalised(second)).norm(dim=1).max().item()
        changed = int((first.argmax(1) != second.argmax(1)).sum())
        k = xb.shape[0] // 2
        batch_diff = 0.0
        if k >= 1:
            alone = model(xb[:k])
            batch_diff = (_normalised(alone) - _normalised(first[:k])).norm(dim=1).max().item()
    problems = []
    if not math.isfinite(random_diff) or random_diff > _RANDOM_TOL or changed:
        problems.append(
            f"two identical forward passes in eval mode differ (relative change {random_diff:.3g}, "
            f"{changed} prediction(s) changed): the forward pass is random (dropout or noise left "
            "on), so gradient attacks see a moving target; evaluate with EOT (AutoAttack "
            "version='rand') or remove the randomness"
        )
    if not math.isfinite(batch_diff) or batch_diff > _BATCH_TOL:
        problems.append(
            f"an example's output depends on the rest of its batch (relative change {batch_diff:.3g} "
            f"between a batch of {xb.shape[0]} and of {k}): BatchNorm or similar is still using batch "
            "statistics in eval mode"
        )
    reasons.extend(problems)
    checks["deterministic"] = not problems
    out = first.float()
    looks_like_probs = (
        out.ndim == 2
        and bool(out.min() > -_PROB_TOL)
        and bool(out.max() < 1 + _PROB_TOL)
        and bool(((out.sum(dim=1) - 1).abs() < _PROB_TOL).all())
    )
    checks["logits"] = not looks_like_probs
    if looks_like_probs:
        reasons.append(
            "the model outputs probabilities (rows in [0,1] summing to 1), not logits: "
            "cross-entropy gradients vanish and attacks built on logits are mis-scaled; return logits"
        )
    return first


def _autoattack_reasons(flags: Sequence[str]) -> list[str]:
    """One reason per kind of AutoAttack flag, in order of first appearance.

    APGD-T and FAB-T repeat the zero-gradient warning once per target class, so identical kinds are
    merged (with a count) to keep the leaderboard footnote readable.
    """
    groups: dict[str, list[str]] = {}
    for flag in flags:
        meaning = describe_autoattack_flag(flag)  # one table of AutoAttack's warnings, in .autoattack
        groups.setdefault(meaning, []).append(flag)
    reasons = []
    for meaning, messages in groups.items():
        if len(messages) == 1:
            reasons.append(f"AutoAttack flagged {meaning}: {messages[0]}")
        else:
            reasons.append(f"AutoAttack flagged {meaning} ({len(messages)} times; first: {messages[0]})")
    return reasons


def run_sanity_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str,
    eps: float | str,
    teacher: nn.Module | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    whitebox_accuracy: float | None = None,
    whitebox_correct: Tensor | None = None,
    autoattack_flags: Sequence[str] = (),
    n_examples: int = 256,
    pgd_steps: int = 10,
    eps_fractions: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0),
    tolerance: float = 0.01,
    unbounded_max_accuracy: float = 0.05,
    transfer_margin: float = 0.05,
    zero_gradient_max_fraction: float = 0.01,
) -> SanityReport:
    """Run the sanity suite (module docstring) on the first ``n_examples`` points of ``(x, y)``.

    Args:
        model: maps [0,1] inputs to logits. Put in eval mode for the checks; every submodule's
            train/eval flag is restored afterwards, even on error. Not moved: ``device`` must be
            where its parameters live.
        x, y: the evaluation set (inputs in [0,1], integer labels); the attacks use its first
            ``n_examples`` points.
        norm: ``"Linf"`` or ``"L2"``. eps: the radius (number or ``"8/255"``); a radius in the
            wrong unit raises UserError (:func:`check_eps_units`).
        teacher: a model on the same inputs and classes (e.g. the distillation teacher) for the
            transfer check; None skips that check.
        batch_size: batch size of every attack. seed: every attack starts from this seed; the
            caller's RNG state is restored.
        device: where the computation runs; default: the device of the model's parameters.
        whitebox_accuracy: the white-box robust accuracy reported for the model (e.g. AutoAttack's).
        whitebox_correct: per-example robust flags of the reported white-box evaluation on ``x``
            (e.g. the point-wise worst case over PGD and AutoAttack); when given, the transfer
            check compares on exactly the same points instead of with ``whitebox_accuracy``.
        autoattack_flags: AutoAttack's warnings (``EvalResult.autoattack_flags``); each becomes a
            reason.
        n_examples: how many points the attacks use. pgd_steps: steps of every PGD in the suite
            (step size ``2.5 * radius / steps``, so PGD can cross the whole ball).
        eps_fractions: the sweep radii, as multiples of ``eps`` (L_inf radii are capped at 1).
        tolerance: how far accuracy may rise between consecutive sweep radii, and by how much FGSM
            may beat PGD, before it counts (a fraction: 0.01 = 1 point). Never less than one
            example, so one point flipping by chance is not a failure.
        unbounded_max_accuracy: the highest accuracy that passes under the unbounded radius.
        transfer_margin: how much lower the transfer accuracy must be than the white-box accuracy
            to count as masking (never less than two examples).
        zero_gradient_max_fraction: the largest share of points with an exactly-zero input
            gradient that passes.

    Returns:
        a :class:`SanityReport`; when it is unreliable each reason has also been logged as a
        warning.
    """
    if norm not in NORMS:
        raise UserError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    eps_value = parse_number(eps, what="eps")
    check_inputs(x, y)
    check_eps_units(eps_value, norm, x, what="eps")
    batch_size = _positive_int(batch_size, "sanity batch_size")
    n_examples = _positive_int(n_examples, "sanity n_examples")
    pgd_steps = _positive_int(pgd_steps, "sanity pgd_steps")
    tolerance = _fraction(tolerance, "sanity tolerance")
    unbounded_max_accuracy = _fraction(unbounded_max_accuracy, "sanity unbounded_max_accuracy")
    transfer_margin = _fraction(transfer_margin, "sanity transfer_margin")
    zero_gradient_max_fraction = _fraction(zero_gradient_max_fraction, "sanity zero_gradient_max_fraction")
    fractions = sorted({float(parse_number(f, what="sanity eps fraction")) for f in eps_fractions})
    if not fractions or fractions[0] < 0:
        raise UserError(f"sanity eps_fractions must be non-negative multiples of eps, got {list(eps_fractions)}")
    if whitebox_accuracy is not None:
        whitebox_accuracy = _fraction(whitebox_accuracy, "whitebox_accuracy")
    if whitebox_correct is not None and tuple(whitebox_correct.shape) != (x.shape[0],):
        raise UserError(
            f"whitebox_correct must hold one flag per example ({x.shape[0]}), got shape {tuple(whitebox_correct.shape)}"
        )

    run_device = torch.device(device) if device is not None else model_device(model)
    xs, ys = x[:n_examples], y[:n_examples]
    m = int(xs.shape[0])
    one = 1.0 / m
    tol = max(tolerance, one)
    margin = max(transfer_margin, 2 * one)
    big = _unbounded_eps(norm, xs)

    reasons: list[str] = []
    checks: dict[str, bool | None] = {name: None for name in SANITY_CHECKS}
    skipped: dict[str, str] = {}
    report = SanityReport(
        reliable=True, reasons=reasons, checks=checks, n_examples=m, norm=norm, eps=eps_value,
        skipped=skipped, autoattack_flags=list(autoattack_flags), unbounded_eps=big,
        settings={"pgd_steps": pgd_steps, "step_size": "2.5 * radius / steps", "eps_fractions": fractions,
                  "tolerance": tol, "unbounded_max_accuracy": unbounded_max_accuracy,
                  "transfer_margin": margin, "zero_gradient_max_fraction": zero_gradient_max_fraction,
                  "seed": seed},
    )  # fmt: skip

    def seeded_pgd(net: nn.Module, radius: float) -> Callable[[Tensor, Tensor], Tensor]:
        # pgd() rejects a zero step size even at radius 0 (where it returns x unchanged).
        alpha = 2.5 * radius / pgd_steps if radius > 0 else 1.0
        return lambda xb, yb: pgd(net, xb, yb, eps=radius, alpha=alpha, steps=pgd_steps, norm=norm)

    def run(attack: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        # Re-seed before each attack so every number is reproducible on its own (as evaluate_model).
        torch.default_generator.manual_seed(seed)
        if rng_devices(run_device):
            torch.cuda.manual_seed_all(seed)
        return _attacked_correct(model, xs, ys, attack, batch_size=batch_size, device=run_device)

    modules = [model] if teacher is None else [model, teacher]
    modes = {module: module.training for net in modules for module in net.modules()}
    try:
        with torch.random.fork_rng(devices=rng_devices(run_device)):
            model.eval()
            if teacher is not None:
                teacher.eval()
            # (e) eval mode: a submodule that overrides train()/eval() can stay in training mode.
            stuck = [name or type(model).__name__ for name, mod in model.named_modules() if mod.training]
            checks["eval_mode"] = not stuck
            if stuck:
                reasons.append(
                    f"submodule(s) {_names(stuck)} stay in training mode after model.eval(): "
                    "BatchNorm/Dropout behave as in training during the evaluation"
                )
            first_batch = xs[:batch_size].to(run_device)
            outputs = _forward_checks(model, first_batch, reasons, checks)

            zero_frac, nonfinite = _zero_gradient_fraction(model, xs, ys, batch_size=batch_size, device=run_device)
            report.zero_gradient_fraction = zero_frac
            checks["gradients"] = nonfinite == 0 and zero_frac <= zero_gradient_max_fraction
            if nonfinite:
                reasons.append(f"{nonfinite} of {m} points have a non-finite (NaN/inf) input gradient")
            if zero_frac > zero_gradient_max_fraction:
                reasons.append(
                    f"{_pct(zero_frac)} of {m} points have an exactly zero cross-entropy input gradient "
                    "(non-differentiable or saturating layers): gradient attacks cannot move them"
                )

            # (a) the eps sweep.
            radii: list[tuple[str, float]] = []
            for f in fractions:
                radius = f * eps_value
                if norm == "Linf":
                    radius = min(radius, 1.0)
                key = format_eps(radius)
                if key not in dict(radii):
                    radii.append((key, radius))
            at_eps: Tensor | None = None
            for key, radius in radii:
                correct = run(seeded_pgd(model, radius))
                report.sweep[key] = float(correct.float().mean())
                if radius == eps_value:
                    at_eps = correct
            if at_eps is None:  # eps itself not among the fractions
                at_eps = run(seeded_pgd(model, eps_value))
            pgd_acc = float(at_eps.float().mean())
            rises = [
                (a, b)
                for (a, _), (b, _) in itertools.pairwise(radii)
                if report.sweep[b] > report.sweep[a] + tol + 1e-12
            ]
            checks["monotone"] = not rises
            for a, b in rises:
                reasons.append(
                    f"PGD-{pgd_steps} accuracy rises with eps: {_pct(report.sweep[a])} at {a} -> "
                    f"{_pct(report.sweep[b])} at {b} (tolerance {_pct(tol)}): a larger ball can only "
                    "help the attacker, so the attack is not following the gradient (masking)"
                )

            # (b) unbounded radius.
            report.unbounded_accuracy = float(run(seeded_pgd(model, big)).float().mean())
            checks["unbounded"] = report.unbounded_accuracy <= unbounded_max_accuracy
            if not checks["unbounded"]:
                reasons.append(
                    f"PGD-{pgd_steps} with an unbounded radius ({norm} eps={big:.4g}, any image reachable) "
                    f"leaves {_pct(report.unbounded_accuracy)} accuracy (expected <= "
                    f"{_pct(unbounded_max_accuracy)}): gradients do not lead the attack anywhere (masking)"
                )

            # Single step vs iterative at eps.
            if eps_value > 0:
                fgsm_correct = run(lambda xb, yb: fgsm(model, xb, yb, eps=eps_value, norm=norm))
                report.fgsm_accuracy = float(fgsm_correct.float().mean())
                checks["single_step"] = report.fgsm_accuracy >= pgd_acc - tol - 1e-12
                if not checks["single_step"]:
                    reasons.append(
                        f"single-step FGSM ({_pct(report.fgsm_accuracy)}) beats PGD-{pgd_steps} "
                        f"({_pct(pgd_acc)}) at eps={format_eps(eps_value)}: the iterative attack gets "
                        "stuck (masked or noisy gradients)"
                    )
            else:
                skipped["single_step"] = "eps is 0"

            # (d) black-box transfer from the teacher.
            if teacher is None:
                skipped["transfer"] = "no teacher given"
            elif eps_value == 0:
                skipped["transfer"] = "eps is 0"
            else:
                with torch.no_grad():
                    teacher_out = teacher(first_batch)
                if teacher_out.shape != outputs.shape:
                    raise UserError(
                        f"the transfer teacher's outputs have shape {tuple(teacher_out.shape)}, the model's "
                        f"{tuple(outputs.shape)}: give a teacher for the same dataset and classes"
                    )
                transfer = run(seeded_pgd(teacher, eps_value))
                report.transfer_accuracy = float(transfer.float().mean())
                if whitebox_correct is not None:
                    worst = at_eps & whitebox_correct[:m].to(torch.bool).cpu()
                    reference = float(worst.float().mean())
                elif whitebox_accuracy is not None:
                    reference = min(pgd_acc, whitebox_accuracy)
                else:
                    reference = pgd_acc
                report.whitebox_accuracy = reference
                checks["transfer"] = report.transfer_accuracy >= reference - margin - 1e-12
                if not checks["transfer"]:
                    reasons.append(
                        f"black-box transfer attack from the teacher (PGD-{pgd_steps} on the teacher) "
                        f"leaves {_pct(report.transfer_accuracy)} accuracy, clearly below the white-box "
                        f"{_pct(reference)} (margin {_pct(margin)}): the model's own gradients are "
                        "masked, so its white-box number overstates its robustness"
                    )
    finally:
        for module, was_training in modes.items():
            module.train(was_training)

    # (c) AutoAttack's own flags.
    aa_reasons = _autoattack_reasons(autoattack_flags)
    checks["autoattack"] = not aa_reasons
    reasons.extend(aa_reasons)

    report.reliable = not reasons
    if reasons:
        logger.warning("evaluation sanity checks failed (%d): the robust accuracy may be unreliable", len(reasons))
        for reason in reasons:
            logger.warning("  - %s", reason)
    else:
        logger.info(
            "evaluation sanity checks passed on %d points (sweep %s)",
            m,
            ", ".join(f"{k}: {_pct(v)}" for k, v in report.sweep.items()),
        )
    return report


def check_evaluation(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    result: EvalResult,
    *,
    teacher: nn.Module | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    **options: Any,
) -> SanityReport:
    """:func:`run_sanity_checks` for an :class:`EvalResult` of ``evaluate_model(model, x, y, ...)``.

    Takes the threat model, seed and batch size from ``result`` and compares the transfer attack
    with the point-wise worst case over every white-box attack that ran (all keys but ``"clean"``)
    on the same points; AutoAttack's flags become reasons. ``options`` go to
    :func:`run_sanity_checks` (``n_examples``, ``tolerance``, ...).
    """
    attacked = [key for key in result.per_example if key != "clean"]
    whitebox_correct: Tensor | None = None
    for key in attacked:
        flags = result.per_example[key].to(torch.bool).cpu()
        whitebox_correct = flags if whitebox_correct is None else whitebox_correct & flags
    whitebox_accuracy = min((result.accuracy[key] for key in attacked), default=None)
    return run_sanity_checks(
        model, x, y, norm=result.norm, eps=result.eps, teacher=teacher,
        batch_size=batch_size or 256, seed=result.seed, device=device,
        whitebox_accuracy=whitebox_accuracy, whitebox_correct=whitebox_correct,
        autoattack_flags=result.autoattack_flags, **options,
    )  # fmt: skip
