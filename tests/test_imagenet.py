"""ImageNet from local class folders: class mapping, RobustBench preprocessing, lazy decoding, evaluate, zoo
teachers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from robustbench_kd.config import DataSection, config_from_mapping
from robustbench_kd.data import imagenet as imagefolder
from robustbench_kd.data.datasets import split_validation
from robustbench_kd.data.imagenet import LazyImages, get_preprocessing, load_imagefolder_splits
from robustbench_kd.errors import UserError

CLASSES = ("n01440764", "n01443537", "n01484850")  # real wnids: sorted order = class index


def make_imagefolder(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """train/ (4 per class) and val/ (2 per class) of 64x48 images; class c is tinted by channel c."""
    from PIL import Image

    per_class = per_class or {"train": 4, "val": 2}
    rng = np.random.default_rng(0)
    for split, count in per_class.items():
        for label, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 60, size=(48, 64, 3), dtype=np.uint8)
                pixels[..., label] += 180
                ext = "png" if i % 2 else "JPEG"  # both formats, upper-case extension as in ImageNet
                Image.fromarray(pixels).save(folder / f"img_{i}.{ext}")
    return root


@pytest.fixture
def imagenet_dir(tmp_path):
    return make_imagefolder(tmp_path / "imagenet")


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = imagefolder._decode

    def counting(path, preprocessing):
        calls.append(path)
        return real(path, preprocessing)

    monkeypatch.setattr(imagefolder, "_decode", counting)
    return calls


def test_class_mapping_and_splits(imagenet_dir):
    data = load_imagefolder_splits("imagenet", imagenet_dir)
    assert data.num_classes == 3 and len(data.train_y) == 12 and len(data.test_y) == 6
    assert data.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    pairs = zip(data.train_x.paths, data.train_y.tolist(), strict=False)
    assert all(Path(p).parent.name == CLASSES[y] for p, y in pairs)
    assert data.in_channels == 3 and data.image_size == 224 and data.augment_default


def test_preprocessing_is_robustbench_res256crop224(imagenet_dir):
    from PIL import Image
    from torchvision import transforms

    path = min((imagenet_dir / "val" / CLASSES[2]).iterdir())
    with Image.open(path) as image:
        ours = get_preprocessing("Res256Crop224")(image)
        # robustbench.data.PREPROCESSINGS['Res256Crop224'], spelled out (importing robustbench is slow).
        theirs = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])(
            image.convert("RGB")
        )
    assert ours.dtype == torch.uint8 and ours.shape == (3, 224, 224)
    assert torch.equal(ours, (theirs * 255).round().to(torch.uint8))
    assert ours[2].float().mean() > ours[0].float().mean() + 100  # the class-2 tint survives (RGB order)


def test_batches_decode_lazily(imagenet_dir, count_decodes):
    data = load_imagefolder_splits("imagenet", imagenet_dir)
    assert isinstance(data.train_x, LazyImages) and count_decodes == []
    batch = data.train_x[torch.tensor([0, 11, 5])]
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.uint8
    assert len(count_decodes) == 3
    assert sorted(Path(p).parent.name for p in count_decodes) == [CLASSES[0], CLASSES[1], CLASSES[2]]
    # Decoded in threads, returned in index order: row 1 is image 11, of class 2 (tinted blue).
    assert batch[1, 2].float().mean() > batch[1, 0].float().mean() + 100
    # Holding out a validation split or truncating takes lazy subsets: still nothing decoded.
    split = split_validation(data, 3)
    assert isinstance(split.train_x, LazyImages) and isinstance(split.val_x, LazyImages)
    assert len(split.train_x) == 9 and len(split.val_x) == 3 and len(count_decodes) == 3
    assert data.test_x[:2].shape == (2, 3, 224, 224) and len(count_decodes) == 5


def test_other_preprocessing_sizes(imagenet_dir):
    data = load_imagefolder_splits("imagenet", imagenet_dir, preprocessing="Crop288")
    assert data.image_size == 288
    x = data.test_x[0]
    assert x.shape == (3, 288, 288)
    # Crop288 crops 288 out of a 64x48 image: torchvision's CenterCrop pads with zeros.
    assert int(x[:, 0, 0].sum()) == 0
    with pytest.raises(UserError, match=r"unknown ImageNet preprocessing 'Res256'.*valid: Res256Crop224"):
        load_imagefolder_splits("imagenet", imagenet_dir, preprocessing="Res256")


def test_robustbench_subset_is_the_test_split_when_present(imagenet_dir, monkeypatch):
    ids = [f"{CLASSES[2]}/img_1.png", f"{CLASSES[0]}/img_0.JPEG"]
    monkeypatch.setattr(imagefolder, "_robustbench_test_ids", lambda: ids)
    data = load_imagefolder_splits("imagenet", imagenet_dir)
    assert data.test_y.tolist() == [2, 0]
    assert [str(Path(p).relative_to(imagenet_dir / "val")) for p in data.test_x.paths] == ids


def test_layout_errors(tmp_path):
    with pytest.raises(UserError, match=r"val is not a directory.*one folder of images per class"):
        load_imagefolder_splits("imagenet", tmp_path)
    root = make_imagefolder(tmp_path / "a")
    (root / "val" / "n09999999").mkdir()
    with pytest.raises(UserError, match=r"must be the same .*n09999999"):
        load_imagefolder_splits("imagenet", root)
    (tmp_path / "b" / "train" / "n1").mkdir(parents=True)
    (tmp_path / "b" / "val" / "n1").mkdir(parents=True)
    with pytest.raises(UserError, match="empty train split"):
        load_imagefolder_splits("imagenet", tmp_path / "b")
    bad = make_imagefolder(tmp_path / "c")
    (bad / "val" / CLASSES[0] / "broken.png").write_bytes(b"not an image")
    data = load_imagefolder_splits("imagenet", bad)
    with pytest.raises(UserError, match=r"cannot read image .*broken.png"):
        data.test_x[:]


def test_hostile_image_files_are_one_line_errors(tmp_path, monkeypatch):
    """A FIFO in place of an image is refused unread; truncated files and decompression bombs name the file."""
    import os

    from PIL import Image

    prep = get_preprocessing("Res256Crop224")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"^image .*pipe.png is a FIFO \(named pipe\), not a regular file"):
        LazyImages([str(fifo)], prep)[0]
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(UserError, match=r"cannot read image .*cut.png \(OSError"):
        LazyImages([str(cut)], prep)[0]
    # PIL refuses an image of more than twice MAX_IMAGE_PIXELS; 40x50 stands in for a billion pixels here.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(UserError, match=r"cannot read image .*good.png \(DecompressionBombError") as info:
        LazyImages([str(good)], prep)[0]
    assert "\n" not in str(info.value)


def test_config_defaults_and_checks():
    cfg = config_from_mapping({"data": {"dataset": "imagenet", "preprocessing": "Crop288"}})
    assert cfg.threat.eps == pytest.approx(4 / 255)  # RobustBench's ImageNet Linf budget
    with pytest.raises(UserError, match="imagenet only"):
        DataSection(dataset="cifar10", preprocessing="Res224")


def test_train_and_evaluate_read_the_imagefolder(imagenet_dir, tmp_path, host):
    from robustbench_kd.jobs.pipeline import evaluate_spec
    from robustbench_kd.training.loop import train

    cfg = config_from_mapping(
        {
            "run": {"out_dir": str(tmp_path / "run"), "progress": False, "seed": 1},
            "data": {"dataset": "imagenet", "data_dir": str(imagenet_dir), "batch_size": 6, "preprocessing": "Res224"},
            "threat": {"steps": 1},
            "student": {"arch": "small-cnn", "options": {"width": 0.125}},
            "method": {"name": "pgd-at"},
            "optim": {"epochs": 1, "lr": 0.01},
        }
    )
    run = train(cfg, host=host)
    assert run.global_step == 2 and np.isfinite(run.history[0]["loss"])
    report = evaluate_spec(
        f"file:{run.checkpoint_dir / 'last.pt'}",
        dataset="imagenet",
        data_dir=str(imagenet_dir),
        norm="Linf",
        eps=4 / 255,
        attacks=["clean"],
        n_examples=None,
        batch_size=4,
        seed=0,
        pgd_steps=2,
        out_dir=tmp_path / "eval",
        model_id=None,
        model_dir=str(tmp_path / "zoo"),
        device="cpu",
        host=host,
        progress=False,
        sanity=False,
    )
    assert report.n_examples == 6 and 0 <= report.accuracy["clean"] <= 1


def test_imagenet_zoo_teacher_gets_its_input_size(tmp_path):
    """A robustbench:imagenet/... teacher loads offline and is fed the resolution it was evaluated at."""
    from robustbench_kd_plugins.teacher_sources import load_robustbench_teacher

    from robustbench_kd.teachers import ResizeInput, TeacherLoadContext, TeacherSpec
    from robustbench_kd.zoo.compat import import_robustbench
    from robustbench_kd.zoo.models import zoo_input_size, zoo_preprocessing

    assert zoo_input_size("Wong2020Fast", dataset="imagenet", threat_model="Linf") == 288
    assert zoo_preprocessing("Wong2020Fast", dataset="imagenet", threat_model="Linf") == "Crop288"
    assert zoo_preprocessing("Mo2022When_ViT-B", dataset="imagenet", threat_model="Linf") == "Res224"
    assert zoo_input_size("Standard", dataset="cifar10", threat_model="Linf") is None

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    net = model_dicts[BenchmarkDataset.imagenet][ThreatModel.Linf]["Salman2020Do_R18"]["model"]()
    folder = tmp_path / "zoo" / "imagenet" / "Linf"
    folder.mkdir(parents=True)
    # The zoo file holds the bare ResNet-18 weights; load_model adds the normalizer wrapper's "model." prefix.
    torch.save(
        {"state_dict": {k[len("model.") :]: v for k, v in net.state_dict().items() if k.startswith("model.")}},
        folder / "Salman2020Do_R18.pt",
    )
    spec = TeacherSpec.parse("robustbench:imagenet/Linf/Salman2020Do_R18")

    def context(size):
        return TeacherLoadContext(
            dataset="imagenet", num_classes=1000, in_channels=3, image_size=size, model_dir=tmp_path / "zoo"
        )

    at_224 = load_robustbench_teacher(spec, context(224))
    assert not isinstance(at_224, ResizeInput) and not at_224.training
    at_64 = load_robustbench_teacher(spec, context(64))
    assert isinstance(at_64, ResizeInput) and at_64.size == 224
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = at_64(x)
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # attacks through the teacher still work


def _fit_to_wrong_labels(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Train ``net`` to predict (y + 1) % 3 on ``x``: clean accuracy 0, so AutoAttack has nothing to attack."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(30):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), (y + 1) % 3).backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        assert (net(x).argmax(1) == y).sum() == 0


def test_zoo_checkpoint_and_bundle_entry_load_through_robustbench(imagenet_dir, tmp_path, host):
    """evaluate --name on ImageNet writes a checkpoint that load_model reads into the bundle's zoo entry."""
    from robustbench_kd.data.datasets import to_float
    from robustbench_kd.jobs.pipeline import evaluate_spec
    from robustbench_kd.students import build_student
    from robustbench_kd.testing.fixtures import tiny_zoo_entry
    from robustbench_kd.zoo.compat import import_robustbench

    torch.manual_seed(0)
    net = build_student(
        "small-cnn", num_classes=3, in_channels=3, image_size=224, width=0.125, normalize=(0.45, 0.25)
    )  # Normalized: buffers inside the student survive too
    data = load_imagefolder_splits("imagenet", imagenet_dir, preprocessing="Res224")
    x = to_float(data.test_x[:])
    _fit_to_wrong_labels(net, x, data.test_y)
    # As a training checkpoint records it: the architecture with its options.
    torch.save(
        {
            "student": net.state_dict(),
            "student_arch": {"name": "small-cnn", "options": {"width": 0.125, "normalize": (0.45, 0.25)}},
        },
        tmp_path / "student.pt",
    )
    name = "Tiny2026ImageNet"
    report = evaluate_spec(
        f"file:{tmp_path / 'student.pt'}",
        dataset="imagenet",
        data_dir=str(imagenet_dir),
        norm="Linf",
        eps=4 / 255,
        attacks=["clean", "autoattack"],
        n_examples=None,
        batch_size=6,
        seed=0,
        pgd_steps=2,
        out_dir=tmp_path / "eval",
        model_id=name,
        model_dir=str(tmp_path / "zoo"),
        device="cpu",
        host=host,
        progress=False,
        sanity=False,
        preprocessing="Res224",
    )
    assert report.accuracy["clean"] == 0 and report.bundle_path is not None
    # RobustBench's own ImageNet files hold the bare network; load_model moves it under "model.".
    saved = torch.load(report.checkpoint_path, weights_only=True)["state_dict"]
    assert list(saved) == list(net.state_dict())

    source = (report.bundle_path / "zoo_entry.py").read_text()
    assert "nn.Sequential(OrderedDict([('normalize', nn.Identity()), ('model', Normalized(SmallCNN(" in source
    assert "'preprocessing': 'Res224'" in source  # what robustbench.data.get_preprocessing reads
    from robustbench_kd.submission.zoo_entry import exec_zoo_entry

    entry_name, entry = exec_zoo_entry(source, {p.name: p.read_text() for p in report.bundle_path.glob("rbkd_*.py")})
    import_robustbench()
    from robustbench.utils import load_model

    with tiny_zoo_entry(entry_name, entry["model"], dataset="imagenet"):
        loaded = load_model(
            entry_name, model_dir=str(tmp_path / "eval" / "models"), dataset="imagenet", threat_model="Linf"
        )
    # Keys matched exactly: nothing was left at its random initialisation by a lenient load.
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in saved.items())
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), net(x))


def test_zoo_layout_models_save_their_network(tmp_path):
    """A model already in the zoo layout (a robustbench:imagenet entry) saves the bare network; ids that
    load_model would not load from file, and keys it would mangle, are refused."""
    from collections import OrderedDict

    from robustbench_kd.evaluation import imagenet_zoo_model, save_zoo_checkpoint

    class Normalizer(torch.nn.Module):  # like robustbench's ImageNormalizer: buffers from the constructor
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))

        def forward(self, x):
            return x - self.mean

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    zoo_style = torch.nn.Sequential(OrderedDict([("normalize", Normalizer()), ("model", net)]))
    path = save_zoo_checkpoint(zoo_style, tmp_path, dataset="imagenet", threat_model="Linf", model_id="A")
    assert list(torch.load(path, weights_only=True)["state_dict"]) == ["1.weight", "1.bias"]
    wrapped = imagenet_zoo_model(net)
    assert list(wrapped.state_dict()) == ["model.1.weight", "model.1.bias"]
    x = torch.rand(2, 3, 2, 2)
    assert torch.equal(wrapped(x), net(x))
    with pytest.raises(UserError, match="contains 'Standard'"):
        save_zoo_checkpoint(net, tmp_path, dataset="imagenet", threat_model="Linf", model_id="Standard_Tiny")
    bad = torch.nn.Sequential(OrderedDict([("submodel", net)]))
    with pytest.raises(ValueError, match="would be renamed"):
        save_zoo_checkpoint(bad, tmp_path, dataset="imagenet", threat_model="Linf", model_id="B")


def test_evaluation_needs_only_val(tmp_path, host):
    """val/ alone evaluates; training without train/ is a one-line error naming the folder."""
    from robustbench_kd.jobs.pipeline import evaluate_spec
    from robustbench_kd.students import build_student
    from robustbench_kd.training.loop import train

    root = make_imagefolder(tmp_path / "imagenet", {"val": 2})
    data = load_imagefolder_splits("imagenet", root)
    assert data.num_classes == 3 and data.test_y.tolist() == [0, 0, 1, 1, 2, 2] and len(data.train_y) == 0
    assert data.in_channels == 3 and data.image_size == 224
    torch.manual_seed(0)
    net = build_student("small-cnn", num_classes=3, in_channels=3, image_size=224, width=0.125)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "student.pt")
    report = evaluate_spec(
        f"file:{tmp_path / 'student.pt'}?arch=small-cnn&width=0.125",
        dataset="imagenet",
        data_dir=str(root),
        norm="Linf",
        eps=4 / 255,
        attacks=["clean"],
        n_examples=None,
        batch_size=6,
        seed=0,
        pgd_steps=2,
        out_dir=tmp_path / "eval",
        model_id=None,
        model_dir=str(tmp_path / "zoo"),
        device="cpu",
        host=host,
        progress=False,
        sanity=False,
    )
    assert report.n_examples == 6
    cfg = config_from_mapping(
        {
            "run": {"out_dir": str(tmp_path / "run"), "progress": False},
            "data": {"dataset": "imagenet", "data_dir": str(root)},
            "student": {"arch": "small-cnn", "options": {"width": 0.125}},
        }
    )
    with pytest.raises(UserError, match=r"^imagenet: .*train is not a directory; training needs data.data_dir/train/"):
        train(cfg, host=host)
