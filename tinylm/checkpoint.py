"""The checkpoint file: one `torch.save`d dict of tensors and plain Python values.

It loads with `torch.load(..., weights_only=True)`, so opening a checkpoint never
runs code from it. Layout (version 1):

    format            "tinylm-checkpoint"
    version           1
    model             state dict of the GPT2LMHeadModel (fp32, on CPU); of a LoRA run, the frozen
                      pretrained weights, under the same names
    adapter           a LoRA run's adapters (`lora.split`: peft's names, the tensors of an
                      adapter_model.safetensors), built as the config's [lora] section says; absent
                      without LoRA
    model_config      GPT2Config.to_dict()
    tokenizer         {"kind": "char"|"bpe", "path": str, "json": tokenizer.json text}
    config            the run's Config.to_dict()
    meta              the prepared data's meta.json (dict)
    base_model        the Hub id a fine-tuned run started from (None: from scratch or a local folder;
                      absent in checkpoints from before it was recorded)
    iter              optimizer steps completed
    best_val_loss     best validation loss so far (inf if none)
    val_loss          validation loss at this checkpoint (or None)
    train_state       what resuming needs (dict): optimizer, scaler, rng (one RNG state per process),
                      world_size, cpu_matmul, run (a `RunState`); the learning-rate schedule is a
                      function of `iter` and the config, so it is not stored. Under FSDP `optimizer` is
                      None and `optimizer_shards` names the folder beside the file that holds it, one
                      shard per process (see `tinylm.shards`); None there too before the first step

`run_payload` builds it from a run; `restore_training` puts it back for a resume, and the `check_*`
functions refuse, with what changed, a resume that would not continue the same run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import textwrap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from . import lora, paths, rng
from . import tokenizer as tok
from .atomic import atomic_path
from .config import SHAPE_KEYS, LoraConfig
from .errors import UserError

FORMAT = "tinylm-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("model", "model_config", "tokenizer", "config", "iter")
# The GPT2Config keys that fix every weight's shape: a checkpoint resumes only into a model that agrees.
WEIGHT_SHAPE_KEYS = ("vocab_size", "n_positions", *SHAPE_KEYS)
# The [lora] keys that fix what the adapters are (their dropout may change on resume, as model.dropout may).
ADAPTER_KEYS = ("enabled", "r", "lora_alpha", "target_modules")


@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint must carry to resume it."""

    iter: int = 0
    best_val_loss: float = math.inf
    best_iter: int = -1
    evals_without_improvement: int = 0
    nonfinite_steps: int = 0
    elapsed_s: float = 0.0
    records: list[dict] = field(default_factory=list)

    def logged(self, step: int) -> bool:
        return any(record["iter"] == step for record in self.records)

    def note_eval(self, step: int, val_loss: float, min_delta: float) -> bool:
        """Count an evaluation; return whether it improved on the best by at least `min_delta`."""
        improved = val_loss < self.best_val_loss and self.best_val_loss - val_loss >= min_delta
        if improved:
            self.best_val_loss, self.best_iter, self.evals_without_improvement = val_loss, step, 0
        else:
            self.evals_without_improvement += 1
        return improved


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
    """The GPT2LMHeadModel stored in a loaded checkpoint, in eval mode; a LoRA run's with its adapters merged
    into its weights (`lora.merged`), a plain GPT-2 that needs no peft."""
    if "adapter" not in payload:
        return gpt2_from(payload).eval()
    # The model shares the payload's tensors (see gpt2_from) and merging adds the adapters into the base
    # weights in place: merge into copies, so the payload still holds the base its adapters were trained on.
    copied = {**payload, "model": {name: tensor.clone() for name, tensor in payload["model"].items()}}
    return lora.merged(trained_model(copied)).eval()


def trained_model(payload: dict[str, Any]):
    """The model a loaded checkpoint's run trained, in eval mode: its GPT2LMHeadModel, or a LoRA run's
    peft model of it with its adapters."""
    model = gpt2_from(payload)
    if "adapter" in payload:
        lora.require_peft("a checkpoint of a LoRA run")
        model = lora.adapt(model, lora.section_of(payload), payload["adapter"])
    return model.eval()


def gpt2_from(payload: dict[str, Any]) -> GPT2LMHeadModel:
    """The GPT2LMHeadModel of a loaded checkpoint's `model` weights (a LoRA run's: the pretrained model it
    adapts); its weights are the payload's tensors."""
    config = GPT2Config.from_dict(payload["model_config"])
    # Built on the meta device, the model takes the checkpoint's tensors as its weights: no random
    # initialisation to throw away and no copy (GPT-2 124M: seconds saved before the first token).
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    # In the dtype of a model built here, as copying into one would give (a no-op for fp32 weights).
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    weights = {name: tensor.to(dtypes.get(name, tensor.dtype)) for name, tensor in payload["model"].items()}
    try:
        model.load_state_dict(weights, assign=True)
    except RuntimeError as exc:
        # torch's first line only says "Error(s) in loading state_dict"; the second says which weight and how.
        first_two = " ".join(line.strip() for line in str(exc).splitlines()[:2])
        raise UserError(f"checkpoint weights do not match its model config: {first_two}") from None
    model.tie_weights()
    return model.eval()


def tokenizer_from(payload: dict[str, Any]):
    """The tokenizer stored in a loaded checkpoint (a PreTrainedTokenizerFast)."""
    return tok.from_json(payload["tokenizer"]["json"])


def run_payload(*, weights: dict, model: GPT2LMHeadModel, tokenizer, data, config, base_model: str | None,
                state: RunState, val_loss: float | None, optimizer_state: dict | None, optimizer_shards: str | None,
                scaler, rng_states: list, world_size: int, cpu_matmul: str) -> dict[str, Any]:
    """A training run's checkpoint (the layout above); `data` is the run's `data.PreparedData`. The optimizer's
    state is in the file (`optimizer_state`), or in the folder `optimizer_shards` names (under FSDP)."""
    weights = {k: v.detach().to("cpu") for k, v in weights.items()}
    adapter = {}
    if config.lora.enabled:
        weights, adapter["adapter"] = lora.split(model, weights)
    return {
        "model": weights,
        **adapter,
        "model_config": model.config.to_dict(),
        "tokenizer": {"kind": data.tokenizer_kind, "path": str(data.tokenizer_path), "json": tok.to_json(tokenizer)},
        "config": config.to_dict(),
        "meta": data.meta,
        "base_model": base_model,
        "iter": state.iter,
        "best_val_loss": state.best_val_loss,
        "val_loss": val_loss,
        "train_state": {
            "optimizer": optimizer_state,
            "optimizer_shards": optimizer_shards,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_states,
            "world_size": world_size,
            "cpu_matmul": cpu_matmul,
            "run": dataclasses.asdict(state),
        },
    }


def train_state(payload: dict[str, Any]) -> dict[str, Any]:
    """What resuming needs; refuses a checkpoint without optimizer state."""
    state = payload.get("train_state") or {}
    if "optimizer" not in state:
        raise UserError("cannot resume: the checkpoint has no optimizer state (was it written by tinylm export?)")
    return state


def run_state(payload: dict[str, Any]) -> RunState:
    run = dict(train_state(payload)["run"])
    return RunState(**run)


def restore_training(payload: dict[str, Any], *, optimizer, scaler, process_index: int, num_processes: int,
                     load_shards: Callable[[], None] | None = None) -> tuple[RunState, str | None]:
    """Put a run's saved training state back into `optimizer` (built with this run's settings), `scaler`
    and this process's random generators; return the run's `RunState`, and a warning when the random
    state cannot be restored. `load_shards` loads the optimizer state from the checkpoint's shards
    folder, when it names one (`tinylm.shards.load`)."""
    saved = train_state(payload)
    # Loading brings back the saved run's hyperparameters with its moments: a resume that
    # changes them must train with this run's, as its start-up diff says. (The learning rate is the
    # schedule's, set when the scheduler is built.)
    this_run = [{"weight_decay": group["weight_decay"], "betas": group["betas"]} for group in optimizer.param_groups]
    if saved.get("optimizer_shards"):
        load_shards()
    elif saved["optimizer"] is not None:  # None: saved before the first step, so a fresh optimizer is the saved one
        optimizer.load_state_dict(saved["optimizer"])
    for group, settings in zip(optimizer.param_groups, this_run):
        group.update(settings)
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    states = saved["rng"]
    if len(states) != num_processes:
        return run_state(payload), (
            f"checkpoint was written by {len(states)} processes, now {num_processes}: random state (dropout) is "
            "reseeded, so the run will not match an uninterrupted one exactly")
    rng.restore(states[process_index])
    return run_state(payload), None


def optimizer_shards_named(path: Path) -> str | None:
    """The shards folder the checkpoint at `path` names (None: none, or no readable checkpoint there).

    Reads only the file's small pickle (the weights are memory-mapped, never read), so it is cheap to
    ask after every save."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return payload["train_state"].get("optimizer_shards")
    except Exception:  # no file, a damaged one, or one without train_state: it names no folder
        return None


def check_optimizer_fits(payload: dict[str, Any], sharded_run: bool) -> None:
    """Refuse to resume under FSDP from a checkpoint that keeps the whole optimizer state in the file
    (written on one process or under DDP): FSDP shards it by parameter, and that file's state is not."""
    saved = train_state(payload)
    if sharded_run and saved["optimizer"] is not None and saved["optimizer"]["state"]:
        raise UserError(f"cannot resume under FSDP from a checkpoint written without it (at iter {payload['iter']}, "
                        f"on {saved.get('world_size', 1)} process(es)): its optimizer state is one unsharded "
                        "file; resume it the way it was launched (one process, or DDP: "
                        "configs/accelerate/multi-gpu.yaml), or start a new run under FSDP")


def started_cpu_matmul(payload: dict[str, Any] | None) -> str | None:
    """The CPU matmul backend the checkpoint's run trained with (None if it did not record one)."""
    return ((payload or {}).get("train_state") or {}).get("cpu_matmul")


def check_same_origin(payload: dict[str, Any], model_section, data, tokenizer) -> None:
    """Refuse a resume whose starting model or data (`data.PreparedData`) is not the checkpoint's: say what changed."""
    saved_model = payload["config"]["model"]
    for key in ("init_from", "init_revision"):
        if saved_model.get(key, "") != getattr(model_section, key):
            raise UserError(f"cannot resume: model.{key} {saved_model.get(key)!r} -> {getattr(model_section, key)!r}; "
                            "a run keeps the model it started from. Start a new run (another --out-dir) to "
                            "train from another")
    saved_meta, meta = payload.get("meta") or {}, data.meta
    if payload["tokenizer"]["json"] != tok.to_json(tokenizer):
        changes = [f"{key} {saved_meta.get(key)!r} -> {meta.get(key)!r}"
                   for key in ("tokenizer_kind", "vocab_size", "source", "created")
                   if saved_meta.get(key) != meta.get(key)]
        raise UserError(
            f"cannot resume: the data in {data.meta_path} was prepared with another tokenizer than the "
            f"checkpoint's ({', '.join(changes) or 'same size, other tokens'}): it was prepared again, or "
            "data.processed_dir points elsewhere. Resume on the data the run was trained on (prepare it "
            "again from the same text, or pass --processed-dir), or start a new run in another --out-dir"
        )


def check_resumable(payload: dict[str, Any], model_config: GPT2Config, adapters: LoraConfig, max_iters: int) -> None:
    """Refuse a resume into a model of another shape or with other LoRA `adapters`, or one with no steps left."""
    saved, saved_adapters = payload["model_config"], lora.section_of(payload)
    changed = [f"{key} {saved.get(key)} -> {getattr(model_config, key)}" for key in WEIGHT_SHAPE_KEYS
               if saved.get(key) != getattr(model_config, key)]
    if changed:
        raise UserError(
            f"cannot resume: the config changes the model shape ({', '.join(changed)}); "
            "resume with the config the checkpoint was trained with, or start a new run in another out_dir"
        )
    changed = [f"lora.{key} {getattr(saved_adapters, key)!r} -> {getattr(adapters, key)!r}" for key in ADAPTER_KEYS
               if getattr(saved_adapters, key) != getattr(adapters, key)]
    if changed:
        raise UserError(
            f"cannot resume: the config changes the LoRA adapters ({', '.join(changed)}); "
            "resume with the config the checkpoint was trained with, or start a new run in another out_dir"
        )
    if payload["iter"] >= max_iters:
        raise UserError(
            f"nothing to train: the checkpoint is at iter {payload['iter']} and training.max_iters is "
            f"{max_iters}; pass a larger --max-iters to train longer"
        )
