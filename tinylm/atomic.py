"""Crash-safe file writes: write a temp file beside the target, fsync, rename.

A reader (or a `kill -9` at any moment) sees either the old file or the new
one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import UserError



def umask() -> int:
    """The process umask, read by creating a file rather than with os.umask, which can only read it by
    setting it (for a moment every thread of the process would create files with the wrong mode)."""
    with tempfile.TemporaryDirectory() as folder:
        probe = os.path.join(folder, "probe")
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o777))
        return 0o777 & ~os.stat(probe).st_mode


def file_mode() -> int:
    """The mode `open` gives a new file: mkstemp makes ours owner-only, and they should be ordinary files."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success move it over `target`.

    The caller writes the temp path however it likes (torch.save, np.save, ...).
    On an exception the temp file is removed and `target` is left untouched.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise UserError(
            f"cannot write {target}: {exc.strerror or exc}; choose a writable folder or free some space"
        ) from None
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, file_mode())
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"cannot write {target}: {exc.strerror or exc}; the previous file (if any) is unchanged. "
            "Free some disk space or choose a writable folder"
        ) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Like `open(target, mode)`, but the file only appears, whole, when the block ends."""
    with atomic_path(target) as tmp:
        with open(tmp, mode, **kwargs) as handle:
            yield handle


def write_json(target: str | os.PathLike, data: Any) -> None:
    """Atomically write `data` as indented JSON."""
    with atomic_open(target, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_folder(staging: Path, out: Path) -> None:
    """Rename the folder `staging` to `out`: a reader sees the old folder or the new one, whole.

    An existing `out` is moved aside first and deleted only once the new one is in; if the
    rename fails, the old one is put back.
    """
    if not out.exists():
        staging.rename(out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    out.rename(retired / out.name)
    try:
        staging.rename(out)
    except OSError:
        (retired / out.name).rename(out)
        raise
    finally:
        if out.exists():
            shutil.rmtree(retired, ignore_errors=True)
