"""Where a submission bundle lives and what its files are called.

A bundle is the directory ``<out>/submission/<model id>/`` (``<model id>.preview/`` when it does not meet
every leaderboard requirement); the constants name its files. ``FILL_IN`` marks
every value the submitter still has to write in by hand. :data:`LEADERBOARD_N_EXAMPLES` says which datasets
RobustBench has leaderboards for, and on how many test points they evaluate.
"""

from __future__ import annotations

import os
from pathlib import Path

from robustbench_kd.zoo.names import validate_model_id

__all__ = [
    "AUTOATTACK_LOG",
    "CHECKSUM_FILE",
    "FILL_IN",
    "ISSUE_FILE",
    "LEADERBOARD_N_EXAMPLES",
    "MANIFEST_FILE",
    "MANIFEST_FORMAT",
    "MANIFEST_VERSION",
    "PREVIEW_SUFFIX",
    "README_FILE",
    "ZOO_ENTRY_FILE",
    "bundle_dir",
    "preview_dir",
]

FILL_IN = "<fill in>"
AUTOATTACK_LOG = "autoattack.log"
CHECKSUM_FILE = "checkpoint.sha256"
ZOO_ENTRY_FILE = "zoo_entry.py"
ISSUE_FILE = "new_model_issue.md"
README_FILE = "README.md"
MANIFEST_FILE = "bundle.json"
MANIFEST_FORMAT = "robustbench_kd submission bundle"
MANIFEST_VERSION = 1
PREVIEW_SUFFIX = ".preview"
#: The leaderboard protocol: the full CIFAR test set (ImageNet: a fixed 5000-image subset).
LEADERBOARD_N_EXAMPLES = {"cifar10": 10000, "cifar100": 10000, "imagenet": 5000}


def bundle_dir(out_dir: str | os.PathLike[str], model_id: str) -> Path:
    """``<out_dir>/submission/<model_id>`` (the id is validated)."""
    return Path(out_dir) / "submission" / validate_model_id(model_id)


def preview_dir(out_dir: str | os.PathLike[str], model_id: str) -> Path:
    """``<out_dir>/submission/<model_id>.preview``: a bundle that does not meet every leaderboard requirement."""
    return Path(out_dir) / "submission" / (validate_model_id(model_id) + PREVIEW_SUFFIX)
