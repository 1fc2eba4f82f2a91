"""The ``[model_info]`` config section: leaderboard metadata that cannot be measured.

A plain frozen dataclass (no torch import): :mod:`robustbench_kd.config` lists it among the run file's
sections, and the final evaluation (:mod:`robustbench_kd.evaluation.final_report`) writes it into the
RobustBench leaderboard entry and the submission bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelInfoSection"]


@dataclass(frozen=True, kw_only=True)
class ModelInfoSection:
    """Leaderboard metadata (RobustBench model_info fields that cannot be measured)."""

    title: str | None = None  #: the "name" field: the paper title
    authors: str | None = None
    venue: str | None = None
    link: str | None = None
    architecture: str | None = None  #: default: the student arch
    additional_data: bool = False
    reported: str | None = None
    footnote: str | None = None
