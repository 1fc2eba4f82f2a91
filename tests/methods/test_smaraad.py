"""Numeric and protocol tests of ``smaraad`` and of the CAM alignment helpers it uses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cam_stubs import STUDENT, TEACHER, CamStub, check_distill_logs, check_resume_is_exact, mse, normalize, rho
from robustbench_kd_plugins import smaraad
from robustbench_kd_plugins.smaraad import SmaraAD
from torch import nn

from robustbench_kd.context import BatchContext
from robustbench_kd.errors import UserError
from robustbench_kd.methods.attribution import CamAlignment, alignment_loss, logits_and_cam, normalize_cam, resize_cam
from robustbench_kd.methods.losses import kl_logits_per_sample
from robustbench_kd.registry import Registry
from robustbench_kd.students import build_student
from robustbench_kd.teachers import EnsembleTeacher, Teacher, TeacherSet
from robustbench_kd.testing import batch_context, kl, softmax
from robustbench_kd.testing.runs import random_teacher_spec
from robustbench_kd.threat import ThreatSpec

THREAT = ThreatSpec(eps=8 / 255, alpha=2 / 255, steps=10)
METHOD, SEED = "smaraad", 5


# -- pure-Python reference formulas -------------------------------------------------------------


def _data(seed: int = 0, batch: int = 3, size: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 2, size, size, generator=gen)
    x_adv = (x + 0.1 * (2 * torch.rand(x.shape, generator=gen) - 1)).clamp(0, 1)
    y = torch.tensor([0, 2, 3, 1, 2, 0][:batch])
    return x, x_adv, y


def _ctx(x, x_adv, y) -> BatchContext:
    return batch_context(
        x, y, student=CamStub(**STUDENT), teachers={"robust": CamStub(**TEACHER)}, x_adv=x_adv, threat=THREAT
    )


def _guidance_by_hand(
    x, y, gamma: float, rank_on: str, cam_class: str = "label", align: float = 1.0, normalization: str = "relu_minmax"
) -> list[tuple[float, float]]:
    """Per sample (rho(S, T), L_align) on inputs x, student/teacher stubs, everything by hand."""
    s, t = CamStub(**STUDENT), CamStub(**TEACHER)
    out = []
    for b in range(x.shape[0]):
        zs, zt = s.hand_logits(x[b]), t.hand_logits(x[b])
        us, ut = (softmax(zs), softmax(zt)) if rank_on == "probs" else (zs, zt)
        r = rho(us, ut, gamma)
        if cam_class == "label":
            cs = ct = int(y[b])
        else:
            cs, ct = max(range(4), key=lambda c: zs[c]), max(range(4), key=lambda c: zt[c])
        l_align = (
            mse(normalize(t.hand_cam(x[b], ct), normalization), normalize(s.hand_cam(x[b], cs), normalization))
            if align
            else 0.0
        )
        out.append((r, l_align))
    return out


# -- CAM helpers ----------------------------------------------------------------------------------


def test_normalize_cam_by_hand() -> None:
    m = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]], [[2.0, 2.0], [2.0, 2.0]]])
    assert torch.allclose(normalize_cam(m, "relu_minmax")[0], torch.tensor([[0.0, 0.0], [1 / 3, 1.0]]))
    assert torch.allclose(normalize_cam(m, "minmax")[0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert normalize_cam(m, "none").tolist() == m.tolist()
    assert normalize_cam(m, "relu_minmax")[1].abs().max() == 0  # a constant map becomes zeros
    with pytest.raises(ValueError):
        normalize_cam(m, "softmax")


def test_bilinear_resize_by_hand() -> None:
    # 2x2 -> 4x4, align_corners=False: source coordinate (i + 0.5)/2 - 0.5, clamped, gives the 1-D
    # interpolation weights t = (0, 1/4, 3/4, 1); for m[i][j] = 2 i + j the result is 2 t_p + t_q.
    m = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    t = [0.0, 0.25, 0.75, 1.0]
    assert torch.allclose(resize_cam(m, (4, 4))[0], torch.tensor([[2 * tp + tq for tq in t] for tp in t]))
    # 4x4 -> 2x2 bilinear at half-pixel centres is a 2x2 average pooling
    big = torch.arange(16.0).view(1, 4, 4)
    assert torch.allclose(resize_cam(big, (2, 2)), F.avg_pool2d(big.unsqueeze(1), 2).squeeze(1))
    assert resize_cam(big, (4, 4)) is big


def test_alignment_loss_resize_targets_by_hand() -> None:
    teacher_cam = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    student_cam = torch.arange(16.0).view(1, 4, 4) % 5
    x = torch.zeros(1, 1, 4, 4)
    t_norm = normalize(teacher_cam[0].tolist())
    s_norm = normalize(student_cam[0].tolist())
    # "teacher": the student map is brought down to 2x2 (a 2x2 average of its normalised map)
    s_down = [[sum(s_norm[2 * i + a][2 * j + b] for a in (0, 1) for b in (0, 1)) / 4 for j in (0, 1)] for i in (0, 1)]
    got = CamAlignment(resize="teacher").loss(teacher_cam, student_cam, x)
    assert got.item() == pytest.approx(mse(t_norm, s_down), rel=1e-5)
    # "student" / "input" (both 4x4 here): the teacher map goes up with weights t = (0, 1/4, 3/4, 1)
    t = [0.0, 0.25, 0.75, 1.0]
    t_up = [
        [
            (1 - tp) * ((1 - tq) * t_norm[0][0] + tq * t_norm[0][1])
            + tp * ((1 - tq) * t_norm[1][0] + tq * t_norm[1][1])
            for tq in t
        ]
        for tp in t
    ]
    for resize in ("student", "input"):
        got = CamAlignment(resize=resize).loss(teacher_cam, student_cam, x)
        assert got.item() == pytest.approx(mse(t_up, s_norm), rel=1e-5)
    assert alignment_loss(teacher_cam, teacher_cam, size=(7, 7)).item() == 0.0


def _robustbench_wrn() -> nn.Module:
    from robustbench_kd.zoo.compat import install

    install()
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    torch.manual_seed(0)
    return WideResNet(depth=10, widen_factor=2, num_classes=10)


def test_cam_of_a_robustbench_wideresnet_matches_a_manual_computation() -> None:
    net = _robustbench_wrn().eval()
    teacher = Teacher(net)
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([3, 7])
    with torch.no_grad():
        logits, cam_map = logits_and_cam(teacher, x, y)
        # by hand: the WideResNet body up to its final BN + ReLU, then sum_k W[y, k] A_k
        a = net.relu(net.bn1(net.block3(net.block2(net.block1(net.conv1(x))))))
        manual = torch.stack([(net.fc.weight[y[n]].view(-1, 1, 1) * a[n]).sum(0) for n in range(2)])
    assert cam_map.shape == (2, 8, 8)
    assert torch.allclose(cam_map, manual, atol=1e-5)
    assert torch.allclose(logits, net(x), atol=1e-6)
    # the CAM's spatial mean plus the bias is the logit of its class
    assert torch.allclose(cam_map.mean((1, 2)) + net.fc.bias[y], logits[torch.arange(2), y], atol=1e-5)
    # own top class
    _, top = logits_and_cam(teacher, x, None)
    assert torch.allclose(
        top,
        torch.stack([(net.fc.weight[logits[n].argmax()].view(-1, 1, 1) * a[n]).sum(0) for n in range(2)]),
        atol=1e-5,
    )


def test_teacher_cam_is_input_differentiable_and_parameters_stay_frozen() -> None:
    teacher = Teacher(_robustbench_wrn())
    student = build_student("small-cnn", num_classes=10, in_channels=3, image_size=32, width=0.25).train()
    x = torch.rand(2, 3, 32, 32)
    y = torch.tensor([1, 5])
    ctx = BatchContext(x=x, y=y, student=student, teachers=TeacherSet({"robust": teacher}), threat=THREAT)
    xa = x.clone().requires_grad_(True)
    _, cam_t = CamAlignment().forward(teacher, xa, y)
    (grad,) = torch.autograd.grad(normalize_cam(cam_t).sum(), xa)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    per_sample = SmaraAD().attack_loss(ctx, xa)
    assert per_sample.shape == (2,) and torch.isfinite(per_sample).all()
    (grad,) = torch.autograd.grad(per_sample.sum(), xa)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_ensembles_are_rejected() -> None:
    x, x_adv, y = _data()
    ctx = _ctx(x, x_adv, y)
    members = [Teacher(CamStub(**TEACHER)), Teacher(CamStub(**TEACHER))]
    ctx.teachers = TeacherSet({"robust": EnsembleTeacher(members)})
    with pytest.raises(UserError, match="single robust teacher"):
        SmaraAD().attack_loss(ctx, x_adv)
    with pytest.raises(UserError, match="one teacher network"):
        logits_and_cam(ctx.teachers["robust"], x, y)


# -- the method -----------------------------------------------------------------------------------


def test_attack_spec() -> None:
    spec = SmaraAD().attack_spec(THREAT)
    assert (spec.eps, spec.alpha, spec.steps) == (THREAT.eps, THREAT.alpha, 10)
    assert spec.init == "gauss" and spec.init_std == pytest.approx(1e-3)
    assert spec.student_mode == "eval" and spec.teacher_grad


@pytest.mark.parametrize("cam_class", ["label", "top"])
def test_attack_loss_by_hand(cam_class: str) -> None:
    x, x_adv, y = _data()
    ctx = _ctx(x, x_adv, y)
    got = SmaraAD(SmaraAD.Config(cam_class=cam_class)).attack_loss(ctx, x_adv)
    s, t = CamStub(**STUDENT), CamStub(**TEACHER)
    hand = _guidance_by_hand(x_adv, y, 1000.0, "probs", cam_class)
    expected = [kl(softmax(t.hand_logits(x_adv[b])), softmax(s.hand_logits(x_adv[b]))) + hand[b][1] for b in range(3)]
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert all(h[1] > 0 for h in hand)  # the CAM term is really there
    no_cam = SmaraAD(SmaraAD.Config(attack_align_weight=0.0)).attack_loss(ctx, x_adv)
    assert no_cam.tolist() == pytest.approx([e - h[1] for e, h in zip(expected, hand, strict=True)], rel=1e-5)


def test_attack_gradient_includes_the_teacher_input_gradient() -> None:
    x, x_adv, y = _data()
    ctx = _ctx(x, x_adv, y)
    distiller = SmaraAD()
    align = distiller.alignment
    student, teacher = ctx.student.eval(), ctx.teachers["robust"]
    xa = x_adv.clone().requires_grad_(True)
    (full,) = torch.autograd.grad(distiller.attack_loss(ctx, xa).sum(), xa)

    def part(detach_student: bool) -> torch.Tensor:
        xb = x_adv.clone().requires_grad_(True)
        zs, cs = align.forward(student, xb, y)
        zt, ct = align.forward(teacher, xb, y)
        if detach_student:
            zs, cs = zs.detach(), cs.detach()
        else:
            zt, ct = zt.detach(), ct.detach()
        loss = kl_logits_per_sample(zs, zt) + align.loss(ct, cs, xb)
        return torch.autograd.grad(loss.sum(), xb)[0]

    teacher_part, student_part = part(True), part(False)
    assert teacher_part.abs().sum() > 1e-3  # the teacher participates in the search
    assert torch.allclose(full, teacher_part + student_part, atol=1e-6)


@pytest.mark.parametrize("gamma,rank_on", [(1000.0, "probs"), (5.0, "logits"), (50.0, "probs")])
def test_loss_eq9_by_hand(gamma: float, rank_on: str) -> None:
    x, x_adv, y = _data()
    ctx = _ctx(x, x_adv, y)
    out = SmaraAD(SmaraAD.Config(gamma=gamma, rank_on=rank_on)).loss(ctx)
    hand = _guidance_by_hand(x_adv, y, gamma, rank_on)
    expected = 2.0 + sum(-rho + a for rho, a in hand) / 3
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert out.terms["rho_adv"].item() == pytest.approx(sum(h[0] for h in hand) / 3, rel=1e-5, abs=1e-6)
    assert out.terms["align_adv"].item() == pytest.approx(sum(h[1] for h in hand) / 3, rel=1e-5)
    assert "rho_nat" not in out.terms


def test_loss_with_clean_terms_and_options_by_hand() -> None:
    x, x_adv, y = _data()
    cfg = SmaraAD.Config(alpha=0.25, c=3.0, gamma=20.0, cam_class="top", cam_normalization="minmax", align_weight=0.5)
    out = SmaraAD(cfg).loss(_ctx(x, x_adv, y))
    adv = _guidance_by_hand(x_adv, y, 20.0, "probs", "top", normalization="minmax")
    nat = _guidance_by_hand(x, y, 20.0, "probs", "top", normalization="minmax")
    expected = (
        3.0
        + sum(0.25 * (-ra + 0.5 * aa) + 0.75 * (-rn + 0.5 * an) for (ra, aa), (rn, an) in zip(adv, nat, strict=True))
        / 3
    )
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert out.terms["align_nat"].item() == pytest.approx(sum(a for _, a in nat) / 3, rel=1e-5)
    no_cam = SmaraAD(SmaraAD.Config(align_weight=0.0, gamma=20.0)).loss(_ctx(x, x_adv, y))
    assert "align_adv" not in no_cam.terms
    adv_label = _guidance_by_hand(x_adv, y, 20.0, "probs", align=0.0)
    assert no_cam.total.item() == pytest.approx(2.0 - sum(r for r, _ in adv_label) / 3, rel=1e-5)


def test_top1_agreement_is_logged_and_a_collapsed_epoch_warns(caplog) -> None:
    x, x_adv, y = _data()
    ctx = _ctx(x, x_adv, y)
    with torch.no_grad():
        agree = (ctx.student(x_adv).argmax(1) == ctx.teachers["robust"](x_adv).argmax(1)).float().mean()
    method = SmaraAD(num_classes=4)
    method.on_epoch_start(0, 1)
    out = method.loss(ctx)
    assert out.terms["top1_agree"].item() == pytest.approx(agree.item())
    caplog.set_level("WARNING")
    method.on_epoch_end(0, 1)
    collapsed = agree.item() < 2 / 4
    assert any("method.gamma = 100" in r.getMessage() for r in caplog.records) == collapsed
    caplog.clear()
    method._agreement = [torch.tensor(0.1), 1]  # an epoch where S and T agreed on 10% of x' (< 2 x 25%)
    method.on_epoch_end(1, 2)
    assert "slack matching has lost its gradient" in caplog.text and "only 10.0%" in caplog.text
    caplog.clear()
    method._agreement = [torch.tensor(0.9), 1]
    method.on_epoch_end(2, 3)
    assert not caplog.records


def test_student_gets_gradient_from_both_terms() -> None:
    x, x_adv, y = _data()
    ctx = _ctx(x, x_adv, y)
    out = SmaraAD(SmaraAD.Config(gamma=5.0, rank_on="logits", align_weight=0.0)).loss(ctx)
    out.total.backward()
    assert ctx.student.features.weight.grad.abs().sum() > 0  # slack matching alone
    ctx = _ctx(x, x_adv, y)
    out = SmaraAD(SmaraAD.Config(gamma=1e9)).loss(ctx)  # ranks flat: only the alignment moves the student
    out.total.backward()
    assert ctx.student.features.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ctx.teachers["robust"].parameters())


def test_clean_forward_order_and_bn_updates() -> None:
    """With alpha = 1 the student still sees the clean batch first (AdaAD order) unless switched off."""
    seen: list[torch.Tensor] = []

    class Recording(CamStub):
        def forward(self, x):
            seen.append(x)
            return super().forward(x)

    x, x_adv, y = _data()
    for flag, expected in ((True, [x, x_adv]), (False, [x_adv])):
        seen.clear()
        ctx = _ctx(x, x_adv, y)
        ctx.student = Recording(**STUDENT)
        SmaraAD(SmaraAD.Config(clean_forward_when_unused=flag)).loss(ctx)
        assert len(seen) == len(expected) and all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))


def test_registration_and_validation() -> None:
    registry = Registry("method")
    smaraad.rbkd_register_methods(registry.bound("smaraad"))
    assert registry.get("smaraad") is SmaraAD
    assert SmaraAD.teacher_roles == ("robust",) and "CVPR 2024" in SmaraAD.paper
    for bad in (
        {"alpha": 1.5},
        {"gamma": 0.0},
        {"rank_on": "ranks"},
        {"cam_class": "y"},
        {"cam_normalization": "l2"},
        {"cam_resize": "max"},
        {"align_weight": -1.0},
        {"init": "zero"},
    ):
        with pytest.raises(UserError):
            SmaraAD.config_from_mapping(bad)
    assert SmaraAD.config_from_mapping({"cam_class": "top"}).cam_class == "top"


# -- end to end on digits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory) -> str:
    return random_teacher_spec(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def test_distill_on_digits(tmp_path, host, digits_teacher) -> None:
    check_distill_logs(tmp_path / "run", host, digits_teacher, METHOD, seed=SEED, terms=("align_adv", "rho_adv"))


def test_resume_equals_uninterrupted(tmp_path, host, digits_teacher) -> None:
    check_resume_is_exact(tmp_path, host, digits_teacher, METHOD, seed=SEED, cam_class="top")
