"""``gacd``, ``gacd-linear``: Guided Adversarial Contrastive Distillation (Bai et al., arXiv:2009.09922).

The paper trains in three stages: contrastive feature distillation (``gacd``,
:mod:`.distiller`), then either a linear evaluation on the frozen features (``gacd-linear``,
:mod:`.linear`; the paper's "GACD" rows) or an adversarial fine-tuning of the whole network (the paper's
"GACD+AFT" rows). The fine-tuning is Madry's PGD adversarial training started from the distilled
weights, i.e. the ``pgd-at`` method with ``student.init_from``. The stages are separate
``robustbench-kd distill`` runs with the same ``[student] arch`` and options::

    stage1.toml   [method] name = "gacd"          [teachers] robust = "..."
    stage2.toml   [method] name = "gacd-linear"   [student] init_from = "runs/stage1/checkpoints/last.pt"
    stage3.toml   [method] name = "pgd-at"        [student] init_from = "runs/stage1/checkpoints/last.pt"

(the paper gives no fine-tuning schedule; lr 0.01 for 20 epochs with SGD momentum 0.9 and the stage-1
weight decay is a reasonable start). The building blocks are :mod:`.contrastive` (memory bank, negatives,
NCE critic) and :mod:`.transport` (the optimal-transport feature-distortion attack).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from robustbench_kd_plugins.gacd.distiller import GACD
from robustbench_kd_plugins.gacd.linear import GACDLinear

from robustbench_kd.hookspecs import hookimpl

if TYPE_CHECKING:
    from robustbench_kd.registry import Registrar

__all__ = ["GACD", "GACDLinear", "rbkd_register_methods"]


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(GACD)
    registry.add(GACDLinear)
