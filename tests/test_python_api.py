"""The Python API (``robustbench_kd.distill / evaluate / load_student``) does what the commands do."""

from __future__ import annotations

import json
import pydoc
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import robustbench_kd as rbkd
from robustbench_kd.cli import main
from robustbench_kd.errors import UserError

pytestmark = pytest.mark.single_thread

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(out_dir: Path, *, attacks: list[str] | None = None) -> dict:
    """One epoch of PGD-AT on 128 digits: a run as a plain mapping."""
    return {
        "run": {"name": "ApiTiny", "out_dir": str(out_dir), "progress": False},
        "data": {"n_train": 128},
        "optim": {"epochs": 1},
        "eval": {"attacks": attacks or ["clean"], "final_n_examples": 32, "teachers": False, "sanity": False},
    }


def as_toml(mapping: dict) -> str:
    lines = []
    for section, values in mapping.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"  # JSON scalars and lists are TOML literals


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["student"]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_distill_from_a_mapping_a_file_and_the_cli_gives_the_same_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    from_mapping = rbkd.distill(tiny_run(tmp_path / "mapping"), evaluate=False)
    (tmp_path / "run.toml").write_text(as_toml(tiny_run(tmp_path / "file")))
    from_file = rbkd.distill(tmp_path / "run.toml", evaluate=False)
    assert main(["distill", "run.toml", "--no-eval", "--set", f"run.out_dir='{tmp_path / 'cli'}'"]) == 0
    capsys.readouterr()

    reference = student_weights(tmp_path / "cli")
    assert same_weights(student_weights(from_mapping.run_dir), reference)
    assert same_weights(student_weights(from_file.run_dir), reference)
    assert same_weights(from_file.student.state_dict(), reference)
    assert not from_file.student.training
    assert from_file.metrics == {} and from_file.reports == []
    assert [row["epoch"] for row in from_file.history] == [1]
    assert {"config", "last_checkpoint", "metrics"} <= set(from_file.paths)


def test_overrides_and_progress_apply_on_top_of_the_config(tmp_path):
    result = rbkd.distill(
        tiny_run(tmp_path / "ignored"), overrides=[f"run.out_dir='{tmp_path / 'run'}'"], evaluate=False
    )
    assert result.run_dir == tmp_path / "run"
    from robustbench_kd.api.runs import resolve_config

    config = resolve_config(tiny_run(tmp_path / "x"), ["optim.epochs=3", "run.progress=true"])
    assert config.optim.epochs == 3 and config.run.progress
    with pytest.raises(UserError, match="overrides must be a list of 'key=value' strings"):
        resolve_config(tiny_run(tmp_path / "x"), "optim.epochs=3")
    with pytest.raises(UserError, match="config must be a run file path, a mapping or a RunConfig, got int"):
        resolve_config(3)


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A tiny run with the final leaderboard evaluation: zoo checkpoint, safetensors, bundle."""
    out = tmp_path_factory.mktemp("api") / "run"
    return rbkd.distill(tiny_run(out, attacks=["clean", "autoattack"]))


def test_distill_returns_the_final_metrics_and_what_it_wrote(evaluated_run):
    result = evaluated_run
    assert set(result.metrics) == {"clean", "autoattack"}
    results = json.loads(result.paths["results"].read_text())
    assert results["accuracy"] == result.metrics
    assert {"results", "model_info", "zoo_checkpoint", "safetensors", "bundle"} <= set(result.paths)
    zoo = result.paths["zoo_checkpoint"]
    assert zoo.parent == result.run_dir / "models" / "digits" / "Linf" and zoo.name == "ApiTiny.pt"
    assert result.paths["safetensors"] == zoo.with_suffix(".safetensors")


def test_load_student_round_trips_every_format_bitwise(evaluated_run):
    from safetensors import safe_open

    reference = evaluated_run.student.state_dict()
    for source in (
        evaluated_run.run_dir,
        evaluated_run.paths["safetensors"],
        evaluated_run.paths["zoo_checkpoint"],
        evaluated_run.paths["last_checkpoint"],
    ):
        loaded = rbkd.load_student(source)
        assert not loaded.training
        assert same_weights(loaded.state_dict(), reference), source
    with safe_open(str(evaluated_run.paths["safetensors"]), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "robustbench_kd.student/1"
    assert (metadata["arch"], metadata["num_classes"], metadata["in_channels"]) == ("small-cnn", "10", "1")
    assert json.loads(metadata["options"]) == {}


def test_load_student_refuses_what_it_cannot_rebuild_in_one_line(tmp_path, evaluated_run):
    zoo_only = tmp_path / "models" / "digits" / "Linf" / "Alone.pt"
    zoo_only.parent.mkdir(parents=True)
    zoo_only.write_bytes(evaluated_run.paths["zoo_checkpoint"].read_bytes())
    (tmp_path / "noise.safetensors").write_bytes(b"\x00" * 64)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    cases = {
        zoo_only: "does not record its architecture",
        tmp_path / "noise.safetensors": "is not a readable safetensors file",
        tmp_path / "foreign.safetensors": "has no robustbench_kd student metadata",
        tmp_path / "missing.pt": "does not exist",
        tmp_path: "is not a run directory",
    }
    for path, phrase in cases.items():
        with pytest.raises(UserError) as info:
            rbkd.load_student(path)
        assert phrase in str(info.value) and "\n" not in str(info.value)


def test_evaluate_with_a_name_writes_what_the_cli_writes(tmp_path, monkeypatch, capsys, evaluated_run):
    monkeypatch.chdir(tmp_path)
    spec = f"file:{evaluated_run.paths['last_checkpoint']}"
    common = ["--dataset", "digits", "--n-examples", "16", "--attacks", "clean,autoattack", "--no-sanity"]
    assert main(["evaluate", spec, *common, "--name", "Same", "--out", "cli", "--device", "cpu"]) == 0
    capsys.readouterr()
    result = rbkd.evaluate(
        spec,
        dataset="digits",
        n_examples=16,
        attacks=["clean", "autoattack"],
        sanity=False,
        name="Same",
        out_dir="api",
        device="cpu",
        progress=False,
    )

    def tree(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}

    assert tree(tmp_path / "api") == tree(tmp_path / "cli")
    cli_results = json.loads((tmp_path / "cli" / "results" / "Same.json").read_text())
    assert cli_results["accuracy"] == result.accuracy
    assert result.clean_accuracy == result.accuracy["clean"]
    assert result.robust_accuracy == result.accuracy["autoattack"]
    assert result.paths["results"] == Path("api") / "results" / "Same.json"
    for name in ("model_info/digits/Linf/Same.json", "models/digits/Linf/Same.pt"):
        assert (tmp_path / "api" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()


def test_evaluate_a_network_writes_nothing_without_a_name(tmp_path, monkeypatch, evaluated_run):
    monkeypatch.chdir(tmp_path)
    result = rbkd.evaluate(
        evaluated_run.student, dataset="digits", n_examples=32, attacks="clean", sanity=False, progress=False
    )
    assert result.accuracy == {"clean": evaluated_run.metrics["clean"]}
    assert result.robust_accuracy is None and result.paths == {}
    assert (result.dataset, result.threat_model, result.eps, result.n_examples) == ("digits", "Linf", 0.2, 32)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_equals_robustbench_benchmark(tmp_path, monkeypatch):
    """Same model, data, seed and batch size: the clean and AutoAttack accuracy of benchmark()."""
    from robustbench_kd.students import build_student
    from robustbench_kd.testing.fixtures import make_tiny_cifar, patch_cifar_integrity
    from robustbench_kd.zoo import compat

    robustbench = compat.import_robustbench()
    import robustbench.eval as rb_eval
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    data = make_tiny_cifar(tmp_path / "data", n_train_per_batch=4, n_test=40, seed=3)
    torch.manual_seed(0)
    model = build_student("small-cnn", num_classes=10, in_channels=3, image_size=32, width=0.5).eval()

    base = rb_eval.AutoAttack

    class SeededAutoAttack(base):  # benchmark() seeds AutoAttack with the time; ours uses seed 0
        def __init__(self, *args, **kwargs):
            kwargs["seed"] = 0 if kwargs.get("seed") is None else kwargs["seed"]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(rb_eval, "AutoAttack", SeededAutoAttack)
    monkeypatch.chdir(tmp_path)
    keywords = {
        "n_examples": 40,
        "dataset": BenchmarkDataset.cifar_10,
        "threat_model": ThreatModel.Linf,
        "data_dir": str(data),
        "batch_size": 40,
        "eps": 8 / 255,
    }
    with patch_cifar_integrity():
        clean, robust = robustbench.eval.benchmark(model, device=torch.device("cpu"), **keywords)
    result = rbkd.evaluate(
        model, **keywords, device="cpu", attacks=["clean", "autoattack"], verify_md5=False, progress=False
    )
    assert result.clean_accuracy == pytest.approx(clean)
    assert result.robust_accuracy == pytest.approx(robust)
    assert (result.dataset, result.threat_model) == ("cifar10", "Linf")


@pytest.mark.parametrize(
    ("api_call", "argv"),
    [
        (
            lambda tmp: rbkd.evaluate(torch.nn.Linear(2, 2), dataset="digitz"),
            lambda tmp: ["evaluate", "file:x.pt", "--dataset", "digitz"],
        ),
        (
            lambda tmp: rbkd.distill({**tiny_run(tmp / "r"), "method": {"name": "rsald"}}),
            lambda tmp: ["distill", "bad.toml"],
        ),
        (
            lambda tmp: rbkd.distill({**tiny_run(tmp / "r"), "optim": {"epochs": -1}}),
            lambda tmp: ["distill", "neg.toml"],
        ),
    ],
    ids=["unknown-dataset", "unknown-method", "negative-epochs"],
)
def test_a_user_error_from_the_api_is_the_cli_line_without_the_prefix(tmp_path, monkeypatch, capsys, api_call, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text(as_toml({**tiny_run(tmp_path / "r"), "method": {"name": "rsald"}}))
    (tmp_path / "neg.toml").write_text(as_toml({**tiny_run(tmp_path / "r"), "optim": {"epochs": -1}}))
    with pytest.raises(UserError) as info:
        api_call(tmp_path)
    assert main(argv(tmp_path)) == 2
    line = capsys.readouterr().err.strip()
    prefix = "robustbench-kd: error: "
    assert line.startswith(prefix)
    message = line[len(prefix) :]
    # A run file names itself in its errors ("config file bad.toml: ..."); a mapping has no file to name.
    assert message == str(info.value) or message.endswith(": " + str(info.value))


def test_help_shows_the_public_functions_with_their_signatures():
    text = pydoc.render_doc(rbkd, renderer=pydoc.plaintext)
    for signature in (
        "distill(config: 'str | os.PathLike[str] | Mapping[str, Any] | RunConfig', *, overrides",
        "evaluate(model: 'nn.Module | str | os.PathLike[str]', *, dataset",
        "load_student(path_or_run_dir: 'str | os.PathLike[str]') -> 'nn.Module'",
        "class RunResult",
        "class EvalResult",
    ):
        assert signature in text, signature


@pytest.mark.slow
def test_the_from_python_example_runs_through_the_public_api(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "from_python.py"),
            *("--epochs", "1", "--n-train", "256"),
            "--n-examples",
            "24",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model     clean  PGD-20 AutoAttack" in proc.stdout
    assert "predicts the same: True" in proc.stdout
    assert (out / "accuracy_vs_eps.png").stat().st_size > 1000
    assert (out / "Student_AKD" / "models" / "digits" / "Linf" / "Student_AKD.safetensors").is_file()
