"""The ``[model_info]`` config section: leaderboard metadata that cannot be measured.

A plain frozen dataclass (no torch import): :mod:`robustbench_kd.config` lists it among the run file's
sections, and the final evaluation (:mod:`robustbench_kd.evaluation.final_report`) writes it into the
RobustBench leaderboard entry and the submission bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

from robustbench_kd.errors import UserError
from robustbench_kd.threat import check_int

__all__ = ["ModelInfoSection"]

#: The fields written as text into the leaderboard entry (a number there would be written unquoted).
_TEXT_FIELDS = ("title", "authors", "venue", "link", "architecture", "reported", "footnote")
#: Forward passes per prediction: RobustBench's largest ensembles use a handful.
_MAX_PASSES = 1000


@dataclass(frozen=True, kw_only=True)
class ModelInfoSection:
    """Leaderboard metadata (RobustBench model_info fields that cannot be measured)."""

    title: str | None = None  #: the "name" field: the paper title
    authors: str | None = None
    venue: str | None = None
    link: str | None = None
    architecture: str | None = None  #: default: the student arch
    #: training used data beyond the dataset's training set; unset (None): true when the leaderboard entry
    #: of a robustbench: teacher says so, else false
    additional_data: bool | None = None
    reported: str | None = None
    footnote: str | None = None
    #: forward passes per prediction (2 for a pair of networks such as MixedNUTS)
    number_forward_passes: int = 1

    def __post_init__(self) -> None:
        passes = self.number_forward_passes
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise UserError(
                f"model_info.number_forward_passes must be a positive integer (forward passes per prediction), "
                f"got {passes!r}"
            )
        check_int(passes, what="model_info.number_forward_passes", low=1, high=_MAX_PASSES)
        for key in _TEXT_FIELDS:
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise UserError(f"model_info.{key} must be a string (or unset), got {value!r}")
        if self.additional_data is not None and not isinstance(self.additional_data, bool):
            raise UserError(f"model_info.additional_data must be true, false or unset, got {self.additional_data!r}")
