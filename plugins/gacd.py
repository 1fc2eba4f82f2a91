"""``gacd``, ``gacd-linear``, ``gacd-aft``: Guided Adversarial Contrastive Distillation (Bai et al., 2020)
in its three stages -- contrastive feature distillation, linear evaluation, adversarial fine-tuning.

No GACD code is public: the contrastive machinery (embedding heads, memory bank, NCE critic with the
normaliser Z, momentum update) follows CRD (Tian, Krishnan, Isola, ICLR 2020; HobbitLong/RepDistiller
``crd/``), which GACD builds on, and the feature-distortion attack follows Feature Scattering (Zhang &
Wang, NeurIPS 2019; Haichao-Zhang/FeatureScatter ``ot.py``, ``attack_methods.py``). methods.md §9,
§11.2, §13.10, §14.12.

The stages are separate ``robustbench-kd distill`` runs chained with ``student.init_from``::

    stage1.toml   [method] name = "gacd"          [teachers] robust = "..."
    stage2.toml   [method] name = "gacd-linear"   [student] init_from = "runs/stage1/checkpoints/last.pt"
    stage3.toml   [method] name = "gacd-aft"      [student] init_from = "runs/stage1/checkpoints/last.pt"

(same ``[student] arch`` and options in all three). Stage 2 gives the paper's "GACD" rows (linear
evaluation), stage 3 its "GACD+AFT" rows (adversarial fine-tuning).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustbench_kd.attacks import module_mode
from robustbench_kd.data.datasets import to_float
from robustbench_kd.distiller import (
    ATTACK_INITS,
    STUDENT_MODES,
    AttackSpec,
    Distiller,
    LossOutput,
)
from robustbench_kd.errors import UserError, check_choice
from robustbench_kd.hookspecs import hookimpl
from robustbench_kd.methods.features import FeatureTap, final_linear
from robustbench_kd.teachers import EnsembleTeacher

if TYPE_CHECKING:
    from collections.abc import Mapping

    from robustbench_kd.context import BatchContext
    from robustbench_kd.registry import Registrar
    from robustbench_kd.threat import ThreatSpec

PAPER = (
    "Tao Bai, Jinnan Chen, Jun Zhao, Bihan Wen, Xudong Jiang, Alex Kot. Feature Distillation With Guided "
    "Adversarial Contrastive Learning. arXiv:2009.09922, 2020"
)

#: CRD's ``eps`` inside the NCE critic: h = P / (P + k/N + NCE_EPS).
NCE_EPS = 1e-7
POSITIVES = ("adv", "clean")
ATTACK_BUDGETS = ("feature-scatter", "threat")
ATTACK_FEATURES = ("penultimate", "logits")
#: ctx.extras key of the clean features the OT attack compares against (computed once per batch).
CLEAN_FEATURES_KEY = "gacd.clean_attack_features"


# -- building blocks (module-level so they can be tested on their own) ----------------------------
def init_bank(rows: int, dim: int, *, generator: torch.Generator | None = None) -> Tensor:
    """CRD's memory initialisation: U(-stdv, stdv) with stdv = 1/sqrt(dim/3) (expected norm ~ 1, unnormalised)."""
    stdv = 1.0 / math.sqrt(dim / 3.0)
    return torch.rand(rows, dim, generator=generator).mul_(2.0 * stdv).sub_(stdv)


def negative_pool_size(labels: Tensor) -> int:
    """Number of bank rows available as negatives to every class: min_c #(rows with a known label != c)."""
    known = labels[labels >= 0]
    if known.numel() == 0:
        return 0
    counts = torch.bincount(known)
    return int(known.numel() - int(counts.max()))


def sample_negatives(y: Tensor, labels: Tensor, k: int) -> Tensor:
    """Indices ``[B, k_eff]`` of bank rows whose label is known and differs from ``y_b``.

    Uniform without replacement per sample (CRD samples without replacement whenever the pool
    allows); ``k_eff = min(k, negative_pool_size(labels))`` so every sample gets the same number of
    negatives. Rows labelled -1 (never seen) are excluded. Uses the global torch RNG of the bank's
    device (seeded per epoch by the trainer).
    """
    k_eff = min(int(k), negative_pool_size(labels))
    if k_eff <= 0:
        return torch.zeros(len(y), 0, dtype=torch.long, device=labels.device)
    valid = (labels.unsqueeze(0) != y.unsqueeze(1)) & (labels.unsqueeze(0) >= 0)
    keys = torch.rand(valid.shape, device=labels.device)
    keys.masked_fill_(~valid, 2.0)  # every valid key is < 1, so the k_eff smallest are all valid
    return keys.topk(k_eff, dim=1, largest=False, sorted=False).indices


def negative_scores(anchor: Tensor, bank: Tensor, index: Tensor, *, path: str = "auto") -> Tensor:
    """``<anchor_b, bank[index_b,i]>`` as ``[B, k]``; the bank is a constant (no gradient).

    Two exact evaluations: ``"gather"`` (CRD: gather the k rows, B*k*d memory) and ``"matmul"``
    (all N scores, then gather: B*N memory -- far smaller for CIFAR's k = 16384, N = 50000).
    ``"auto"`` picks the one needing less memory.
    """
    b, k = index.shape
    if k == 0:
        return anchor.new_zeros(b, 0)
    bank = bank.detach()
    if path == "auto":
        path = "matmul" if bank.shape[0] <= k * bank.shape[1] else "gather"
    if path == "matmul":
        return (anchor @ bank.t()).gather(1, index)
    if path == "gather":
        return torch.bmm(bank[index], anchor.unsqueeze(2)).squeeze(2)
    raise ValueError(f"path must be 'auto', 'matmul' or 'gather', got {path!r}")


def nce_normaliser(pos: Tensor, neg: Tensor, *, temperature: float, n_data: int) -> Tensor:
    """CRD's Z: mean of exp(score / T) over the positive and negative scores of a batch, times N."""
    scores = torch.cat([pos.detach().unsqueeze(1), neg.detach()], dim=1).float() / temperature
    return torch.exp(torch.logsumexp(scores.flatten(), 0) - math.log(scores.numel()) + math.log(n_data))


def nce_log_likelihood(pos: Tensor, neg: Tensor, *, temperature: float, z: Tensor | float,
                       n_data: int) -> Tensor:
    """Per-sample NCE log-likelihood ``log h(pos) + sum_i log(1 - h(neg_i))``, shape ``[B]``.

    With P(s) = exp(s / T) / Z, k = neg.shape[1] and N = n_data, CRD's critic is
    h = P / (P + k/N + 1e-7) and 1 - h is taken as (k/N) / (P + k/N + 1e-7) (CRD ``ContrastLoss``).
    Evaluated in the log domain in fp32: exp(s / T) alone is e^10 at T = 0.1.
    """
    pos, neg = pos.float(), neg.float()
    k = neg.shape[1]
    log_z = torch.log(torch.as_tensor(z, dtype=torch.float32, device=pos.device))
    noise = k / float(n_data)
    log_c = math.log(noise + NCE_EPS)
    log_p_pos = pos / temperature - log_z
    ll = log_p_pos - torch.logaddexp(log_p_pos, torch.full_like(log_p_pos, log_c))
    if k:
        log_p_neg = neg / temperature - log_z
        ll = ll + (math.log(noise) - torch.logaddexp(log_p_neg, torch.full_like(log_p_neg, log_c))).sum(1)
    return ll


@torch.no_grad()
def momentum_update(bank: Tensor, index: Tensor, embeddings: Tensor, momentum: float) -> None:
    """CRD's memory update in place: ``bank[i] <- l2normalize(m * bank[i] + (1 - m) * e)``."""
    rows = bank[index] * momentum + embeddings.to(bank.dtype) * (1.0 - momentum)
    bank[index] = F.normalize(rows, dim=1)


def cosine_cost(a: Tensor, b: Tensor) -> Tensor:
    """Feature Scattering's cost ``C_ij = max(0, 1 - cos(a_i, b_j))`` (cosine eps 1e-6), shape ``[m, n]``."""
    cos = F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=2, eps=1e-6)
    return torch.clamp(1.0 - cos, min=0.0)


def sinkhorn_plan(cost: Tensor, *, reg: float = 0.01, iters: int = 100, tol: float = 0.1) -> Tensor:
    """Entropic OT plan between uniform marginals, log-domain Sinkhorn as in Feature Scattering's ``ot.py``.

    u, v start at 0; each iteration sets u <- reg (log mu - lse_j M) + u, then v <- reg (log nu -
    lse_i M) + v, with M_ij = (-C_ij + u_i + v_j) / reg; it stops once sum|u - u_prev| < tol
    (``tol = 0`` runs all iterations and avoids a host sync per iteration). Returns exp(M). The plan
    stays differentiable w.r.t. the cost (the reference does not detach it either).
    """
    m, n = cost.shape
    log_mu, log_nu = -math.log(m), -math.log(n)
    u = cost.new_zeros(m)
    v = cost.new_zeros(n)
    for _ in range(iters):
        u_prev = u
        u = reg * (log_mu - torch.logsumexp((-cost + u[:, None] + v[None, :]) / reg, dim=1)) + u
        v = reg * (log_nu - torch.logsumexp((-cost + u[:, None] + v[None, :]) / reg, dim=0)) + v
        if tol > 0 and float((u - u_prev).detach().abs().sum()) < tol:
            break
    return torch.exp((-cost + u[:, None] + v[None, :]) / reg)


def ot_per_sample(clean: Tensor, adv: Tensor, *, reg: float, iters: int, tol: float) -> Tensor:
    """Each adversarial sample's share of the OT objective: ``sum_i T_ij C_ij`` for column j, ``[B]``.

    The shares sum to Feature Scattering's ``sum(T * C)``, so ascending their sum is its attack.
    """
    cost = cosine_cost(clean.float(), adv.float())
    plan = sinkhorn_plan(cost, reg=reg, iters=iters, tol=tol)
    return (plan * cost).sum(0)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _single_teacher(teacher: nn.Module) -> nn.Module:
    if isinstance(teacher, EnsembleTeacher):
        raise UserError("gacd distils the penultimate features of ONE network; teachers.robust is an ensemble, "
                        "give a single spec")
    return teacher


# -- stage 1: contrastive distillation -------------------------------------------------------------
class GACD(Distiller):
    r"""GACD stage 1: contrastive feature distillation with teacher-confidence sample weights.

    Paper: Bai, Chen, Zhao, Wen, Jiang, Kot, 'Feature Distillation With Guided Adversarial
    Contrastive Learning' [https://arxiv.org/abs/2009.09922] (paper text Eq. 9-10, Algorithm 1). No
    code is public; memory bank, critic and Z follow CRD (HobbitLong/RepDistiller ``crd/memory.py``,
    ``crd/criterion.py``), the attack follows Feature Scattering (Haichao-Zhang/FeatureScatter).
    methods.md §9, §11.2, §13.10, §14.12.

    Embeddings (CRD ``Embed``): f_S, f_T = penultimate features (the input of the final
    ``nn.Linear``, via :class:`~robustbench_kd.methods.features.FeatureTap`) of student and teacher on the
    positive input x+ (= x', the attack's output); s+ = l2norm(W_S f_S + b_S), t+ = l2norm(W_T f_T +
    b_T), both of dimension d. W_S, W_T are ``nn.LazyLinear`` parameters of this distiller (their
    input sizes are read from the first batch), so they join the optimiser through
    :meth:`trainable_parameters` and are checkpointed with it.

    Loss (paper Eq. 9-10, teacher anchor; methods.md §9)::

        P(t, s)   = exp(<t, s> / T) / Z
        h(t, s)   = P / (P + k/N + 1e-7),    1 - h := (k/N) / (P + k/N + 1e-7)             (CRD)
        l_b       = w_b [ log h(t+_b, s+_b) + sum_{i=1..k} log(1 - h(t+_b, M_S[n_bi])) ]
        L         = -(1/B) sum_b l_b                 (+ the same with anchor s+_b, positive t+_b and
                                                       negatives M_T[n_bi] if symmetric)
        w_b       = softmax(z_T(x+_b))_{y_b}          (no grad; 1 if not sample_weights)

    M_S (M_T) is the N x d memory bank of student (teacher) embeddings, N = training-set size; n_bi
    are k indices drawn uniformly WITHOUT replacement from the rows of OTHER classes than y_b (CRD's
    supervised ``cls_negative`` mode). The bank is a constant in the loss, so with the teacher
    anchor the negatives only train W_T and the student learns through the positive term (pull s+
    towards t+); ``symmetric=True`` adds CRD's student-anchor term, which also pushes s+ away from
    other-class teacher embeddings. Z (one per direction) is set on the FIRST batch to
    mean(exp(score / T)) * N over its positive and negative scores, then frozen (CRD): buffer
    ``nce_z`` with flag ``nce_z_set``. The NCE (and the heads) run in fp32 with autocast off
    (§14.12: exp(<t,s>/T) overflows fp16).

    Memory update, after each optimiser step (``after_step``, CRD)::

        M_S[i] <- l2norm( m * M_S[i] + (1 - m) * s+_i )   for the batch's dataset indices i (ctx.index)

    (and M_T with t+ if symmetric), with the embeddings computed in this step's loss. The bank starts
    as CRD's U(-1/sqrt(d/3), 1/sqrt(d/3)) rows, drawn from a generator seeded with ``run.seed``.
    ``memory_labels`` holds the class of each row (the training labels, set in
    :meth:`on_train_start`, also written from ctx.y / ctx.index every batch). Sizing: from
    ``len(run.data.train_y)`` in :meth:`on_train_start`; outside the trainer the bank grows lazily to
    the largest index seen (unseen rows have label -1 and are never negatives). All of it is in
    registered buffers, so checkpoints keep it and a resume restores it exactly.

    Attack (positive generation; Feature Scattering, methods.md §13.10)::

        x' = x + U(-eps, eps);  x' <- Proj(x' + eps * sign(grad_x' OT(f_S(x), f_S(x'))))   (1 step)
        OT(a, b) = sum_ij T_ij C_ij,   C_ij = max(0, 1 - cos(a_i, b_j)),   T = Sinkhorn(C, uniform marginals)

    over the batch (B x B), student in eval mode, f_S(x) computed once per batch without grad. The
    per-sample attack loss of x'_j is its column share sum_i T_ij C_ij (the shares sum to the OT
    objective). Sinkhorn: log domain, reg 0.01, <= 100 iterations, stop when sum|u - u_prev| < 0.1,
    the plan is not detached (all as the reference ``ot.py``).

    Arguments (``GACD.Config``):
        embed_dim (int): d. (Default: 128, CRD ``feat_dim``; GACD only says "same dimension".)
        nce_k (int): k, negatives per positive. (Default: 16384, paper.) Clipped to the smallest
            number of other-class rows any class has (``min_c N - N_c``): every sample gets the same
            k_eff negatives, all distinct, and k/N in the critic uses k_eff. CIFAR-10 (45000 rows per
            class pool) is never clipped; tiny runs are.
        nce_t (float): T. (Default: 0.1, paper -- best of {0.02, 0.05, 0.07, 0.1, 0.2}.)
        nce_momentum (float): m of the memory update, in [0, 1). (Default: 0.5, CRD ``nce_m``;
            GACD unspecified.)
        symmetric (bool): add CRD's student-anchor term (teacher bank M_T). (Default: False, the
            paper's Eq. 9 and methods.md §9; see the notes for what each choice did on digits.)
        sample_weights (bool): w_b = p_T(x+)_y; False = the paper's ablation without weights.
            (Default: True, paper.)
        positive (str): ``"adv"`` (x+ = x', paper) or ``"clean"`` (x+ = x, no attack: plain
            supervised CRD with the paper's weights). (Default: "adv".)
        attack_budget (str): ``"feature-scatter"`` (1 step, step = eps, uniform start: FS code,
            methods.md §13.10) or ``"threat"`` (the run's eps / alpha / steps, uniform start:
            methods.md §9 [SUGGESTION] 8/255, 2/255, 10). (Default: "feature-scatter".)
        attack_features (str): what the OT cost compares: ``"penultimate"`` student features
            (GACD: "maximal distortion on features", methods.md §13.10 [SUGGESTION]) or
            ``"logits"`` (what the Feature Scattering code uses). (Default: "penultimate".)
        attack_student_mode (str): student BN mode during the attack. (Default: "eval", FS code.)
        ot_reg (float): Sinkhorn entropic regulariser. (Default: 0.01, FS code.)
        ot_iters (int): maximum Sinkhorn iterations. (Default: 100, FS code.)
        ot_tol (float): early-stop threshold on sum|u - u_prev|; 0 = never stop early.
            (Default: 0.1, FS code.)

    Teacher roles:
        robust: ONE robust network (an ensemble is rejected: its "penultimate features" are not
        defined). Paper: adversarially trained ResNet-18 / WRN-34-10 (CIFAR-10), ResNet-56 /
        WRN-40-2 (CIFAR-100).

    Terms logged:
        ``nce`` (teacher-anchor NCE loss, weights included), ``nce_sym`` (student-anchor term, if
        symmetric), ``w_mean`` (mean teacher confidence w_b), ``pos_sim`` (mean <t+, s+>).

    Deviations / notes:
        * The paper gives no stage schedules. Stage 1 [SUGGESTION methods.md §9]: ARD-like 200
          epochs, SGD lr 0.1 x0.1 at 100/150, wd 2e-4, batch 128. No CE term: the student's final
          Linear is untouched (it keeps its initial weights) -- run ``gacd-linear`` and/or
          ``gacd-aft`` next.
        * The trainer's batches must carry dataset indices (ctx.index); ours always do.
        * FS adds 1e-6 inside its log-sum-exp and clamps x' to [-1, 1] (their input range); we use an
          exact logsumexp and the attack's usual [0, 1] clamp (also after the random start).
        * Dataset indices are the bank's rows: a training set that changes between runs (n_train)
          changes N; a resume with a different N is an error.
        * Teacher anchor vs symmetric: the paper's Algorithm 1 computes the negatives s-_i with the
          student (so they would repel the student); with CRD's memory bank they are constants, and
          the only repulsive force on the student is the symmetric term. Measured on digits (small-cnn
          student, PGD-AT teacher, 15 epochs, ``bench/compare_methods.py``): with the literal Eq. 9
          (default) the student embeddings drift together (pos_sim ~0.8, the NCE grows from 9 to ~150
          after the LR drop), yet the penultimate features stay informative (standardised logistic
          probe 93% test) and ``gacd-aft`` from them trains (82.7 clean / 40.7 PGD-20). With
          ``symmetric=True`` the NCE stays bounded (pos_sim ~0.25) but the probe reaches 84% and
          ``gacd-aft`` from those weights never leaves chance (CE 2.30 from epoch 2, at lr 0.05 and
          0.01). An earlier 40-60-epoch digits check saw the same drift without the symmetric term.
          Neither is a faithful reproduction of unpublished code; the default follows the paper.        * The NCE sees only the directions of W_S f_S: the scale of the student's penultimate
          features is unconstrained after stage 1, so choose the stage-2 probe's LR accordingly.

    Examples::

        >>> gacd = GACD(num_classes=10)                          # k 16384, T 0.1, d 128, teacher anchor
        >>> sym = GACD(GACD.Config(symmetric=True, nce_k=4096))  # CRD's two-sided NCE
        >>> # run config: [method] name = "gacd", nce_k = 16384;  [teachers] robust = "robustbench:..."
    """

    name: ClassVar[str] = "gacd"
    supports_distributed: ClassVar[bool] = False  # memory bank, NCE Z: per-process samples
    paper: ClassVar[str] = PAPER
    teacher_roles: ClassVar[tuple[str, ...]] = ("robust",)
    # The memory bank has one row per training sample: extra-data samples (data.extra_path) have none.
    indexes_training_set: ClassVar[bool] = True

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """Hyper-parameters of GACD stage 1 (see the class docstring for meanings and provenance)."""

        embed_dim: int = 128
        nce_k: int = 16384
        nce_t: float = 0.1
        nce_momentum: float = 0.5
        symmetric: bool = False
        sample_weights: bool = True
        positive: str = "adv"
        attack_budget: str = "feature-scatter"
        attack_features: str = "penultimate"
        attack_student_mode: str = "eval"
        ot_reg: float = 0.01
        ot_iters: int = 100
        ot_tol: float = 0.1

        def __post_init__(self) -> None:
            for key in ("embed_dim", "nce_k", "ot_iters"):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise UserError(f"method.{key} must be a positive integer, got {value!r}")
            if not self.nce_t > 0.0:
                raise UserError(f"method.nce_t must be positive, got {self.nce_t}")
            if not 0.0 <= self.nce_momentum < 1.0:
                raise UserError(f"method.nce_momentum must be in [0, 1), got {self.nce_momentum}")
            for key, allowed in (("positive", POSITIVES), ("attack_budget", ATTACK_BUDGETS),
                                 ("attack_features", ATTACK_FEATURES), ("attack_student_mode", STUDENT_MODES)):
                if getattr(self, key) not in allowed:
                    raise UserError(f"method.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
            if not self.ot_reg > 0.0:
                raise UserError(f"method.ot_reg must be positive, got {self.ot_reg}")
            if not self.ot_tol >= 0.0:
                raise UserError(f"method.ot_tol must be >= 0, got {self.ot_tol}")

    #: buffers whose first dimension is the training-set size (resized when a checkpoint is loaded).
    _BANK_BUFFERS: ClassVar[tuple[str, ...]] = ("memory_s", "memory_t", "memory_labels")

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        d = self.config.embed_dim
        self.embed_s = nn.LazyLinear(d)
        self.embed_t = nn.LazyLinear(d)
        self.register_buffer("memory_s", torch.zeros(0, d))
        self.register_buffer("memory_t", torch.zeros(0, d))  # rows only if symmetric
        self.register_buffer("memory_labels", torch.zeros(0, dtype=torch.long))
        # Z of the teacher-anchor term (index 0) and of the student-anchor term (index 1); CRD's -1 = unset.
        self.register_buffer("nce_z", torch.full((2,), -1.0))
        self.register_buffer("nce_z_set", torch.zeros((), dtype=torch.bool))
        # Host copy of nce_z_set, so the per-step check needs no device sync; None = read the buffer once
        # (after construction or a checkpoint load).
        self._nce_z_known: bool | None = None
        self._pending: tuple[Tensor, Tensor, Tensor | None, Tensor] | None = None

    # -- memory bank -------------------------------------------------------------------------------
    @property
    def bank_size(self) -> int:
        """N, the number of memory rows (the training-set size once sized)."""
        return int(self.memory_s.shape[0])

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        # A fresh distiller has empty banks: take the checkpoint's shape before copying.
        for name in self._BANK_BUFFERS:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(incoming, Tensor) and incoming.shape != current.shape:
                setattr(self, name, torch.empty(incoming.shape, dtype=current.dtype, device=current.device))
        self._nce_z_known = None  # nce_z_set may change below
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _grow_bank(self, rows: int) -> None:
        """Extend the banks to ``rows`` rows (new rows: CRD init, label -1)."""
        old = self.bank_size
        if rows <= old:
            return
        device, d = self.memory_s.device, self.config.embed_dim
        self.memory_s = torch.cat([self.memory_s, init_bank(rows - old, d).to(device)])
        if self.config.symmetric:
            self.memory_t = torch.cat([self.memory_t, init_bank(rows - old, d).to(device)])
        self.memory_labels = torch.cat(
            [self.memory_labels, torch.full((rows - old,), -1, dtype=torch.long, device=device)])

    def on_train_start(self, run: Any) -> None:
        """Size the banks from the training set (unless a resumed checkpoint already did) and set the labels."""
        _single_teacher(run.teachers["robust"])
        labels = run.data.train_y.to(device=self.memory_labels.device, dtype=torch.long)
        n, d = len(labels), self.config.embed_dim
        if self.bank_size == 0:
            gen = torch.Generator().manual_seed(int(run.config.run.seed))
            device = self.memory_s.device
            self.memory_s = init_bank(n, d, generator=gen).to(device)
            if self.config.symmetric:
                self.memory_t = init_bank(n, d, generator=gen).to(device)
            self.memory_labels = labels.clone()
        elif self.bank_size != n:
            raise UserError(f"gacd: the memory bank has {self.bank_size} rows but the training set has {n} "
                            "samples; resume with the same data (data.n_train) as the checkpoint")
        else:
            self.memory_labels.copy_(labels)

    # -- attack --------------------------------------------------------------------------------------
    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        cfg = self.config
        if cfg.positive == "clean":
            return None
        if cfg.attack_budget == "feature-scatter":
            return AttackSpec(eps=threat.eps, alpha=threat.eps, steps=1, norm=threat.norm, init="uniform",
                              student_mode=cfg.attack_student_mode)
        return AttackSpec(eps=threat.eps, alpha=threat.alpha, steps=threat.steps, norm=threat.norm,
                          init="uniform", student_mode=cfg.attack_student_mode)

    def _attack_features(self, student: nn.Module, x: Tensor) -> Tensor:
        if self.config.attack_features == "logits":
            return student(x)
        with FeatureTap(student, penultimate=True) as tap:
            student(x)
        return tap.penultimate

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        """Each x'_j's share of OT(f_S(x), f_S(x')) (see the class docstring)."""
        cfg = self.config
        clean = ctx.extras.get(CLEAN_FEATURES_KEY)
        if clean is None:
            with torch.no_grad():
                clean = self._attack_features(ctx.student, ctx.x).detach()
            ctx.extras[CLEAN_FEATURES_KEY] = clean
        adv = self._attack_features(ctx.student, x_adv)
        with _no_autocast(adv.device):
            return ot_per_sample(clean, adv, reg=cfg.ot_reg, iters=cfg.ot_iters, tol=cfg.ot_tol)

    # -- loss ----------------------------------------------------------------------------------------
    def embed(self, f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
        """(s, t): the l2-normalised fp32 embeddings of student and teacher features."""
        with _no_autocast(f_s.device):
            s = F.normalize(self.embed_s(f_s.float().flatten(1)), dim=1)
            t = F.normalize(self.embed_t(f_t.float().flatten(1)), dim=1)
        return s, t

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        if ctx.index is None:
            raise UserError("gacd needs the dataset index of every sample (ctx.index) for its memory bank")
        x_pos = ctx.x_adv if cfg.positive == "adv" else ctx.x
        teacher = _single_teacher(ctx.teachers["robust"])
        with torch.no_grad(), FeatureTap(teacher, penultimate=True) as t_tap:
            t_logits = teacher(x_pos)
        with FeatureTap(ctx.student, penultimate=True) as s_tap:
            ctx.student(x_pos)
        s, t = self.embed(s_tap.penultimate, t_tap.penultimate.detach())

        device = self.memory_s.device
        index = ctx.index.to(device=device, dtype=torch.long)
        y = ctx.y.to(device)
        if self.bank_size == 0 or int(index.max()) >= self.bank_size:
            self._grow_bank(int(index.max()) + 1)  # outside the trainer: lazy sizing
        self.memory_labels[index] = y
        n_data = self.bank_size
        neg_idx = sample_negatives(y, self.memory_labels, cfg.nce_k)

        with _no_autocast(s.device):
            if cfg.sample_weights:
                w = torch.softmax(t_logits.float(), dim=1).gather(1, ctx.y.unsqueeze(1)).squeeze(1)
            else:
                w = torch.ones(len(ctx.y), device=s.device)
            pos = (t * s).sum(1)
            neg_t = negative_scores(t, self.memory_s, neg_idx)
            neg_s = negative_scores(s, self.memory_t, neg_idx) if cfg.symmetric else None
            if self._nce_z_known is None:
                self._nce_z_known = bool(self.nce_z_set)
            if not self._nce_z_known:
                z = [nce_normaliser(pos, neg_t, temperature=cfg.nce_t, n_data=n_data)]
                if neg_s is not None:
                    z.append(nce_normaliser(pos, neg_s, temperature=cfg.nce_t, n_data=n_data))
                self.nce_z[: len(z)] = torch.stack(z).to(self.nce_z)
                self.nce_z_set.fill_(True)
                self._nce_z_known = True
            ll = nce_log_likelihood(pos, neg_t, temperature=cfg.nce_t, z=self.nce_z[0], n_data=n_data)
            nce = -(w * ll).mean()
            total = nce
            terms = {"nce": nce.detach(), "w_mean": w.detach().mean(), "pos_sim": pos.detach().mean()}
            if neg_s is not None:
                ll_sym = nce_log_likelihood(pos, neg_s, temperature=cfg.nce_t, z=self.nce_z[1], n_data=n_data)
                nce_sym = -(w * ll_sym).mean()
                total = total + nce_sym
                terms["nce_sym"] = nce_sym.detach()
        self._pending = (index, s.detach(), t.detach() if cfg.symmetric else None, y)
        return LossOutput(total=total, terms=terms)

    def after_step(self, ctx: BatchContext, out: LossOutput) -> None:
        """Momentum update of the bank rows of this batch with the embeddings of its loss."""
        if self._pending is None:
            return
        index, s, t, y = self._pending
        self._pending = None
        momentum_update(self.memory_s, index, s, self.config.nce_momentum)
        if t is not None:
            momentum_update(self.memory_t, index, t, self.config.nce_momentum)
        self.memory_labels[index] = y


# -- stage 2: linear evaluation --------------------------------------------------------------------
#: sigma floor of the standardised probe, as a fraction of the median feature standard deviation.
STD_FLOOR = 0.1


class GACDLinear(Distiller):
    r"""GACD stage 2, linear evaluation: train only the student's final Linear on frozen features.

    Paper: Bai et al., arXiv:2009.09922 ("GACD" rows of Tables 1-2 and the transfer experiments of
    Table 4: "a linear classifier on the top of frozen student models"). methods.md §9 (stages).

    Loss::

        L = (1/B) sum_b CE( W f_S(x_b) + b, y_b ),   f_S = penultimate features, no grad, student in eval

    on CLEAN data, no attack. Only the classifier learns. Freezing: a distiller cannot own the
    student's parameters, so :meth:`on_train_start` calls ``requires_grad_(False)`` on every student
    parameter (the optimiser then skips them: no update, no weight decay, no momentum); and
    :meth:`loss` runs the backbone under ``no_grad`` with every module in eval mode (BN running
    statistics frozen, dropout off) and restores the modes afterwards, so the features are frozen
    even outside the trainer. Assumes the logits are the final Linear applied to its input (true for
    the built-in students and the RobustBench CIFAR architectures).

    Standardised probe (``standardize=True``, ours): stage 1 has no CE term, so nothing bounds the
    scale or the offset of f_S (a digits run gave feature norms ~20 sharing a large common mean),
    and plain SGD on such features diverges at any usual LR (CE 6 -> 31, accuracy at chance on the
    compare_methods run) although a standardised logistic regression on the same features reaches
    93%. So the probe is trained in standardised coordinates::

        z = (f_S - mu) / sigma,   logits = V z + c          (V, c: the distiller's ``probe``)

    with mu, sigma the per-feature mean and standard deviation of the frozen features over the whole
    training set (computed once in :meth:`on_train_start`, no augmentation), sigma floored at
    ``STD_FLOOR`` (0.1) times the median sigma of the non-constant features (after stage 1 most
    units can be dead, so the plain median can be 0), so that near-dead features (sigma ~ 1e-5 on
    the digits run) do not get 1e4-sized weights; and folded into the student's final Linear after
    every step::

        W = V / sigma,   b = c - (V / sigma) mu             so W f_S + b == V z + c

    It is still one linear classifier on the same features (the exported student is unchanged in
    form); only the optimisation is preconditioned, and weight decay acts on V. V, c start as the
    fold-inverse of the checkpoint's classifier, so the starting function is the stage-1 one.
    ``standardize=False`` trains (W, b) directly.

    Run it from the stage-1 weights::

        [method]
        name = "gacd-linear"
        [student]
        arch = "<same as stage 1>"
        init_from = "runs/gacd_stage1/checkpoints/last.pt"

    Arguments (``GACDLinear.Config``):
        fc_module (str | None): name of the classifier Linear if it is not the last ``nn.Linear`` of
            the student. (Default: None.)
        standardize (bool): train the probe on standardised features and fold it into the
            classifier (see above). (Default: True, ours -- the paper gives no probe recipe.)

    Teacher roles:
        none.

    Terms logged:
        ``ce_nat`` (the probe's CE), ``acc_nat`` (its batch accuracy).

    Deviations / notes:
        * Schedule not given by the paper [SUGGESTION, flagged]: SGD momentum 0.9, lr 0.1, 30 epochs,
          x0.1 at 15/25, weight decay 0 or the stage-1 value.
        * The classifier starts from the stage-1 checkpoint's (untrained) classifier weights.
        * Called outside the trainer (no :meth:`on_train_start`), mu and sigma come from the first
          batch :meth:`loss` sees.

    Examples::

        >>> probe = GACDLinear()
        >>> # run config: [method] name = "gacd-linear"; [student] init_from = "<stage 1>/checkpoints/last.pt"
    """

    name: ClassVar[str] = "gacd-linear"
    supports_distributed: ClassVar[bool] = False  # frozen student: nothing for DDP
    paper: ClassVar[str] = PAPER
    teacher_roles: ClassVar[tuple[str, ...]] = ()

    #: feature statistics, empty until set (resized when a checkpoint is loaded).
    _STAT_BUFFERS: ClassVar[tuple[str, ...]] = ("feature_mean", "feature_std")

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """Options of the linear probe (see the class docstring)."""

        fc_module: str | None = None
        standardize: bool = True

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        if self.config.standardize:
            self.probe = nn.LazyLinear(num_classes)  # (V, c) in standardised coordinates
        self.register_buffer("feature_mean", torch.zeros(0))
        self.register_buffer("feature_std", torch.zeros(0))

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        for name in self._STAT_BUFFERS:
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, Tensor) and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(incoming, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return None

    def _classifier(self, student: nn.Module) -> nn.Linear:
        _, fc = final_linear(student, self.config.fc_module)
        if self.config.standardize and fc.bias is None:
            raise UserError("gacd-linear: the student's classifier has no bias, which the standardised probe "
                            "needs; set method.standardize = false")
        return fc

    def _features(self, student: nn.Module, x: Tensor) -> Tensor:
        """Penultimate features with the whole student in eval mode and no graph (modes restored)."""
        with module_mode(student, "eval"), torch.no_grad(), \
                FeatureTap(student, penultimate=True, fc_module=self.config.fc_module) as tap:
            student(x)
        return tap.penultimate.detach()

    @torch.no_grad()
    def _set_statistics(self, features: Tensor, fc: nn.Linear) -> None:
        """mu, sigma from ``features``; (V, c) so that the probe starts as the current classifier."""
        std = features.std(dim=0, unbiased=False)
        live = std[std > 0]  # dead units (constant features) can be the majority after stage 1
        self.feature_mean = features.mean(dim=0)
        self.feature_std = std.clamp_min(STD_FLOOR * live.median()) if live.numel() else torch.ones_like(std)
        self.probe(self.feature_mean[None])  # materialise the lazy layer
        self.probe.weight.copy_(fc.weight * self.feature_std)
        self.probe.bias.copy_(fc.bias + fc.weight @ self.feature_mean)

    def on_train_start(self, run: Any) -> None:
        """Freeze the student; with ``standardize``, compute mu and sigma over the training set."""
        fc = self._classifier(run.student)
        run.student.requires_grad_(False)
        if not self.config.standardize:
            fc.requires_grad_(True)
            return
        if self.feature_mean.numel() == 0:  # not restored from a checkpoint
            chunks = [self._features(run.student, to_float(run.data.train_x[i:i + 512]).to(run.device))
                      for i in range(0, len(run.data.train_x), 512)]
            self._set_statistics(torch.cat(chunks), fc)

    def loss(self, ctx: BatchContext) -> LossOutput:
        fc = self._classifier(ctx.student)
        features = self._features(ctx.student, ctx.x)
        if self.config.standardize:
            if self.feature_mean.numel() == 0:
                self._set_statistics(features, fc)
            logits = self.probe((features - self.feature_mean) / self.feature_std)
        else:
            logits = fc(features)
        ce = F.cross_entropy(logits, ctx.y)
        acc = (logits.detach().argmax(1) == ctx.y).float().mean()
        return LossOutput(total=ce, terms={"ce_nat": ce.detach(), "acc_nat": acc})

    @torch.no_grad()
    def after_step(self, ctx: BatchContext, out: LossOutput) -> None:
        """Fold the standardised probe into the student's classifier: W = V / sigma, b = c - W mu."""
        if not self.config.standardize:
            return
        fc = self._classifier(ctx.student)
        weight = self.probe.weight / self.feature_std
        fc.weight.copy_(weight)
        fc.bias.copy_(self.probe.bias - weight @ self.feature_mean)


# -- stage 3: adversarial fine-tuning --------------------------------------------------------------
class GACDAFT(Distiller):
    r"""GACD stage 3, adversarial fine-tuning (AFT): PGD adversarial training of the whole student.

    Paper: Bai et al., arXiv:2009.09922 ("GACD+AFT" rows: "full network fine-tuning with
    adversarial training after feature distillation"). methods.md §9 (stages).

    Loss and attack (Madry PGD-AT, methods.md §1.1)::

        L  = (1/B) sum_b CE(z_S(x'_b), y_b)
        x' = PGD_{eps, alpha, K}( CE(z_S(x'), y) ),  uniform start, student in eval mode

    Budget: the run's threat (K overridable by ``steps``); every student parameter trains.

    Run it from the distilled weights (stage 1; starting from the stage-2 probe instead only changes
    the initial classifier)::

        [method]
        name = "gacd-aft"
        [student]
        arch = "<same as stage 1>"
        init_from = "runs/gacd_stage1/checkpoints/last.pt"

    Arguments (``GACDAFT.Config``):
        steps (int | None): attack steps; None = the threat's. (Default: None -> PGD-10 with the
            default threat, methods.md §9 [SUGGESTION].)
        init (str): attack start. (Default: "uniform", Madry.)
        attack_student_mode (str): student BN mode in the attack. (Default: "eval", methods.md §1.1
            [SUGGESTION].)

    Teacher roles:
        none.

    Terms logged:
        ``ce_adv``.

    Deviations / notes:
        * Schedule not given by the paper [SUGGESTION methods.md §9]: lr 0.01, 20 epochs (SGD
          momentum 0.9, wd as stage 1).

    Examples::

        >>> aft = GACDAFT()
        >>> # run config: [method] name = "gacd-aft"; [student] init_from = "<stage 1>/checkpoints/last.pt"
    """

    name: ClassVar[str] = "gacd-aft"
    supports_distributed: ClassVar[bool] = True  # stateless, batch-mean loss
    paper: ClassVar[str] = PAPER
    teacher_roles: ClassVar[tuple[str, ...]] = ()

    @dataclass(frozen=True, kw_only=True)
    class Config:
        """Options of the adversarial fine-tuning stage (see the class docstring)."""

        steps: int | None = None
        init: str = "uniform"
        attack_student_mode: str = "eval"

        def __post_init__(self) -> None:
            if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                           or self.steps < 0):
                raise UserError(f"method.steps must be a non-negative integer or None, got {self.steps!r}")
            check_choice("init", self.init, ATTACK_INITS)
            check_choice("attack_student_mode", self.attack_student_mode, STUDENT_MODES)

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        cfg = self.config
        steps = threat.steps if cfg.steps is None else cfg.steps
        return AttackSpec(eps=threat.eps, alpha=threat.alpha, steps=steps, norm=threat.norm, init=cfg.init,
                          student_mode=cfg.attack_student_mode)

    def attack_loss(self, ctx: BatchContext, x_adv: Tensor) -> Tensor:
        return F.cross_entropy(self.student_logits(ctx, x_adv), ctx.y, reduction="none")

    def loss(self, ctx: BatchContext) -> LossOutput:
        ce_adv = F.cross_entropy(self.student_logits(ctx, ctx.x_adv), ctx.y)
        return LossOutput(total=ce_adv, terms={"ce_adv": ce_adv.detach()})


@hookimpl
def rbkd_register_methods(registry: Registrar) -> None:
    registry.add(GACD)
    registry.add(GACDLinear)
    registry.add(GACDAFT)
