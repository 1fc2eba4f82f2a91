"""Which of AutoAttack's attacks fooled each point: the per-attack outcomes behind its single number.

AutoAttack runs its attacks in sequence (standard: APGD-CE, APGD-T, FAB-T, Square), each on the points no
earlier attack fooled, and reports only the final robust flags. A reviewer comparing two models point by
point also wants the outcome after each attack: "robust after APGD-CE" is the flag of a cheaper attack on
the same points, and a point only Square breaks hints at gradient masking.

Two sources give it:

* the resumable driver (:func:`robustbench_kd.zoo.autoattack_resume.run_resumable`) records the attack
  that fooled each point in its state (``fooled_by``);
* a single official ``run_standard_evaluation`` call is observed by :class:`StageRecorder`, which wraps the
  ``perturb`` method of each attack object on the instance for the duration of the call and records, per
  call, the attack's name, the labels of the batch and the prediction at the returned adversarial inputs.
  The official loop attacks the still-robust points in index order, ``batch_size`` at a time, attack by
  attack; replaying that order over the recorded calls maps every call back to its point indices. The
  replay is checked call by call (attack name, batch size, labels) and at the end against AutoAttack's own
  verdict; any disagreement (a forward pass that is random, a backend that batches differently) discards
  the per-attack outcomes with a warning instead of reporting wrong ones.

Either way the outcome after attack ``k`` is ``robust_final | (fooled_by > k)``: a point is still robust
after attack ``k`` when it survives all of them or only a later attack fools it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["StageRecorder", "stage_flags"]

logger = logging.getLogger(__name__)

#: The attribute of an AutoAttack object that holds each attack object (fra31's and pyautoattack's API).
_ATTACK_OWNERS = ("apgd", "apgd_targeted", "fab", "square")


def stage_flags(robust: Tensor, fooled_by: Tensor, attacks: Sequence[str]) -> dict[str, Tensor]:
    """``attack -> bool [n]``: still robust after that attack (and every attack before it).

    ``robust`` is AutoAttack's final verdict, ``fooled_by[i]`` the position in ``attacks`` of the attack
    that fooled point ``i`` (-1: none did). Attacks skipped because no robust point was left have all
    points False, as their position is after every fooling attack's.
    """
    robust = robust.to(torch.bool).cpu()
    fooled_by = fooled_by.to(torch.long).cpu()
    return {attack: robust | (fooled_by > position) for position, attack in enumerate(attacks)}


class StageRecorder:
    """Records the attack calls of one ``run_standard_evaluation`` and maps them back to points.

    Usage::

        recorder = StageRecorder(adversary)
        with recorder.recording():
            x_adv, y_adv = adversary.run_standard_evaluation(x, y, bs=batch_size, return_labels=True)
        fooled_by = recorder.fooled_by(attacks, clean_correct=..., y=y, batch_size=batch_size,
                                       final_robust=...)

    The extra work is one forward pass per attacked batch (the prediction at the returned adversarial
    examples, which AutoAttack computes too), under ``torch.no_grad`` and in the model's eval mode.
    """

    def __init__(self, adversary: Any) -> None:
        self._adversary = adversary
        self._forward: Callable[[Tensor], Tensor] = getattr(adversary, "get_logits", None) or adversary.model
        self.calls: list[tuple[str, Tensor, Tensor]] = []

    @staticmethod
    def _name(owner: str, attack: Any) -> str:
        # The official loop selects the variant through these attributes just before calling perturb.
        if owner == "apgd":
            return "apgd-ce" if getattr(attack, "loss", "ce") == "ce" else "apgd-dlr"
        if owner == "apgd_targeted":
            return "apgd-t"
        if owner == "fab":
            return "fab-t" if getattr(attack, "targeted", False) else "fab"
        return "square"

    def _wrap(self, owner: str, attack: Any) -> Callable[..., Any]:
        original = attack.perturb

        def perturb(x: Tensor, y: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
            adv = original(x, y, *args, **kwargs)
            if isinstance(adv, Tensor) and isinstance(y, Tensor):
                with torch.no_grad():
                    predicted = self._forward(adv).max(dim=1)[1]
                self.calls.append((self._name(owner, attack), y.detach().cpu(), predicted.detach().cpu()))
            return adv

        return perturb

    @contextlib.contextmanager
    def recording(self) -> Iterator[StageRecorder]:
        """Wrap each attack object's ``perturb`` on the instance; the class and other objects are untouched."""
        wrapped: list[Any] = []
        seen: set[int] = set()
        try:
            for owner in _ATTACK_OWNERS:
                attack = getattr(self._adversary, owner, None)
                if attack is None or id(attack) in seen or not callable(getattr(attack, "perturb", None)):
                    continue
                seen.add(id(attack))
                attack.perturb = self._wrap(owner, attack)
                wrapped.append(attack)
            yield self
        finally:
            for attack in wrapped:
                with contextlib.suppress(AttributeError):
                    del attack.perturb  # the instance attribute; the class's method shows through again

    def fooled_by(
        self,
        attacks: Sequence[str],
        *,
        clean_correct: Tensor,
        y: Tensor,
        batch_size: int,
        final_robust: Tensor,
    ) -> Tensor | None:
        """The position in ``attacks`` of the attack that fooled each point (-1: none), or None.

        Replays the official loop's order over the recorded calls (see the module docstring).
        ``clean_correct`` is the model's clean correctness (AutoAttack's first pass), ``final_robust``
        AutoAttack's own final verdict, which the replay must reproduce. None, with a warning, when the
        calls do not fit that order.
        """
        y = y.detach().cpu().long()
        robust = clean_correct.detach().cpu().to(torch.bool).clone()
        fooled_by = torch.full((robust.numel(),), -1, dtype=torch.long)
        calls = iter(self.calls)
        for position, attack in enumerate(attacks):
            if not bool(robust.any()):
                break
            for chunk in robust.nonzero().flatten().split(batch_size):
                call = next(calls, None)
                if call is None or call[0] != attack or not torch.equal(call[1], y[chunk]):
                    return self._unmatched(f"the calls of {attack} do not follow the official batching")
                fooled = call[2] != call[1]
                fooled_by[chunk[fooled]] = position
                robust[chunk[fooled]] = False
        if next(calls, None) is not None:
            return self._unmatched("more attack calls were made than the official loop makes")
        if not torch.equal(robust, final_robust.detach().cpu().to(torch.bool)):
            return self._unmatched("the replay disagrees with AutoAttack's own final verdict")
        return fooled_by

    @staticmethod
    def _unmatched(why: str) -> None:
        logger.warning("AutoAttack's per-attack outcomes are not reported for this run: %s", why)
        return None
