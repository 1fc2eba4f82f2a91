"""Ready or preview: the requirements of a leaderboard entry, the issue text, and `check-submission` agreeing."""

from __future__ import annotations

import dataclasses
import json

import pytest

from robustbench_kd.submission.issue import PRIVATE_SUBMISSION_EMAIL, format_new_model_issue
from robustbench_kd.submission.readiness import EvaluationRecord, unmet_requirements
from robustbench_kd.submission.zoo_entry import ZooConstructor
from robustbench_kd.testing.fixtures import CARMON2019_MODEL_INFO

READY = EvaluationRecord(
    dataset="cifar10", threat_model="Linf", eps="8/255", n_examples=10000, sanity_ran=True, sanity_passed=True
)


def test_a_complete_full_test_set_evaluation_is_ready():
    assert unmet_requirements(CARMON2019_MODEL_INFO, READY) == []


@pytest.mark.parametrize(
    ("change", "info_change", "expected"),
    [
        ({"dataset": "digits"}, {}, "RobustBench has no digits/Linf leaderboard"),
        ({"dataset": "cifar100", "threat_model": "L2", "eps": "0.5"}, {}, "no cifar100/L2 leaderboard"),
        ({"dataset": "imagenet", "threat_model": "L2", "eps": "3"}, {}, "no imagenet/L2 leaderboard"),
        ({"eps": "4/255"}, {}, "the cifar10/Linf leaderboard uses eps 8/255; this evaluation used 4/255"),
        ({"n_examples": 150}, {}, "evaluated on 150 test points; the leaderboard uses all 10,000"),
        ({"dataset": "imagenet", "eps": "4/255", "n_examples": 1000}, {}, "the leaderboard uses all 5,000"),
        ({}, {"link": None, "venue": ""}, "model_info fields null or empty: venue, link"),
        ({"sanity_ran": False}, {}, "the evaluation sanity suite did not run"),
        ({"sanity_passed": False}, {}, "the sanity suite found problems that the entry does not record"),
        ({"standalone_entry": False, "entry_note": "it imports this project"}, {}, "cannot be loaded without"),
        ({"autoattack_version": "plus"}, {}, "the leaderboard ranks 'standard'"),
    ],
)
def test_each_unmet_requirement_makes_a_preview(change, info_change, expected):
    record = dataclasses.replace(READY, **change)
    unmet = unmet_requirements({**CARMON2019_MODEL_INFO, **info_change}, record)
    assert len(unmet) == 1 and expected in unmet[0], unmet
    assert all("\n" not in line for line in unmet)


def test_failed_sanity_recorded_in_the_entry_is_acceptable():
    info = {**CARMON2019_MODEL_INFO, "unreliable": True, "footnote": "The evaluation may be affected by masking."}
    assert unmet_requirements(info, dataclasses.replace(READY, sanity_passed=False)) == []


def _issue(unmet=(), in_robustbench=False, architecture_file=None) -> str:
    constructor = ZooConstructor(
        expression="Net()", imports=(), architecture="Net", in_robustbench=in_robustbench, placeholder=False, note=""
    )
    return format_new_model_issue(
        CARMON2019_MODEL_INFO,
        model_id="Me2026Robust",
        threat_model="Linf",
        n_examples=10000,
        seed=0,
        autoattack_version="pyautoattack 0.2",
        batch_size=500,
        sha256="ab" * 32,
        constructor=constructor,
        unmet=list(unmet),
        architecture_file=architecture_file,
    )


def test_issue_text_follows_the_current_template_field_for_field():
    text = _issue(in_robustbench=True)
    lines = text.splitlines()
    order = [
        "# Paper Information",
        "- **Paper Title**: Unlabeled Data Improves Adversarial Robustness",
        "- **Paper URL**: https://arxiv.org/abs/1905.13736",
        "- **Paper authors**: Yair Carmon",
        "# Leaderboard Claim(s)",
        "- **Architecture**: WideResNet-28-10",
        "- **Threat Model**: Linf",
        "- **Dataset**: CIFAR-10",
        "- **eps**: 8/255",
        "- **Clean accuracy**: 89.69%",
        "- **Robust accuracy**: 59.53%",
        "- **Additional data**: true",
        "- **Evaluation method**: AutoAttack, version standard",
        "- **Checkpoint and code**:",
        "# Model Zoo:",
        "- [ ] I want to add my models to the Model Zoo (check if true)",
        "- [x] I use an architecture that is included among",
        "- [ ] I agree to release my model(s) under MIT license (check if true) **OR** under a custom license",
    ]
    positions = [next(i for i, line in enumerate(lines) if line.startswith(prefix)) for prefix in order]
    assert positions == sorted(positions)
    method = next(line for line in lines if line.startswith("- **Evaluation method**"))
    assert "the full CIFAR-10 test set (10,000 points" in method and "`autoattack.log`" in method
    assert PRIVATE_SUBMISSION_EMAIL in text and "private submission" in text
    assert "Preview" not in text


def test_issue_ticks_no_box_the_bundle_does_not_make_true():
    text = _issue(in_robustbench=False, architecture_file="architectures/small_cnn.py")
    assert "- [x]" not in text
    assert "`architectures/small_cnn.py` in the submission bundle" in text


def test_a_preview_issue_opens_with_its_unmet_requirements():
    text = _issue(unmet=["RobustBench has no digits/Linf leaderboard"])
    lines = text.splitlines()
    start = lines.index("> **Preview: not ready to submit.** This text shows the format; the bundle does not meet:")
    assert lines[start + 1] == "> - RobustBench has no digits/Linf leaderboard"
    assert start < lines.index("# Paper Information")


# -- bundles written, then checked as a maintainer would -------------------------------------------------------
STANDARD_LOG = (
    "using standard version including apgd-ce, apgd-t, fab-t, square.\n"
    "initial accuracy: 90.00%\nrobust accuracy after APGD-CE: 60.00% (total time 1.0 s)\n"
    "robust accuracy: {robust}%\n"
)


def _bundle(tmp_path, *, dataset="cifar10", threat_model="Linf", eps=8 / 255, n_examples=10000, sanity=True, **meta):
    """A bundle from a written entry and checkpoint (no attack run): the writer's verdict and the checker's."""
    from robustbench_kd.evaluation.export import save_zoo_checkpoint
    from robustbench_kd.evaluation.model_info import build_model_info, write_model_info
    from robustbench_kd.students import build_student
    from robustbench_kd.submission.bundle import write_submission_bundle

    model_id = "Me2026Bundle"
    metadata = {
        "name": "A Paper",
        "authors": "A. Author",
        "venue": "arXiv, Jan 2026",
        "link": "https://arxiv.org/abs/0000.00000",
        "architecture": "SmallCNN",
        **meta,
    }
    info = build_model_info(
        dataset=dataset, threat_model=threat_model, eps=eps, clean_acc=0.9, autoattack_acc=0.5, **metadata
    )
    info_path = write_model_info(tmp_path, info, dataset=dataset, threat_model=threat_model, model_id=model_id)
    channels, size = (1, 8) if dataset == "digits" else (3, 32)
    num_classes = 100 if dataset == "cifar100" else 10
    net = build_student("small-cnn", num_classes=num_classes, in_channels=channels, image_size=size, width=0.25)
    checkpoint = save_zoo_checkpoint(net, tmp_path, dataset=dataset, threat_model=threat_model, model_id=model_id)
    log = tmp_path / "aa.log"
    log.write_text(STANDARD_LOG.format(robust=info["autoattack_acc"]))
    from robustbench_kd.submission.zoo_entry import student_constructor

    return write_submission_bundle(
        tmp_path,
        model_id=model_id,
        threat_model=threat_model,
        info_path=info_path,
        checkpoint_path=checkpoint,
        results={
            "n_examples": n_examples,
            "seed": 0,
            "eps_str": info["eps"],
            "accuracy": {"clean": 0.9, "autoattack": 0.5},
            "autoattack_version": "pyautoattack 0.2.0",
            "sanity": {"reliable": True, "reasons": []} if sanity else None,
        },
        constructor=student_constructor(
            "small-cnn",
            num_classes=num_classes,
            in_channels=channels,
            image_size=size,
            options={"width": 0.25},
            dataset=dataset,
        ),
        autoattack_log=log,
    )


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"dataset": "digits", "eps": 0.2}, "RobustBench has no digits/Linf leaderboard"),
        ({"dataset": "cifar100", "threat_model": "L2", "eps": 0.5}, "RobustBench has no cifar100/L2 leaderboard"),
        ({"eps": 4 / 255}, "the cifar10/Linf leaderboard uses eps 8/255; this evaluation used 4/255"),
        ({"n_examples": 150}, "evaluated on 150 test points; the leaderboard uses all 10,000"),
        ({"venue": None, "link": None}, "model_info fields null or empty: venue, link"),
        ({"sanity": False}, "the evaluation sanity suite did not run"),
    ],
)
def test_each_preview_reason_is_written_and_check_submission_agrees(tmp_path, kwargs, reason):
    from robustbench_kd.jobs.check_submission import check_submission

    bundle = _bundle(tmp_path, **kwargs)
    assert not bundle.ready and bundle.directory.name == "Me2026Bundle.preview"
    assert len(bundle.unmet) == 1 and reason in bundle.unmet[0]
    assert bundle.readme.read_text().startswith("# PREVIEW submission bundle for Me2026Bundle: not ready to submit")
    assert reason in bundle.issue.read_text().split("# Paper Information")[0]
    assert bundle.status_line().startswith("submission bundle PREVIEW") and reason in bundle.status_line()
    check = check_submission(bundle.directory, load_entry=False)
    assert check.unmet == bundle.unmet and check.problems == [] and not check.ready


def test_a_ready_bundle_passes_check_submission_and_replaces_an_old_preview(tmp_path, capsys):
    from robustbench_kd.cli import main

    _bundle(tmp_path, n_examples=150)  # an earlier, partial evaluation of the same id
    bundle = _bundle(tmp_path)
    assert bundle.ready and bundle.unmet == [] and bundle.directory.name == "Me2026Bundle"
    assert not (tmp_path / "submission" / "Me2026Bundle.preview").exists()
    assert main(["check-submission", str(bundle.directory)]) == 0  # loads the entry without robustbench_kd
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"READY    {bundle.directory} can be submitted"
    assert any("robustbench.utils.load_model loads Me2026Bundle" in line for line in out)


def test_check_submission_finds_a_tampered_bundle(tmp_path, capsys):
    from robustbench_kd.cli import main

    bundle = _bundle(tmp_path)
    checkpoint = tmp_path / "models" / "cifar10" / "Linf" / "Me2026Bundle.pt"
    checkpoint.write_bytes(checkpoint.read_bytes() + b"\0")
    (bundle.directory / "zoo_entry.py").write_text(
        "from robustbench_kd.students import build_student\n" + (bundle.directory / "zoo_entry.py").read_text()
    )
    assert main(["check-submission", str(bundle.directory), "--no-load"]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM  the checkpoint" in out and "does not have the SHA-256" in out
    assert "PROBLEM  zoo_entry.py imports this project (robustbench_kd.students)" in out
    assert out.splitlines()[-1].startswith("NOT READY")


@pytest.mark.single_thread
def test_two_merged_shards_give_a_ready_bundle_with_both_autoattack_logs(tmp_path, monkeypatch, capsys):
    """`evaluate --shard` twice and `merge-shards`: a ready bundle (the leaderboard's point count set to the
    fixture's 20), AutoAttack's log of both shards in order, and `check-submission` agreeing."""
    import torch

    from robustbench_kd.cli import main
    from robustbench_kd.students import build_student
    from robustbench_kd.submission import layout
    from robustbench_kd.testing.fixtures import make_tiny_cifar, relabel_to_predictions

    monkeypatch.setitem(layout.LEADERBOARD_N_EXAMPLES, "cifar10", 20)
    torch.manual_seed(0)
    model = build_student("small-cnn", num_classes=10, in_channels=3, image_size=32, width=0.25)
    data = make_tiny_cifar(tmp_path / "data", n_train_per_batch=2, n_test=20, seed=3)
    relabel_to_predictions(data, model)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "model.pt")
    common = [
        "evaluate",
        f"file:{tmp_path / 'model.pt'}?arch=small-cnn&width=0.25",
        *("--dataset", "cifar10", "--data-dir", str(data), "--no-verify-md5", "--n-examples", "20"),
        *("--attacks", "clean,autoattack", "--batch-size", "10", "--device", "cpu"),
        *("--name", "Shard2026Ready", "--out", str(tmp_path / "out")),
        *("--title", "Tiny", "--authors", "A. Author", "--venue", "arXiv, Jan 2026"),
        *("--link", "https://arxiv.org/abs/0000.00000", "--architecture", "SmallCNN"),
    ]
    for i in (0, 1):
        assert main([*common, "--shard", f"{i}/2"]) == 0
    shards = tmp_path / "out" / "shards" / "Shard2026Ready"
    assert main(["merge-shards", str(shards)]) == 0
    bundle = tmp_path / "out" / "submission" / "Shard2026Ready"
    assert f"wrote submission bundle {bundle} (ready" in capsys.readouterr().out
    log = (bundle / "autoattack.log").read_text()
    first, second = log.index("===== shard_0_of_2.autoattack.log"), log.index("===== shard_1_of_2.autoattack.log")
    assert first < log.index("standard version", first) < second < log.index("standard version", second)
    assert (shards / "shard_0_of_2.autoattack.log").is_file()  # the shards keep theirs: merging again works
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["status"] == "ready" and manifest["evaluation"]["n_examples"] == 20
    assert main(["check-submission", str(bundle)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"READY    {bundle} can be submitted"
