"""Hostile data files: pickles that would run code, and CIFAR batches and extra-data files that lie.

Every CIFAR file is unpickled through ``robustbench_kd.storage.safe_pickle`` (never ``pickle.load``), in
both ``verify_md5`` modes, and checked; every extra-data file is memory-mapped only after its kind,
headers and sizes are checked. Each bad file is one line, exit 2, no traceback, nothing written.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hostile_harness import Case, Sandbox, assert_keeps_the_promise, check_catalogue, distill, with_files

from robustbench_kd.data.cifar import load_cifar
from robustbench_kd.errors import UserError
from robustbench_kd.storage.safe_pickle import MAX_OPERATIONS, loads_pickle
from robustbench_kd.testing.fixtures import make_tiny_cifar

CIFAR10 = Path("cifar") / "cifar-10-batches-py"
CIFAR100 = Path("cifar") / "cifar-100-python"
UNVERIFIED = {"data": {"dataset": "cifar10", "data_dir": "cifar", "verify_md5": False}}
UNVERIFIED_100 = {"data": {"dataset": "cifar100", "data_dir": "cifar", "verify_md5": False}}
EXTRA = {"data": {"extra_path": "gen.npz", "extra_fraction": 0.25}}
MKDIR = f"{os.mkdir.__module__}.mkdir"  # how a pickle names os.mkdir (posix.mkdir on Linux)


class MakeDirectory:
    """Unpickling this calls ``os.mkdir(path)``: the payload of a hostile batch file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.path,)


def _tiny(box: Sandbox, dataset: str = "cifar10") -> Path:
    make_tiny_cifar(box.root / "cifar", dataset=dataset, n_train_per_batch=4, n_test=4)
    return box.root / (CIFAR10 if dataset == "cifar10" else CIFAR100)


def _batch(n: int = 4, **entries: Any) -> dict[str, Any]:
    batch: dict[str, Any] = {"batch_label": "b", "labels": [i % 10 for i in range(n)]}
    batch["data"] = np.zeros((n, 3072), np.uint8)
    return {**batch, **entries}


def _cifar_with(filename: str, content: Any, dataset: str = "cifar10"):
    """A tiny CIFAR folder whose ``filename`` is replaced: bytes as they are, anything else pickled."""

    def prepare(box: Sandbox) -> None:
        folder = _tiny(box, dataset)
        data = content if isinstance(content, bytes) else pickle.dumps(content, protocol=2)
        (folder / filename).write_bytes(data)

    return prepare


def _cifar_payload(box: Sandbox) -> None:
    _cifar_with("data_batch_1", MakeDirectory(str(box.root / "pwned")))(box)


def _cifar_fifo(box: Sandbox) -> None:
    path = _tiny(box) / "data_batch_2"
    path.unlink()
    os.mkfifo(path)


def _cifar_dev_zero(box: Sandbox) -> None:
    path = _tiny(box) / "test_batch"
    path.unlink()
    path.symlink_to("/dev/zero")


def _cifar_oversized(box: Sandbox) -> None:
    with open(_tiny(box) / "data_batch_4", "r+b") as handle:
        handle.truncate(64 * 2**20 + 1)  # sparse: 64 MiB + 1 byte of zeros, nothing on disk


def _cifar_missing_meta(box: Sandbox) -> None:
    (_tiny(box) / "batches.meta").unlink()


def _escaping_global() -> bytes:
    """A protocol-4 pickle naming a global whose text holds a newline and a terminal escape."""
    module, name = b"os\n", b"sys\x1b[2Jtem"
    return b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93."


def _many_operations() -> bytes:
    """A 2 MB pickle of two million Nones in a list: small on disk, millions of objects when loaded."""
    return b"\x80\x02(" + b"N" * (MAX_OPERATIONS + 1) + b"l."


def _npz(box: Sandbox, **arrays: Any) -> None:
    np.savez(box.root / "gen.npz", **arrays)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def _npz_members(box: Sandbox, members: list[tuple[str, bytes]]) -> None:
    with zipfile.ZipFile(box.root / "gen.npz", "w") as archive:
        for name, data in members:
            archive.writestr(name, data)


GOOD_IMAGES = np.zeros((8, 8, 8, 1), np.uint8)
GOOD_LABELS = np.arange(8) % 10


def _npz_huge_shape(box: Sandbox) -> None:
    header = _npy_bytes(GOOD_IMAGES).replace(b"(8, 8, 8, 1)", b"(2**62, 8, 8, 1)".replace(b"2**62", b"%d" % 2**62))
    _npz_members(box, [("image.npy", header), ("label.npy", _npy_bytes(GOOD_LABELS))])


def _npz_fifo(box: Sandbox) -> None:
    os.mkfifo(box.root / "gen.npz")


CASES = [
    # -- CIFAR batches ---------------------------------------------------------------------------------
    Case(
        "data-cifar-batch-runs-code",
        with_files(_cifar_payload, distill(UNVERIFIED)),
        f"holds a pickled reference to {MKDIR}, which could run code",
    ),
    Case(
        "data-cifar-global-with-terminal-escape",
        with_files(_cifar_with("test_batch", _escaping_global()), distill(UNVERIFIED)),
        "holds a pickled reference to 'os\\n.sys\\x1b[2Jtem', which could run code",
    ),
    Case(
        "data-cifar-object-array",
        with_files(_cifar_with("data_batch_1", _batch(data=np.array([None] * 4, dtype=object))), distill(UNVERIFIED)),
        "holds a numpy array of Python objects, not of plain numbers",
    ),
    Case(
        "data-cifar-millions-of-objects",
        with_files(_cifar_with("data_batch_5", _many_operations()), distill(UNVERIFIED)),
        "holds more than 2,000,000 pickle operations",
        fresh=True,
        max_rss_mib=1500,
    ),
    Case(
        "data-cifar-batch-is-fifo",
        with_files(_cifar_fifo, distill(UNVERIFIED)),
        "data_batch_2 is a FIFO (named pipe), not a regular file",
        fresh=True,
        timeout=120,
    ),
    Case(
        "data-cifar-batch-links-to-dev-zero",
        with_files(_cifar_dev_zero, distill(UNVERIFIED)),
        "test_batch is a device, not a regular file",
        fresh=True,
        timeout=120,
        max_rss_mib=1500,
    ),
    Case(
        "data-cifar-batch-oversized",
        with_files(_cifar_oversized, distill(UNVERIFIED)),
        "data_batch_4 is larger than 64 MiB",
        fresh=True,
        max_rss_mib=1500,
    ),
    Case(
        "data-cifar-label-out-of-range",
        with_files(_cifar_with("data_batch_3", _batch(labels=[0, 1, 10, 2])), distill(UNVERIFIED)),
        "data_batch_3 holds the label 10; cifar10 labels lie in [0, 10)",
    ),
    Case(
        "data-cifar100-negative-fine-label",
        with_files(
            _cifar_with("train", {"fine_labels": [-1] * 4, "data": np.zeros((4, 3072), np.uint8)}, "cifar100"),
            distill(UNVERIFIED_100),
        ),
        "train holds the label -1; cifar100 labels lie in [0, 100)",
    ),
    Case(
        "data-cifar-labels-not-integers",
        with_files(_cifar_with("data_batch_2", _batch(labels=["cat", "dog", "cat", "ship"])), distill(UNVERIFIED)),
        "its 'labels' entry must be a list of integer class labels",
    ),
    Case(
        "data-cifar-wrong-image-size",
        with_files(_cifar_with("data_batch_1", _batch(data=np.zeros((4, 1024), np.uint8))), distill(UNVERIFIED)),
        "holds 4,096 image bytes for 4 labels, expected 12,288 (3072 bytes per 3x32x32 image)",
    ),
    Case(
        "data-cifar-fewer-images-than-labels",
        with_files(_cifar_with("data_batch_1", _batch(n=5, data=np.zeros((4, 3072), np.uint8))), distill(UNVERIFIED)),
        "holds 12,288 image bytes for 5 labels",
    ),
    Case(
        "data-cifar-float-images",
        with_files(_cifar_with("data_batch_1", _batch(data=np.zeros((4, 3072), np.float32))), distill(UNVERIFIED)),
        "its 'data' entry must be a uint8 array of image bytes, got a float32 array",
    ),
    Case(
        "data-cifar-batch-not-a-dict",
        with_files(_cifar_with("data_batch_1", [1, 2, 3]), distill(UNVERIFIED)),
        "is not a CIFAR batch (a dict with 'data' and 'labels'), it holds a list",
    ),
    Case(
        "data-cifar-missing-meta",
        with_files(_cifar_missing_meta, distill(UNVERIFIED)),
        "is incomplete: missing batches.meta",
    ),
    Case(
        "data-cifar-meta-wrong-class-count",
        with_files(_cifar_with("batches.meta", {"label_names": ["a"] * 9}), distill(UNVERIFIED)),
        "must list the 10 class names under 'label_names', found 9 names",
    ),
    # -- extra (generated) data ------------------------------------------------------------------------
    Case(
        "data-extra-object-labels",
        with_files(
            lambda box: _npz(box, image=GOOD_IMAGES, label=np.array([{"cls": 1}] * 8, dtype=object)), distill(EXTRA)
        ),
        "member label.npy holds Python objects (pickled)",
    ),
    Case(
        "data-extra-nan-float-images",
        with_files(
            lambda box: _npz(box, image=np.full((8, 8, 8, 1), np.nan, np.float32), label=GOOD_LABELS), distill(EXTRA)
        ),
        "extra images must be uint8 in [0, 255]",
    ),
    Case(
        "data-extra-shape-of-another-dataset",
        with_files(lambda box: _npz(box, image=np.zeros((8, 32, 32, 3), np.uint8), label=GOOD_LABELS), distill(EXTRA)),
        "extra images of shape (32, 32, 3) do not match the training images; expected (N, 8, 8, 1)",
    ),
    Case(
        "data-extra-member-not-npy",
        with_files(lambda box: _npz_members(box, [("image.npy", b"GIF89a" + bytes(64))]), distill(EXTRA)),
        "member image.npy is not a valid .npy array",
    ),
    Case(
        "data-extra-header-claims-exabytes",
        with_files(_npz_huge_shape, distill(EXTRA)),
        "member image.npy is truncated",
        fresh=True,
        max_rss_mib=1500,
    ),
    Case(
        "data-extra-member-twice",
        with_files(
            lambda box: _npz_members(
                box,
                [
                    ("image.npy", _npy_bytes(GOOD_IMAGES)),
                    ("label.npy", _npy_bytes(GOOD_LABELS)),
                    ("label.npy", _npy_bytes(GOOD_LABELS + 100)),
                ],
            ),
            distill(EXTRA),
        ),
        "holds two members named label.npy",
    ),
    Case(
        "data-extra-is-fifo",
        with_files(_npz_fifo, distill(EXTRA)),
        "data.extra_path gen.npz is a FIFO (named pipe), not a regular file",
        fresh=True,
        timeout=120,
    ),
]


def test_catalogue_ids_unique() -> None:
    check_catalogue(CASES)
    assert all(case.id.startswith("data-") for case in CASES)


@pytest.mark.filterwarnings("ignore:Duplicate name")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_data_is_one_line_exit_2_and_leaves_no_output(case, tmp_path, monkeypatch, capsys) -> None:
    assert_keeps_the_promise(case, tmp_path, monkeypatch, capsys)


# -- the severe finding: a CIFAR batch that runs code --------------------------------------------------


def test_a_batch_that_runs_code_never_runs_it(tmp_path, monkeypatch, capsys) -> None:
    """Control: ``pickle.load`` (torchvision's call) runs the payload; ``distill`` refuses it unrun."""
    control = Sandbox(tmp_path / "control")
    control.root.mkdir()
    _cifar_payload(control)
    with open(control.root / CIFAR10 / "data_batch_1", "rb") as handle:
        pickle.load(handle, encoding="latin1")  # exactly what torchvision's CIFAR10 does with each batch
    assert (control.root / "pwned").is_dir(), "the control payload did not run: the test proves nothing"

    sandbox = tmp_path / "real"
    sandbox.mkdir()
    case = Case(
        "data-control-payload",
        with_files(_cifar_payload, distill(UNVERIFIED)),
        f"holds a pickled reference to {MKDIR}, which could run code",
    )
    line = assert_keeps_the_promise(case, sandbox, monkeypatch, capsys)
    assert str(CIFAR10 / "data_batch_1") in line  # names the file
    assert not (sandbox / "pwned").exists() and not (sandbox / "run").exists()


@pytest.mark.parametrize("verify_md5", [True, False])
def test_load_cifar_never_runs_a_payload(tmp_path, verify_md5) -> None:
    box = Sandbox(tmp_path)
    _cifar_payload(box)
    expect = "fails torchvision's MD5 check" if verify_md5 else f"holds a pickled reference to {MKDIR}"
    with pytest.raises(UserError, match=expect):
        load_cifar("cifar10", tmp_path / "cifar", train=True, verify_md5=verify_md5)
    assert not (tmp_path / "pwned").exists()


def test_payload_with_matching_md5_is_still_refused(tmp_path, monkeypatch) -> None:
    """Even a file whose MD5 matches torchvision's table (a collision, a patched table) is never run."""
    from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

    box = Sandbox(tmp_path)
    _cifar_payload(box)
    folder = tmp_path / CIFAR10

    def digest(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(TorchvisionCIFAR10, "train_list", [[f, digest(f)] for f, _ in TorchvisionCIFAR10.train_list])
    monkeypatch.setattr(TorchvisionCIFAR10, "meta", {**TorchvisionCIFAR10.meta, "md5": digest("batches.meta")})
    with pytest.raises(UserError, match=f"holds a pickled reference to {MKDIR}, which could run code"):
        load_cifar("cifar10", tmp_path / "cifar", train=True, verify_md5=True)
    assert not (tmp_path / "pwned").exists()


# -- the safe loader itself ----------------------------------------------------------------------------


def _load(data: bytes) -> Any:
    return loads_pickle(data, source="file x", fix="replace it")


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]  # the pure-Python pickler
    """Writes strings and bytes as Python 2 ``str`` (BINSTRING), as the official CIFAR files hold them."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def _python2_pickle(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    # numpy 1.x (and Python 2) name the array constructor by its old module.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def test_the_layout_of_the_official_python2_files_loads(tmp_path) -> None:
    make_tiny_cifar(tmp_path, n_train_per_batch=3, n_test=5, seed=2)
    folder = tmp_path / "cifar-10-batches-py"
    before, labels_before = load_cifar("cifar10", tmp_path, train=False, verify_md5=False)
    with open(folder / "test_batch", "rb") as handle:
        batch = pickle.load(handle)  # a file make_tiny_cifar just wrote
    data = _python2_pickle(batch)
    assert b"cnumpy.core.multiarray\n_reconstruct" in data and pickle.BINSTRING in data
    (folder / "test_batch").write_bytes(data)
    after, labels_after = load_cifar("cifar10", tmp_path, train=False, verify_md5=False)
    assert torch.equal(before, after) and torch.equal(labels_before, labels_after)


@pytest.mark.parametrize("protocol", [0, 2, 3, 4])
def test_numeric_arrays_round_trip(protocol) -> None:
    arrays = {
        "u1": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "big_endian": np.arange(3, dtype=">i4"),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "float": np.linspace(0, 1, 5, dtype=np.float32),
    }
    loaded = _load(pickle.dumps({**arrays, "names": ["a", "b"], "n": (1, 2.5)}, protocol=protocol))
    for key, array in arrays.items():
        np.testing.assert_array_equal(loaded[key], array)
    assert loaded["names"] == ["a", "b"] and loaded["n"] == (1, 2.5)
    again = pickle.loads(pickle.dumps(loaded["u1"]))  # pickled again it is a plain ndarray
    assert type(again) is np.ndarray


def test_forged_dtype_flags_cannot_make_numbers_into_object_pointers() -> None:
    """numpy's own unpickling trusts a dtype's pickled flags; "holds objects" on uint64 would deref bytes."""
    data = pickle.dumps(np.arange(2, dtype=np.uint64), protocol=2)
    forged = data.replace(b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t", b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK?t")
    assert forged != data
    array = _load(forged)
    assert not array.dtype.hasobject and array.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (pickle.dumps(eval, protocol=4), "holds a pickled reference to builtins.eval, which could run code"),
        (b"\x80\x02c__builtin__\ngetattr\n.", "holds a pickled reference to __builtin__.getattr"),
        (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.", "only accepted as Python 3"),
        (b"\x80\x02cnumpy\nndarray\n)R.", "'_NdarrayMarker' object is not callable"),
        (b"\x80\x02cnumpy\ndtype\n}b.", "cannot be read as a pickle"),
        (b"\x80\x02]r\xff\xff\xff\x7f.", "memo index 2147483647 is beyond what a data file uses"),
        (b"not a pickle", "cannot be read as a pickle"),
    ],
    ids=[
        "global-eval",
        "python2-builtin",
        "codecs-other-than-latin1",
        "calls-ndarray",
        "build-on-allowed-callable",
        "memo-index-2-billion",
        "garbage",
    ],
)
def test_refused_pickles(data, match) -> None:
    with pytest.raises(UserError, match=match) as info:
        _load(data)
    assert "\n" not in str(info.value) and str(info.value).startswith("file x ")


def test_array_reconstruction_must_be_what_numpy_writes() -> None:
    data = pickle.dumps(np.zeros(4, np.uint8), protocol=4)
    with pytest.raises(UserError, match="reconstruction with arguments numpy never writes"):
        _load(data.replace(b"K\x00\x85", b"J\x00\x00\x00\x40\x85"))  # a 1 GiB placeholder instead of (0,)
    with pytest.raises(UserError, match=r"needs 9 bytes, the file holds 4"):
        _load(data.replace(b"K\x04\x85", b"K\x09\x85"))
