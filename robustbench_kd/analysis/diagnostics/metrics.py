r"""Pure diagnostic formulas on tensors (no model, no I/O); every function is tested by hand.

Notation: ``probs`` is (N, C) softmax output p(x_n), ``y`` the (N,) labels.

* entropy               H(x) = -sum_i p_i log p_i   (0 log 0 = 0), natural log
* reliability bins      B equal-width confidence bins ((b-1)/B, b/B]; per bin: count n_b, mean confidence
                        conf_b = mean max_i p_i, accuracy acc_b = mean [argmax p = y]
* ECE                   sum_b (n_b / N) |acc_b - conf_b|
* agreement             mean_n [argmax a_n = argmax b_n]
* per-class accuracy    acc_c = mean_{n: y_n = c} [pred_n = y_n] (NaN for a class absent from y)
* correct-class prob    p_{y_n}(x_n); cross-entropy CE_n = -log p_{y_n}(x_n)
* difficulty (AKD eq 6) S(x) = (1/K) sum_k CE(f_k(x), y) over the K recorded epochs
* trajectory cosine     cos(p_S(x), p_T(x)) = <p_S, p_T> / (||p_S|| ||p_T||), p in [0,1]^K (0 if a norm is 0)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def entropy(probs: Tensor) -> Tensor:
    """Per-sample entropy -sum_i p_i log p_i in nats, with 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(dim=1)


def reliability_bins(probs: Tensor, y: Tensor, n_bins: int) -> dict[str, list[float]]:
    """The reliability-diagram table over ``n_bins`` equal-width confidence bins ((b-1)/B, b/B].

    Returns lists of length B: ``lower``, ``upper``, ``count``, ``confidence`` (mean max-probability) and
    ``accuracy`` (mean correctness); an empty bin has confidence and accuracy NaN.
    """
    conf, pred = probs.max(dim=1)
    correct = (pred == y).double()
    # Bin b (0-based) holds conf in (b/B, (b+1)/B]; conf >= 1/C > 0, so ceil(conf*B)-1 is in [0, B-1].
    index = (torch.ceil(conf.double() * n_bins) - 1).clamp(0, n_bins - 1).long()
    count = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf.double())
    acc_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    nan = torch.full_like(count, math.nan)
    return {
        "lower": [b / n_bins for b in range(n_bins)],
        "upper": [(b + 1) / n_bins for b in range(n_bins)],
        "count": count.tolist(),
        "confidence": torch.where(count > 0, conf_sum / count.clamp(min=1), nan).tolist(),
        "accuracy": torch.where(count > 0, acc_sum / count.clamp(min=1), nan).tolist(),
    }


def expected_calibration_error(table: dict[str, list[float]]) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| from a :func:`reliability_bins` table."""
    total = sum(table["count"])
    rows = zip(table["count"], table["accuracy"], table["confidence"], strict=False)
    return sum(n / total * abs(a - c) for n, a, c in rows if n > 0)


def agreement(logits_a: Tensor, logits_b: Tensor) -> float:
    """Share of samples on which the two models predict the same class."""
    return (logits_a.argmax(dim=1) == logits_b.argmax(dim=1)).double().mean().item()


def per_class_accuracy(pred: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """(num_classes,) float64 accuracy per true class; NaN for a class with no sample."""
    correct = (pred == y).double()
    count = torch.bincount(y, minlength=num_classes).double()
    hits = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, correct)
    return torch.where(count > 0, hits / count.clamp(min=1), torch.full_like(count, math.nan))


def worst_class(acc: Tensor) -> tuple[int, float]:
    """(class, accuracy) of the lowest per-class accuracy, ignoring NaN (absent classes); lowest index on ties."""
    present = ~torch.isnan(acc)
    if not present.any():
        raise ValueError("no class has a sample")
    masked = torch.where(present, acc, torch.full_like(acc, math.inf))
    index = int(masked.argmin())
    return index, float(acc[index])


def correct_class_prob(probs: Tensor, y: Tensor) -> Tensor:
    """p_{y_n}(x_n) for every sample."""
    return probs.gather(1, y[:, None]).squeeze(1)


def cross_entropy_from_logits(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample CE_n = -log softmax(z_n)_{y_n}."""
    return torch.nn.functional.cross_entropy(logits.double(), y, reduction="none")


def difficulty(ce_trajectory: Tensor) -> Tensor:
    """AKD eq. (6): S(x) = mean over the K recorded epochs of CE; ``ce_trajectory`` is (N, K)."""
    return ce_trajectory.double().mean(dim=1)


def trajectory_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of (N, K) trajectories; 0 where either row is all zeros."""
    a, b = a.double(), b.double()
    norm = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norm > 0, (a * b).sum(dim=1) / norm.clamp(min=1e-300), torch.zeros_like(norm))


def easy_hard_split(score: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the easier and the harder half by difficulty (ascending; the middle sample goes to easy)."""
    order = torch.argsort(score, stable=True)
    half = (len(order) + 1) // 2
    return order[:half], order[half:]
