"""End-of-run analyses of a teacher and a student, as pure functions of tensors and models.

* :func:`logit_correlation`: the class x class Pearson correlation of logits over a sample set, and
  :func:`correlation_difference`: teacher minus student and its Frobenius norm (GACD, Figs. 3-4);
* :func:`pca_embedding`: a 2-D PCA embedding of features (natural and adversarial examples together);
* :func:`accuracy_vs_eps`: PGD accuracy at several radii (robustbench_kd.evaluation.pgd);
* :func:`normalized_cams`: class activation maps at input resolution in [0, 1] (SmaraAD, Eq. 6);
* :func:`logits_and_features`: logits and penultimate features of a model in batches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robustbench_kd.evaluation.attacks import pgd
from robustbench_kd.methods.attribution import logits_and_cam, normalize_cam, resize_cam
from robustbench_kd.methods.features import FeatureTap

__all__ = [
    "accuracy_vs_eps",
    "correlation_difference",
    "logit_correlation",
    "logits_and_features",
    "normalized_cams",
    "pca_embedding",
]


def logit_correlation(logits: Tensor) -> Tensor:
    """Pearson correlation between the columns (classes) of ``logits`` (N, C) over the N samples: (C, C).

    A class whose logit is constant over the samples has no defined correlation; its row and column
    are 0 (1 on the diagonal).
    """
    if logits.dim() != 2 or logits.shape[0] < 2:
        raise ValueError(f"logits must be (N, C) with N >= 2, got shape {tuple(logits.shape)}")
    z = logits.double()
    z = z - z.mean(dim=0, keepdim=True)
    norm = z.pow(2).sum(dim=0).sqrt()
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    z = z / safe
    corr = z.T @ z
    corr.fill_diagonal_(1.0)
    return corr


def correlation_difference(teacher_logits: Tensor, student_logits: Tensor) -> tuple[Tensor, float]:
    """``(corr(T) - corr(S), ||corr(T) - corr(S)||_F)`` over the same samples."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher and student logits differ in shape: {tuple(teacher_logits.shape)} vs "
            f"{tuple(student_logits.shape)}"
        )
    diff = logit_correlation(teacher_logits) - logit_correlation(student_logits)
    return diff, float(torch.linalg.matrix_norm(diff, ord="fro"))


def pca_embedding(features: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    """Project ``features`` (N, D) onto their top-``k`` principal components: ``(coords (N, k), explained ratio (k,))``.

    Centred SVD; each component's sign is fixed so that its largest-magnitude loading is positive, so
    the picture does not flip between runs. Fewer than ``k`` dimensions are zero-padded.
    """
    x = features.double().flatten(1)
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    signs = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    vh = vh * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(1)
    coords = x @ vh[:k].T
    total = s.pow(2).sum()
    ratio = s[:k].pow(2) / total if total > 0 else torch.zeros_like(s[:k])
    if coords.shape[1] < k:
        pad = k - coords.shape[1]
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], pad)], dim=1)
        ratio = torch.cat([ratio, ratio.new_zeros(pad)])
    return coords.float(), ratio.float()


@torch.no_grad()
def logits_and_features(model: nn.Module, x: Tensor, *, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Logits (N, C) and penultimate features (N, D) of ``model`` on ``x``, on the CPU."""
    device = next(model.parameters()).device
    logits, feats = [], []
    with FeatureTap(model, penultimate=True) as tap:
        for start in range(0, len(x), batch_size):
            logits.append(model(x[start : start + batch_size].to(device)).float().cpu())
            feats.append(tap.penultimate.float().flatten(1).cpu())
    return torch.cat(logits), torch.cat(feats)


def adversarial(
    model: nn.Module, x: Tensor, y: Tensor, *, eps: float, norm: str, steps: int, batch_size: int = 256
) -> Tensor:
    """PGD-``steps`` adversarial examples against ``model`` (step 2.5 eps / steps), on the CPU."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
        out.append(pgd(model, xb, yb, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm).cpu())
    return torch.cat(out)


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    device = next(model.parameters()).device
    correct = sum(
        int((model(x[s : s + batch_size].to(device)).argmax(1).cpu() == y[s : s + batch_size]).sum())
        for s in range(0, len(x), batch_size)
    )
    return correct / len(y)


def accuracy_vs_eps(
    model: nn.Module, x: Tensor, y: Tensor, eps_values: list[float], *, norm: str, steps: int
) -> list[float]:
    """Accuracy of ``model`` under PGD-``steps`` (step 2.5 eps / steps) at each radius; eps 0 is clean."""
    return [
        _accuracy(model, x, y)
        if eps == 0
        else _accuracy(model, adversarial(model, x, y, eps=eps, norm=norm, steps=steps), y)
        for eps in eps_values
    ]


@torch.no_grad()
def normalized_cams(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """CAMs of ``model`` on ``x`` for ``classes``: ReLU + per-image min-max, resized to the input; (N, H, W) on CPU."""
    device = next(model.parameters()).device
    _, raw = logits_and_cam(model, x.to(device), classes.to(device))
    return resize_cam(normalize_cam(raw.float(), "relu_minmax"), (x.shape[-2], x.shape[-1])).cpu()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, *, batch_size: int = 256) -> Tensor:
    """Logits (N, C) of ``model`` on ``x``, on the CPU (any model, ensembles included)."""
    device = next(model.parameters()).device
    return torch.cat([model(x[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(x), batch_size)])
