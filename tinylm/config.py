"""Typed, validated run configuration: TOML presets -> dataclasses.

Every key has a type and a default; an unknown key is an error that names the
closest valid key, and a wrong type or out-of-range value names the key and
what was expected. Command-line flags override the file via `apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from . import paths
from .errors import UserError, command_line

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16")
DATA_FORMATS = ("txt", "bin")
TOKENIZERS = ("char", "bpe", "pretrained")
SCRATCH = "scratch"
# The [model] keys that are GPT2Config keys too and fix the transformer's shape (a fine-tune keeps them).
SHAPE_KEYS = ("n_layer", "n_head", "n_embd")
# accelerate's trackers (accelerate.utils.LoggerType, less "all"); tinylm/tracking.py checks each is installed.
TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
COMPILE_CHOICES = ("auto", "on", "off")
# The layers of GPT-2 that LoRA can adapt (peft's target_modules, matched by name in every block), in words.
LORA_TARGETS = {
    "c_attn": "attention's query/key/value projection",
    "c_proj": "attention's and the MLP's output projections",
    "c_fc": "the MLP's first layer",
}
CPU_MATMULS = ("auto", "blas", "onednn")


@dataclass
class ModelConfig:
    """Shape of the GPT-2 model. The vocab size comes from the prepared data's tokenizer.

    `init_from` a Hub id or a local GPT-2 folder fine-tunes that model: its shape is the
    model's own (shape keys given here must agree), and `block_size` may crop its context.
    """

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    init_from: str = SCRATCH  # "scratch", a Hub id ("gpt2", "user/model") or a local model folder
    init_revision: str = ""  # a branch, tag or commit of a Hub id; empty: the default branch


@dataclass
class DataConfig:
    """Where the prepared data lives and which tokenizer it was prepared with."""

    processed_dir: str = paths.PROCESSED_DIR
    tokenizer: str = "char"


@dataclass
class TrainingConfig:
    """The optimisation loop, evaluation, checkpointing and hardware."""

    data_format: str = "bin"
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 12
    grad_accum_steps: int = 1
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    # Each evaluation prints (and logs) a sample of this many new tokens from eval_sample_prompt,
    # seeded by `seed`, so successive samples show what the model learned in between; 0: none.
    eval_sample_tokens: int = 100
    eval_sample_prompt: str = ""
    log_interval: int = 10
    seed: int = 1337
    out_dir: str = paths.CHECKPOINT_DIR
    save_best: bool = True
    early_stopping: bool = False
    early_stopping_patience: int = 3
    early_stopping_min_delta: float = 0.0
    tracker: str = "none"
    # torch.compile the model: "auto" compiles on CUDA only. On CPU it bought ~1-3% per step
    # (the step is matmul-bound) for ~20-30 s of compiling; see benchmarks/train_throughput.py.
    compile: str = "auto"
    # fp32 matmuls on CPU: "auto" times the model's step both ways at start and uses oneDNN where it is
    # exact and reliably faster than PyTorch's default BLAS (see hardware.choose_cpu_matmul); "blas" or
    # "onednn" to force.
    cpu_matmul: str = "auto"
    # Keep only each block's input in the forward and recompute the block in the backward
    # (transformers' activation checkpointing): less activation memory for ~1/3 more compute.
    gradient_checkpointing: bool = False


@dataclass
class HubConfig:
    """Optionally export and push the model to the Hugging Face Hub when training ends, and keep the run's
    checkpoints there as it trains."""

    repo_id: str = ""  # "user/name"; empty: don't push
    private: bool = False
    # Push the run's checkpoint and logs at each evaluation to the repo's checkpoints branch, in the
    # background, so the run can be resumed from the Hub on another machine (tinylm/hub_run.py).
    push_checkpoints: bool = False
    # For the model card (`tinylm export` reads them from the checkpoint; see docs/export-and-deployment.md).
    license: str = ""  # a Hub license id ("mit", "apache-2.0", ...); empty: the card says none is stated
    language: str = ""  # the training text's language ("en", ...); empty: the card names none


@dataclass
class LoraConfig:
    """LoRA fine-tuning through `peft`: the pretrained weights stay frozen and only small low-rank
    adapters train. The keys are peft's own (`peft.LoraConfig`); `enabled` turns it on, for a
    fine-tune (`model.init_from`) only. Needs `pip install 'tinylm[lora]'`.
    """

    enabled: bool = False
    r: int = 8  # the adapters' rank
    lora_alpha: int = 8  # the adapters' output is scaled by lora_alpha / r
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["c_attn"])


# Hub license ids are lowercase (https://huggingface.co/docs/hub/repositories-licenses); languages are
# ISO 639 codes, optionally with subtags ("pt-BR"), or "code" / "multilingual".
HUB_CARD_PATTERNS = {
    "license": (re.compile(r"[a-z0-9][a-z0-9.+-]*"),
                'a Hub license id such as "mit", "apache-2.0", "cc-by-4.0" or "other" '
                "(https://huggingface.co/docs/hub/repositories-licenses)"),
    "language": (re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8})*|code|multilingual"),
                 'an ISO 639 language code such as "en" or "fr" (or "code", "multilingual")'),
}


def check_card_field(key: str, value: str, name: str) -> None:
    """Refuse a `license` or `language` (given as `name`) that the Hub's card metadata would not accept."""
    pattern, expected = HUB_CARD_PATTERNS[key]
    if value and not pattern.fullmatch(value):
        hint = f" (did you mean {value.lower()!r}?)" if pattern.fullmatch(value.lower()) else ""
        raise UserError(f"{name} must be {expected}, got {value!r}{hint}")


@dataclass
class Config:
    """A whole run: `[model]`, `[data]`, `[training]`, `[lora]` and `[hub]`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    # The dotted keys the TOML file or a flag set, as opposed to defaults: a fine-tuned model's
    # shape comes from the model unless the config names it.
    given: frozenset = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @property
    def effective_batch_size(self) -> int:
        """Sequences per optimizer step on one process."""
        return self.training.batch_size * self.training.grad_accum_steps


@dataclass(frozen=True)
class Sampling:
    """How `tinylm generate` and the demo pick each next token (nanoGPT's sample.py defaults)."""

    max_new_tokens: int = 500
    temperature: float = 0.8  # 0 means greedy: always the most likely token
    top_k: int = 200  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1 keeps all
    # A model trained on documents separated by <|endoftext|> emits it where a text ends; what
    # it would sample after that is the start of an unrelated text, so stop there by default.
    stop_at_eos: bool = True

    def check(self) -> None:
        """Raise `UserError` naming the flag when a setting is out of range."""
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be 1 or more, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be 0 (off) or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1] (1 is off), got {self.top_p}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "training": TrainingConfig, "lora": LoraConfig,
            "hub": HubConfig}

CHOICES = {
    "training.device": DEVICES,
    "training.precision": PRECISIONS,
    "training.data_format": DATA_FORMATS,
    "training.tracker": TRACKERS,
    "training.compile": COMPILE_CHOICES,
    "training.cpu_matmul": CPU_MATMULS,
    "data.tokenizer": TOKENIZERS,
}
POSITIVE = {
    "model.n_layer", "model.n_head", "model.n_embd", "model.block_size",
    "training.batch_size", "training.grad_accum_steps", "training.max_iters",
    "training.learning_rate", "training.eval_interval", "training.eval_iters",
    "training.log_interval", "training.early_stopping_patience", "training.lr_decay_iters",
    "lora.r", "lora.lora_alpha",
}
NON_NEGATIVE = {
    "training.min_lr", "training.warmup_iters", "training.weight_decay", "training.grad_clip",
    "training.early_stopping_min_delta", "training.seed", "training.eval_sample_tokens",
}
# numpy's seeds (accelerate's set_seed seeds numpy too) are 32-bit.
MAX_SEED = 2**32 - 1
UNIT_INTERVAL = {"model.dropout": (0.0, 1.0), "training.beta1": (0.0, 1.0), "training.beta2": (0.0, 1.0),
                 "lora.lora_dropout": (0.0, 1.0)}


def check_seed_fits(seed: int, num_processes: int) -> None:
    """Each process seeds with seed + rank: refuse a seed that leaves the last rank's past MAX_SEED."""
    if seed + num_processes - 1 > MAX_SEED:
        raise UserError(f"training.seed {seed} is too large for {num_processes} processes (each uses seed + rank, "
                        f"at most {MAX_SEED}); choose a smaller --seed")


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None, *,
                base: dict[str, Any] | None = None, base_source: str = "") -> Config:
    """Read a TOML preset (the built-in defaults when `path` is None), apply flag overrides, validate once.

    `overrides` maps dotted keys to flag values (None: the flag was not given). `base` is a saved
    run's config (`Config.to_dict()`, named `base_source`) that the file's keys and the flags are
    laid over, for resuming. Keys are checked one by one as they come, and the rules between keys
    only on the result, so a flag can fix what the file alone gets wrong. `given` holds the keys
    the file and the flags named.
    """
    raw = _read_toml(Path(path)) if path is not None else {}
    flags = {dotted: value for dotted, value in (overrides or {}).items() if value is not None}
    sources = [name for name, used in ((base_source, base), (str(path), path is not None),
                                       ("command-line flags", flags)) if used] or ["defaults"]
    source = " + ".join(sources)
    # Each key of the file checked on its own first, so that its errors name the file alone.
    layered = from_dict(raw, str(path) if path is not None else source, check_consistency=False)
    named = {f"{section}.{key}": getattr(getattr(layered, section), key) for section, key in
             (dotted.split(".", 1) for dotted in layered.given)}
    merged = base if base is not None else {}
    merged = {name: dict(merged.get(name, {})) for name in SECTIONS}
    for dotted, value in {**named, **flags}.items():
        section, key = dotted.split(".", 1)
        merged[section][key] = value
    config = from_dict(merged, source)
    return dataclasses.replace(config, given=frozenset({*named, *flags}))


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "missing"
        raise UserError(f"config {path} is {kind}: pass a TOML file, e.g. --config {paths.CONFIG_EXAMPLE}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"config {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror}") from None


def from_dict(raw: dict[str, Any], source: str = "config", *, check_consistency: bool = True) -> Config:
    """Build a validated `Config` from nested dicts shaped like the TOML file."""
    sections: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise UserError(f"{source}: unknown section [{name}]{_suggest(name, SECTIONS)}")
        if not isinstance(value, dict):
            raise UserError(f"{source}: [{name}] must be a table of keys, got {_type_name(value)}")
        sections[name] = _build_section(name, value, source)
    given = frozenset(f"{name}.{key}" for name, values in raw.items() for key in values)
    config = Config(**sections, given=given)
    if check_consistency:
        _check_consistency(config, source)
    return config


def apply_overrides(config: Config, overrides: dict[str, Any], source: str = "command line") -> Config:
    """Return a copy of `config` with dotted-key overrides (`{"training.max_iters": 10}`), validated."""
    merged = config.to_dict()
    given = set(config.given)
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        merged[section][key] = value
        given.add(dotted)
    return dataclasses.replace(from_dict(merged, source=source), given=frozenset(given))


def _build_section(name: str, values: dict[str, Any], source: str):
    cls = SECTIONS[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{source}: unknown key {name}.{key}{_suggest(key, fields)}")
        checked[key] = _check_value(f"{name}.{key}", value, type(getattr(cls(), key)), source)
    return cls(**checked)


def _check_value(dotted: str, value: Any, expected: type, source: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise UserError(
            f"{source}: {dotted} must be {_type_name(expected())}, got {_type_name(value)} {value!r}"
        )
    if dotted in CHOICES and value not in CHOICES[dotted]:
        options = ", ".join(f'"{c}"' for c in CHOICES[dotted])
        raise UserError(f"{source}: {dotted} must be one of {options}, got {value!r}")
    if expected is float and value != value:
        raise UserError(f"{source}: {dotted} must be a number, got nan")
    if dotted in POSITIVE and not value > 0:
        raise UserError(f"{source}: {dotted} must be greater than 0, got {value!r}")
    if dotted in NON_NEGATIVE and not value >= 0:
        raise UserError(f"{source}: {dotted} must be 0 or more, got {value!r}")
    if dotted == "training.seed" and value > MAX_SEED:
        raise UserError(f"{source}: training.seed must be at most {MAX_SEED}, got {value!r}")
    if dotted in ("hub.license", "hub.language"):
        check_card_field(dotted.split(".")[1], value, f"{source}: {dotted}")
    if dotted in UNIT_INTERVAL:
        low, high = UNIT_INTERVAL[dotted]
        if not low <= value < high:
            raise UserError(f"{source}: {dotted} must be in [{low}, {high}), got {value!r}")
    if dotted == "lora.target_modules":
        check_lora_targets(value, f"{source}: {dotted}")
    return value


def check_lora_targets(targets: list, name: str) -> None:
    """Refuse `lora.target_modules` (given as `name`) unless it names GPT-2 layers (`LORA_TARGETS`), each once."""
    layers = ", ".join(f'"{layer}" ({what})' for layer, what in LORA_TARGETS.items())
    if not targets:
        raise UserError(f"{name} is empty: name at least one of GPT-2's layers: {layers}")
    for target in targets:
        if target not in LORA_TARGETS:  # no "did you mean": Llama's q_proj is nothing like GPT-2's c_proj
            raise UserError(f"{name}: {target!r} is not a GPT-2 layer LoRA can adapt; choose from {layers}")
    if len(set(targets)) < len(targets):
        raise UserError(f"{name} names a layer twice: {targets!r}")


def _check_consistency(config: Config, source: str) -> None:
    model = config.model
    if model.n_embd % model.n_head:
        raise UserError(
            f"{source}: model.n_embd ({model.n_embd}) must be divisible by model.n_head ({model.n_head})"
        )
    if model.init_from != SCRATCH and config.data.tokenizer != "pretrained":
        raise UserError(
            f"{source}: model.init_from = {model.init_from!r} fine-tunes a pretrained model, which reads text "
            f"with its own tokenizer: set data.tokenizer = \"pretrained\" (--tokenizer pretrained) and prepare "
            f"the data with `{command_line('tinylm', 'prepare', '--tokenizer', 'pretrained', '--from', model.init_from)}`"
        )
    if model.init_revision and model.init_from == SCRATCH:
        raise UserError(f"{source}: model.init_revision applies to model.init_from; drop it, or set model.init_from")
    if config.hub.push_checkpoints and not config.hub.repo_id:
        raise UserError(f"{source}: hub.push_checkpoints needs hub.repo_id, the Hub repo to push to: set "
                        "[hub] repo_id = \"your-name/run-name\", or drop push_checkpoints")
    _check_lora(config, source)
    training = config.training
    if training.min_lr > training.learning_rate:
        raise UserError(
            f"{source}: training.min_lr ({training.min_lr}) must not exceed "
            f"training.learning_rate ({training.learning_rate})"
        )
    if training.warmup_iters > training.lr_decay_iters:
        raise UserError(
            f"{source}: training.warmup_iters ({training.warmup_iters}) is longer than training.lr_decay_iters "
            f"({training.lr_decay_iters}), where the decay to min_lr ends: the learning rate would drop from the "
            "peak straight to min_lr. Make warmup_iters at most lr_decay_iters (--warmup-iters, --lr-decay-iters)"
        )


def _check_lora(config: Config, source: str) -> None:
    """LoRA adapts a pretrained model; and `[lora]` keys that would do nothing (not enabled) are a mistake."""
    lora = config.lora
    if lora.enabled and config.model.init_from == SCRATCH:
        raise UserError(f"{source}: lora.enabled fine-tunes a pretrained model through small adapters, but "
                        "model.init_from is \"scratch\": a new model must train all its weights. Set model.init_from "
                        "to the model to fine-tune, or lora.enabled = false")
    unused = [f"lora.{key} = {value!r}" for key, value in dataclasses.asdict(lora).items()
              if key != "enabled" and value != getattr(LoraConfig(), key)]
    if unused and not lora.enabled:
        raise UserError(f"{source}: {', '.join(unused)} does nothing while lora.enabled is false: set "
                        "lora.enabled = true to fine-tune with LoRA, or remove the [lora] keys")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    valid = ", ".join(sorted(options))
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {valid})"


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            dict: "a table", list: "an array"}.get(type(value), type(value).__name__)
