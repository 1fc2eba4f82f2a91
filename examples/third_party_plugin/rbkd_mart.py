"""MART as a third-party robustbench_kd method: one module plus one entry point.

Install with ``pip install ./examples/third_party_plugin``; ``robustbench-kd methods`` then lists
``mart`` with the distribution ``rbkd-examples``, and ``[method] name = "mart"`` trains it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from robustbench_kd import AttackSpec, Distiller, LossOutput, hookimpl


class MART(Distiller):
    r"""MART: misclassification-aware adversarial training (no teacher).

    Paper: Yisen Wang, Difan Zou, Jinfeng Yi, James Bailey, Xingjun Ma, Quanquan Gu. Improving
    Adversarial Robustness Requires Revisiting Misclassified Examples. ICLR 2020.

    Loss, per sample b with p = softmax(z)::

        BCE_b = CE(z(x'_b), y_b) - log(1 - max_{k != y_b} p_k(x'_b))
        L = (1/B) sum_b [ BCE_b + beta * KL(p(x_b) || p(x'_b)) * (1 - p_{y_b}(x_b)) ]

    Attack: PGD on CE(z(x'), y), start x + 0.001 N(0, I), student in eval mode (reference code).

    Arguments (``MART.Config``):
        beta (float): weight of the misclassification-aware KL term. (Default: 6.0)
    """

    name = "mart"
    paper = "Wang et al. Improving Adversarial Robustness Requires Revisiting Misclassified Examples. ICLR 2020"

    @dataclass(frozen=True, kw_only=True)
    class Config:
        beta: float = 6.0

    def attack_spec(self, threat):
        return AttackSpec(eps=threat.eps, alpha=threat.alpha, steps=threat.steps, norm=threat.norm, init="gauss")

    def attack_loss(self, ctx, x_adv):
        return F.cross_entropy(ctx.student(x_adv), ctx.y, reduction="none")

    def loss(self, ctx):
        logits_adv = ctx.student(ctx.x_adv)
        logits_nat = ctx.student(ctx.x)
        p_adv = logits_adv.softmax(dim=1)
        p_nat = logits_nat.softmax(dim=1)
        wrong = p_adv.masked_fill(F.one_hot(ctx.y, p_adv.shape[1]).bool(), -1.0).max(dim=1).values
        bce = F.cross_entropy(logits_adv, ctx.y, reduction="none") - torch.log(1.0001 - wrong + 1e-12)
        kl = (p_nat * (F.log_softmax(logits_nat, dim=1) - F.log_softmax(logits_adv, dim=1))).sum(dim=1)
        true_prob = p_nat.gather(1, ctx.y[:, None]).squeeze(1)
        robust = kl * (1.0000001 - true_prob)
        total = (bce + self.config.beta * robust).mean()
        return LossOutput(total, {"bce": bce.mean().detach(), "kl_weighted": robust.mean().detach()})


@hookimpl
def rbkd_register_methods(registry):
    registry.add(MART)
