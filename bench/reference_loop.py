"""Reference training loops written the way the methods' official scripts are written.

What makes them "reference style" (and not minimal): per batch the teacher runs on the clean x
(RSLAD, ARD), the attack is a fresh PGD from a new random start inside a helper that switches the
student's mode, every forward the loss needs is a separate call (ARD's wrapper also runs the clean
student pass it does not use at alpha = 1), and ``loss.item()`` is read every step for the progress
line, a host sync per batch. The losses are the library's defaults for each method:

* rslad: KL(p_T(x) || p_S(x')) and KL(p_T(x) || p_S(x)), elementwise KLDivLoss averaged over all
  entries, 5/6 and 1/6; attack: 1e-3 Gaussian start, K steps of summed KL, student in eval mode.
* ard: tau^2 KL(p_T(x)/tau || p_S(x')/tau) averaged over all entries, tau = 30, alpha = 1; attack:
  uniform start, K steps of CE, student in train mode.
* akd: -sum_c q_c log p_S(x')_c with q = 0.75 p_T(x') + 0.25 onehot(y); attack: uniform start, 7 CE
  steps, student in eval mode; the teacher runs on x' (after the attack).
* pgd-at: CE(student(x'), y); attack: uniform start, K CE steps, eval mode.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REFERENCE_METHODS = ("pgd-at", "rslad", "ard", "akd")


def pgd(
    student: nn.Module, x: Tensor, loss_fn, *, eps: float, alpha: float, steps: int, start: str, train_mode: bool
) -> Tensor:
    """A fresh L_inf PGD run: x' <- clip_{x,eps}(x' + alpha sign(grad loss_fn(student(x'))))."""
    student.train(train_mode)
    if start == "gauss":
        x_adv = x.detach() + 0.001 * torch.randn_like(x)
    else:
        x_adv = (x.detach() + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = loss_fn(student(x_adv))
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    student.train()
    return x_adv.detach()


def reference_step(
    method: str,
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    eps: float,
    alpha: float,
    steps: int,
) -> float:
    """One training step of ``method``; returns ``loss.item()`` as the official scripts print it."""
    student.train()
    optimizer.zero_grad()
    if method == "rslad":
        with torch.no_grad():
            teacher_logits = teacher(x)
        kl_sum = nn.KLDivLoss(reduction="sum")
        x_adv = pgd(
            student,
            x,
            lambda out: kl_sum(F.log_softmax(out, dim=1), F.softmax(teacher_logits, dim=1)),
            eps=eps,
            alpha=alpha,
            steps=steps,
            start="gauss",
            train_mode=False,
        )
        adv_logits = student(x_adv)
        nat_logits = student(x)
        kl = nn.KLDivLoss(reduction="none")
        loss1 = kl(F.log_softmax(adv_logits, dim=1), F.softmax(teacher_logits.detach(), dim=1)).mean()
        loss2 = kl(F.log_softmax(nat_logits, dim=1), F.softmax(teacher_logits.detach(), dim=1)).mean()
        loss = 5 / 6.0 * loss1 + 1 / 6.0 * loss2
    elif method == "ard":
        tau, a = 30.0, 1.0
        x_adv = pgd(
            student,
            x,
            lambda out: F.cross_entropy(out, y),
            eps=eps,
            alpha=alpha,
            steps=steps,
            start="uniform",
            train_mode=True,
        )
        outputs = student(x)  # the reference wrapper returns the clean logits as well
        per_outputs = student(x_adv)
        teacher_outputs = teacher(x)
        kl = nn.KLDivLoss(reduction="none")
        loss = kl(F.log_softmax(per_outputs / tau, dim=1), F.softmax(teacher_outputs / tau, dim=1)).mean() * (
            a * tau * tau
        ) + (1.0 - a) * F.cross_entropy(outputs, y)
    elif method == "akd":
        x_adv = pgd(
            student,
            x,
            lambda out: F.cross_entropy(out, y),
            eps=eps,
            alpha=alpha,
            steps=7,
            start="uniform",
            train_mode=False,
        )
        with torch.no_grad():
            p_t = F.softmax(teacher(x_adv), dim=1)
        q = 0.75 * p_t + 0.25 * F.one_hot(y, p_t.shape[1]).float()
        loss = torch.sum(-q * F.log_softmax(student(x_adv), dim=1), dim=1).mean()
    elif method == "pgd-at":
        x_adv = pgd(
            student,
            x,
            lambda out: F.cross_entropy(out, y),
            eps=eps,
            alpha=alpha,
            steps=steps,
            start="uniform",
            train_mode=False,
        )
        loss = F.cross_entropy(student(x_adv), y)
    else:
        raise ValueError(f"no reference loop for {method!r}; choose from {', '.join(REFERENCE_METHODS)}")
    loss.backward()
    optimizer.step()
    return loss.item()


def reference_epoch(
    method: str,
    student: nn.Module,
    teacher: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    eps: float,
    alpha: float,
    steps: int,
    lr: float,
    device: torch.device,
) -> float:
    """One epoch of :func:`reference_steps`; returns wall seconds."""
    start = time.perf_counter()
    for _ in reference_steps(
        method,
        student,
        teacher,
        images,
        labels,
        batch_size=batch_size,
        eps=eps,
        alpha=alpha,
        steps=steps,
        lr=lr,
        device=device,
    ):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def reference_steps(
    method: str,
    student: nn.Module,
    teacher: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    eps: float,
    alpha: float,
    steps: int,
    lr: float,
    device: torch.device,
) -> Iterator[None]:
    """:func:`reference_step` over shuffled ``images``, yielding after each batch."""
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(2))
    train_loss = 0.0
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        x = images[idx].float().to(device)
        y = labels[idx].to(device)
        train_loss += reference_step(method, student, teacher, x, y, optimizer, eps=eps, alpha=alpha, steps=steps)
        yield
