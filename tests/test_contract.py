"""The method contract, run over every registered method (timm's test_models habit)."""

from __future__ import annotations

import pytest

from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.testing import check_distiller

METHODS = PluginHost.create(autoload=False).methods.names()


def test_every_builtin_method_is_registered():
    assert set(METHODS) >= {"standard", "pgd-at", "trades", "kd", "ard", "rslad", "akd"}


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(host, name):
    check_distiller(host.methods.get(name), host=host)


# Non-default configurations that must satisfy the contract too: (method key, [method] options, epoch).
# Each method's entries sit together; a method whose variants need a special host keeps them in its own file.
VARIANTS: list[tuple[str, dict, int]] = [
    ("iad", {}, 60),
    ("iad", {"variant": "II"}, 40),
    (
        "iad",
        {"alpha": 0.5, "weight_teacher_term": True, "detach_self_target": True, "clean_forward_when_unused": False},
        60,
    ),
    ("adaad", {"alpha": 0.5, "init": "none"}, 0),
    ("adaad", {"attack_teacher_grad": False, "clean_forward_when_unused": False}, 0),
    ("adaiad", {"alpha": 0.5, "weight_teacher_term": True}, 60),
    ("smaraad", {"alpha": 0.5, "rank_on": "logits", "cam_class": "top", "cam_resize": "student", "init": "uniform"}, 0),
    # Without the alignment terms only near-tied scores carry gradient at gamma = 1000: a smaller gamma.
    ("smaraad", {"align_weight": 0.0, "attack_align_weight": 0.0, "gamma": 10.0}, 0),
    (
        "smaraad-plus",
        {
            "alpha": 0.5,
            "rank_on": "logits",
            "self_rho_sign": 1.0,
            "entropy_source": "student_clean",
            "cam_class": "top",
            "detach_self_target": True,
        },
        0,
    ),
    ("smaraad-plus", {"begin_epoch": 1}, 0),
    (
        "gacd",
        {
            "symmetric": True,
            "sample_weights": False,
            "attack_budget": "threat",
            "attack_features": "logits",
            "nce_k": 3,
            "ot_tol": 0.0,
            "ot_iters": 20,
        },
        0,
    ),
    ("gacd", {"positive": "clean"}, 0),
    ("standard", {"label_smoothing": 0.1}, 0),
    ("pgd-at", {"fast": True}, 0),
    ("pgd-at", {"clean_weight": 0.5, "steps": 2, "init": "gauss"}, 0),
    ("trades", {"attack_student_mode": "train", "recompute_clean_target": True}, 0),
    ("kd", {"temperature": 1.0, "kd_weight": 0.5, "ce_weight": 0.5, "tau_squared": False}, 0),
    ("ard", {"alpha": 0.5}, 0),
    ("ard", {"clean_forward_when_unused": False}, 0),
    ("ard", {"divergence": "ikl"}, 0),
    ("ard", {"divergence": "ikl", "ikl_class_prior": False, "alpha": 0.5}, 0),
    ("rslad", {"label_mix_alpha": 0.0, "mix_in_attack": True}, 0),
    ("rslad", {"divergence": "ikl"}, 0),
    ("rslad", {"divergence": "ikl", "ikl_class_prior": False, "label_mix_alpha": 0.5}, 0),
    ("akd", {"alpha": 0.0}, 0),
    (
        "mtard",
        {
            "teacher_log_eps": 0.0,
            "kl_reduction": "batchmean",
            "adaptive_weights": False,
            "attack_student_mode": "train",
        },
        0,
    ),
    ("ikl-at", {}, 1),
    (
        "ikl-at",
        {"class_prior": False, "attack_mse_weight": 1.0, "attack_budget": "intended", "learner_mse_grad": False},
        0,
    ),
    ("ikl-at", {"attack_budget": "threat", "eps_schedule": "constant"}, 0),
]


@pytest.mark.parametrize(
    ("name", "options", "epoch"), VARIANTS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(VARIANTS)]
)
def test_method_contract_variant(host, name, options, epoch):
    cls = host.methods.get(name)
    check_distiller(cls, host=host, config=cls.config_from_mapping(options), epoch=epoch)


@pytest.mark.parametrize("name", METHODS)
def test_method_declares_roles_it_uses(host, name):
    """A method must not read a teacher role it did not declare."""
    from robustbench_kd.errors import UserError
    from robustbench_kd.teachers import TeacherSet
    from robustbench_kd.testing.contract import contract_batch

    cls = host.methods.get(name)
    distiller, ctx = contract_batch(cls)
    declared = set(cls.teacher_roles) | set(cls.optional_teacher_roles)
    ctx.teachers = TeacherSet({r: t for r, t in ctx.teachers.items() if r in declared})
    distiller.prepare(ctx)
    spec = distiller.attack_spec(ctx.threat)
    if spec is not None:
        ctx.x_adv = ctx.x.clone()
    try:
        distiller.loss(ctx)
    except UserError as exc:  # pragma: no cover - the failure message names the role
        pytest.fail(f"{name} used an undeclared teacher role: {exc}")
