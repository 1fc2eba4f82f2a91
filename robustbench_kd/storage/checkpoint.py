"""Training checkpoints: atomic writes, safe (``weights_only``) reads, and rebuilding a network.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``: a crafted pickle cannot run code. It holds everything a resume
needs (student, optimiser, scheduler, distiller parameters/buffers and method state, epoch, step)
plus the student's architecture, so any checkpoint is usable as a teacher:
``file:RUN/checkpoints/epoch_020.pt``.

Every file the library reads goes through :func:`load_checkpoint` (``weights_only=True``), optionally
after :func:`verify_sha256` checked a pinned digest; files that third-party code reads for us
(``robustbench.utils.load_model``, timm's hub weights) are read inside :func:`weights_only_loads`, which
forces ``weights_only=True`` on every ``torch.load`` for its duration.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pickle
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustbench_kd.errors import UserError
from robustbench_kd.storage.atomic import atomic_torch_save
from robustbench_kd.storage.hashing import sha256_of

log = logging.getLogger(__name__)

FORMAT = "robustbench_kd.storage.checkpoint/1"
#: Names the same layout had before (version numbers are shared): older runs still resume.
_FORMAT_NAMES = ("robustbench_kd.storage.checkpoint", "robustbench_kd.checkpoint")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically (temp file + rename): a crash leaves the previous file intact."""
    path = Path(path)
    atomic_torch_save({"format": FORMAT, **_plain(payload)}, path)
    return path


def load_checkpoint(
    path: str | Path, *, map_location: str | torch.device = "cpu", sha256: str | None = None
) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any failure is a one-line UserError naming the file.

    ``sha256`` (hex) is compared with the file's digest before a single byte is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if sha256:
        verify_sha256(path, sha256)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as exc:
        raise UserError(_unreadable_message(path, exc)) from None
    if not isinstance(data, dict):
        raise UserError(f"checkpoint {path} holds a {type(data).__name__}, expected a dict of tensors")
    return data


def check_format(data: dict[str, Any], path: str | Path) -> None:
    """Refuse, in one line, a checkpoint whose ``format`` this version cannot resume.

    Missing (not a checkpoint ``distill`` wrote: a teacher, a zoo file), foreign (another program's), or a
    newer version (a later robustbench_kd changed the layout: resuming it here would misread it).
    """
    fmt = data.get("format")
    name, _, version = fmt.rpartition("/") if isinstance(fmt, str) else ("", "", "")
    current = int(FORMAT.rpartition("/")[2])
    if fmt is None:
        raise UserError(
            f"checkpoint {path} has no 'format' entry: it is not a checkpoint `robustbench-kd distill` wrote "
            "(a teacher or a zoo file?); --resume continues from a run's own checkpoints/last.pt"
        )
    if name not in _FORMAT_NAMES or not version.isdigit():
        raise UserError(
            f"checkpoint {path} has format {str(fmt)[:80]!r}, not a robustbench_kd training checkpoint "
            f"({FORMAT}); --resume continues from a run's own checkpoints/last.pt"
        )
    if int(version) > current:
        raise UserError(
            f"checkpoint {path} has format {fmt!r}, newer than this robustbench_kd reads ({FORMAT}); resume it "
            "with the robustbench_kd version that wrote it, or upgrade"
        )


def _unreadable_message(path: Path, exc: BaseException) -> str:
    """One line saying why ``path`` was refused.

    Three cases, told apart because the advice differs: an HTML page (a failed download), a pickle that
    references a Python callable (could run code: refused, never retried unsafely), and anything else
    (corrupt or truncated bytes). torch's own text is multi-line and suggests ``weights_only=False``, which
    is the wrong advice for an untrusted file, so only its offending item is quoted.
    """
    if _looks_like_html(path):
        return (
            f"checkpoint {path} is an HTML page, not a checkpoint (a failed or redirected download?); "
            "re-download the file"
        )
    text = str(exc)
    code = re.search(r"(?:Unsupported global|GLOBAL)[^\n]*", text)
    if "Weights only load failed" in text and code:
        return (
            f"checkpoint {path} was refused: it holds pickled Python objects that could run code when "
            f"loaded ({code.group(0).strip()[:160]}); only tensors, numbers, strings, lists and dicts are "
            "accepted (torch.load weights_only=True) - re-save it as a plain state dict or use a trusted file"
        )
    detail = re.search(r"Unsupported operand[^\n]*", text)
    first = detail.group(0) if detail else (text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    return (
        f"checkpoint {path} is corrupt or truncated ({first.strip()[:160]}); a checkpoint is a torch.save "
        "of tensors, numbers, strings, lists and dicts - re-create or re-download it"
    )


_HEX64 = re.compile(r"[0-9a-f]{64}")


def parse_sha256(text: str, *, where: str) -> tuple[str, ...]:
    """Split a ``sha256=`` value (comma-separated hex digests, any case) into lower-case digests."""
    digests = tuple(d.strip().lower() for d in str(text).split(","))
    if "" in digests:  # `sha256=$PIN` with PIN unset, or a stray comma: never read as "no pin"
        raise UserError(
            f"{where}: sha256 {text!r} holds an empty digest (an unset shell variable or a stray comma?); "
            "expected 64 hex characters (e.g. from `sha256sum FILE`), comma-separated for multi-file zoo entries"
        )
    bad = [d for d in digests if not _HEX64.fullmatch(d)]
    if bad:
        raise UserError(
            f"{where}: sha256 {bad[0]!r} is not a SHA-256 digest; expected 64 hex characters "
            "(e.g. from `sha256sum FILE`), comma-separated for multi-file zoo entries"
        )
    return digests


def verify_sha256(path: str | Path, expected: str) -> None:
    """Raise a one-line UserError unless ``path``'s SHA-256 equals ``expected`` (hex, any case).

    Reads raw bytes only: called before unpickling, so a swapped file is refused before it is parsed.
    """
    actual = sha256_of(path)
    if actual != expected.strip().lower():
        raise UserError(
            f"checkpoint {path} has SHA-256 {actual} but {expected.strip().lower()} was pinned; the file "
            "changed or is not the one you meant - re-download it or update the sha256 pin"
        )


def verify_sha256_all(paths: Sequence[Path], digests: Sequence[str], *, what: str, skip_missing: bool = False) -> None:
    """Check one pinned digest per file (a multi-file zoo ensemble pins each member in order).

    ``skip_missing``: files not on disk yet (about to be downloaded) are checked later by the caller.
    """
    if len(digests) != len(paths):
        raise UserError(
            f"{what} reads {len(paths)} file(s) ({' '.join(map(str, paths))}) but {len(digests)} "
            "sha256 digest(s) were pinned; give one per file, comma-separated, in that order"
        )
    for path, digest in zip(paths, digests, strict=False):
        if not (skip_missing and not Path(path).is_file()):
            verify_sha256(path, digest)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force ``weights_only=True`` on every ``torch.load`` made inside the block.

    For code we do not control that reads checkpoints for us: ``robustbench.utils.load_model`` calls
    ``torch.load`` without ``weights_only`` (unsafe when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set, or
    on torch < 2.6) and torch hub's ``load_state_dict_from_url`` defaults to ``weights_only=False``.
    Both look ``torch.load`` up on the module at call time, so replacing it for the duration of the
    call covers them. An explicit ``weights_only=True`` beats the environment variable.
    """
    original = torch.load

    @functools.wraps(original)
    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)  # a custom unpickler is how weights_only would be bypassed
        return original(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original


def _looks_like_html(path: Path) -> bool:
    try:
        head = path.open("rb").read(256).lstrip().lower()
    except OSError:
        return False
    return head.startswith(b"<!doctype html") or head.startswith(b"<html")


def _plain(obj: Any) -> Any:
    """Make scheduler/optimiser states weights_only-safe (MultiStepLR keeps a Counter)."""
    if isinstance(obj, Counter):
        return {"__counter__": {k: v for k, v in obj.items()}}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def restore_plain(obj: Any) -> Any:
    """Inverse of :func:`_plain`."""
    if isinstance(obj, dict):
        if set(obj) == {"__counter__"}:
            return Counter(obj["__counter__"])
        return {k: restore_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_plain(v) for v in obj]
    return obj


def state_dict_of(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network weights in a checkpoint: ours (``student``), zoo layout (``state_dict``) or bare."""
    for key in ("student", "state_dict", "model"):
        if isinstance(data.get(key), dict):
            return data[key]
    if all(isinstance(v, torch.Tensor) for v in data.values()):
        return data
    raise UserError("checkpoint holds no state dict (expected a 'student' or 'state_dict' entry)")


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> nn.Module:
    """``load_state_dict`` (strict), stripping a DDP ``module.`` prefix, with a readable error."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise UserError(f"{source} does not match the architecture: {detail}") from None
    return net
