"""A run's folder (training.out_dir): which files make a run, who may write there, what a new run clears.

One process writes into a run folder at a time: it holds the folder's lock (`locks.FolderLock`)
from the checks before training to the end of the run, so any temp file of an atomic write it
finds there belongs to a dead writer and is removed. A folder that holds another run is refused
unless the user asks to replace it (--overwrite); the replaced run's files are removed before the
new run writes its first, so none of them can be taken for the new run's.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from . import locks, shards
from .errors import UserError, command_line
from .paths import BEST_NAME, LAST_NAME, METRICS_NAME, TRAIN_LOG_NAME

# What a run writes into its out_dir: what --overwrite clears, and what makes a folder "hold a run".
RUN_FILES = (BEST_NAME, LAST_NAME, TRAIN_LOG_NAME, METRICS_NAME)
# The copies a run with [hub] push_checkpoints uploads from, while they upload (tinylm/hub_run.py).
HUB_UPLOADS = ".hub-uploads"
# Temp files of the run's atomic writes (atomic_path: ".<name>.XXXX.tmp"), the folders of optimizer shards
# being written (`shards`) and the uploads' copies: a dead writer's are litter.
STALE_PATTERNS = (*(f".{name}.*.tmp" for name in RUN_FILES), shards.STAGING_PATTERN, HUB_UPLOADS)
# Where a run that pushes to the Hub writes its export folder, inside out_dir.
EXPORT_NAME = "exported"
# The trackers' project name; tensorboard logs go to <out_dir>/<TRACKER_PROJECT>.
TRACKER_PROJECT = "tinylm"


def lock(out_dir: Path) -> locks.FolderLock:
    return locks.FolderLock(out_dir, "training run")


def claim(out_dir: Path, folder_lock: locks.FolderLock, *, is_main: bool, resumed_from: Path | None, overwrite: bool,
          say: Callable[[str], None]) -> list[str]:
    """Before any work: check out_dir is writable (on every process, so all of them stop together), take
    its lock and remove what a dead writer left (main process), and refuse it when it holds another run,
    unless `overwrite`. Return that run's files, which `clear_replaced_run` removes before the first write."""
    check_writable(out_dir)
    if is_main:
        folder_lock.acquire()
        stale = [path.name for path in remove_stale(out_dir)] + shards.remove_unnamed(out_dir)
        if stale:
            say(f"removed {len(stale)} unfinished file(s) a stopped run left in {out_dir}: " + ", ".join(stale))
    found = other_run(out_dir, resumed_from)
    if found and not overwrite:
        refuse_other_run(out_dir, found)
    return found


def check_writable(out_dir: Path) -> None:
    """Create out_dir if needed and write a file there, or raise a `UserError` saying why not."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"training.out_dir {out_dir} is a file, not a folder; choose another --out-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to training.out_dir {out_dir}: {exc.strerror or exc}; "
                        "choose a writable --out-dir") from None


def remove_stale(out_dir: Path) -> list[Path]:
    """Remove the temp files a dead writer left in out_dir (call it holding the lock); return them."""
    return locks.remove_stale(out_dir, STALE_PATTERNS)


def other_run(out_dir: Path, resumed_from: Path | None) -> list[str]:
    """The run files in out_dir that belong to another run than the one resumed (all of them for a new run)."""
    if resumed_from is not None and resumed_from.parent.resolve() == out_dir.resolve():
        return []
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def refuse_other_run(out_dir: Path, found: list[str]) -> None:
    """The error for a folder holding another run's `found` files, with the three ways on."""
    resume_hint = command_line("tinylm", "train", "--resume", out_dir / LAST_NAME)
    raise UserError(
        f"{out_dir} already holds a training run ({', '.join(found)}); continue it with "
        f"`{resume_hint}`, train into another --out-dir, or pass --overwrite to replace it"
    )


def clear_replaced_run(out_dir: Path) -> list[str]:
    """--overwrite: remove the replaced run's files (its optimizer shards, export and tracker logs too); return
    their names."""
    replaced = [name for name in (*RUN_FILES, EXPORT_NAME, TRACKER_PROJECT) if (out_dir / name).exists()]
    replaced += [folder.name for folder in shards.all_folders(out_dir)]
    for name in replaced:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return replaced


def final_checkpoint(out_dir: Path) -> Path:
    """The checkpoint a finished run hands on: ckpt_best.pt, or ckpt_last.pt when there is none."""
    best = out_dir / BEST_NAME
    return best if best.is_file() else out_dir / LAST_NAME
