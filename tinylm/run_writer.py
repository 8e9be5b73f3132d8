"""What every process of a run does together to write into out_dir: claim it before any work, then save
checkpoints and train_log.json, and stop together when one of them cannot.

The main process writes the files (`checkpoint.save`, `atomic.write_json`); the others hand it their
RNG states and (under FSDP) their shards of the weights. Under FSDP every process also writes its
shard of the optimizer state into a folder the checkpoints name (`tinylm.shards`). A failure on one
process is raised on all of them, so no process waits in the next collective for one that has
stopped (until a timeout, minutes later).

With `[hub] push_checkpoints` the main process also hands each good save's files to a `HubPusher`
(`tinylm.hub_run`), which uploads them in the background; `close` waits for the last upload before it
lets the folder go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from . import checkpoint, locks, rng, run_folder, shards
from .atomic import write_json
from .config import HubConfig
from .errors import UserError
from .hub_run import HubPusher
from .paths import TRAIN_LOG_NAME


class RunWriter:
    """The run's writes into `out_dir` (and its pushes to the Hub, per `hub`); holds the folder's lock from
    `claim` to `close`."""

    def __init__(self, accelerator: Accelerator, out_dir: Path, hub: HubConfig):
        self.accelerator, self.out_dir, self.hub = accelerator, out_dir, hub
        self.is_main = accelerator.is_main_process
        # No process holds the whole optimizer state: each writes its shard (tinylm.shards).
        self.sharded = accelerator.distributed_type == DistributedType.FSDP
        self.lock = run_folder.lock(out_dir)
        self.replaced_run: list[str] = []
        self.pusher: HubPusher | None = None

    def claim(self, *, resumed_from: Path | None, overwrite: bool, say: Callable[[str], None]) -> None:
        """Refuse, before any work, what would lose a run or fail later (see `run_folder.claim`); every
        process stops with the first refusal, and the lock is let go."""
        failure = None
        try:
            self.replaced_run = run_folder.claim(self.out_dir, self.lock, is_main=self.is_main,
                                                 resumed_from=resumed_from, overwrite=overwrite, say=say)
        except UserError as exc:
            failure = exc
        try:
            self.stop_together(failure)
            if self.sharded:  # before any work, not at the first save with optimizer state (a whole interval)
                shards.check_shared(self.out_dir / locks.OWNER_NAME)
        except UserError:
            self.close(say)
            raise
        # The Hub as the run's home: its files pushed after each save, in the background (main process).
        if self.hub.push_checkpoints and self.is_main:
            self.pusher = HubPusher(self.hub, self.out_dir)

    def clear_replaced_run(self, say: Callable[[str], None]) -> None:
        """Remove the run --overwrite replaces (main process), before the new run writes its first file."""
        if self.replaced_run and self.is_main:
            removed = run_folder.clear_replaced_run(self.out_dir)
            say(f"--overwrite: removed the previous run's {', '.join(removed)} from {self.out_dir}")

    def save(self, names: list[str], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             payload: Callable[[dict | None, list, str | None], dict], train_log: dict, *, step: int) -> None:
        """Write one checkpoint under each of `names` (`payload(weights, rng_states, optimizer_shards)`),
        then train_log.json; under FSDP, first the folder of optimizer shards they name. Then, when every
        process saved, hand the files to the pusher."""
        rng_states = gather_object([rng.capture()])
        # A collective under FSDP (it gathers the shards), so every process calls it.
        weights = self.accelerator.get_state_dict(model) if names else None
        failure, folder = None, None
        if names and self.sharded:
            try:
                folder = shards.save(self.out_dir, model, optimizer, step=step, is_main=self.is_main)
            except UserError as exc:
                failure = exc
            self.stop_together(failure)
        if self.is_main:
            try:
                for name in names:
                    checkpoint.save(self.out_dir / name, payload(weights, rng_states, folder))
                write_json(self.out_dir / TRAIN_LOG_NAME, train_log)
                if folder:  # only now: until the checkpoints named the new folder, the old one was theirs
                    shards.remove_unnamed(self.out_dir)
            except UserError as exc:
                failure = exc
        self.stop_together(failure)
        if self.pusher is not None:
            self.pusher.push(step, train_log)

    def report(self, say: Callable[[str], None]) -> None:
        """Say what the uploads to the Hub did since the last report (main process, when pushing)."""
        if self.pusher is not None:
            self.pusher.report(say=say)

    def stop_together(self, failure: UserError | None) -> None:
        """Raise on every process the first failure any process had (one gather); nothing if none had."""
        messages = gather_object([str(failure) if failure else None])
        first = next((message for message in messages if message), None)
        if first is not None:
            raise UserError(first)

    def close(self, say: Callable[[str], None]) -> None:
        """Wait for the last upload to the Hub, then let another run use out_dir."""
        try:
            if self.pusher is not None:
                self.pusher.close(say=say)
        finally:
            self.lock.release()
