"""The single-writer lock.

Exactly one watcher may write a database. SQLite would serialise two writers, but two watchers
would interleave runs, duplicate identities and fight over camera status. The lock is an
exclusive `fcntl.flock` on `<database>.lock`: the kernel drops it when the holding process
exits for any reason, kill -9 included, so a crash never leaves a stale lock to clean up by
hand. The file's content (owner, pid, host, time) only serves the error message; the lock file
is never deleted, because deleting it could let two processes lock two different inodes.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import WriterLockedError


class WriterLock:
    """An exclusive, non-blocking OS lock on one file, released by `release()` or process exit."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path = path
        self.owner = owner
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise WriterLockedError(
                f"{self.path.with_suffix('')} already has a writer ({holder}); "
                "stop that process first (only one keyreid-watch may write a database)"
            ) from None
        info = {
            "owner": self.owner,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "holder unknown"
    return (
        f"held by {info.get('owner', '?')!s}, pid {info.get('pid', '?')} on host "
        f"{info.get('host', '?')} since {info.get('since', '?')}"
    )
