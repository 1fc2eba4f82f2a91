r"""``gacd``: stage 1 of Guided Adversarial Contrastive Distillation, contrastive feature distillation.

Paper: Tao Bai, Jinnan Chen, Jun Zhao, Bihan Wen, Xudong Jiang, Alex Kot, 'Feature Distillation With
Guided Adversarial Contrastive Learning', arXiv:2009.09922 (Eq. 9-10, Algorithm 1). No code is public:
the memory bank, critic and normaliser follow CRD (:mod:`robustbench_kd_plugins.gacd.contrastive`),
the attack follows Feature Scattering (:mod:`robustbench_kd_plugins.gacd.transport`).

Embeddings (CRD's ``Embed`` heads): f_S, f_T = penultimate features (the input of the final
``nn.Linear``, read with :class:`~robustbench_kd.methods.features.FeatureTap`) of student and teacher
on the positive input x+ (= x', the attack's output); s+ = l2norm(W_S f_S + b_S), t+ = l2norm(W_T f_T +
b_T), both of dimension d. W_S, W_T are ``nn.Linear`` heads of the distiller, built in :meth:`GACD.on_setup`
with the input sizes of the student's and the teacher's final ``nn.Linear``, so they join the optimiser
and are checkpointed with it.

Loss (Eq. 9-10, teacher anchor)::

    P(t, s)   = exp(<t, s> / T) / Z
    h(t, s)   = P / (P + k/N + 1e-7),    1 - h := (k/N) / (P + k/N + 1e-7)             (CRD)
    l_b       = w_b [ log h(t+_b, s+_b) + sum_{i=1..k} log(1 - h(t+_b, M_S[n_bi])) ]
    L         = -(1/B) sum_b l_b                 (+ the same with anchor s+_b, positive t+_b and
                                                   negatives M_T[n_bi] if symmetric)
    w_b       = softmax(z_T(x+_b))_{y_b}          (no gradient; 1 if not sample_weights)

M_S (M_T) is the N x d memory bank of student (teacher) embeddings, N = training-set size; n_bi are k
indices drawn uniformly WITHOUT replacement from the rows of OTHER classes than y_b. The bank is a
constant in the loss, so with the teacher anchor the negatives only train W_T and the student learns
through the positive term (pull s+ towards t+); ``symmetric=True`` adds CRD's student-anchor term,
which also pushes s+ away from other-class teacher embeddings. Z (one per direction) is set on the
FIRST batch to mean(exp(score / T)) * N over its positive and negative scores, then frozen: buffer
``nce_z`` with flag ``nce_z_set``. The NCE and the heads run in fp32 with autocast off (exp(<t,s>/T)
overflows fp16).

Memory update, after each optimiser step::

    M_S[i] <- l2norm( m * M_S[i] + (1 - m) * s+_i )   for the batch's dataset indices i (ctx.index)

(and M_T with t+ if symmetric), with the embeddings computed in this step's loss. The bank starts as
CRD's U(-1/sqrt(d/3), 1/sqrt(d/3)) rows, drawn from a generator seeded with ``run.seed``.
``memory_labels`` holds the class of each row (the training labels, set at the start of training and
written from ctx.y / ctx.index every batch). Outside the trainer the bank grows lazily to the largest
index seen (unseen rows have label -1 and are never negatives). All of it is in registered buffers, so
checkpoints keep it and a resume restores it exactly.

Attack (positive generation, Feature Scattering)::

    x' = x + U(-eps, eps);  x' <- Proj(x' + eps * sign(grad_x' OT(f_S(x), f_S(x'))))   (1 step)
    OT(a, b) = sum_ij T_ij C_ij,   C_ij = max(0, 1 - cos(a_i, b_j)),   T = Sinkhorn(C, uniform marginals)

over the batch (B x B), student in eval mode, f_S(x) computed once per batch without gradient. The
per-sample attack loss of x'_j is its column share sum_i T_ij C_ij (the shares sum to the OT
objective). Sinkhorn: log domain, reg 0.01, at most 100 iterations, stop when sum|u - u_prev| < 0.1,
the plan not detached (all as the Feature Scattering code).

Reference defaults: k = 16384 and T = 0.1 (paper, the best of {0.02, 0.05, 0.07, 0.1, 0.2}); d = 128
and m = 0.5 (CRD's values; GACD does not state them); the one-step eps attack of Feature Scattering.

Deviations / notes:
    * The paper gives no stage schedules; an ARD-like one is a reasonable start (200 epochs, SGD lr 0.1,
      x0.1 at 100/150, wd 2e-4, batch 128). No CE term: the student's final Linear keeps its initial
      weights -- run ``gacd-linear`` and/or the adversarial fine-tuning (``pgd-at`` from this run's
      checkpoint) next.
    * k is clipped to the smallest number of other-class rows any class has (``min_c N - N_c``): every
      sample gets the same k_eff negatives, all distinct, and k/N in the critic uses k_eff. CIFAR-10
      (45000 rows per class pool) is never clipped; tiny runs are.
    * The trainer's batches must carry dataset indices (ctx.index); ours always do. A training set that
      changes between runs (n_train) changes N; a resume with a different N is an error.
    * Feature Scattering clamps x' to [-1, 1] (its input range); we use the attack's usual [0, 1] clamp
      (also after the random start). The attack's features default to the student's penultimate ones
      (GACD: "maximal distortion on features"); the Feature Scattering code uses the logits.
    * Teacher anchor vs symmetric: the paper's Algorithm 1 computes the negatives s-_i with the student
      (so they would repel the student); with CRD's memory bank they are constants, and the only
      repulsive force on the student is the symmetric term. Measured on digits (small-cnn student,
      PGD-AT teacher, 15 epochs, ``bench/compare_methods.py``): with the literal Eq. 9 (default) the
      student embeddings drift together (pos_sim ~0.8, the NCE grows from 9 to ~150 after the LR drop),
      yet the penultimate features stay informative (standardised logistic probe 93% test) and
      adversarial fine-tuning from them trains (82.7 clean / 40.7 PGD-20). With ``symmetric=True`` the
      NCE stays bounded (pos_sim ~0.25) but the probe reaches 84% and the fine-tuning from those
      weights never leaves chance (CE 2.30 from epoch 2, at lr 0.05 and 0.01). Neither is a faithful
      reproduction of unpublished code; the default follows the paper.
    * The NCE sees only the directions of W_S f_S: the scale of the student's penultimate features is
      unconstrained after stage 1, so choose the stage-2 probe's LR accordingly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from robustbench_kd_plugins.gacd.contrastive import (
    init_bank,
    momentum_update,
    nce_normaliser,
    negative_scores,
    sample_negatives,
    weighted_nce_loss,
)
from robustbench_kd_plugins.gacd.transport import ot_per_sample
from torch import Tensor, nn

from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.errors import UserError
from robustbench_kd.methods.attack_options import student_mode_option, threat_attack
from robustbench_kd.methods.features import FeatureTap, final_linear
from robustbench_kd.teachers import EnsembleTeacher

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext, SetupContext
    from robustbench_kd.threat import ThreatSpec

PAPER = (
    "Tao Bai, Jinnan Chen, Jun Zhao, Bihan Wen, Xudong Jiang, Alex Kot. Feature Distillation With Guided "
    "Adversarial Contrastive Learning. arXiv:2009.09922, 2020"
)

POSITIVES = ("adv", "clean")
ATTACK_BUDGETS = ("feature-scatter", "threat")
ATTACK_FEATURES = ("penultimate", "logits")
BOOLS = (False, True)
#: ctx.extras key of the clean features the OT attack compares against (computed once per batch).
CLEAN_FEATURES_KEY = "gacd.clean_attack_features"


def teacher_confidence(teacher_logits: Tensor, y: Tensor) -> Tensor:
    """GACD's sample weight ``w_b = softmax(z_T(x+_b))_{y_b}`` in fp32 (the logits carry no graph)."""
    return torch.softmax(teacher_logits.float(), dim=1).gather(1, y.unsqueeze(1)).squeeze(1)


def no_autocast(device: torch.device) -> Any:
    """A context without autocast on ``device`` (the NCE and the OT cost overflow in fp16)."""
    return torch.autocast(device_type=device.type, enabled=False)


def single_teacher(teacher: nn.Module) -> nn.Module:
    """The teacher, refusing an ensemble (its "penultimate features" are not defined)."""
    if isinstance(teacher, EnsembleTeacher):
        raise UserError(
            "gacd distils the penultimate features of ONE network; teachers.robust is an ensemble, give a single spec"
        )
    return teacher


class GACD(Distiller):
    r"""GACD stage 1: contrastive feature distillation with teacher-confidence sample weights.

    Loss, attack, memory bank and reference defaults: see the docstring of
    ``robustbench_kd_plugins.gacd.distiller``.

    Arguments (``GACD.Config``):
        embed_dim (int): d. (Default: 128, CRD; GACD only says "same dimension".)
        nce_k (int): k, negatives per positive, clipped to the smallest other-class pool. (Default: 16384, paper.)
        nce_t (float): T. (Default: 0.1, paper.)
        nce_momentum (float): m of the memory update, in [0, 1). (Default: 0.5, CRD; GACD unspecified.)
        symmetric (bool): add CRD's student-anchor term (teacher bank M_T). (Default: False, the
            paper's Eq. 9; see the module notes for what each choice did on digits.)
        sample_weights (bool): w_b = p_T(x+)_y; False = the paper's ablation without weights.
            (Default: True, paper.)
        positive (str): ``"adv"`` (x+ = x', paper) or ``"clean"`` (x+ = x, no attack: plain
            supervised CRD with the paper's weights). (Default: "adv".)
        attack_budget (str): ``"feature-scatter"`` (1 step, step = eps, uniform start, as the Feature
            Scattering code) or ``"threat"`` (the run's eps / alpha / steps, uniform start).
            (Default: "feature-scatter".)
        attack_features (str): what the OT cost compares: the student's ``"penultimate"`` features
            (GACD: "maximal distortion on features") or its ``"logits"`` (what the Feature Scattering
            code uses). (Default: "penultimate".)
        attack_student_mode (str): student BN mode during the attack. (Default: "eval", Feature Scattering.)
        ot_reg (float): Sinkhorn entropic regulariser. (Default: 0.01, Feature Scattering.)
        ot_iters (int): maximum Sinkhorn iterations. (Default: 100, Feature Scattering.)
        ot_tol (float): early-stop threshold on sum|u - u_prev|; 0 = never stop early.
            (Default: 0.1, Feature Scattering.)

    Teacher roles:
        robust: ONE robust network (an ensemble is rejected: its "penultimate features" are not
        defined). Paper: adversarially trained ResNet-18 / WRN-34-10 (CIFAR-10), ResNet-56 /
        WRN-40-2 (CIFAR-100).

    Terms logged:
        ``nce`` (teacher-anchor NCE loss, weights included), ``nce_sym`` (student-anchor term, if
        symmetric), ``w_mean`` (mean teacher confidence w_b), ``pos_sim`` (mean <t+, s+>).

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
    class Config(MethodConfig):
        """Hyper-parameters of GACD stage 1 (see the class docstring for meanings and provenance)."""

        embed_dim: int = option(128, low=0, low_open=True, integer=True, help="embedding dimension d")
        nce_k: int = option(16384, low=0, low_open=True, integer=True, help="negatives per positive k")
        nce_t: float = option(0.1, low=0, low_open=True, help="NCE temperature T")
        nce_momentum: float = option(0.5, low=0, high=1, high_open=True, help="momentum m of the memory update")
        symmetric: bool = option(False, choices=BOOLS, help="add CRD's student-anchor term (teacher memory bank)")
        sample_weights: bool = option(True, choices=BOOLS, help="weight samples by the teacher's p_T(y|x+)")
        positive: str = option("adv", choices=POSITIVES, help="positive input: adv (x', paper) or clean (x)")
        attack_budget: str = option(
            "feature-scatter",
            choices=ATTACK_BUDGETS,
            help="feature-scatter (1 step of eps) or threat (the run's PGD budget)",
        )
        attack_features: str = option(
            "penultimate", choices=ATTACK_FEATURES, help="features the OT attack distorts: penultimate or logits"
        )
        attack_student_mode: str = student_mode_option("eval")
        ot_reg: float = option(0.01, low=0, low_open=True, help="Sinkhorn entropic regulariser")
        ot_iters: int = option(100, low=0, low_open=True, integer=True, help="maximum Sinkhorn iterations")
        ot_tol: float = option(0.1, low=0, help="Sinkhorn early-stop threshold; 0 = never stop early")

    # Registered buffers (see __init__); declared here for the type checker.
    memory_s: Tensor
    memory_t: Tensor
    memory_labels: Tensor
    nce_z: Tensor
    nce_z_set: Tensor

    #: buffers whose first dimension is the training-set size (resized when a checkpoint is loaded).
    _BANK_BUFFERS: ClassVar[tuple[str, ...]] = ("memory_s", "memory_t", "memory_labels")

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        d = self.config.embed_dim
        # The heads' input sizes are the networks' feature widths: built in on_setup.
        self.embed_s: nn.Linear | None = None
        self.embed_t: nn.Linear | None = None
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
            [self.memory_labels, torch.full((rows - old,), -1, dtype=torch.long, device=device)]
        )

    def on_setup(self, setup: SetupContext) -> None:
        """Build the embedding heads W_S, W_T from the widths of the student's and the teacher's features."""
        teacher = single_teacher(setup.teachers["robust"])
        d = self.config.embed_dim
        self.embed_s = nn.Linear(final_linear(setup.student)[1].in_features, d)
        self.embed_t = nn.Linear(final_linear(teacher)[1].in_features, d)

    def on_train_start(self, run: Any) -> None:
        """Size the banks from the training set (unless a resumed checkpoint already did) and set the labels."""
        single_teacher(run.teachers["robust"])
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
            raise UserError(
                f"gacd: the memory bank has {self.bank_size} rows but the training set has {n} "
                "samples; resume with the same data (data.n_train) as the checkpoint"
            )
        else:
            self.memory_labels.copy_(labels)

    # -- attack --------------------------------------------------------------------------------------
    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        cfg = self.config
        if cfg.positive == "clean":
            return None
        if cfg.attack_budget == "feature-scatter":
            return threat_attack(threat, cfg, init="uniform", alpha=threat.eps, steps=1)
        return threat_attack(threat, cfg, init="uniform")

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
        with no_autocast(adv.device):
            return ot_per_sample(clean, adv, reg=cfg.ot_reg, iters=cfg.ot_iters, tol=cfg.ot_tol)

    # -- loss ----------------------------------------------------------------------------------------
    def embed(self, f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
        """(s, t): the l2-normalised fp32 embeddings of student and teacher features."""
        if self.embed_s is None or self.embed_t is None:
            raise RuntimeError("gacd: on_setup() has not built the embedding heads (the trainer calls it first)")
        with no_autocast(f_s.device):
            s = F.normalize(self.embed_s(f_s.float().flatten(1)), dim=1)
            t = F.normalize(self.embed_t(f_t.float().flatten(1)), dim=1)
        return s, t

    def _set_z_once(self, pos: Tensor, neg_t: Tensor, neg_s: Tensor | None, n_data: int) -> None:
        """Set the normalisers Z from the first batch's scores (then frozen, as CRD)."""
        if self._nce_z_known is None:
            self._nce_z_known = bool(self.nce_z_set)
        if self._nce_z_known:
            return
        t = self.config.nce_t
        z = [nce_normaliser(pos, neg_t, temperature=t, n_data=n_data)]
        if neg_s is not None:
            z.append(nce_normaliser(pos, neg_s, temperature=t, n_data=n_data))
        self.nce_z[: len(z)] = torch.stack(z).to(self.nce_z)
        self.nce_z_set.fill_(True)
        self._nce_z_known = True

    def loss(self, ctx: BatchContext) -> LossOutput:
        cfg = self.config
        if ctx.index is None:
            raise UserError("gacd needs the dataset index of every sample (ctx.index) for its memory bank")
        x_pos = ctx.x_adv if cfg.positive == "adv" else ctx.x
        teacher = single_teacher(ctx.teachers["robust"])
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

        with no_autocast(s.device):
            w = teacher_confidence(t_logits, ctx.y) if cfg.sample_weights else torch.ones(len(ctx.y), device=s.device)
            pos = (t * s).sum(1)
            neg_t = negative_scores(t, self.memory_s, neg_idx)
            neg_s = negative_scores(s, self.memory_t, neg_idx) if cfg.symmetric else None
            self._set_z_once(pos, neg_t, neg_s, n_data)
            nce = weighted_nce_loss(pos, neg_t, w, temperature=cfg.nce_t, z=self.nce_z[0], n_data=n_data)
            total = nce
            terms = {"nce": nce.detach(), "w_mean": w.detach().mean(), "pos_sim": pos.detach().mean()}
            if neg_s is not None:
                nce_sym = weighted_nce_loss(pos, neg_s, w, temperature=cfg.nce_t, z=self.nce_z[1], n_data=n_data)
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
