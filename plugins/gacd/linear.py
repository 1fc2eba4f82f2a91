"""``gacd-linear``: stage 2 of GACD, linear evaluation of the distilled features (the paper's "GACD" rows)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from robustbench_kd_plugins.gacd.distiller import PAPER
from torch import Tensor, nn

from robustbench_kd.attacks import module_mode
from robustbench_kd.data.datasets import to_float
from robustbench_kd.distiller import AttackSpec, Distiller, LossOutput, MethodConfig, option
from robustbench_kd.errors import UserError
from robustbench_kd.methods.features import FeatureTap, final_linear

if TYPE_CHECKING:
    from robustbench_kd.context import BatchContext, SetupContext
    from robustbench_kd.threat import ThreatSpec

#: sigma floor of the standardised probe, as a fraction of the median feature standard deviation.
STD_FLOOR = 0.1


class GACDLinear(Distiller):
    r"""GACD stage 2, linear evaluation: train only the student's final Linear on frozen features.

    Paper: Bai et al., arXiv:2009.09922 ("GACD" rows of Tables 1-2 and the transfer experiments of
    Table 4: "a linear classifier on the top of frozen student models").

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
        * The paper gives no schedule; a usual linear-evaluation one is SGD momentum 0.9, lr 0.1,
          30 epochs, x0.1 at 15/25, weight decay 0 or the stage-1 value.
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
    class Config(MethodConfig):
        """Options of the linear probe (see the class docstring)."""

        fc_module: str | None = None  # name of the classifier Linear; None = the student's last nn.Linear
        standardize: bool = option(
            True, choices=(False, True), help="train the probe on standardised features, folded into the classifier"
        )

    def __init__(self, config: Any = None, *, num_classes: int = 10) -> None:
        super().__init__(config, num_classes=num_classes)
        # (V, c) in standardised coordinates, sized by the student's feature width in on_setup.
        self.probe: nn.Linear | None = None
        self.register_buffer("feature_mean", torch.zeros(0))
        self.register_buffer("feature_std", torch.zeros(0))

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
        for name in self._STAT_BUFFERS:
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, Tensor) and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(incoming, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def on_setup(self, setup: SetupContext) -> None:
        """With ``standardize``, build the probe (V, c) with the width of the student's classifier input."""
        if self.config.standardize:
            fc = self._classifier(setup.student)
            self.probe = nn.Linear(fc.in_features, fc.out_features)

    def _standardised_probe(self) -> nn.Linear:
        if self.probe is None:
            raise RuntimeError("gacd-linear: on_setup() has not built the probe (the trainer calls it first)")
        return self.probe

    def attack_spec(self, threat: ThreatSpec) -> AttackSpec | None:
        return None

    def _classifier(self, student: nn.Module) -> nn.Linear:
        _, fc = final_linear(student, self.config.fc_module)
        if self.config.standardize and fc.bias is None:
            raise UserError(
                "gacd-linear: the student's classifier has no bias, which the standardised probe "
                "needs; set method.standardize = false"
            )
        return fc

    def _features(self, student: nn.Module, x: Tensor) -> Tensor:
        """Penultimate features with the whole student in eval mode and no graph (modes restored)."""
        with (
            module_mode(student, "eval"),
            torch.no_grad(),
            FeatureTap(student, penultimate=True, fc_module=self.config.fc_module) as tap,
        ):
            student(x)
        return tap.penultimate.detach()

    @torch.no_grad()
    def _set_statistics(self, features: Tensor, fc: nn.Linear) -> None:
        """mu, sigma from ``features``; (V, c) so that the probe starts as the current classifier."""
        std = features.std(dim=0, unbiased=False)
        live = std[std > 0]  # dead units (constant features) can be the majority after stage 1
        self.feature_mean = features.mean(dim=0)
        self.feature_std = std.clamp_min(STD_FLOOR * live.median()) if live.numel() else torch.ones_like(std)
        probe = self._standardised_probe()
        probe.weight.copy_(fc.weight * self.feature_std)
        probe.bias.copy_(fc.bias + fc.weight @ self.feature_mean)

    def on_train_start(self, run: Any) -> None:
        """Freeze the student; with ``standardize``, compute mu and sigma over the training set."""
        fc = self._classifier(run.student)
        run.student.requires_grad_(False)
        if not self.config.standardize:
            fc.requires_grad_(True)
            return
        if self.feature_mean.numel() == 0:  # not restored from a checkpoint
            chunks = [
                self._features(run.student, to_float(run.data.train_x[i : i + 512]).to(run.device))
                for i in range(0, len(run.data.train_x), 512)
            ]
            self._set_statistics(torch.cat(chunks), fc)

    def loss(self, ctx: BatchContext) -> LossOutput:
        fc = self._classifier(ctx.student)
        features = self._features(ctx.student, ctx.x)
        if self.config.standardize:
            if self.feature_mean.numel() == 0:
                self._set_statistics(features, fc)
            logits = self._standardised_probe()((features - self.feature_mean) / self.feature_std)
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
        probe = self._standardised_probe()
        weight = probe.weight / self.feature_std
        fc.weight.copy_(weight)
        fc.bias.copy_(probe.bias - weight @ self.feature_mean)
