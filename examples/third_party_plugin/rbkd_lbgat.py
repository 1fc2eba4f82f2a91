"""LBGAT as a third-party robustbench_kd method that owns a network: a natural classifier trained jointly.

Installed with the other example (``pip install ./examples/third_party_plugin``), ``[method] name = "lbgat"``
trains it. The natural classifier is created in ``on_setup`` (the set-up step that sees the real student),
so it joins the optimiser, is saved in every checkpoint and comes back with ``--resume``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from robustbench_kd import AttackSpec, Distiller, LossOutput, MethodConfig, hookimpl, option


class LBGAT(Distiller):
    r"""LBGAT: Learnable Boundary Guided Adversarial Training (no pretrained teacher).

    Paper: Jiequan Cui, Shu Liu, Liwei Wang, Jiaya Jia. Learnable Boundary Guided Adversarial Training.
    ICCV 2021. arXiv:2011.11164.

    A natural classifier f_n, a network of the student's architecture and options with fresh weights, is
    trained together with the robust student f_r, in the same SGD optimiser (the reference code's one
    optimiser over both networks). The student's logits on x' are pulled towards the natural
    classifier's logits on x::

        L = MSE(f_r(x'), f_n(x)) + CE(f_n(x), y) + beta * (1/B) sum_b KL(p_r(x_b) || p_r(x'_b))

    MSE is the mean over the B x C logits; p_r = softmax(f_r). Attack (TRADES): x' maximises
    sum_b KL(p_r(x_b) || p_r(x'_b)), start x + 0.001 N(0, I), student in eval mode, the run's threat
    budget. f_n stays in train mode throughout, as in the reference code (its BatchNorm uses batch
    statistics); only the student is evaluated and submitted.

    Reference defaults: beta = 6 (the reference training script; beta = 0 is the paper's "LBGAT0"). The
    reference allows f_n of another (smaller) architecture; here it is always the student's.

    Arguments (``LBGAT.Config``):
        beta (float): weight of the TRADES term KL(p_r(x) || p_r(x')). (Default: 6.0)
    """

    name = "lbgat"
    paper = "Cui et al. Learnable Boundary Guided Adversarial Training. ICCV 2021. arXiv:2011.11164"

    @dataclass(frozen=True, kw_only=True)
    class Config(MethodConfig):
        beta: float = option(6.0, low=0, help="weight of the TRADES term KL(p_r(x) || p_r(x'))")

    def on_setup(self, setup):
        # Before the optimiser is built and before --resume loads state: f_n trains and is checkpointed.
        self.natural = setup.new_student()

    def attack_spec(self, threat):
        return AttackSpec(eps=threat.eps, alpha=threat.alpha, steps=threat.steps, norm=threat.norm, init="gauss")

    def attack_loss(self, ctx, x_adv):
        target = ctx.extras.get("lbgat.clean_probs")
        if target is None:  # p_r(x) is the attack's fixed target: once per batch
            target = F.softmax(ctx.student(ctx.x), dim=1).detach()
            ctx.extras["lbgat.clean_probs"] = target
        log_adv = F.log_softmax(ctx.student(x_adv), dim=1)
        return F.kl_div(log_adv, target, reduction="none").sum(dim=1)

    def loss(self, ctx):
        logits_adv = ctx.student(ctx.x_adv)
        logits_clean = ctx.student(ctx.x)
        natural = self.natural(ctx.x)
        mse = F.mse_loss(logits_adv, natural)
        ce_natural = F.cross_entropy(natural, ctx.y)
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
        total = mse + ce_natural + self.config.beta * kl
        accuracy = (natural.detach().argmax(dim=1) == ctx.y).float().mean()
        return LossOutput(
            total,
            {"mse": mse.detach(), "ce_natural": ce_natural.detach(), "kl": kl.detach(), "acc_natural": accuracy},
        )


@hookimpl
def rbkd_register_methods(registry):
    registry.add(LBGAT)
