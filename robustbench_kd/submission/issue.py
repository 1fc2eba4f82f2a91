"""The bundle's ``new_model_issue.md``: RobustBench's "New Model(s)" issue template, filled in."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from robustbench_kd.submission.layout import FILL_IN, LEADERBOARD_N_EXAMPLES, ZOO_ENTRY_FILE
from robustbench_kd.submission.zoo_entry import ZooConstructor

__all__ = ["DATASET_NAMES", "STANDARD_ATTACKS", "THREAT_NAMES", "format_new_model_issue", "or_fill_in"]

DATASET_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "imagenet": "ImageNet",
    "digits": "digits (scikit-learn 8x8)",
}
THREAT_NAMES = {"Linf": "Linf", "L2": "L2", "corruptions": "Common Corruptions"}
STANDARD_ATTACKS = "APGD-CE, APGD-T, FAB-T, Square"


def or_fill_in(value: Any) -> str:
    """``value`` as text, or :data:`FILL_IN` when it is missing or empty."""
    return FILL_IN if value is None or value == "" else str(value)


def format_new_model_issue(
    info: Mapping[str, Any],
    *,
    model_id: str,
    threat_model: str,
    n_examples: int,
    seed: int | None,
    autoattack_version: str | None,
    batch_size: int | None,
    sha256: str | None,
    constructor: ZooConstructor | None,
    tool_version: str | None = None,
) -> str:
    """RobustBench's "New Model(s)" issue (``.github/ISSUE_TEMPLATE/new-model.md``) filled in for one model.

    Fields the run cannot know (paper title, URL, authors when not given, the checkpoint URL, the
    license) read ``<fill in>`` / stay unchecked. The evaluation method states AutoAttack's version
    (standard: APGD-CE, APGD-T, FAB-T, Square), backend, seed and the number of test points; an
    entry marked ``unreliable`` gets a note with its footnote (AutoAttack's flags, failed sanity checks).
    """
    dataset = str(info["dataset"])
    full = LEADERBOARD_N_EXAMPLES.get(dataset)
    points = (
        f"the first {n_examples} {DATASET_NAMES.get(dataset, dataset)} test images "
        "(unshuffled, as robustbench.eval.benchmark)"
    )
    method = (
        f"AutoAttack, version standard ({STANDARD_ATTACKS}), backend {or_fill_in(autoattack_version)}, "
        f"seed {seed}, batch size {or_fill_in(batch_size)}, on {points}"
    )
    if tool_version:
        method += f"; run with robustbench_kd {tool_version}"
    notes = []
    if full is not None and n_examples != full:
        notes.append(
            f"evaluated on {n_examples} points, not the {full} the leaderboard requires: "
            "re-run on the full test set before submitting"
        )
    if info.get("unreliable"):
        notes.append("the entry is marked unreliable: " + or_fill_in(info.get("footnote")))
    robust_key = "autoattack_acc" if "autoattack_acc" in info else "corruptions_acc"
    sha = f" (SHA-256 of {model_id}.pt: `{sha256}`)" if sha256 else ""
    not_in_rb = constructor is not None and not constructor.in_robustbench
    lines = [
        f"Title: [New Model] {model_id}",
        "Labels: new-model",
        "",
        "# Paper Information",
        "",
        f"- **Paper Title**: {or_fill_in(info.get('name'))}",
        f"- **Paper URL**: {or_fill_in(info.get('link'))}",
        f"- **Paper authors**: {or_fill_in(info.get('authors'))}",
        "",
        "# Leaderboard Claim(s)",
        "",
        f"## Model 1: {model_id}",
        "",
        f"- **Architecture**: {or_fill_in(info.get('architecture'))}",
        f"- **Threat Model**: {THREAT_NAMES.get(threat_model, threat_model)}",
        f"- **eps**: {'N/A' if info.get('eps') is None else info['eps']}",
        f"- **Clean accuracy**: {info['clean_acc']}%",
        f"- **Robust accuracy**: {info[robust_key]}%",
        f"- **Additional data**: {'true' if info.get('additional_data') else 'false'}",
        f"- **Evaluation method**: {method}",
        f"- **Checkpoint and code**: checkpoint {FILL_IN} (URL){sha}; code {FILL_IN} (URL). The model-zoo "
        f"entry is in `{ZOO_ENTRY_FILE}` of the submission bundle.",
    ]
    if notes:
        lines += ["", *[f"**Note:** {note}" for note in notes]]
    lines += [
        "",
        f"Leaderboard entry (`model_info/{dataset}/{threat_model}/{model_id}.json`):",
        "",
        "```json",
        _json(info).rstrip("\n"),
        "```",
        "",
        "# Model Zoo:",
        "",
        "- [x] I want to add my models to the Model Zoo (check if true)",
        f"- {'[x]' if not_in_rb else '[ ]'} I use an architecture that is **not** included among",
        "  those [here](https://github.com/RobustBench/robustbench/tree/master/robustbench/model_zoo/architectures) "
        "(check if true).",
        "- [ ] I agree to release my model(s) under MIT license (check if true) **OR**",
        "- [ ] I want my models to be released under a custom license, located here: (custom license URL here)",
        "",
    ]
    return "\n".join(lines)


def _json(info: Mapping[str, Any]) -> str:
    return json.dumps(dict(info), indent=2) + "\n"
