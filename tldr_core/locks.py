"""Advisory file locks (``fcntl.flock``) shared by every layer: one audit per output folder, one
champion promotion at a time on a local registry store.

flock locks belong to an open file description, so two threads that each open the lock file
exclude each other just as two processes do, and the kernel drops the lock when the holder dies
(a SIGKILLed audit never leaves a stale lock behind). The lock file itself is left in place:
unlinking it while another process waits on it would let a third one lock a different inode.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class LockBusy(RuntimeError):
    """The lock is held by someone else (another audit, another promotion)."""


class FileLock:
    """An exclusive flock on ``path`` (created if missing); ``acquire`` then ``release`` (or ``with``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, timeout: float | None = 0.0, poll: float = 0.05) -> "FileLock":
        """Take the lock. timeout 0: fail at once with LockBusy when held; None: wait forever; else wait
        up to ``timeout`` seconds. OSError when the lock file cannot be created (an unwritable folder)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return self
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                os.close(fd)
                raise LockBusy(f"{self.path} is locked by another process")
            time.sleep(poll)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FileLock":
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def file_lock(path: str | Path, timeout: float | None = 0.0) -> Iterator[FileLock]:
    """``with file_lock(p, timeout=30):`` holds the exclusive lock on ``p`` for the block (see FileLock)."""
    lock = FileLock(path).acquire(timeout)
    try:
        yield lock
    finally:
        lock.release()
