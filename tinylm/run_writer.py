"""What every process of a run does together to write into out_dir: claim it before any work, then save
checkpoints and train_log.json, and stop together when one of them cannot.

The main process writes the files (`checkpoint.save`, `atomic.write_json`); the others hand it their
RNG states and (under FSDP) their shards. A failure on one process is raised on all of them, so no
process waits in the next collective for one that has stopped (until a timeout, minutes later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from . import checkpoint, rng, run_folder
from .atomic import write_json
from .errors import UserError
from .paths import TRAIN_LOG_NAME


class RunWriter:
    """The run's writes into `out_dir`; holds the folder's lock from `claim` to `close`."""

    def __init__(self, accelerator: Accelerator, out_dir: Path):
        self.accelerator, self.out_dir = accelerator, out_dir
        self.is_main = accelerator.is_main_process
        self.lock = run_folder.lock(out_dir)
        self.replaced_run: list[str] = []

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
        except UserError:
            self.close()
            raise

    def clear_replaced_run(self, say: Callable[[str], None]) -> None:
        """Remove the run --overwrite replaces (main process), before the new run writes its first file."""
        if self.replaced_run and self.is_main:
            removed = run_folder.clear_replaced_run(self.out_dir)
            say(f"--overwrite: removed the previous run's {', '.join(removed)} from {self.out_dir}")

    def save(self, names: list[str], model: torch.nn.Module, payload: Callable[[dict | None, list], dict],
             train_log: dict) -> None:
        """Write one checkpoint under each of `names` (`payload(weights, rng_states)`), then train_log.json."""
        rng_states = gather_object([rng.capture()])
        # A collective under FSDP (it gathers the shards), so every process calls it.
        weights = self.accelerator.get_state_dict(model) if names else None
        failure = None
        if self.is_main:
            try:
                for name in names:
                    checkpoint.save(self.out_dir / name, payload(weights, rng_states))
                write_json(self.out_dir / TRAIN_LOG_NAME, train_log)
            except UserError as exc:
                failure = exc
        self.stop_together(failure)

    def stop_together(self, failure: UserError | None) -> None:
        """Raise on every process the first failure any process had (one gather); nothing if none had."""
        messages = gather_object([str(failure) if failure else None])
        first = next((message for message in messages if message), None)
        if first is not None:
            raise UserError(first)

    def close(self) -> None:
        """Let another run use out_dir."""
        self.lock.release()
