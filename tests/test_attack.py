"""The inner maximisation: agreement with torchattacks.PGD, eps-ball/[0,1], modes, L2, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattacks

from robustbench_kd.attacks import DistillationAttack
from robustbench_kd.errors import UserError
from robustbench_kd.testing import TinyNet


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.rand(8, 1, 8, 8), torch.arange(8) % 4


def ce_loss(net, y):
    return lambda xa: F.cross_entropy(net(xa), y, reduction="none")


def test_matches_torchattacks_pgd_under_fixed_seed(batch):
    x, y = batch
    net = TinyNet(4).eval()
    torch.manual_seed(123)
    ours = DistillationAttack(net, ce_loss(net, y), eps=0.1, alpha=0.02, steps=7)(x, y)
    torch.manual_seed(123)
    theirs = torchattacks.PGD(net, eps=0.1, alpha=0.02, steps=7, random_start=True)(x, y)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("init", ["uniform", "gauss", "none"])
@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
def test_stays_in_ball_and_unit_box(batch, init, norm, eps):
    x, y = batch
    net = TinyNet(4)
    x_adv = DistillationAttack(net, ce_loss(net, y), eps=eps, alpha=eps / 4, steps=5, norm=norm, init=init)(x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(dim=1).values if norm == "Linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_attack_increases_the_loss(batch):
    x, y = batch
    net = TinyNet(4).eval()
    loss = ce_loss(net, y)
    x_adv = DistillationAttack(net, loss, eps=0.1, alpha=0.025, steps=10, init="none")(x, y)
    assert loss(x_adv).sum() > loss(x).sum()


def test_l2_step_moves_by_alpha(batch):
    """One L2 step from x moves each sample by exactly alpha (normalised gradient), if inside the ball."""
    x, y = batch
    x = x * 0.5 + 0.25  # away from the box edges
    net = TinyNet(4).eval()
    x_adv = DistillationAttack(net, ce_loss(net, y), eps=1.0, alpha=0.1, steps=1, norm="L2", init="none")(x, y)
    assert torch.allclose((x_adv - x).flatten(1).norm(dim=1), torch.full((8,), 0.1), atol=1e-5)


def test_eval_mode_restores_every_submodule_even_frozen_ones(batch):
    x, y = batch
    net = TinyNet(4).train()
    net.bn.eval()  # deliberately frozen BN inside a training model
    seen = {}

    def loss(xa):
        seen["training"] = net.training
        return F.cross_entropy(net(xa), y, reduction="none")

    DistillationAttack(net, loss, eps=0.1, alpha=0.05, steps=1)(x, y)
    assert seen["training"] is False
    assert net.training and not net.bn.training  # torchattacks would have flipped bn back to train


def test_train_mode_keeps_batch_statistics(batch):
    x, y = batch
    net = TinyNet(4).train()
    before = net.bn.running_mean.clone()
    DistillationAttack(net, ce_loss(net, y), eps=0.1, alpha=0.05, steps=2, student_mode="train")(x, y)
    assert not torch.equal(before, net.bn.running_mean)  # ARD/IAD: running stats updated per step
    assert net.training


def test_mode_restored_when_the_loss_raises(batch):
    x, y = batch
    net = TinyNet(4).train()

    def broken(xa):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        DistillationAttack(net, broken, eps=0.1, alpha=0.05, steps=1)(x, y)
    assert net.training


def test_no_gradient_reaches_parameters(batch):
    x, y = batch
    net = TinyNet(4)
    DistillationAttack(net, ce_loss(net, y), eps=0.1, alpha=0.05, steps=3)(x, y)
    assert all(p.grad is None for p in net.parameters())


def test_parameters_need_no_grad_during_the_attack_and_are_restored_after(batch):
    x, y = batch
    net = TinyNet(4)
    net.bn.requires_grad_(False)  # deliberately frozen before the attack: must stay frozen
    trainable_before = [p.requires_grad for p in net.parameters()]
    seen = []

    def loss(xa):
        seen.append([p.requires_grad for p in net.parameters()])
        return F.cross_entropy(net(xa), y, reduction="none")

    DistillationAttack(net, loss, eps=0.1, alpha=0.05, steps=2)(x, y)
    assert seen and all(not any(flags) for flags in seen)  # input gradients only inside the attack
    assert [p.requires_grad for p in net.parameters()] == trainable_before


def test_parameters_restored_when_the_loss_raises(batch):
    x, y = batch
    net = TinyNet(4)

    def broken(xa):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        DistillationAttack(net, broken, eps=0.1, alpha=0.05, steps=1)(x, y)
    assert all(p.requires_grad for p in net.parameters())


def test_step_larger_than_eps_is_rejected(batch):
    net = TinyNet(4)
    with pytest.raises(UserError, match="exceeds eps"):
        DistillationAttack(net, lambda xa: xa.sum((1, 2, 3)), eps=2 / 255, alpha=8 / 255, steps=10)
