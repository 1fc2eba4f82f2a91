"""Crash-safe file writes.

A results file or checkpoint is either the complete old version or the complete new one, never a
truncated mix: the new content goes to a temporary file in the *same directory* (so the final
``os.replace`` is a rename within one filesystem, which POSIX and Windows make atomic), is flushed
and fsynced, and only then replaces the target. If writing fails, the temporary file is removed and
the previous file is left untouched.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_text", "remove_stale_temps"]

# mkstemp creates files readable by the owner only; a freshly written results file should get the
# usual permissions instead (an existing file keeps its own).
_DEFAULT_MODE = 0o644
_TMP_SUFFIX = ".tmp"


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Not possible on every platform/filesystem (e.g. Windows),
    # where it is skipped: the data is already fsynced, only the directory entry may lag.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_binary_file(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Yield a binary file object whose content replaces ``path`` atomically on normal exit."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = _DEFAULT_MODE
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        # BaseException too: a KeyboardInterrupt mid-save must not leave a stray temp file behind.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None:  # name the file the user will look for
            raise OSError(exc.errno, exc.strerror or str(exc), str(target)) from exc
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents are created); return the path."""
    with _atomic_binary_file(path) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (parents are created); return the path.

    The text is encoded before the temporary file is created, so an encoding error leaves nothing
    behind either.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` atomically: on any error the previous file at ``path`` survives.

    Parents are created. Returns the path. A write the operating system refused (a full disk, a file-size
    limit, an I/O error) is raised as that :class:`OSError` naming ``path``, never as torch's multi-line
    ``RuntimeError`` from its zip writer (:func:`_os_failure_of`).
    """
    with _atomic_binary_file(path) as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as exc:
            cause = _os_failure_of(exc, handle)
            if cause is None:
                raise
            raise cause from exc
    return Path(path)


# What torch's zip writer (caffe2 ``PytorchStreamWriter`` in ``inline_container.cc``) says when a write
# of the file under it failed: a short write shows up as an "unexpected pos" check, a failed stream as
# "file write failed" or an iostream error.
_WRITER_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|file write failed|iostream error")


def _os_failure_of(exc: RuntimeError, handle: IO[bytes]) -> OSError | None:
    """The operating system's error behind torch's writer failure ``exc``, or None if the OS is not the cause.

    Two ways to learn it, because torch reports a failed write of the Python file object as a
    ``RuntimeError`` with no errno: (1) the ``OSError`` that ``handle.write`` raised, which torch leaves as
    the context (or cause) of its own exception; (2) when the chain has none but the message is the
    writer's, one more write of one byte at the end of the file: the OS refuses it again with the errno
    (ENOSPC, EFBIG, EIO, ...). Either way the half-written temporary file is removed by the caller.
    """
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if isinstance(link, OSError) and link.errno is not None:
            return OSError(link.errno, link.strerror or str(link))
        link = link.__cause__ or link.__context__
    if not _WRITER_FAILURE.search(str(exc)):
        return None
    try:
        handle.flush()
        fd = handle.fileno()
        os.pwrite(fd, b"\0", os.fstat(fd).st_size)
        os.fsync(fd)
    except OSError as probe:
        if probe.errno is not None:
            return OSError(probe.errno, probe.strerror or str(probe))
    return None


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a killed writer left in ``directory``; return what was removed.

    A process killed mid-write (SIGKILL, power loss) cannot run the cleanup above, so its
    ``.<name>.XXXX.tmp`` file stays behind; the target itself is still the previous complete version.
    Call this only while no other process writes into ``directory``.
    """
    removed = []
    for tmp in Path(directory).glob(f".*{_TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed
