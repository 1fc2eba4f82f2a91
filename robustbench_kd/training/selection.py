"""Checkpoint selection during training: validation accuracy, and which epoch is best by ``eval.select``.

Only the validation split held out of the training set (``data.val_size``) is read here, never the test set.
"""

from __future__ import annotations

from typing import Any

from robustbench_kd.config import RunConfig
from robustbench_kd.data.datasets import to_float
from robustbench_kd.errors import UserError
from robustbench_kd.training.setup import Run


def quick_eval(run: Run) -> dict[str, float]:
    """Clean and PGD accuracy on the first ``eval.n_examples`` validation points (RNG isolated).

    Keys ``val_clean_acc`` and ``val_pgd<steps>_acc``, plus ``val_ema_clean_acc`` and ``val_ema_pgd<steps>_acc``
    for the EMA student when ``[ema]`` is on. The validation split is held out of the training set and never
    augmented; the test set is never read here (UserError without a validation split).
    """
    from robustbench_kd.evaluation import evaluate_model

    cfg = run.config
    val_x, val_y = run.data.val_x, run.data.val_y
    if val_x is None or val_y is None:
        raise UserError("evaluation during training needs a validation split: set data.val_size")
    n = cfg.eval.n_examples
    # With [ema] on, the averaged student is checked on the same points, as val_ema_*; best.pt still ranks
    # the raw student.
    models = [("val", run.student)] + ([("val_ema", run.ema.module)] if run.ema is not None else [])
    metrics: dict[str, float] = {}
    for prefix, model in models:
        result = evaluate_model(
            model,
            to_float(val_x[:n]),
            val_y[:n],
            norm=cfg.threat.norm,
            eps=cfg.threat.eps,
            attacks=("clean", "pgd"),
            batch_size=cfg.eval.batch_size,
            seed=cfg.eval.seed,
            pgd_steps=cfg.eval.pgd_steps,
            device=run.device,
            progress=False,
        )
        metrics.update({f"{prefix}_{k.replace('-', '')}_acc": v for k, v in result.accuracy.items()})
    return metrics


def selection_metrics(config: RunConfig) -> tuple[str, str]:
    """(ranking key, tie-break key) among :func:`quick_eval`'s metrics for ``eval.select``.

    ``pgd`` ranks by ``val_pgd<steps>_acc`` and breaks ties by clean accuracy; ``clean`` the reverse.
    """
    pgd, clean = f"val_pgd{config.eval.pgd_steps}_acc", "val_clean_acc"
    return (clean, pgd) if config.eval.select == "clean" else (pgd, clean)


def selection_protocol(run: Run) -> dict[str, Any]:
    """What makes two epochs' validation numbers comparable; stored with the best record."""
    cfg = run.config
    val_y = run.data.val_y
    n_val = len(val_y) if run.data.has_validation and val_y is not None else 0
    return {
        "metric": selection_metrics(cfg)[0],
        "n_examples": min(cfg.eval.n_examples, n_val),
        "eps": float(cfg.threat.eps),
        "norm": cfg.threat.norm,
        "seed": cfg.eval.seed,
    }


def update_best(run: Run, epoch: int, metrics: dict[str, Any]) -> bool:
    """Record ``epoch`` (1-based) as the best so far if it beats the record; return whether it did.

    Strictly better only: on a full tie the earlier epoch stays best.
    """
    key, tie = selection_metrics(run.config)
    score = (metrics[key], metrics[tie])
    if run.best is not None and score <= (run.best[key], run.best[tie]):
        return False
    run.best = {
        "epoch": epoch,
        "metric": key,
        key: float(metrics[key]),
        tie: float(metrics[tie]),
        "protocol": selection_protocol(run),
    }
    return True
