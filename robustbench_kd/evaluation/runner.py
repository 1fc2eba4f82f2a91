"""One call that evaluates a model the way robust-distillation papers report it.

Clean accuracy, FGSM, PGD-k (cross-entropy), CW-inf (PGD-k on the CW margin) and AutoAttack, on the
same examples, with the model in eval mode and the caller's RNG untouched, so that the numbers are comparable across
attacks and an evaluation in the middle of training changes nothing in the training run.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from robustbench_kd.errors import UserError, close_matches
from robustbench_kd.evaluation.attacks import check_inputs, fgsm, pgd
from robustbench_kd.evaluation.autoattack import (
    AUTOATTACK_VERSIONS,
    model_device,
    predict_correct,
    rng_devices,
    run_autoattack,
)
from robustbench_kd.threat import NORMS, format_eps, parse_number, validate_eps

__all__ = ["VALID_ATTACKS", "EvalResult", "evaluate_model"]

logger = logging.getLogger(__name__)

VALID_ATTACKS = ("clean", "fgsm", "pgd", "cw", "autoattack", "autoattack-quick")


@dataclass
class EvalResult:
    """Accuracies of one model under each requested attack, on the same ``n_examples`` points.

    Attributes:
        n_examples: number of evaluated examples.
        norm, eps: the threat model (eps in [0,1] input units).
        accuracy: attack key -> accuracy in [0,1]. Keys: ``"clean"``, ``"fgsm"``, ``"pgd-<steps>"``,
            ``"cw-<steps>"``, ``"autoattack"`` (standard version), ``"autoattack-quick"`` (or
            ``"autoattack-<version>"`` for the other AA versions), in the requested order.
        pgd_alpha, pgd_steps: step size and number of steps used by PGD and CW (reported always,
            since PGD numbers depend strongly on the step size).
        per_example: attack key -> bool tensor [n_examples] (on CPU), True where the prediction
            on the attacked input is still correct.
        autoattack_stages: ``"<AutoAttack key>/<attack>"`` (e.g. ``"autoattack/apgd-ce"``) -> bool tensor
            [n_examples] on CPU: still robust after that attack of AutoAttack and the ones before it, by
            AutoAttack's own verdict (``AutoAttackResult.stages``; empty when the run could not tell).
        autoattack_flags: warnings AutoAttack logged (see ``AutoAttackResult.flags``).
        autoattack_version: version of the AutoAttack backend, or None if AA did not run.
        seed: the seed every attack was started from.
    """

    n_examples: int
    norm: str
    eps: float
    accuracy: dict[str, float]
    pgd_alpha: float
    pgd_steps: int
    per_example: dict[str, Tensor] = field(default_factory=dict, repr=False)
    autoattack_stages: dict[str, Tensor] = field(default_factory=dict, repr=False)
    autoattack_flags: list[str] = field(default_factory=list)
    autoattack_version: str | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (everything except the per-example tensors)."""
        stages = {
            key: float(flags.sum().item()) / max(1, flags.numel()) for key, flags in self.autoattack_stages.items()
        }
        return {
            "n_examples": int(self.n_examples),
            "norm": self.norm,
            "eps": float(self.eps),
            "eps_str": format_eps(self.eps),
            "accuracy": {key: float(value) for key, value in self.accuracy.items()},
            **({"autoattack_stage_accuracy": stages} if stages else {}),
            "pgd_alpha": float(self.pgd_alpha),
            "pgd_steps": int(self.pgd_steps),
            "autoattack_flags": list(self.autoattack_flags),
            "autoattack_version": self.autoattack_version,
            "seed": int(self.seed),
        }


def _normalise_attacks(attacks: str | Sequence[str]) -> list[str]:
    names = [attacks] if isinstance(attacks, str) else list(attacks)
    if not names:
        raise UserError(f"no attacks requested; choose from {', '.join(VALID_ATTACKS)}")
    unique: list[str] = []
    for name in names:
        if name not in VALID_ATTACKS:
            raise UserError(
                f"unknown attack {name!r}{close_matches(str(name), VALID_ATTACKS)}; "
                f"valid attacks: {', '.join(VALID_ATTACKS)}"
            )
        if name not in unique:
            unique.append(name)
    return unique


def _seed_all(seed: int, device: torch.device) -> None:
    # Seed only the generators that fork_rng saved, so nothing outside the fork is disturbed.
    torch.default_generator.manual_seed(seed)
    if rng_devices(device):
        torch.cuda.manual_seed_all(seed)


def evaluate_model(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    norm: str = "Linf",
    eps: float | str,
    attacks: str | Sequence[str] = ("clean", "pgd", "autoattack"),
    batch_size: int = 256,
    seed: int = 0,
    pgd_steps: int = 20,
    pgd_alpha: float | str | None = None,
    autoattack_version: str = "standard",
    device: torch.device | str | None = None,
    progress: bool = True,
    autoattack_log: str | os.PathLike[str] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``(x, y)`` under each attack in ``attacks``.

    Args:
        model: maps [0,1] inputs to logits. It is put in eval mode for the evaluation and every
            submodule's train/eval flag is restored afterwards, even if an attack raises. It is
            not moved: ``device`` must be where its parameters live.
        x, y: inputs in [0,1] and integer labels; batches are moved to ``device``.
        norm: ``"Linf"`` or ``"L2"``. eps: radius, a number or a string such as ``"8/255"``.
        attacks: names from ``VALID_ATTACKS``: ``"clean"``, ``"fgsm"``, ``"pgd"`` (PGD-k on
            cross-entropy with random start), ``"cw"`` (PGD-k on the CW margin, i.e. CW-inf),
            ``"autoattack"`` (version ``autoattack_version``), ``"autoattack-quick"``. Unknown
            names raise UserError.
        batch_size: batch size for every attack (AutoAttack included).
        seed: every attack starts from this seed (re-seeded before each one, so an attack's number
            does not depend on which other attacks ran). The caller's RNG state is restored.
        pgd_steps: steps of PGD and CW. pgd_alpha: their step size; default ``eps / 4`` (2/255 at
            8/255).
        autoattack_version: version used for ``"autoattack"``: one of ``AUTOATTACK_VERSIONS``.
        device: where the computation runs; default: the device of the model's parameters.
        progress: show tqdm progress bars.
        autoattack_log: if given, AutoAttack's full log (every attack, DEBUG progress included) is
            appended to this file, for each AutoAttack run of this evaluation (``run_autoattack``'s
            ``log_path``).

    Returns:
        an :class:`EvalResult`. PGD/CW/FGSM accuracy is the accuracy on the final adversarial
        iterate (as in the reference evaluation code); AutoAttack's is the point-wise worst case
        over its attacks.
    """
    names = _normalise_attacks(attacks)
    if norm not in NORMS:
        raise UserError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    eps_value = parse_number(eps, what="eps")
    validate_eps(eps_value, norm, what="eps")
    alpha = eps_value / 4 if pgd_alpha is None else parse_number(pgd_alpha, what="pgd_alpha")
    if isinstance(pgd_steps, bool) or not isinstance(pgd_steps, int) or pgd_steps < 1:
        raise UserError(f"pgd_steps must be a positive integer, got {pgd_steps!r}")
    if alpha <= 0 and eps_value > 0 and any(n in ("pgd", "cw") for n in names):
        raise UserError(f"pgd_alpha must be positive, got {alpha}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if autoattack_version not in AUTOATTACK_VERSIONS:
        raise UserError(f"unknown autoattack_version {autoattack_version!r}; valid: {', '.join(AUTOATTACK_VERSIONS)}")
    check_inputs(x, y)
    run_device = torch.device(device) if device is not None else model_device(model)
    n = int(x.shape[0])

    accuracy: dict[str, float] = {}
    per_example: dict[str, Tensor] = {}
    stages: dict[str, Tensor] = {}
    aa_flags: list[str] = []
    aa_version: str | None = None

    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices(run_device)):
            for name in names:
                _seed_all(seed, run_device)
                if name in ("autoattack", "autoattack-quick"):
                    mode = autoattack_version if name == "autoattack" else "quick"
                    key = "autoattack" if mode == "standard" else f"autoattack-{mode}"
                    if key in accuracy:
                        continue
                    logger.info("AutoAttack (%s) on %d examples", mode, n)
                    with tqdm(total=1, desc=key, disable=not progress, leave=False) as bar:
                        result = run_autoattack(
                            model,
                            x,
                            y,
                            norm=norm,
                            eps=eps_value,
                            version=mode,
                            seed=seed,
                            batch_size=batch_size,
                            device=run_device,
                            log_path=autoattack_log,
                        )
                        bar.update(1)
                    flags = result.robust
                    stages.update({f"{key}/{attack}": robust for attack, robust in result.stages.items()})
                    aa_flags.extend(result.flags)
                    aa_version = result.version
                else:
                    key = {"pgd": f"pgd-{pgd_steps}", "cw": f"cw-{pgd_steps}"}.get(name, name)
                    flags = _batched(
                        model, x, y, name,
                        norm=norm, eps=eps_value, alpha=alpha, steps=pgd_steps,
                        batch_size=batch_size, device=run_device, progress=progress, desc=key,
                    )  # fmt: skip
                per_example[key] = flags
                accuracy[key] = float(flags.sum().item()) / n
                logger.info("%s accuracy: %.2f%%", key, 100 * accuracy[key])
    finally:
        for module, was_training in modes.items():
            module.train(was_training)

    return EvalResult(
        n_examples=n,
        norm=norm,
        eps=eps_value,
        accuracy=accuracy,
        pgd_alpha=alpha,
        pgd_steps=pgd_steps,
        per_example=per_example,
        autoattack_stages=stages,
        autoattack_flags=aa_flags,
        autoattack_version=aa_version,
        seed=seed,
    )


def _batched(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    name: str,
    *,
    norm: str,
    eps: float,
    alpha: float,
    steps: int,
    batch_size: int,
    device: torch.device,
    progress: bool,
    desc: str,
) -> Tensor:
    """Per-example correctness under the clean/FGSM/PGD/CW attack ``name``, batch by batch."""
    flags: list[Tensor] = []
    n_batches = math.ceil(x.shape[0] / batch_size)
    for start in tqdm(
        range(0, x.shape[0], batch_size), total=n_batches, desc=desc, disable=not progress,
        leave=False,
    ):  # fmt: skip
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        if name == "clean":
            x_eval = xb
        elif name == "fgsm":
            x_eval = fgsm(model, xb, yb, eps=eps, norm=norm)
        else:
            x_eval = pgd(
                model, xb, yb, eps=eps, alpha=alpha, steps=steps, norm=norm,
                random_start=True, loss="ce" if name == "pgd" else "cw",
            )  # fmt: skip
        flags.append(predict_correct(model, x_eval, yb, batch_size=batch_size, device=device))
    return torch.cat(flags)
