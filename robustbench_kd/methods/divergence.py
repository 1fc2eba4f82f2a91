r"""DKL / IKL: the Kullback-Leibler loss split into a weighted MSE and a soft-label cross-entropy.

Cui, Tian, Zhong, Qi, Yu, Zhang, 'Decoupled Kullback-Leibler Divergence Loss', NeurIPS 2024
[https://arxiv.org/abs/2305.13948]; reference code jiequancui/DKL (``DKLv1`` = IKL).

This module holds the loss maths (:func:`ikl_per_sample` and its parts), IKL's class prior
(:class:`ClassPrior`) and the divergence component of the methods that can swap their KL for IKL:
:class:`DivergenceOptions` (their five ``divergence`` / ``ikl_*`` options), :class:`Divergence` (the
KL-or-IKL term with its weights and prior) and :class:`DivergenceDistiller` (the base that owns one and
updates its prior); ard and rslad derive from them, ikl-at uses :class:`Divergence` for its weights.

Notation: ``o_t`` are the TARGET-side logits (teacher in distillation, the natural branch z(x) in
adversarial training), ``o_l`` the LEARNER-side logits (student, adversarial branch z(x')),
``s_t = softmax(o_t)``, and the pairwise logit differences are ``Dt_jk = o_t^j - o_t^k``,
``Dl_jk = o_l^j - o_l^k`` over all class pairs (j = k contributes 0).

**DKL.** For every sample, KL(s_t || s_l) has the same gradients as ::

    L_DKL = (a / 4) * sum_{j,k} sg(w_jk) * (Dt_jk - sg(Dl_jk))^2  -  b * sum_j sg(s_t^j) * log s_l^j
            \_______________ wMSE: gradient into o_t only ____/    \___ sCE: gradient into o_l only __/

with ``w_jk = s_t^j * s_t^k`` and a = b = 1 (paper appendix A.1, Eq. 12-13): the wMSE produces exactly
KL's gradient w.r.t. ``o_t`` and the sCE exactly KL's gradient w.r.t. ``o_l`` (``s_l - s_t``). When the
target is a detached teacher, the wMSE is therefore dead in plain KL ("asymmetric optimisation").

**IKL** (what the code implements) changes two things:

1. the wMSE is not stopped on the learner side: its gradient also flows into ``o_l``
   (``learner_mse_grad=True``);
2. the per-sample weights ``s_t s_t^T`` are replaced by class-wise global weights
   ``w_bar_y = s_bar_y s_bar_y^T``, ``s_bar_y`` = the mean of ``softmax(o_t / T)`` over the training
   samples of class y during the PREVIOUS epoch (uniform 1/C in the first epoch): :class:`ClassPrior`.

Per batch (``dkl_loss`` of the reference, reduced with a batch mean)::

    L_IKL = mse_weight * (1/B) sum_b wMSE_b + sce_weight * (1/B) sum_b sCE_b
    wMSE_b = (1/4) sum_{j,k} w_b^{jk} (Dt_b,jk - Dl_b,jk)^2
    sCE_b  = -sum_j sg(softmax(o_t,b / tau))_j * log_softmax(o_l,b / tau)_j

**Parameter-name trap**: the paper calls the wMSE weight alpha and
the sCE weight beta; the reference code names them the other way round (``beta * loss_mse + alpha *
loss_sce``; its scripts pass ``--beta 20 --alpha 4``). This module and the methods built on it use the
unambiguous names ``mse_weight`` (= paper alpha = code ``beta``) and ``sce_weight`` (= paper beta =
code ``alpha``).

**When DKL/IKL is KL.** :func:`ikl_per_sample` reduces to KL(s_t || s_l) in gradient (w.r.t. both
logits) with: per-sample weights ``w = sg(s_t s_t^T)`` from ``softmax(o_t)`` at temperature 1 (no class
prior), ``learner_mse_grad=False``, ``mse_weight = sce_weight = 1`` and ``temperature = 1``
(:func:`dkl_per_sample`). The loss VALUE differs from KL by the target entropy (sCE = KL + H(s_t))
plus the wMSE value.

**Cheap wMSE.** Every weight used here is rank one, ``w = s s^T`` (s = ``s_bar_y`` or ``s_t``), and
``Dt_jk - Dl_jk = d_j - d_k`` with ``d = o_t - o_l``, so ::

    (1/4) sum_{j,k} s_j s_k (d_j - d_k)^2 = (1/2) * S * sum_j s_j (d_j - m)^2,   S = sum_j s_j,  m = (sum_j s_j d_j) / S

(a weighted variance of the logit gaps). :func:`wmse_per_sample` uses this O(B*C) form;
:func:`wmse_pairwise_per_sample` is the literal O(B*C^2) sum for arbitrary weights. With per-sample
weights the wMSE is also KL's second-order expansion, KL(s_t || s_l) ~ (1/2) Var_{s_t}(o_t - o_l).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_kd.distiller import Distiller, LossOutput, MethodConfig, option
from robustbench_kd.methods.losses import kl_per_sample, soft_cross_entropy_from_log_probs, soften

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext

__all__ = [
    "DIVERGENCES",
    "ClassPrior",
    "Divergence",
    "DivergenceDistiller",
    "DivergenceOptions",
    "IKLTerms",
    "dkl_per_sample",
    "ikl_per_sample",
    "pairwise_logit_differences",
    "sample_weight_vectors",
    "sce_per_sample",
    "wmse_pairwise_per_sample",
    "wmse_per_sample",
]


def pairwise_logit_differences(logits: Tensor) -> Tensor:
    """``D[b, j, k] = logits[b, j] - logits[b, k]``, shape ``[B, C, C]`` (the reference's ``delta_n``)."""
    return logits.unsqueeze(2) - logits.unsqueeze(1)


def wmse_pairwise_per_sample(target_logits: Tensor, learner_logits: Tensor, weights: Tensor) -> Tensor:
    """Literal wMSE per sample: ``(1/4) sum_{j,k} w[b,j,k] (Dt[b,j,k] - Dl[b,j,k])^2``, shape ``[B]``.

    ``weights`` is ``[B, C, C]`` or broadcastable to it (``[C, C]``). Gradients flow into whichever
    logits require grad; detach a side to stop them. Memory O(B*C^2): prefer :func:`wmse_per_sample`
    for rank-one weights.
    """
    diff = pairwise_logit_differences(target_logits) - pairwise_logit_differences(learner_logits)
    return 0.25 * (diff.pow(2) * weights).sum(dim=(1, 2))


def wmse_per_sample(target_logits: Tensor, learner_logits: Tensor, weight_vectors: Tensor) -> Tensor:
    """wMSE per sample for rank-one weights ``w[b] = s[b] s[b]^T``, shape ``[B]``.

    Equal to ``wmse_pairwise_per_sample(target_logits, learner_logits, s s^T)`` (see the module
    docstring for the identity), computed in O(B*C) as ``(1/2) S sum_j s_j (d_j - m)^2`` with
    ``d = o_t - o_l``. ``weight_vectors`` s is ``[B, C]`` or ``[C]``, non-negative with a positive sum
    (softmax outputs or rows of a :class:`ClassPrior`); it is used as given (detach it yourself).
    """
    d = target_logits - learner_logits
    s = weight_vectors.to(d.dtype).expand_as(d)
    total = s.sum(dim=1, keepdim=True)
    mean = (s * d).sum(dim=1, keepdim=True) / total
    return 0.5 * total.squeeze(1) * (s * (d - mean).pow(2)).sum(dim=1)


def sce_per_sample(learner_logits: Tensor, target_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft-label cross-entropy ``-sum_j sg(q_j) log softmax(o_l / tau)_j`` per sample, shape ``[B]``.

    The target ``q`` is always detached (the reference's ``softmax(...).detach()``): the sCE sends
    gradient into the learner only, ``(softmax(o_l/tau) - q) / tau`` per logit.
    """
    return soft_cross_entropy_from_log_probs(F.log_softmax(learner_logits / temperature, dim=1), target_probs.detach())


def sample_weight_vectors(target_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-sample (non-global) weight factors ``sg(softmax(o_t / T))``, shape ``[B, C]``.

    ``w = s s^T`` with these s are DKL's weights at T = 1, and IKL-KD's ``GI=False`` weights at
    T = ``T2`` (reference default 100, nearly uniform).
    """
    return torch.softmax(target_logits.detach() / temperature, dim=1)


@dataclass
class IKLTerms:
    """Per-sample pieces of one IKL evaluation (each ``[B]``).

    Attributes:
        total: ``mse_weight * wmse + sce_weight * sce`` (what a method reduces and back-propagates).
        wmse, sce: the unweighted terms (for logging; still attached to the graph).
    """

    total: Tensor
    wmse: Tensor
    sce: Tensor


def ikl_per_sample(
    learner_logits: Tensor,
    target_logits: Tensor,
    weight_vectors: Tensor,
    *,
    mse_weight: float,
    sce_weight: float,
    temperature: float = 1.0,
    target_probs: Tensor | None = None,
    learner_mse_grad: bool = True,
) -> IKLTerms:
    r"""IKL (or DKL) per sample: ``mse_weight * wMSE + sce_weight * sCE``.

    .. math::
        \mathrm{wMSE}_b = \tfrac14 \sum_{j,k} s_b^j s_b^k \big((o_t^j - o_t^k) - (o_l^j - o_l^k)\big)^2,\qquad
        \mathrm{sCE}_b = -\sum_j \mathrm{sg}(q_b^j) \log \mathrm{softmax}(o_{l,b} / \tau)_j

    Args:
        learner_logits: ``o_l`` ``[B, C]`` (student / adversarial branch).
        target_logits: ``o_t`` ``[B, C]`` (teacher / natural branch). Its wMSE gradient flows if it
            requires grad (IKL-AT's natural logits); detach it for a fixed teacher.
        weight_vectors: s with ``w = s s^T``, ``[B, C]`` or ``[C]``: ``ClassPrior.weight_vectors(y)``
            (IKL's global weights) or :func:`sample_weight_vectors` (per sample). Used as given.
        mse_weight: weight of the wMSE (paper alpha, reference code ``beta``).
        sce_weight: weight of the sCE (paper beta, reference code ``alpha``).
        temperature: tau of the sCE only (IKL-KD uses T on both sCE sides and none in the wMSE; IKL-AT
            uses 1). To evaluate IKL "at temperature tau" on both parts, divide both logits by tau.
        target_probs: the sCE target q; default ``softmax(o_t / tau)``. Always detached.
        learner_mse_grad: True (IKL) lets the wMSE gradient reach ``o_l``; False stops it (DKL, which is
            then gradient-equal to KL; see :func:`dkl_per_sample`).
    """
    if target_probs is None:
        target_probs = torch.softmax(target_logits.detach() / temperature, dim=1)
    sce = sce_per_sample(learner_logits, target_probs, temperature)
    learner_side = learner_logits if learner_mse_grad else learner_logits.detach()
    if mse_weight != 0.0:
        wmse = wmse_per_sample(target_logits, learner_side, weight_vectors)
    else:  # skip the work but keep a well-formed term
        wmse = torch.zeros_like(sce)
    return IKLTerms(total=mse_weight * wmse + sce_weight * sce, wmse=wmse, sce=sce)


def dkl_per_sample(
    learner_logits: Tensor, target_logits: Tensor, *, mse_weight: float = 1.0, sce_weight: float = 1.0
) -> Tensor:
    """DKL (paper Eq. 5) per sample: per-sample weights, learner side stopped in the wMSE.

    With ``mse_weight = sce_weight = 1`` its gradients w.r.t. BOTH logits equal those of
    ``KL(softmax(o_t) || softmax(o_l))`` (paper appendix A.1); the value differs (module docstring).
    """
    weights = sample_weight_vectors(target_logits)
    return ikl_per_sample(
        learner_logits, target_logits, weights, mse_weight=mse_weight, sce_weight=sce_weight, learner_mse_grad=False
    ).total


class ClassPrior(nn.Module):
    r"""IKL's class-wise global weights: a ``C x C`` prior whose row y is ``s_bar_y``.

    ``s_bar_y`` = mean of ``softmax(o_t / T)`` over the samples of class y seen in the previous epoch.
    Use per batch :meth:`weight_vectors` (rows of the prior for the labels) and :meth:`accumulate`
    (target-side logits of the batch); call :meth:`finalize` at the end of each epoch::

        prior_new[y] = m * accumulator[y] / accumulator[y].sum() + (1 - m) * prior_old[y]

    (row normalisation = class mean, because every softmax row sums to 1; m = ``mix``, reference
    ``--m``, default 1). Before the first :meth:`finalize` every entry is 1/C (the reference's
    first-epoch ``ones(C, C) / C``, i.e. ``w = 1/C^2`` everywhere), so the weights lag one epoch.

    Both the prior and the running accumulator are buffers, so they move with ``.to()`` and are saved
    in the owner's ``state_dict()``: a resume restores the prior bit for bit.

    Deviation: a class with no sample in an epoch keeps its previous row (the reference divides 0 by 0
    and produces NaN weights for it).

    Args:
        num_classes: C.
        temperature: T of the accumulated softmax (IKL-AT: 4).
        mix: m in [0, 1]. (Default: 1.0, reference.)
    """

    prior: Tensor
    accumulator: Tensor

    def __init__(self, num_classes: int, temperature: float = 4.0, mix: float = 1.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not temperature > 0.0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        self.num_classes = num_classes
        self.temperature = float(temperature)
        self.mix = float(mix)
        self.register_buffer("prior", torch.full((num_classes, num_classes), 1.0 / num_classes))
        self.register_buffer("accumulator", torch.zeros(num_classes, num_classes))

    def weight_vectors(self, labels: Tensor) -> Tensor:
        """``s_bar_y`` for every label, ``[B, C]`` (constant: no gradient)."""
        return self.prior.index_select(0, labels.to(self.prior.device))

    def pairwise_weights(self, labels: Tensor) -> Tensor:
        """``w_bar_y = s_bar_y s_bar_y^T`` for every label, ``[B, C, C]`` (the reference's ``sample_weight``)."""
        s = self.weight_vectors(labels)
        return s.unsqueeze(2) * s.unsqueeze(1)

    @torch.no_grad()
    def accumulate(self, target_logits: Tensor, labels: Tensor) -> None:
        """Add ``softmax(o_t / T)`` of a batch to the rows of its labels (on device, no host sync)."""
        probs = torch.softmax(target_logits.detach().to(self.accumulator.dtype) / self.temperature, dim=1)
        self.accumulate_probs(probs, labels)

    @torch.no_grad()
    def accumulate_probs(self, probs: Tensor, labels: Tensor) -> None:
        """Add already-softened probabilities ``[B, C]`` to the rows of their labels."""
        labels = labels.to(self.accumulator.device)
        onehot = F.one_hot(labels, self.num_classes).to(self.accumulator.dtype)
        # A matmul, not index_add_: deterministic on every device.
        self.accumulator.add_(onehot.t() @ probs.detach().to(self.accumulator.dtype))

    @torch.no_grad()
    def finalize(self) -> None:
        """End of epoch: the prior becomes the row-normalised accumulator (mixed with ``mix``); reset.

        Under DDP the accumulators of all processes are summed first, so every process gets the prior of
        all the epoch's samples, as one process would.
        """
        from robustbench_kd.scale.distributed import all_reduce_sum_

        all_reduce_sum_(self.accumulator)
        rows = self.accumulator.sum(dim=1, keepdim=True)
        seen = rows > 0
        normalised = torch.where(seen, self.accumulator / rows.clamp_min(torch.finfo(rows.dtype).tiny), self.prior)
        self.prior.copy_(self.mix * normalised + (1.0 - self.mix) * self.prior)
        self.accumulator.zero_()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, temperature={self.temperature}, mix={self.mix}"


# -- the divergence component of a distillation method -------------------------------------------
#: Values of the ``divergence`` option of methods that can swap their KL for IKL (rslad, ard).
DIVERGENCES = ("kl", "ikl")


@dataclass(frozen=True, kw_only=True)
class DivergenceOptions(MethodConfig):
    """The options of a method whose teacher-to-student KL can be replaced by IKL (base of its ``Config``).

    ``ikl_mse_weight`` defaults to 5 with ``ikl_sce_weight`` 1: the IKL-AT scripts' wMSE:sCE ratio 20:4, with
    the sCE (which has KL's gradient) kept at the scale of the KL it replaces; our choice, the IKL paper
    does not distil with a teacher this way. ``ikl_prior_temperature`` 4 is the IKL-AT scripts' ``--T 4``.
    """

    divergence: str = option(
        "kl", choices=DIVERGENCES, help="kl (the method's KL) or ikl (Improved KL: class-weighted wMSE + soft-label CE)"
    )
    ikl_mse_weight: float = option(5.0, low=0, help="IKL: weight of the wMSE (paper alpha, IKL code --beta)")
    ikl_sce_weight: float = option(1.0, low=0, help="IKL: weight of the soft-label CE (paper beta, IKL code --alpha)")
    ikl_prior_temperature: float = option(
        4.0, low=0, low_open=True, help="IKL: temperature of the teacher softmax behind the class prior"
    )
    ikl_class_prior: bool = option(
        True, choices=(False, True), help="IKL: class-wise weights from the previous epoch; false = per-sample weights"
    )


class Divergence:
    r"""The KL-or-IKL term of a distillation loss, with the weights and class prior IKL needs.

    ``kind="kl"``: ``KL(q || p_S^tau)`` per sample (:func:`~robustbench_kd.methods.losses.kl_per_sample`).
    ``kind="ikl"``: IKL evaluated at the same temperature, on logits divided by tau, per sample::

        mse_weight * (1/4) sum_{j,k} s_j s_k ((z_T^j - z_T^k) - (z_S^j - z_S^k))^2 / tau^2
          + sce_weight * ( -sum_j q_j log p_S^tau_j )

    with the teacher logits z_T detached and the student logits z_S receiving the wMSE gradient (in the
    plain KL the student gets none of it). q is the method's target (its sCE has the KL's gradient, so
    ``mse_weight = 0`` trains exactly like the KL). s is, per label y, the class prior's row ``s_bar_y``
    (``class_prior=True``: the mean of ``softmax(z_T / prior_temperature)`` over the training samples of
    class y in the previous epoch, uniform 1/C in the first) or the sample's own
    ``softmax(z_T / prior_temperature)`` (:meth:`weight_vectors`).

    Not an ``nn.Module``: the owning distiller registers :attr:`prior` as its own submodule ``prior`` (as
    :class:`DivergenceDistiller` does), so its buffers are saved as ``prior.prior`` / ``prior.accumulator``;
    :attr:`prior` is None (no state at all) unless the kind is ``"ikl"`` with a class prior. Per training
    batch call :meth:`accumulate` with the target-side logits (after the optimiser step), and
    :meth:`finalize` at the end of every epoch.

    Args:
        kind: ``"kl"`` or ``"ikl"`` (:data:`DIVERGENCES`).
        num_classes: C.
        mse_weight, sce_weight: IKL's weights of the wMSE and the soft-label CE.
        prior_temperature: T of the softmax behind the weights.
        class_prior: class-wise weights (IKL) instead of per-sample ones.
        prior_mix: m of :class:`ClassPrior` (new rows mixed into the old ones).
    """

    def __init__(
        self,
        kind: str,
        num_classes: int,
        *,
        mse_weight: float = 5.0,
        sce_weight: float = 1.0,
        prior_temperature: float = 4.0,
        class_prior: bool = True,
        prior_mix: float = 1.0,
    ) -> None:
        if kind not in DIVERGENCES:
            raise ValueError(f"kind must be one of {', '.join(DIVERGENCES)}, got {kind!r}")
        self.kind = kind
        self.mse_weight = float(mse_weight)
        self.sce_weight = float(sce_weight)
        self.prior_temperature = float(prior_temperature)
        self.prior: ClassPrior | None = (
            ClassPrior(num_classes, temperature=prior_temperature, mix=prior_mix)
            if kind == "ikl" and class_prior
            else None
        )

    @classmethod
    def from_options(cls, options: DivergenceOptions, num_classes: int) -> Divergence:
        """The component a method's :class:`DivergenceOptions` describe."""
        return cls(
            options.divergence,
            num_classes,
            mse_weight=options.ikl_mse_weight,
            sce_weight=options.ikl_sce_weight,
            prior_temperature=options.ikl_prior_temperature,
            class_prior=options.ikl_class_prior,
        )

    def weight_vectors(self, labels: Tensor, target_logits: Tensor) -> Tensor:
        """s with ``w = s s^T``: the class prior's rows for ``labels``, or per-sample softened target outputs."""
        if self.prior is not None:
            return self.prior.weight_vectors(labels)
        return sample_weight_vectors(target_logits, self.prior_temperature)

    def per_sample(
        self,
        student_logits: Tensor,
        target_probs: Tensor,
        *,
        teacher_logits: Tensor,
        labels: Tensor,
        temperature: float = 1.0,
    ) -> Tensor:
        """KL(q || p_S^tau) or IKL(teacher -> student) at temperature tau, shape ``[B]`` (class docstring).

        ``target_probs`` q is already softened (and possibly label-mixed); ``teacher_logits`` are the raw
        teacher logits behind it (read by IKL only).
        """
        if self.kind == "kl":
            return kl_per_sample(student_logits, target_probs, temperature=temperature)
        weights = self.weight_vectors(labels, teacher_logits)
        return ikl_per_sample(
            soften(student_logits, temperature),
            soften(teacher_logits, temperature),
            weights,
            mse_weight=self.mse_weight,
            sce_weight=self.sce_weight,
            target_probs=target_probs,
        ).total

    def accumulate(self, target_logits: Tensor, labels: Tensor) -> None:
        """After a training step: add the batch's target-side outputs to the class prior (if any)."""
        if self.prior is not None:
            self.prior.accumulate(target_logits, labels)

    def finalize(self) -> None:
        """At the end of an epoch: the class prior (if any) becomes the epoch's class means."""
        if self.prior is not None:
            self.prior.finalize()


class DivergenceDistiller(Distiller):
    """Base of a distiller whose teacher KL can be IKL (its ``Config`` derives from :class:`DivergenceOptions`).

    Owns the :class:`Divergence` its options describe as ``self.divergence``, registers the class prior as the
    submodule ``prior`` (checkpoint buffers ``prior.prior`` / ``prior.accumulator``; no state at all for the
    KL), feeds it the clean logits of the teacher role :attr:`divergence_role` after every training step and
    finalises it at the end of every epoch. Subclasses compute their loss with ``self.divergence.per_sample``.
    """

    #: The teacher role whose clean logits build the class prior.
    divergence_role: ClassVar[str] = "robust"

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        self.divergence = Divergence.from_options(self.config, num_classes)
        self.prior: ClassPrior | None = self.divergence.prior

    def after_step(self, ctx: BatchContext, out: LossOutput) -> None:
        self.divergence.accumulate(ctx.teacher_logits(self.divergence_role, "clean"), ctx.y)

    def on_epoch_end(self, epoch: int, num_epochs: int) -> dict[str, float]:
        self.divergence.finalize()
        return {}
