"""``reproduce()``: train a paper's recipe, run the leaderboard evaluation, and compare with the published numbers.

A recipe is a run file whose ``[published]`` section holds what a paper printed for that setting (clean and
AutoAttack accuracy, the table it comes from, a tolerance); ``examples/recipes/`` has one per published
setting of the built-in methods. :func:`reproduce` is :func:`~robustbench_kd.api.runs.distill` (training and
the final evaluation) followed by one closing line, :func:`verdict_line` (measured numbers made up here)::

    reproduce cifar10_rslad_resnet18_wrn34: clean 83.10% (published 82.81%, +0.29), AutoAttack 49.02%
    (published 49.95%, -0.93): within the ±1.00-point tolerance (Yin et al., CVPR 2024, Table 3, ...)

The comparison is only meaningful on the leaderboard's protocol, which :func:`check_leaderboard_protocol`
enforces before anything is trained: clean and AutoAttack accuracy on the whole test set at the
leaderboard's perturbation budget. Tests that need a one-step run on tiny data call the pieces
(:func:`check_leaderboard_protocol`, :func:`verdict_line`) directly instead of :func:`reproduce`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustbench_kd.api.runs import RunResult, distill, resolve_config
from robustbench_kd.config import PublishedSection, RunConfig
from robustbench_kd.errors import UserError

__all__ = ["LEADERBOARD_BUDGETS", "Reproduction", "check_leaderboard_protocol", "reproduce", "verdict_line"]

#: The final-evaluation attacks a published leaderboard number needs.
LEADERBOARD_ATTACKS = ("clean", "autoattack")
#: RobustBench's perturbation budget per (dataset, norm): the eps its leaderboards (and the papers that
#: report AutoAttack against them) evaluate at.
LEADERBOARD_BUDGETS: dict[tuple[str, str], tuple[float, str]] = {
    ("cifar10", "Linf"): (8 / 255, "8/255"),
    ("cifar10", "L2"): (0.5, "0.5"),
    ("cifar100", "Linf"): (8 / 255, "8/255"),
    ("imagenet", "Linf"): (4 / 255, "4/255"),
}
#: Metric key in the results -> the name the verdict prints.
_SHOWN = {"clean": "clean", "autoattack": "AutoAttack"}
#: Slack on the tolerance for binary floating point: 0.8338 * 100 is 83.38000000000001.
_FLOAT_SLACK = 1e-9


@dataclass(frozen=True)
class Reproduction:
    """What :func:`reproduce` made.

    Attributes:
        result: the run (:class:`~robustbench_kd.api.runs.RunResult`): student, metrics, files written.
        published: the recipe's ``[published]`` section.
        verdict: the closing line (:func:`verdict_line`).
        within_tolerance: whether every published number was matched within ``published.tolerance``;
            None when the paper gives no number for this setting.
    """

    result: RunResult
    published: PublishedSection
    verdict: str
    within_tolerance: bool | None


def check_leaderboard_protocol(config: RunConfig) -> None:
    """Refuse, in one line, a run whose final evaluation is not the leaderboard's.

    The published numbers are clean and AutoAttack accuracy on the whole test set at the leaderboard's
    budget (:data:`LEADERBOARD_BUDGETS`), so ``eval.attacks`` must include ``"clean"`` and ``"autoattack"``,
    ``eval.final_n_examples`` must be unset (a subset is another, noisier measurement) and ``threat`` must be
    the leaderboard's norm and eps (the final evaluation attacks at ``threat.eps``).
    """
    missing = [name for name in LEADERBOARD_ATTACKS if name not in config.eval.attacks]
    if missing:
        raise UserError(
            f"reproduce needs the leaderboard evaluation, but eval.attacks lacks {' and '.join(map(repr, missing))}; "
            f'set eval.attacks to include "clean" and "autoattack"'
        )
    if config.eval.final_n_examples is not None:
        raise UserError(
            f"reproduce compares with numbers measured on the whole test set, but eval.final_n_examples = "
            f"{config.eval.final_n_examples}; remove it (unset means the whole test set)"
        )
    key = (config.data.dataset, config.threat.norm)
    budget = LEADERBOARD_BUDGETS.get(key)
    if budget is None:
        valid = ", ".join(f"{d} {n}" for d, n in LEADERBOARD_BUDGETS)
        raise UserError(
            f"reproduce compares with a RobustBench leaderboard, and there is none for {key[0]} {key[1]}; "
            f"valid: {valid}"
        )
    eps, shown = budget
    if not math.isclose(config.threat.eps, eps, rel_tol=1e-9, abs_tol=1e-12):
        raise UserError(
            f"reproduce evaluates at the leaderboard's budget, eps = {shown} for {key[0]} {key[1]}, but "
            f"threat.eps = {config.threat.eps:g}; restore threat.eps = {shown!r}"
        )


def verdict_line(
    metrics: Mapping[str, float], published: PublishedSection, *, recipe_name: str
) -> tuple[str, bool | None]:
    """The closing line of a reproduction and whether it counts as reproduced.

    ``metrics`` are the final test accuracies as :class:`~robustbench_kd.api.runs.RunResult` holds them,
    fractions in [0, 1] by attack (``{"clean": 0.831, "autoattack": 0.5102}``); the line prints them in
    percent. For every published metric p with measured accuracy m (percent) it shows the difference
    d = m - p; the reproduction is within tolerance when |d| <= ``published.tolerance`` for all of them.
    Returns ``(line, within)``; ``within`` is None when the paper gives no number for the setting. A
    published metric that was not measured is a one-line UserError.
    """
    parts: list[str] = []
    within: bool | None = None
    for key, shown in _SHOWN.items():
        paper = getattr(published, key)
        value = metrics.get(key)
        if value is None:
            if paper is not None:
                raise UserError(
                    f"reproduce {recipe_name}: the paper gives {shown} accuracy {paper:.2f}% but the run measured "
                    f'none; the final evaluation must include "{key}"'
                )
            continue
        measured = _percent(value, key, recipe_name)
        if paper is None:
            parts.append(f"{shown} {measured:.2f}%" + (" (not published)" if _any_published(published) else ""))
            continue
        difference = measured - paper
        shown_difference = round(difference, 2) + 0.0  # + 0.0 turns -0.0 into 0.0: no "-0.00"
        parts.append(f"{shown} {measured:.2f}% (published {paper:.2f}%, {shown_difference:+.2f})")
        ok = abs(difference) <= published.tolerance + _FLOAT_SLACK
        within = ok if within is None else within and ok
    measured_text = ", ".join(parts) if parts else "nothing measured"
    if within is None:
        conclusion = "no published numbers for this setting"
    else:
        side = "within" if within else "outside"
        conclusion = f"{side} the ±{published.tolerance:.2f}-point tolerance"
    if published.source:
        conclusion += f" ({published.source})"
    if published.teacher_note:
        conclusion += f"; {published.teacher_note}"
    return f"reproduce {recipe_name}: {measured_text}: {conclusion}", within


def reproduce(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | RunConfig,
    *,
    overrides: Sequence[str] | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Reproduction:
    """Train a recipe, evaluate it as the leaderboard does, and compare with the paper: ``robustbench-kd reproduce``.

    Args:
        recipe: a run file with a ``[published]`` section (``examples/recipes/*.toml``), a mapping of sections
            or a :class:`~robustbench_kd.config.RunConfig`.
        overrides: ``--set`` strings applied on top (``["run.out_dir=runs/r1", "run.seed=1"]``).
        resume: continue from ``<out_dir>/checkpoints/last.pt``; a changed ``[published]`` section does not
            block it (a resume compares only what training depends on).
        progress: ``False`` switches the progress bars off; ``True`` keeps the run file's ``run.progress``.

    Returns:
        A :class:`Reproduction`. Raises :class:`~robustbench_kd.errors.UserError` before anything is trained
        when the final evaluation is not the leaderboard's (:func:`check_leaderboard_protocol`).
    """
    config = resolve_config(recipe, overrides)
    check_leaderboard_protocol(config)
    result = distill(config, resume=resume, progress=progress)
    verdict, within = verdict_line(result.metrics, config.published, recipe_name=_recipe_name(recipe, config))
    return Reproduction(result=result, published=config.published, verdict=verdict, within_tolerance=within)


def _recipe_name(recipe: object, config: RunConfig) -> str:
    """The run file's stem (``cifar10_rslad_resnet18_wrn34``), or ``run.name`` for a mapping or a config."""
    if isinstance(recipe, (str, os.PathLike)):
        return Path(recipe).stem
    return config.run.name


def _any_published(published: PublishedSection) -> bool:
    return published.clean is not None or published.autoattack is not None


def _percent(value: object, key: str, recipe_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:  # also NaN
        raise UserError(
            f"reproduce {recipe_name}: the {key} accuracy must be a fraction in [0, 1] as the results hold it, "
            f"got {value!r}"
        )
    return 100.0 * float(value)
