"""One writer per folder: a run (or a prepare) holds its output folder's lock while it writes.

The lock is an OS file lock (`filelock`: flock on Unix, LockFileEx on Windows), so the
operating system drops it when its process ends, however it ends (SIGKILL included): a crash
never leaves a folder locked. Who holds it is written beside the lock, so a refused second
writer can name the first. And since only the holder writes there, the holder knows that
any temp file it finds from an earlier writer is litter (that writer is dead) and removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import UserError

LOCK_NAME = ".tinylm.lock"
OWNER_NAME = ".tinylm.lock.json"  # who holds the lock; written once it is held, removed on release


class FolderLock:
    """Hold `folder`'s lock: `acquire()` refuses at once (no waiting) when another process holds it."""

    def __init__(self, folder: str | os.PathLike, purpose: str):
        self.folder = Path(folder)
        self.purpose = purpose  # e.g. "training", "tinylm prepare": said to a process that is refused
        self._lock = FileLock(self.folder / LOCK_NAME, timeout=0)

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise UserError(f"{self.folder} is in use by {describe_owner(self.folder)}; wait for it to finish "
                            f"(or stop it), or choose another folder") from None
        except OSError as exc:
            raise UserError(f"cannot lock {self.folder}: {exc.strerror or exc}; choose a writable folder") from None
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                 "command": " ".join(sys.argv), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        (self.folder / OWNER_NAME).write_text(json.dumps(owner), encoding="utf-8")

    def release(self) -> None:
        if self._lock.is_locked:
            with contextlib.suppress(OSError):
                (self.folder / OWNER_NAME).unlink()
            self._lock.release(force=True)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def describe_owner(folder: Path) -> str:
    """'tinylm prepare (pid 123 on host, since ...: `command`)', or a plain phrase when unknown."""
    try:
        owner = json.loads((folder / OWNER_NAME).read_text(encoding="utf-8"))
        return (f"another {owner['purpose']} (pid {owner['pid']} on {owner['host']}, since {owner['since']}: "
                f"`{owner['command']}`)")
    except (OSError, ValueError, KeyError, TypeError):
        return "another tinylm process"


def remove_stale(folder: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Delete what an earlier, dead writer left in `folder` (entries matching `patterns`); call it only
    while holding `folder`'s lock, so nobody alive is writing them. Returns what was removed."""
    removed = []
    for pattern in patterns:
        for path in folder.glob(pattern):
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                removed.append(path)
    return removed
