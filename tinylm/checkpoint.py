"""The checkpoint file: one `torch.save`d dict of tensors and plain Python values.

It loads with `torch.load(..., weights_only=True)`, so opening a checkpoint never
runs code from it. Layout (version 1):

    format            "tinylm-checkpoint"
    version           1
    model             state dict of the GPT2LMHeadModel (fp32, on CPU)
    model_config      GPT2Config.to_dict()
    tokenizer         {"kind": "char"|"bpe", "path": str, "json": tokenizer.json text}
    config            the run's Config.to_dict()
    meta              the prepared data's meta.json (dict)
    base_model        the Hub id a fine-tuned run started from (None: from scratch or a local folder;
                      absent in checkpoints from before it was recorded)
    iter              optimizer steps completed
    best_val_loss     best validation loss so far (inf if none)
    val_loss          validation loss at this checkpoint (or None)
    train_state       what resuming needs: optimizer, scaler, RNG states, ... (dict); the learning-rate
                      schedule is a function of `iter` and the config, so it is not stored
"""

from __future__ import annotations

import os
import shutil
import textwrap
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from . import paths
from . import tokenizer as tok
from .atomic import atomic_path
from .errors import UserError

FORMAT = "tinylm-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("model", "model_config", "tokenizer", "config", "iter")


class Loaded(NamedTuple):
    """A checkpoint read by `load`, with the path it came from."""

    path: Path
    payload: dict[str, Any]


def save(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Atomically write a checkpoint dict (format and version are added here)."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a failed write (a full disk) this way
            free = shutil.disk_usage(tmp.parent).free
            raise OSError(f"the write stopped short ({str(exc).strip().splitlines()[0]}) with "
                          f"{free / 2**20:.1f} MiB free on that disk") from None


def load(path: str | os.PathLike, flag: str = "--checkpoint") -> dict[str, Any]:
    """Read and check a checkpoint without running any code stored in it.

    `flag` is the command-line option the path came from, for the error messages.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a checkpoint file" if path.is_dir() else "does not exist"
        raise UserError(f"checkpoint {path} {what}; train first (tinylm train) or pass the right {flag}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        with open(path, "rb") as handle:
            starts_like_one = handle.read(4) == b"PK\x03\x04"
        if starts_like_one:  # a zip whose end is missing: a copy or a write that stopped short
            raise UserError(f"cannot load checkpoint {path}: the file is truncated or damaged; "
                            f"copy it again, or pass {flag} another checkpoint (e.g. {paths.BEST_NAME})")
        raise UserError(f"{path} is not a checkpoint (not a file written by torch.save); pass {flag} "
                        f"a {paths.BEST_NAME} or {paths.LAST_NAME} written by tinylm train")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors have many types; all mean "not a usable checkpoint"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it contains Python objects that could run code when loaded, so it was refused"
        raise UserError(f"cannot load checkpoint {path}: {textwrap.shorten(reason, 300)}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a tinylm checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise UserError(
            f"checkpoint {path} has format version {payload.get('version')!r}; this tinylm reads version {VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise UserError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return payload


def model_from(payload: dict[str, Any]) -> GPT2LMHeadModel:
    """The GPT2LMHeadModel stored in a loaded checkpoint, in eval mode."""
    config = GPT2Config.from_dict(payload["model_config"])
    model = GPT2LMHeadModel(config)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        # torch's first line only says "Error(s) in loading state_dict"; the second says which weight and how.
        first_two = " ".join(line.strip() for line in str(exc).splitlines()[:2])
        raise UserError(f"checkpoint weights do not match its model config: {first_two}") from None
    model.tie_weights()
    return model.eval()


def tokenizer_from(payload: dict[str, Any]):
    """The tokenizer stored in a loaded checkpoint (a PreTrainedTokenizerFast)."""
    return tok.from_json(payload["tokenizer"]["json"])
