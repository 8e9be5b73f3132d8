"""metrics.jsonl in a run's out_dir: one JSON line per logged step (every log_interval) and one per
evaluation, appended as the run goes, for `tinylm plot` and for pandas
(`pandas.read_json(path, lines=True)`: a step's row has a train_loss, an evaluation's a val_loss).

Each line is appended and flushed on its own, so a run killed mid-write leaves at most its last line
cut short (readers skip it). A resumed run first drops the lines past the step it resumes from: it
logs those steps again, and the file then reads like the one an uninterrupted run would have written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .atomic import atomic_open

# The columns of a logged step's line and of an evaluation's; elapsed_s and tokens_per_s are wall-clock
# measurements. An evaluation's train loss is over the fixed evaluation blocks, not the steps' batches.
STEP_COLUMNS = ("iter", "train_loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "elapsed_s")
EVAL_COLUMNS = ("iter", "val_loss", "eval_train_loss", "lr", "tokens_seen", "elapsed_s")


class MetricsLog:
    """Appends the logged steps and evaluations of the run that continues from step `start_iter` (main process)."""

    def __init__(self, path: Path, start_iter: int):
        self.path = path
        self.failure: str | None = None
        kept = [line for line in read_lines(path) if line["iter"] <= start_iter]
        if path.exists():
            with atomic_open(path, encoding="utf-8") as file:  # whole or not at all: a crash here loses nothing
                file.writelines(json.dumps(line) + "\n" for line in kept)

    def log_step(self, row: dict) -> str | None:
        """Add a logged step's line (the STEP_COLUMNS of `row`); see `append` for what it returns."""
        return self.append({key: row[key] for key in STEP_COLUMNS})

    def log_eval(self, record: dict) -> str | None:
        """Add an evaluation's line (EVAL_COLUMNS), from its train_log.json record."""
        return self.append({"iter": record["iter"], "val_loss": record["val_loss"], "eval_train_loss": record["train_loss"],
                            "lr": record["lr"], "tokens_seen": record["tokens_seen"], "elapsed_s": record["elapsed_s"]})

    def append(self, row: dict) -> str | None:
        """Add one line. A failed write (a full disk) stops the log, not the run: the first one
        returns a warning to print, and nothing more is written."""
        if self.failure is not None:
            return None
        try:
            with self.path.open("a", encoding="utf-8") as file:
                file.write(json.dumps(row) + "\n")
        except OSError as exc:
            self.failure = (f"cannot append to {self.path}: {exc.strerror or exc}; it stops at the step before "
                            f"iter {row['iter']}, training goes on")
            return self.failure
        return None


def parse(text: str) -> list[tuple[int, Any]]:
    """(line number, parsed JSON or the `json.JSONDecodeError` of a line that is not JSON) of each non-blank line.
    The one reader of the format: the writer and `tinylm plot` decide what a bad line means to them."""
    parsed = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            parsed.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            parsed.append((number, exc))
    return parsed


def read_lines(path: Path) -> list[dict]:
    """The whole lines of a metrics.jsonl ([] when there is none); a line cut short is left out."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [line for _, line in parse(text) if isinstance(line, dict) and isinstance(line.get("iter"), int)]
