"""A CAM-able stub network, float64 reference maths and a digits run shared by the SmaraAD and SmaraAD++ tests.

:class:`CamStub` maps x (B, 2, H, W) through a 1x1 convolution with matrix M (K x 2), a global mean and a
``Linear(W, bias)``. With U = W M (C x 2), by hand: logits = U mean_hw(x) + bias and CAM_c = sum_ch U[c, ch] x[ch].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from robustbench_kd.config import RunConfig, config_from_mapping
from robustbench_kd.testing.runs import tiny_digits_raw

__all__ = [
    "STUDENT",
    "TEACHER",
    "CamStub",
    "check_distill_logs",
    "check_resume_is_exact",
    "digits_run",
    "mse",
    "normalize",
    "rho",
]

STUDENT = {
    "mix": [[1.0, -0.5], [0.3, 0.8], [-0.7, 0.2]],
    "weight": [[0.5, -1.0, 0.3], [1.2, 0.4, -0.6], [-0.3, 0.9, 1.1], [0.7, 0.2, -0.8]],
    "bias": [0.1, -0.2, 0.0, 0.3],
}
TEACHER = {
    "mix": [[0.6, 0.9], [-1.0, 0.4]],
    "weight": [[1.5, -0.2], [-0.4, 1.1], [0.8, 0.6], [0.2, -0.9]],
    "bias": [0.0, 0.5, -0.3, 0.2],
}


class CamStub(nn.Module):
    """x (B, 2, H, W) -> 1x1 conv (matrix M) -> global mean -> Linear; U = W M gives logits and CAMs by hand."""

    def __init__(self, mix: list[list[float]], weight: list[list[float]], bias: list[float]) -> None:
        super().__init__()
        k = len(mix)
        self.features = nn.Conv2d(2, k, 1, bias=False)
        self.fc = nn.Linear(k, len(bias))
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor(mix).view(k, 2, 1, 1))
            self.fc.weight.copy_(torch.tensor(weight))
            self.fc.bias.copy_(torch.tensor(bias))
        self.u = [[sum(weight[c][j] * mix[j][ch] for j in range(k)) for ch in range(2)] for c in range(len(bias))]
        self.b = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))

    def hand_logits(self, x: torch.Tensor) -> list[float]:
        means = [x[ch].double().mean().item() for ch in range(2)]
        return [self.u[c][0] * means[0] + self.u[c][1] * means[1] + self.b[c] for c in range(len(self.b))]

    def hand_cam(self, x: torch.Tensor, c: int) -> list[list[float]]:
        return (self.u[c][0] * x[0].double() + self.u[c][1] * x[1].double()).tolist()


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def rho(u: list[float], v: list[float], gamma: float) -> float:
    """Soft Spearman correlation: soft ranks r_i = sum_j sigmoid(gamma (u_j - u_i)), 1 - 6 sum d^2 / (n (n^2 - 1))."""
    ru = [sum(_sigmoid(gamma * (uj - ui)) for uj in u) for ui in u]
    rv = [sum(_sigmoid(gamma * (vj - vi)) for vj in v) for vi in v]
    n = len(u)
    return 1.0 - 6.0 * sum((a - b) ** 2 for a, b in zip(ru, rv, strict=True)) / (n * (n * n - 1))


def normalize(m: list[list[float]], mode: str = "relu_minmax") -> list[list[float]]:
    """A CAM's per-image normalisation: optional ReLU, then (m - min) / (max - min + 1e-7); ``none`` as is."""
    if mode == "none":
        return m
    if mode == "relu_minmax":
        m = [[max(v, 0.0) for v in row] for row in m]
    flat = [v for row in m for v in row]
    lo, hi = min(flat), max(flat)
    return [[(v - lo) / (hi - lo + 1e-7) for v in row] for row in m]


def mse(a: list[list[float]], b: list[list[float]]) -> float:
    """Mean squared difference of two maps."""
    flat = [(x - y) ** 2 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(flat) / len(flat)


def digits_run(out_dir, teacher: str, name: str, *, seed: int, **options) -> RunConfig:
    """A 2-epoch digits run of method ``name`` (with ``options``) from the ``file:`` teacher spec ``teacher``."""
    return config_from_mapping(
        tiny_digits_raw(
            out_dir,
            merge={"run": {"seed": seed}},
            teachers={"robust": teacher},
            method={"name": name, **options},
            eval={"attacks": ["clean", "pgd"], "final_n_examples": 32, "pgd_steps": 2, "teachers": False},
        )
    )


def check_distill_logs(out_dir, host, teacher: str, name: str, *, seed: int, terms: tuple[str, ...]) -> None:
    """A whole ``distill`` of the digits run: final accuracies in [0, 1] and ``terms`` logged every epoch."""
    from robustbench_kd.jobs.pipeline import distill

    reports = distill(digits_run(out_dir, teacher, name, seed=seed), host=host)
    assert reports and all(0.0 <= acc <= 1.0 for acc in reports[0].accuracy.values())
    rows = [line for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert len(rows) == 2 and all(f'"{term}"' in row for row in rows for term in terms)


def check_resume_is_exact(tmp_path, host, teacher: str, name: str, *, seed: int, **options) -> Any:
    """Train 2 epochs straight and 1 + 1 with a resume: same student, agreement tally and losses; returns the
    uninterrupted run."""
    from robustbench_kd.training.loop import train

    full = train(digits_run(tmp_path / "full", teacher, name, seed=seed, **options), host=host)
    cfg = digits_run(tmp_path / "split", teacher, name, seed=seed, **options)
    train(cfg, host=host, stop_after=1)
    resumed = train(cfg, host=host, resume=True)
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    got, want = resumed.distiller.method_state(), full.distiller.method_state()
    assert set(got) == set(want) == {"agreement"}  # the epoch's top-1 agreement tally (step checkpoints)
    assert torch.equal(got["agreement"][0], want["agreement"][0]) and got["agreement"][1] == want["agreement"][1]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    return full
