"""Whether a bundle can be submitted as it stands: the requirements of a RobustBench leaderboard entry.

A bundle is *ready* only when every requirement holds; otherwise it is a *preview*
(``submission/<ID>.preview/``) that shows the format and says, first thing, what is missing:

1. a leaderboard exists for the (dataset, threat model, eps) of the evaluation (:data:`LEADERBOARDS`);
2. the evaluation used the whole test set the leaderboard uses (:data:`LEADERBOARD_N_EXAMPLES`);
3. AutoAttack ran in its ``standard`` version (the number the leaderboard ranks);
4. the entry's metadata RobustBench's leaderboard code prints (:data:`REQUIRED_METADATA`) is present;
5. the evaluation sanity suite ran, and passed or its findings are recorded in the entry (``unreliable``
   with a footnote);
6. the zoo entry rebuilds the model without this project (RobustBench's zoo files may import only
   ``robustbench.model_zoo.architectures`` and timm).

:func:`unmet_requirements` checks them from the leaderboard entry and a :class:`EvaluationRecord`; the bundle
writer and ``check-submission`` both call it, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from robustbench_kd.submission.layout import LEADERBOARD_N_EXAMPLES

__all__ = ["LEADERBOARDS", "REQUIRED_METADATA", "EvaluationRecord", "unmet_requirements"]

#: The RobustBench leaderboards with an eps: (dataset, threat model) -> eps as the entries write it. The
#: corruption boards have no eps and are not evaluated by this project.
LEADERBOARDS: Mapping[tuple[str, str], str] = {
    ("cifar10", "Linf"): "8/255",
    ("cifar10", "L2"): "0.5",
    ("cifar100", "Linf"): "8/255",
    ("imagenet", "Linf"): "4/255",
}
#: Entry fields RobustBench's leaderboard, BibTeX and LaTeX code read as text: null or empty breaks them.
REQUIRED_METADATA = ("name", "authors", "venue", "link", "architecture")


@dataclass(frozen=True)
class EvaluationRecord:
    """What readiness needs to know about the evaluation behind a bundle (the bundle's ``bundle.json``).

    Attributes:
        dataset, threat_model: as in the entry's path (``cifar10``, ``Linf``).
        eps: the radius as the entry writes it (``"8/255"``).
        n_examples: test points evaluated.
        autoattack_version: AutoAttack's version name (``"standard"``).
        sanity_ran: the evaluation sanity suite ran; ``sanity_passed``: it found nothing.
        standalone_entry: the zoo entry imports only RobustBench's architectures, timm and torch;
            ``entry_note`` says why not otherwise.
    """

    dataset: str
    threat_model: str
    eps: str
    n_examples: int
    autoattack_version: str = "standard"
    sanity_ran: bool = False
    sanity_passed: bool = False
    standalone_entry: bool = True
    entry_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationRecord:
        return cls(**{key: data[key] for key in cls.__dataclass_fields__ if key in data})


def unmet_requirements(info: Mapping[str, Any], evaluation: EvaluationRecord) -> list[str]:
    """The requirements (module docstring) ``info`` and ``evaluation`` do not meet, one sentence each."""
    unmet = []
    board = (evaluation.dataset, evaluation.threat_model)
    board_eps = LEADERBOARDS.get(board)
    if board_eps is None:
        boards = ", ".join(f"{d}/{t} (eps {e})" for (d, t), e in LEADERBOARDS.items())
        unmet.append(
            f"RobustBench has no {evaluation.dataset}/{evaluation.threat_model} leaderboard (they are: {boards})"
        )
    elif evaluation.eps != board_eps:
        unmet.append(
            f"the {evaluation.dataset}/{evaluation.threat_model} leaderboard uses eps {board_eps}; this evaluation "
            f"used {evaluation.eps}"
        )
    full = LEADERBOARD_N_EXAMPLES.get(evaluation.dataset)
    if board_eps is not None and full is not None and evaluation.n_examples != full:
        unmet.append(f"evaluated on {evaluation.n_examples:,} test points; the leaderboard uses all {full:,}")
    if evaluation.autoattack_version != "standard":
        unmet.append(f"AutoAttack ran as version {evaluation.autoattack_version!r}; the leaderboard ranks 'standard'")
    empty = [key for key in REQUIRED_METADATA if not isinstance(info.get(key), str) or not info[key].strip()]
    if empty:
        unmet.append(
            f"model_info fields null or empty: {', '.join(empty)} (set them in [model_info] or with the evaluate "
            "flags --title/--authors/--venue/--link/--architecture)"
        )
    if not evaluation.sanity_ran:
        unmet.append("the evaluation sanity suite did not run (drop --no-sanity, or set eval.sanity = true)")
    elif not evaluation.sanity_passed and not (info.get("unreliable") is True and info.get("footnote")):
        unmet.append("the sanity suite found problems that the entry does not record (unreliable and a footnote)")
    if not evaluation.standalone_entry:
        why = evaluation.entry_note or "see zoo_entry.py"
        unmet.append(f"the zoo entry cannot be loaded without robustbench_kd: {why}")
    return unmet
