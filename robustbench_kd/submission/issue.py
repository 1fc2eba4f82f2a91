"""The bundle's ``new_model_issue.md``: RobustBench's "New Model(s)" issue template, filled in."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from robustbench_kd.submission.layout import AUTOATTACK_LOG, FILL_IN, LEADERBOARD_N_EXAMPLES, ZOO_ENTRY_FILE
from robustbench_kd.submission.zoo_entry import ZooConstructor

__all__ = [
    "ARCHITECTURES_URL",
    "DATASET_NAMES",
    "PRIVATE_SUBMISSION_EMAIL",
    "STANDARD_ATTACKS",
    "THREAT_NAMES",
    "format_new_model_issue",
    "or_fill_in",
]

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


#: Where RobustBench takes checkpoints that are not shared publicly (the template's own words).
PRIVATE_SUBMISSION_EMAIL = "adversarial.benchmark@gmail.com"
ARCHITECTURES_URL = "https://github.com/RobustBench/robustbench/tree/master/robustbench/model_zoo/architectures"


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
    unmet: Sequence[str] = (),
    architecture_file: str | None = None,
) -> str:
    """RobustBench's "New Model(s)" issue (``.github/ISSUE_TEMPLATE/new-model.md``) filled in for one model.

    Field for field the current template: paper information; one model claim (architecture, threat model,
    eps, clean and robust accuracy, additional data, evaluation method, checkpoint and code, with the
    template's private-submission route); the three Model Zoo boxes. Added where a maintainer needs it:
    the dataset and the number of test points, and where AutoAttack's log is. Fields the run cannot know
    (paper title, URL, authors when not given, the checkpoint URL) read ``<fill in>``. No box is ticked
    that the bundle does not make true: the architecture box only for a RobustBench or timm architecture;
    wanting the Model Zoo and the license are the submitter's to tick. ``unmet`` (a preview bundle's
    unmet requirements) opens the text.
    """
    dataset = str(info["dataset"])
    dataset_name = DATASET_NAMES.get(dataset, dataset)
    full = LEADERBOARD_N_EXAMPLES.get(dataset)
    if full is not None and n_examples == full:
        points = f"the full {dataset_name} test set ({n_examples:,} points"
    else:
        points = f"the first {n_examples:,} {dataset_name} test points (the leaderboard uses {full or 'n/a'}"
    points += ", unshuffled, as robustbench.eval.benchmark)"
    method = (
        f"AutoAttack, version standard ({STANDARD_ATTACKS}), on {points}; seed {seed}, batch size "
        f"{or_fill_in(batch_size)}, backend {or_fill_in(autoattack_version)}"
    )
    if tool_version:
        method += f", run with robustbench_kd {tool_version}"
    method += f". AutoAttack's full log is `{AUTOATTACK_LOG}` in the submission bundle: attach it to this issue."
    if info.get("unreliable"):
        method += " The entry is marked unreliable: " + or_fill_in(info.get("footnote"))
    robust_key = "autoattack_acc" if "autoattack_acc" in info else "corruptions_acc"
    sha = f" (SHA-256 of {model_id}.pt: `{sha256}`)" if sha256 else ""
    in_zoo_or_timm = constructor is not None and constructor.in_robustbench
    zoo_files = f"`{ZOO_ENTRY_FILE}`" + (f" and `{architecture_file}`" if architecture_file else "")
    lines = [f"Title: [New Model] {model_id}", "Labels: new-model", ""]
    if unmet:
        lines += [
            "> **Preview: not ready to submit.** This text shows the format; the bundle does not meet:",
            *[f"> - {item}" for item in unmet],
            "",
        ]
    lines += [
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
        f"- **Dataset**: {dataset_name}",
        f"- **eps**: {'N/A' if info.get('eps') is None else info['eps']}",
        f"- **Clean accuracy**: {info['clean_acc']}%",
        f"- **Robust accuracy**: {info[robust_key]}%",
        f"- **Additional data**: {'true' if info.get('additional_data') else 'false'}",
        f"- **Evaluation method**: {method}",
        f"- **Checkpoint and code**: checkpoint {FILL_IN} (URL){sha}; code {FILL_IN} (URL); the model-zoo entry is "
        f"{zoo_files} in the submission bundle. If you don't want to share your checkpoint publicly, you can share "
        f"it for a private submission via an email to `{PRIVATE_SUBMISSION_EMAIL}`.",
        "",
        f"Leaderboard entry (`model_info/{dataset}/{threat_model}/{model_id}.json`):",
        "",
        "```json",
        _json(info).rstrip("\n"),
        "```",
        "",
        "# Model Zoo:",
        "",
        "- [ ] I want to add my models to the Model Zoo (check if true)",
        f"- {'[x]' if in_zoo_or_timm else '[ ]'} I use an architecture that is included among",
        f"  those [here]({ARCHITECTURES_URL}) or in `timm`. If not, I added the link to the architecture "
        "implementation so that it can be added.",
    ]
    if not in_zoo_or_timm and architecture_file:
        lines.append(
            f"  (The implementation is `{architecture_file}` in the submission bundle, for "
            f"`robustbench/model_zoo/architectures/`: add its link here once it is uploaded.)"
        )
    lines += [
        "- [ ] I agree to release my model(s) under MIT license (check if true) **OR** under a custom license, "
        "located here: (put the custom license URL here if a custom license is needed. If no URL is specified, "
        "we assume that you are fine with MIT)",
        "",
    ]
    return "\n".join(lines)


def _json(info: Mapping[str, Any]) -> str:
    return json.dumps(dict(info), indent=2) + "\n"
