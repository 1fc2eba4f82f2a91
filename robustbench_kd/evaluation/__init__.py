"""Evaluation the way RobustBench and the robust-distillation papers report it.

* :func:`evaluate_model`: clean, FGSM, PGD-k, CW-inf and AutoAttack accuracy on the same examples;
* :func:`run_autoattack`: AutoAttack through the official code (pyautoattack / fra31), with its
  gradient-masking and randomness warnings collected;
* :func:`fgsm`, :func:`pgd`: the white-box attacks themselves;
* :func:`build_model_info`, :func:`write_model_info`: leaderboard JSON entries;
* :func:`save_zoo_checkpoint`: checkpoints that ``robustbench.utils.load_model`` can read;
* :func:`run_sanity_checks`: the evaluation sanity suite (eps sweep, unbounded eps, transfer from a
  teacher, determinism, AutoAttack's flags) that marks a gradient-masked number unreliable.

Importing this package does not import robustbench; AutoAttack is imported when first run.

:mod:`.final_report` (evaluate a model and write its leaderboard entry, zoo checkpoint, results and
submission bundle) and :mod:`.shards` (sharded evaluation and its merge) are the writers; the rest measures.

May import the layers below it: ``submission``, ``methods``, ``students``, ``scale``, ``zoo`` (the
robustbench/AutoAttack shim), ``data``, the core plugin API, ``storage`` and ``errors``. Never ``config``,
``analysis``, ``training`` or ``jobs``. ``training`` imports the measuring part (``evaluate_model``),
never the writers.
"""

from __future__ import annotations

from robustbench_kd.evaluation.attacks import cw_margin_loss, fgsm, pgd
from robustbench_kd.evaluation.autoattack import AUTOATTACK_VERSIONS, AutoAttackResult, run_autoattack
from robustbench_kd.evaluation.export import imagenet_zoo_model, save_zoo_checkpoint, zoo_checkpoint_path
from robustbench_kd.evaluation.model_info import (
    LEADERBOARD_KEYS,
    THREAT_MODELS,
    build_model_info,
    model_info_path,
    validate_model_info,
    write_model_info,
)
from robustbench_kd.evaluation.runner import VALID_ATTACKS, EvalResult, evaluate_model
from robustbench_kd.evaluation.sanity import (
    SANITY_CHECKS,
    SanityReport,
    check_eps_units,
    check_evaluation,
    run_sanity_checks,
)
from robustbench_kd.zoo.names import validate_model_id

__all__ = [
    "AUTOATTACK_VERSIONS",
    "LEADERBOARD_KEYS",
    "SANITY_CHECKS",
    "THREAT_MODELS",
    "VALID_ATTACKS",
    "AutoAttackResult",
    "EvalResult",
    "SanityReport",
    "build_model_info",
    "check_eps_units",
    "check_evaluation",
    "cw_margin_loss",
    "evaluate_model",
    "fgsm",
    "imagenet_zoo_model",
    "model_info_path",
    "pgd",
    "run_autoattack",
    "run_sanity_checks",
    "save_zoo_checkpoint",
    "validate_model_id",
    "validate_model_info",
    "write_model_info",
    "zoo_checkpoint_path",
]
