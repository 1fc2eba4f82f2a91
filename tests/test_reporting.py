"""End-of-run analyses, figures, the run report and the comparison report."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from PIL import Image

from robustbench_kd.analysis.diagnostics.section import DIAGNOSTICS
from robustbench_kd.analysis.reports.analyses import (
    accuracy_vs_eps,
    correlation_difference,
    logit_correlation,
    normalized_cams,
    pca_embedding,
)
from robustbench_kd.analysis.reports.compare import robust_key
from robustbench_kd.analysis.reports.diagnostics_report import FIGURES as DIAGNOSTIC_FIGURES
from robustbench_kd.analysis.reports.metrics import read_metric_series
from robustbench_kd.analysis.reports.run_report import FIGURES
from robustbench_kd.cli import main
from robustbench_kd.students import build_student

# Columns (classes) over 3 samples. Teacher: c0 = (1,2,3), c1 = (0,1,0), c2 = (0,0,1); the student swaps c1, c2.
TEACHER = torch.tensor([[1.0, 0, 0], [2, 1, 0], [3, 0, 1]])
STUDENT = TEACHER[:, [0, 2, 1]]
R3 = math.sqrt(3) / 2


def test_logit_correlation_by_hand():
    # corr(c0,c1) = 0; corr(c0,c2) = 1 / (sqrt(2) sqrt(2/3)) = sqrt(3)/2; corr(c1,c2) = (-1/3) / (2/3) = -1/2
    expected = torch.tensor([[1, 0, R3], [0, 1, -0.5], [R3, -0.5, 1]], dtype=torch.float64)
    assert torch.allclose(logit_correlation(TEACHER), expected)


def test_correlation_difference_and_frobenius_by_hand():
    diff, fro = correlation_difference(TEACHER, STUDENT)
    # T - S: (0,1) = 0 - sqrt3/2, (0,2) = sqrt3/2 - 0, (1,2) = -1/2 - (-1/2) = 0, symmetric, zero diagonal
    expected = torch.tensor([[0, -R3, R3], [-R3, 0, 0], [R3, 0, 0]], dtype=torch.float64)
    assert torch.allclose(diff, expected)
    assert fro == pytest.approx(math.sqrt(4 * 3 / 4))  # sqrt(3)


def test_constant_logit_has_zero_correlation():
    logits = torch.tensor([[1.0, 5], [2, 5], [4, 5]])
    assert torch.equal(logit_correlation(logits), torch.eye(2, dtype=torch.float64))


def test_pca_of_points_on_a_line():
    coords, ratio = pca_embedding(torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert torch.allclose(coords[:, 0], torch.tensor([-math.sqrt(2), 0, math.sqrt(2)]), atol=1e-6)
    assert torch.allclose(coords[:, 1], torch.zeros(3), atol=1e-6)
    assert ratio.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_cam_by_hand():
    # feature map = ReLU(conv 1x1) with channels (x, -x) -> (x, 0); fc = identity: the class-0 CAM is x itself,
    # relu_minmax scales [[0, 1], [2, 3]] to [[0, 1/3], [2/3, 1]] (input size: no resize).
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 1, bias=False),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(2, 2, bias=False),
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        net[4].weight.copy_(torch.eye(2))
    x = torch.tensor([[0.0, 1], [2, 3]]).view(1, 1, 2, 2) / 3
    cam = normalized_cams(net.eval(), x, torch.tensor([0]))
    assert torch.allclose(cam[0], torch.tensor([[0, 1 / 3], [2 / 3, 1]]), atol=1e-5)


def test_accuracy_vs_eps_by_hand():
    # logits = (mean pixel, 0.5): class 0 when the mean exceeds 0.5. Means 0.1, 0.9, 0.2, 0.8 with labels
    # 0, 0, 1, 1 -> predictions 1, 0, 1, 0 -> clean accuracy 2/4. At eps = 1 (L_inf) every image in [0,1] is
    # reachable, and PGD (step 0.25, 10 steps) drives each to the wrong class: accuracy 0.
    class MeanModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            mean = self.scale * x.flatten(1).mean(1)
            return torch.stack([mean, torch.full_like(mean, 0.5)], dim=1)

    x = torch.tensor([0.1, 0.9, 0.2, 0.8]).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    y = torch.tensor([0, 0, 1, 1])
    torch.manual_seed(0)
    assert accuracy_vs_eps(MeanModel(), x, y, [0.0, 1.0], norm="Linf", steps=10) == [0.5, 0.0]


def test_metric_series_reads_whatever_numeric_keys_exist(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"epoch": 1, "loss": 2.0, "lr": 0.1, "method": "x", "flag": True},
        {"epoch": 2, "loss": 1.0, "lr": 0.1, "entropy": {"teacher": 0.5}, "ece": float("nan")},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    epochs, series = read_metric_series(path)
    assert epochs == [1.0, 2.0]
    assert series == {"loss": [2.0, 1.0], "lr": [0.1, 0.1], "entropy.teacher": [None, 0.5]}
    assert read_metric_series(tmp_path / "missing.jsonl") == ([], {})


def test_robust_key_prefers_the_strongest_attack():
    assert robust_key({"clean": 1, "pgd-20": 0.5, "autoattack": 0.4}) == "autoattack"
    assert robust_key({"clean": 1, "fgsm": 0.6, "pgd-2": 0.5}) == "pgd-2"
    assert robust_key({"clean": 1}) is None


def _decodes(path) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 50 and image.size[1] > 50


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A tiny RSLAD run with a file teacher (report at the end of distill) and a teacher-less PGD-AT run."""
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    teacher = build_student("small-cnn", num_classes=10, in_channels=1, image_size=8, width=2.0)
    torch.save({"state_dict": teacher.state_dict()}, root / "teacher.pt")
    runs = []
    teacher_spec = f"file:{root / 'teacher.pt'}?arch=small-cnn&width=2.0"
    # R1 records every diagnostic and embeds with t-SNE; R2 has neither (the defaults).
    extras = {
        "R1": {
            "diagnostics": {"enabled": list(DIAGNOSTICS), "n_examples": 20, "pgd_steps": 2, "bins": 5},
            "report": {"embedding": "tsne", "tsne_perplexity": 5},
        },
        "R2": {"report": {}},
    }
    for name, method, teachers in (("R1", "rslad", {"robust": teacher_spec}), ("R2", "pgd-at", {})):
        config = root / f"{name}.yaml"
        extra = extras[name]
        config.write_text(
            yaml.safe_dump(
                {
                    **{k: v for k, v in extra.items() if k != "report"},
                    "run": {"name": name, "out_dir": str(root / name), "progress": False},
                    "data": {"dataset": "digits", "n_train": 100, "batch_size": 50},
                    "threat": {"eps": 0.2, "alpha": 0.1, "steps": 2},
                    "teachers": teachers,
                    "method": {"name": method},
                    "optim": {"epochs": 2, "lr": 0.05},
                    "eval": {
                        "attacks": ["clean", "pgd"],
                        "pgd_steps": 2,
                        "final_n_examples": 16,
                        "teachers": False,
                        "sanity": False,
                    },
                    "report": {
                        "n_examples": 24,
                        "n_cam": 2,
                        "pgd_steps": 2,
                        "eps_factors": [0, 0.5, 1],
                        **extra["report"],
                    },
                }
            )
        )
        assert main(["-q", "distill", str(config)]) == 0
        runs.append(root / name)
    return runs


def test_distill_writes_the_report_with_every_figure(two_runs):
    report = two_runs[0] / "report"
    every = [*FIGURES.values(), *DIAGNOSTIC_FIGURES.values()]
    for name in [*every, "overview.png"]:
        _decodes(report / name)
    text = (report / "report.md").read_text()
    assert all(f"]({name})" in text for name in every)
    page = (report / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count('src="data:image/png;base64,') == len(every)
    numbers = json.loads((report / "analyses.json").read_text())
    assert numbers["embedding"]["method"] == "tsne" and math.isfinite(numbers["embedding"]["kl_divergence"])
    assert numbers["diagnostics"]["trajectory_epochs"] == [1, 2]
    assert set(numbers["diagnostics"]["class_accuracy"]) == {"train_student_clean", "train_student_adv"}
    assert numbers["accuracy_vs_eps"]["eps"] == pytest.approx([0, 0.1, 0.2])
    assert set(numbers["logit_correlation_frobenius"]) == {"natural", "adversarial"}
    assert all(0 <= a <= 1 for curve in ("student", "teacher (robust)") for a in numbers["accuracy_vs_eps"][curve])


def test_report_without_teacher_skips_the_teacher_figures(two_runs):
    report = two_runs[1] / "report"
    assert not (report / FIGURES["correlation"]).exists()
    for key in ("eps_curve", "embedding", "cam", "metrics"):
        _decodes(report / FIGURES[key])
    # No [diagnostics]: no diagnostics figures, and the report says how to get them.
    assert not any((report / name).exists() for name in DIAGNOSTIC_FIGURES.values())
    assert "No per-epoch diagnostics were recorded" in (report / "report.md").read_text()
    assert json.loads((report / "analyses.json").read_text())["embedding"]["method"] == "pca"


def test_report_command_rewrites_a_run_report(two_runs, tmp_path, capsys):
    assert main(["-q", "report", str(two_runs[0]), "--out", str(tmp_path / "again")]) == 0
    for name in [*FIGURES.values(), *DIAGNOSTIC_FIGURES.values(), "overview.png"]:
        _decodes(tmp_path / "again" / name)
    assert "report:" in capsys.readouterr().out


def test_report_command_compares_runs(two_runs, tmp_path):
    assert main(["-q", "report", *map(str, two_runs), "--out", str(tmp_path / "cmp")]) == 0
    _decodes(tmp_path / "cmp" / "tradeoff.png")
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "R1/R1" in text and "R2/R2" in text and "pgd-2" in text


@pytest.mark.parametrize("several", [False, True])
def test_bad_run_dir_is_a_one_line_error(tmp_path, capsys, several):
    args = [str(tmp_path / "nope")] * (2 if several else 1)
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err


def test_documents_render_markdown_html_and_overview(tmp_path):
    from robustbench_kd.analysis.reports.document import (
        Figure,
        Heading,
        Paragraph,
        Table,
        write_documents,
    )

    Image.new("RGB", (80, 60), (200, 30, 30)).save(tmp_path / "a.png")
    blocks = [
        Heading("Run <1>", 1),
        Paragraph("a & b"),
        Table(["eps", "student"], [["0", "97.0"]]),
        Figure("red", tmp_path / "a.png"),
    ]
    paths = write_documents(blocks, tmp_path, "Report: x")
    assert paths["markdown"].read_text() == (
        "# Run <1>\n\na & b\n\n| eps | student |\n|---|---|\n| 0 | 97.0 |\n\n![red](a.png)\n"
    )
    page = paths["html"].read_text()
    assert "<h1>Run &lt;1&gt;</h1>" in page and "<p>a &amp; b</p>" in page and "<td>97.0</td>" in page
    assert page.count("data:image/png;base64,") == 1
    _decodes(paths["overview"])
