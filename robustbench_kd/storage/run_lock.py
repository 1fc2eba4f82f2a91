"""One writer per run directory: an advisory lock file that ``distill`` holds from start to finish.

Two ``distill`` processes on one ``run.out_dir`` would interleave their checkpoints, metrics and config (the
directory's ``config.yaml`` naming one seed while ``last.pt`` was trained with the other). The first to
get here holds ``<out_dir>/run.lock`` with ``flock`` (the :mod:`filelock` package); a second one is refused
in one line and writes nothing.

Why this shape:

* ``flock`` belongs to the open file: the kernel drops it when the holder exits in any way (an exception,
  Ctrl-C, SIGKILL, a power cut), so a crashed run never leaves a lock that blocks the next one. filelock's
  fallback to a marker file, which a crash would leave behind, is switched off.
* The lock file is created only together with the run directory (:meth:`RunDirLock.claim`), so a command
  refused for a mistake before anything is written leaves no trace; an existing lock file is taken at once
  (:meth:`RunDirLock.claim_existing`), before the process reads ``last.pt``, and opening it neither
  truncates nor touches it.
* The file is never removed: a process waiting to open it must find the inode the holder locked.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from robustbench_kd.errors import UserError

if TYPE_CHECKING:
    from filelock import BaseFileLock

__all__ = ["LOCK_NAME", "RunDirLock"]

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"

# flock is missing on some network filesystems: run unlocked there (as before) rather than not at all.
_NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}


class RunDirLock:
    """The lock of one run directory; a context manager that releases it (if held) on exit."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self._lock: BaseFileLock | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (through this object)."""
        return self._lock is not None

    def claim_existing(self) -> None:
        """Take the lock if its file exists already (a run directory used before); create nothing.

        Raises a one-line UserError while another process holds it.
        """
        if not self.held and os.path.lexists(self.path):
            self._acquire()

    def claim(self) -> None:
        """Take the lock, creating the run directory and the lock file if needed; a no-op when held."""
        if self.held:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._acquire()

    def release(self) -> None:
        """Release the lock (the file stays); a no-op when not held."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()

    def _acquire(self) -> None:
        import filelock

        self._check_regular_file()
        lock = filelock.FileLock(str(self.path), thread_local=False, fallback_to_soft=False, preserve_lock_file=True)
        try:
            lock.acquire(timeout=0, blocking=False)
        except filelock.Timeout:
            raise UserError(
                f"run directory {self.out_dir} is in use by another process (it holds {self.path}); wait for "
                "that distill to finish, or choose another run.out_dir"
            ) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            log.warning(
                "cannot lock %s (%s): this filesystem has no flock; make sure no other process uses %s",
                self.path,
                exc.strerror,
                self.out_dir,
            )
            return
        self._lock = lock

    def _check_regular_file(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            raise UserError(
                f"{self.path} is not a regular file; it is the lock file of run directory {self.out_dir}: "
                "remove it, or choose another run.out_dir"
            )
