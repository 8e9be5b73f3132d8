"""A checkpoint's sharded part: under FSDP, every process's share of the optimizer state, written and
read by all processes together with torch.distributed.checkpoint (DCP).

Under FSDP no process holds the whole optimizer state, so `ckpt_last.pt` (and `ckpt_best.pt`) keep the
whole model (gathered, as on one process) and the run's state, and name, in
`train_state.optimizer_shards`, a folder beside them that holds the optimizer state:

    ckpt_last.pt                  model, config, tokenizer, iter, RNG of every process, ...
    ckpt_shards-<iter>-<token>/   .metadata and one __<rank>_0.distcp per process (DCP's format)

Each save writes a new folder (a unique name), first as `.ckpt_shards-<iter>-<token>.tmp`, renamed
when every process has written its part; then the checkpoint file that names it is written
(atomically), and only then are the folders no checkpoint names removed. The checkpoint file is the
commit: a crash at any moment leaves `ckpt_last.pt` naming a whole folder, the old one or the new
one. A half-written folder is never named, and the next run's start removes it.

The state is saved by parameter name with torch's `get_optimizer_state_dict`, so DCP reshards it on
load: a run resumes on another number of processes, under FSDP or not.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate.utils import broadcast_object_list, gather_object
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from .atomic import dir_mode, replace_folder
from .checkpoint import optimizer_shards_named
from .errors import UserError
from .paths import BEST_NAME, LAST_NAME, SHARDS_PREFIX

# Where a save writes before its rename: a dead writer's are litter (run_folder removes them).
STAGING_PATTERN = f".{SHARDS_PREFIX}*.tmp"


def save(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, step: int,
         is_main: bool) -> str | None:
    """Write this process's part of the optimizer state (every process calls this together); return
    the new folder's name, or None when the optimizer has no state yet (no step taken: nothing to keep)."""
    if not optimizer.state:  # the same on every process: each holds state for its shard of every parameter
        return None
    # The moments, by parameter name: DTensors (this process's shard) under FSDP, whole tensors otherwise.
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    staging = [str(staging_folder(out_dir, f"{SHARDS_PREFIX}{step}-")) if is_main else None]
    broadcast_object_list(staging)  # every process writes into the folder the main process made
    staging = Path(staging[0])
    try:  # every process stops here, together, rather than some of them in dcp.save's collectives
        check_shared(staging)
    except UserError as exc:
        if is_main:
            staging.rmdir()
        raise UserError(f"cannot save the optimizer shards: {exc}") from None
    try:
        dcp.save(state, checkpoint_id=staging)
    except CheckpointException as exc:  # raised on every process when one of them failed
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write the optimizer shards to {staging}: {_first_failure(exc)}; "
                        "the previous checkpoint is unchanged. Free some disk space or choose a writable "
                        "folder") from None
    name = staging.name[1:-len(".tmp")]
    # dcp.save returns once the main process wrote .metadata, after every process wrote (and fsynced) its
    # part. (The checkpoint file's atomic write fsyncs out_dir, and with it this rename.)
    if is_main:
        replace_folder(staging, out_dir / name)
    return name


def check_shared(made: Path) -> None:
    """Stop every process, with one line, unless every one sees `made`, which the main process made in
    training.out_dir (every process calls this together)."""
    blind = [rank for rank, sees in enumerate(gather_object([made.exists()])) if not sees]
    if blind:
        raise UserError(f"process {blind[0]} does not see {made}, which the main process made in training.out_dir; "
                        "under FSDP every process writes its part of each checkpoint there, so put out_dir on a "
                        "filesystem every machine shares")


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put the optimizer state in `folder` into `optimizer`, each process its shard, on any number of
    processes (every process calls this together)."""
    if not all(gather_object([(folder / ".metadata").is_file()])):  # DCP writes it last; every process stops
        raise UserError(f"cannot resume: the optimizer shards {folder} the checkpoint names are missing or "
                        "incomplete; copy that folder along with the checkpoint (where every process sees it), "
                        "or start a new run")
    # The optimizer's state as this run shards it: torch first gives a fresh optimizer its moments
    # (a step with zero gradients at learning rate 0), so DCP has tensors of the right shards to read into.
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    try:
        dcp.load(state, checkpoint_id=folder)
    except CheckpointException as exc:
        raise UserError(f"cannot resume from the optimizer shards in {folder}: {_first_failure(exc)}") from None
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def folder_of(checkpoint_path: Path, payload: dict) -> Path | None:
    """The shards folder a loaded checkpoint names (beside it), or None if it keeps its optimizer state itself."""
    name = (payload.get("train_state") or {}).get("optimizer_shards")
    return checkpoint_path.parent / name if name else None


def remove_unnamed(out_dir: Path) -> list[str]:
    """Remove the shards folders in out_dir that no checkpoint names (replaced by a later save, or
    left by a save cut short before its checkpoint was written); call it holding out_dir's lock."""
    named = {optimizer_shards_named(out_dir / name) for name in (LAST_NAME, BEST_NAME)}
    removed = []
    for folder in sorted(out_dir.glob(f"{SHARDS_PREFIX}*")):
        if folder.is_dir() and folder.name not in named:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def all_folders(out_dir: Path) -> list[Path]:
    """Every shards folder in out_dir, named or not (what --overwrite clears)."""
    return sorted(folder for folder in out_dir.glob(f"{SHARDS_PREFIX}*") if folder.is_dir())


def staging_folder(out_dir: Path, stem: str) -> Path:
    """A new, empty folder `.<stem>XXXXXXXX.tmp` in out_dir, where a shards folder is written before its
    rename (`stem` starts with SHARDS_PREFIX: a dead writer's is litter, STAGING_PATTERN)."""
    staging = tempfile.mkdtemp(prefix=f".{stem}", suffix=".tmp", dir=out_dir)
    os.chmod(staging, dir_mode())  # mkdtemp's is owner-only; the run's other files follow the umask
    return Path(staging)


def _first_failure(exc: CheckpointException) -> str:
    """The first process's error, on one line (DCP's own message lists every process with tracebacks)."""
    failure = next(iter(exc.failures.values()), None)
    error = failure[0] if isinstance(failure, tuple) else failure
    return str(error).strip().splitlines()[0] if error is not None and str(error).strip() else type(error).__name__
