"""Safe loading: every checkpoint entry point refuses a code-running pickle (and runs none of it); sha256 pins."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from robustbench_kd import hookimpl
from robustbench_kd.cli import main
from robustbench_kd.errors import UserError
from robustbench_kd.plugin_host import PluginHost
from robustbench_kd.storage.checkpoint import load_checkpoint, weights_only_loads
from robustbench_kd.teachers import TeacherLoadContext, TeacherSpec
from robustbench_kd.testing.fixtures import tiny_zoo_entry
from robustbench_kd.testing.runs import digits_load_context, tiny_digits_config
from robustbench_kd.training import builders
from robustbench_kd.training.loop import train
from robustbench_kd.zoo import models as zoo


class PlantMarker:
    """Unpickling this calls ``os.mkdir(marker)``: if the directory appears, code ran during loading."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def small_cnn_state(host: PluginHost) -> dict[str, torch.Tensor]:
    net = host.students.get("small-cnn")(num_classes=10, in_channels=1, image_size=8, width=0.5)
    return net.state_dict()


def write_malicious(path: Path, marker: Path, state: dict[str, torch.Tensor], **extra) -> Path:
    """A checkpoint that looks like ours (architecture recorded, real weights) plus the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "student": state,
            "student_arch": {"name": "small-cnn", "options": {"width": 0.5}},
            "payload": PlantMarker(marker),
            **extra,
        },
        path,
    )
    return path


def digits_config(out_dir, **sections):
    merge = {"run": {"deterministic": False}, "threat": {"steps": 1}, "optim": {"epochs": 1}}
    return tiny_digits_config(out_dir, merge=merge, **sections)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def test_the_payload_really_runs_code_when_loaded_unsafely(tmp_path, host, marker):
    """Control: the crafted file is a real exploit, so the refusals below prove something."""
    path = write_malicious(tmp_path / "evil.pt", marker, small_cnn_state(host))
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def test_file_teacher_refuses_and_runs_nothing(tmp_path, host, marker):
    path = write_malicious(tmp_path / "evil.pt", marker, small_cnn_state(host))
    with pytest.raises(
        UserError, match=r"evil.pt was refused: it holds pickled Python objects that could run code"
    ) as info:
        builders.load_teacher(host, f"file:{path}", digits_load_context(host))
    assert "mkdir" in str(info.value) and "\n" not in str(info.value) and "\033" not in str(info.value)
    assert not marker.exists()


def test_legacy_format_pickle_is_refused_too(tmp_path, host, marker):
    path = tmp_path / "legacy.pt"
    torch.save(
        {"student": small_cnn_state(host), "payload": PlantMarker(marker)}, path, _use_new_zipfile_serialization=False
    )
    with pytest.raises(UserError, match="was refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_student_init_from_refuses_and_runs_nothing(tmp_path, host, marker):
    path = write_malicious(tmp_path / "init.pt", marker, small_cnn_state(host))
    cfg = digits_config(
        tmp_path / "run", student={"arch": "small-cnn", "options": {"width": 0.5}, "init_from": str(path)}
    )
    with pytest.raises(UserError, match=r"init.pt was refused"):
        train(cfg, host=host)
    assert not marker.exists()


def test_resume_refuses_and_runs_nothing(tmp_path, host, marker):
    cfg = digits_config(tmp_path / "run")
    first = train(cfg, host=host)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    good = load_checkpoint(last)
    write_malicious(
        last,
        marker,
        first.student.state_dict(),
        **{k: v for k, v in good.items() if k not in ("student", "student_arch")},
    )
    with pytest.raises(UserError, match=r"last.pt was refused"):
        train(cfg, host=host, resume=True)
    assert not marker.exists()


def test_evaluate_command_refuses_and_runs_nothing(tmp_path, host, marker, capsys):
    path = write_malicious(tmp_path / "model.pt", marker, small_cnn_state(host))
    assert (
        main(
            [
                "evaluate",
                str(path),
                "--dataset",
                "digits",
                "--n-examples",
                "10",
                "--attacks",
                "clean",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "model.pt was refused" in err and "Traceback" not in err and err.count("\n") == 1
    assert not marker.exists()


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_zoo_file_refused_even_where_torch_would_unpickle_freely(tmp_path, marker, monkeypatch):
    """robustbench's load_model calls torch.load without weights_only; this env var makes that unsafe."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with tiny_zoo_entry("RbkdTinyTest", TinyNet):
        path = zoo.expected_checkpoint_paths(tmp_path, "cifar10", "Linf", "RbkdTinyTest")[0]
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": TinyNet().state_dict(), "payload": PlantMarker(marker)}, path)
        with pytest.raises(UserError, match=r"RbkdTinyTest.pt for cifar10/Linf/RbkdTinyTest cannot be"):
            zoo.load_zoo_model("RbkdTinyTest", dataset="cifar10", threat_model="Linf", model_dir=tmp_path)
    assert not marker.exists()


def test_weights_only_loads_restores_torch_load_and_overrides_callers(tmp_path, marker):
    path = tmp_path / "evil.pt"
    torch.save({"payload": PlantMarker(marker)}, path)
    original = torch.load
    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=False)  # what a careless third party might write
    assert torch.load is original and not marker.exists()


# -- sha256 pins ---------------------------------------------------------------------------------------
def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_file_teacher_pin_accepts_the_right_file(tmp_path, host):
    path = tmp_path / "t.pt"
    torch.save(
        {"student": small_cnn_state(host), "student_arch": {"name": "small-cnn", "options": {"width": 0.5}}}, path
    )
    teacher = builders.load_teacher(host, f"file:{path}?sha256={digest(path).upper()}", digits_load_context(host))
    assert teacher(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_pin_mismatch_names_file_and_both_digests_before_unpickling(tmp_path, host, marker):
    path = write_malicious(tmp_path / "swapped.pt", marker, small_cnn_state(host))
    pinned = "0" * 64
    with pytest.raises(UserError) as info:
        builders.load_teacher(host, f"file:{path}?sha256={pinned}", digits_load_context(host))
    message = str(info.value)
    assert str(path) in message and pinned in message and digest(path) in message and "\n" not in message
    assert "was refused" not in message  # the digest check came first: the file was never unpickled
    assert not marker.exists()


def test_bad_digest_text_is_a_user_error():
    with pytest.raises(UserError, match=r"'abc' is not a SHA-256 digest; expected 64 hex characters"):
        TeacherSpec.parse("file:x.pt?sha256=abc&arch=small-cnn")
    spec = TeacherSpec.parse(f"file:x.pt?sha256={'a' * 64}&arch=small-cnn")
    assert spec.sha256 == ("a" * 64,) and spec.options == {"arch": "small-cnn"}  # never an arch option


def test_zoo_pin_checked_before_loading(tmp_path):
    with tiny_zoo_entry("RbkdTinyTest", TinyNet):
        path = zoo.expected_checkpoint_paths(tmp_path, "cifar10", "Linf", "RbkdTinyTest")[0]
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": TinyNet().state_dict()}, path)
        model = zoo.load_zoo_model(
            "RbkdTinyTest", dataset="cifar10", threat_model="Linf", model_dir=tmp_path, sha256=(digest(path),)
        )
        assert isinstance(model, TinyNet)
        with pytest.raises(UserError, match=f"has SHA-256 {digest(path)} but {'1' * 64} was pinned"):
            zoo.load_zoo_model(
                "RbkdTinyTest", dataset="cifar10", threat_model="Linf", model_dir=tmp_path, sha256=("1" * 64,)
            )
        with pytest.raises(UserError, match=r"reads 1 file\(s\) .* but 2 sha256 digest\(s\) were pinned"):
            zoo.load_zoo_model(
                "RbkdTinyTest", dataset="cifar10", threat_model="Linf", model_dir=tmp_path, sha256=("1" * 64, "2" * 64)
            )


def test_zoo_teacher_spec_passes_its_pin(tmp_path, host):
    with tiny_zoo_entry("RbkdTinyTest", TinyNet):
        path = zoo.expected_checkpoint_paths(tmp_path, "cifar10", "Linf", "RbkdTinyTest")[0]
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": TinyNet().state_dict()}, path)
        ctx = TeacherLoadContext(
            dataset="cifar10", num_classes=10, in_channels=3, image_size=32, model_dir=tmp_path, students=host.students
        )
        with pytest.raises(UserError, match="was pinned"):
            builders.load_teacher(host, f"robustbench:cifar10/Linf/RbkdTinyTest?sha256={'2' * 64}", ctx)
        builders.load_teacher(host, f"robustbench:cifar10/Linf/RbkdTinyTest?sha256={digest(path)}", ctx)


def test_a_source_that_cannot_check_pins_refuses_them(host):
    class Mine:
        @staticmethod
        @hookimpl
        def rbkd_register_teacher_sources(registry):
            registry.add("mine", lambda spec, ctx: nn.Linear(64, 10))

    host = PluginHost.create(autoload=False, extra=[Mine])
    with pytest.raises(UserError, match="teacher source 'mine' does not check sha256 pins"):
        builders.load_teacher(host, f"mine:x?sha256={'a' * 64}", digits_load_context(host))
