"""The [speed] switches: autocast (bf16/fp16 + GradScaler), fp32 attack, channels_last, torch.compile.

Numerics on a tiny model through the methods' own ``loss`` (the contract batch), then short digits runs
through ``train()`` with each switch: they run, keep checkpoints plain and resume exactly.
"""

from __future__ import annotations

import pytest
import torch

from robustbench_kd.config import config_from_mapping
from robustbench_kd.errors import UserError
from robustbench_kd.scale.precision import SpeedPlan, check_autocast
from robustbench_kd.scale.sections import SpeedSection
from robustbench_kd.storage.checkpoint import load_checkpoint
from robustbench_kd.students import build_student
from robustbench_kd.teachers import TeacherSet
from robustbench_kd.testing.contract import contract_batch
from robustbench_kd.testing.runs import random_teacher_spec, tiny_digits_raw
from robustbench_kd.training.loop import train, train_one_epoch
from robustbench_kd.training.setup import setup_run

CPU = torch.device("cpu")


# -- one loss on a tiny model ----------------------------------------------------------------------
def method_loss(host, name, **speed):
    """(loss, flat student gradient, logits dtype) of one outer step of ``name`` under ``[speed]``.

    x' is a fixed perturbation (no attack), so every variant sees the same inputs.
    """
    distiller, ctx = contract_batch(host.methods.get(name), batch=8)
    plain = ctx.student
    gen = torch.Generator().manual_seed(5)
    x_adv = (ctx.x + 0.1 * (2 * torch.rand(ctx.x.shape, generator=gen) - 1)).clamp(0, 1)
    plan = SpeedPlan(SpeedSection(**speed), CPU, plain, ctx.teachers)
    ctx.student, ctx.x, ctx.x_adv = plan.student, plan.inputs(ctx.x), plan.inputs(x_adv)
    distiller.prepare(ctx)
    ctx.student.train()
    with plan.autocast():
        out = distiller.loss(ctx)
        logits_dtype = ctx.student(ctx.x).dtype
    out.total.backward()
    grad = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in plain.parameters()])
    return out.total.detach(), grad, logits_dtype


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ["rslad", "trades", "ard"])
def test_bf16_changes_the_loss_only_within_bf16_precision(host, name):
    loss32, grad32, _ = method_loss(host, name)
    loss16, grad16, dtype = method_loss(host, name, amp="bf16")
    # bf16 keeps 8 significant bits (relative step 2**-8 = 0.4%): a few steps of error through the net.
    assert abs(float(loss16 - loss32)) <= 5 * 2**-8 * abs(float(loss32))
    assert relative(grad16, grad32) < 0.1
    assert loss16 != loss32  # autocast really ran in bf16
    assert dtype == torch.float32  # logits leave the network in fp32: the method's KL runs in fp32


@pytest.mark.parametrize("name", ["rslad", "trades"])
def test_fp16_autocast_works_on_this_cpu(host, name):
    loss32, grad32, _ = method_loss(host, name)
    loss16, grad16, _ = method_loss(host, name, amp="fp16")
    assert abs(float(loss16 - loss32)) <= 5 * 2**-11 * abs(float(loss32))  # fp16: 11 significant bits
    assert relative(grad16, grad32) < 0.05


def test_amp_dtype_this_torch_cannot_autocast_to_is_a_one_line_error():
    # CPU autocast does not lower to float64: the same check refuses fp16 on a torch without CPU fp16.
    with pytest.raises(UserError, match=r"is not supported on cpu|does not autocast") as info:
        check_autocast("cpu", torch.float64, "fp16")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["rslad", "trades"])
def test_channels_last_gives_the_same_loss(host, name):
    loss, grad, _ = method_loss(host, name)
    loss_cl, grad_cl, _ = method_loss(host, name, channels_last=True)
    assert torch.allclose(loss_cl, loss, rtol=1e-5, atol=1e-6)
    assert relative(grad_cl, grad) < 1e-4


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("target", ["student", "both"])
def test_compile_gives_the_same_loss_and_gradients(host, backend, target):
    loss, grad, _ = method_loss(host, "rslad")
    loss_c, grad_c, _ = method_loss(host, "rslad", compile=target, compile_backend=backend)
    assert torch.allclose(loss_c, loss, rtol=1e-6, atol=1e-7)
    assert torch.allclose(grad_c, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["gacd", "smaraad"])
def test_feature_tap_methods_work_under_compile(host, name):
    """FeatureTap hooks the module behind a compiled view (its own hooks would not run)."""
    loss, grad, _ = method_loss(host, name)
    loss_c, grad_c, _ = method_loss(host, name, compile="both", compile_backend="eager")
    assert torch.allclose(loss_c, loss, rtol=1e-6, atol=1e-7)
    assert torch.allclose(grad_c, grad, rtol=1e-5, atol=1e-7)


def test_bad_speed_values_are_one_line_errors():
    with pytest.raises(UserError, match=r"speed.amp must be one of off, bf16, fp16, got 'fp8'"):
        config_from_mapping({"speed": {"amp": "fp8"}})
    with pytest.raises(UserError, match=r"speed.compile must be one of off, student, teachers, both"):
        config_from_mapping({"speed": {"compile": "yes"}})
    with pytest.raises(UserError, match=r"unknown key speed.channel_last"):
        config_from_mapping({"speed": {"channel_last": True}})
    with pytest.raises(UserError, match=r"speed.compile_backend 'nope' is not a torch.compile backend; valid: .*eager"):
        SpeedPlan(SpeedSection(compile="student", compile_backend="nope"), CPU, torch.nn.Linear(2, 2), TeacherSet())


# -- short runs on digits --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    return random_teacher_spec(tmp_path_factory.mktemp("teacher") / "teacher.pt", width=1.0)


def digits_config(out_dir, teacher, speed, epochs=3, **sections):
    merge = {
        "data": {"n_train": 300},
        "teachers": {"robust": teacher},
        "method": {"name": "rslad"},
        "optim": {"epochs": epochs, "schedule": "multistep", "milestones": [2]},
        "speed": speed,
    }
    return config_from_mapping(tiny_digits_raw(out_dir, merge=merge, **sections))


SWITCHES = {
    "bf16": {"amp": "bf16"},
    "bf16-attack-in-bf16": {"amp": "bf16", "attack_fp32": False},
    "fp16": {"amp": "fp16"},
    "channels_last": {"channels_last": True},
    "compile-eager": {"compile": "both", "compile_backend": "eager"},
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_train_with_each_switch_runs_and_resumes_exactly(tmp_path, host, digits_teacher, switch):
    """Stop after epoch 1, resume, finish: bitwise the uninterrupted run (CPU, run.deterministic)."""
    speed = SWITCHES[switch]
    full = train(digits_config(tmp_path / "full", digits_teacher, speed), host=host)
    cfg = digits_config(tmp_path / "split", digits_teacher, speed)
    train(cfg, host=host, stop_after=1)
    resumed = train(cfg, host=host, resume=True)
    for key, value in full.student.state_dict().items():
        assert torch.equal(value, resumed.student.state_dict()[key]), key
    for _role, teacher in resumed.teachers.items():  # teachers stay frozen and in eval mode
        assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    saved = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert not any("_orig_mod" in k for k in saved["student"])  # plain state dict, compiled or not
    assert set(saved["student"]) == set(
        build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=0.5).state_dict()
    )
    if speed.get("amp") == "fp16":
        assert saved["scaler"]["scale"] > 0
        assert resumed.speed.scaler.state_dict() == full.speed.scaler.state_dict()
    else:
        assert saved["scaler"] is None


def test_compiled_run_exports_and_evaluates_the_plain_student(tmp_path, host, digits_teacher):
    from robustbench_kd.jobs.pipeline import distill

    cfg = digits_config(
        tmp_path / "r",
        digits_teacher,
        {"compile": "student", "compile_backend": "eager"},
        epochs=1,
        eval={"attacks": ["clean"], "final_n_examples": 16, "teachers": False, "sanity": False},
    )
    reports = distill(cfg, host=host)
    zoo = torch.load(reports[0].checkpoint_path, weights_only=True)["state_dict"]
    assert zoo and not any("_orig_mod" in k for k in zoo)


@pytest.mark.parametrize("attack_fp32", [True, False])
def test_attack_fp32_runs_the_inner_maximisation_in_fp32(tmp_path, host, digits_teacher, attack_fp32):
    """Inside the attack loss the student's computation is fp32 (autocast off) unless attack_fp32 = false."""
    cfg = digits_config(tmp_path / "r", digits_teacher, {"amp": "bf16", "attack_fp32": attack_fp32}, epochs=1)
    run = setup_run(cfg, host)
    seen = {"attack": set(), "loss": set(), "outer_autocast": set()}

    def conv_dtype(module, args, output):
        phase = "attack" if getattr(run, "_in_attack", False) else "loss"
        seen[phase].add(output.dtype)

    first_conv = next(m for m in run.student.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(conv_dtype)
    attack_loss, loss = run.distiller.attack_loss, run.distiller.loss

    def spy_attack_loss(ctx, x_adv):
        run._in_attack = True
        try:
            return attack_loss(ctx, x_adv)
        finally:
            run._in_attack = False

    run.distiller.attack_loss = spy_attack_loss

    def spy_loss(ctx):
        seen["outer_autocast"].add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return loss(ctx)

    run.distiller.loss = spy_loss
    train_one_epoch(run, 0)
    assert seen["attack"] == ({torch.float32} if attack_fp32 else {torch.bfloat16})
    # The outer step always autocasts.
    assert seen["loss"] == {torch.bfloat16} and seen["outer_autocast"] == {torch.bfloat16}


def test_amp_does_not_change_a_run_with_everything_off(tmp_path, host, digits_teacher):
    """The defaults are off, and an explicit all-off [speed] equals no [speed] bitwise."""
    assert SpeedSection() == SpeedSection(
        amp="off", attack_fp32=True, channels_last=False, compile="off", compile_backend="inductor"
    )
    a = train(digits_config(tmp_path / "a", digits_teacher, {}, epochs=1), host=host)
    b = train(digits_config(tmp_path / "b", digits_teacher, {"amp": "off", "compile": "off"}, epochs=1), host=host)
    assert all(torch.equal(v, b.student.state_dict()[k]) for k, v in a.student.state_dict().items())
