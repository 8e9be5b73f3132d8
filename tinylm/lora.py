"""LoRA fine-tuning through `peft`: the `[lora]` section made into adapters on a GPT-2, and back.

A LoRA run wraps the pretrained GPT2LMHeadModel in peft's `PeftModel`: each adapted layer
(`lora.target_modules`) gains two small matrices A (r x in) and B (out x r) whose product, scaled
by `lora_alpha / r`, is added to the layer's frozen weight; only A and B train. A checkpoint keeps
the GPT-2's weights under their own names and the adapters as peft saves them (`split`), so
`adapt` rebuilds the run's model from it, and `merged` folds the adapters into a plain GPT-2 that
needs no peft. peft is an optional extra (`pip install 'tinylm[lora]'`), imported only here and
only when a run or a checkpoint uses LoRA.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import GPT2LMHeadModel

from . import compat
from .config import LoraConfig
from .errors import UserError

INSTALL = "pip install 'tinylm[lora]'"
# Each adaptable layer's (inputs, outputs) in units of n_embd: c_proj is attention's output and the MLP's
# (4 * n_embd, GPT-2's inner width, wide). An adapter on an (in, out) layer has r * (in + out) parameters.
LAYER_WIDTHS = {"c_attn": [(1, 3)], "c_proj": [(1, 1), (4, 1)], "c_fc": [(1, 4)]}


def require_peft(why: str = "LoRA fine-tuning (lora.enabled)"):
    """The `peft` module, or a UserError saying how to install it."""
    try:
        import peft
    except ImportError:
        raise UserError(f"{why} needs the peft package, which is not installed: {INSTALL}") from None
    return peft


def check_installed(section: LoraConfig) -> None:
    """Refuse a LoRA run before any work when peft is missing."""
    if section.enabled:
        require_peft()


def peft_config(section: LoraConfig):
    """peft's `LoraConfig` for the `[lora]` section."""
    peft = require_peft()
    return peft.LoraConfig(
        r=section.r, lora_alpha=section.lora_alpha, lora_dropout=section.lora_dropout,
        target_modules=list(section.target_modules), task_type="CAUSAL_LM",
        # GPT-2's layers are transformers' Conv1D, whose weight is stored (in, out); peft would
        # find that out itself, and warn about it on every run.
        fan_in_fan_out=True,
    )


def adapt(model: GPT2LMHeadModel, section: LoraConfig, adapter: dict | None = None):
    """`model` with LoRA adapters on `section.target_modules` (new ones, or the saved `adapter`
    weights) and its own weights frozen: a peft `PeftModel`. `model` itself when LoRA is off."""
    if not section.enabled:
        return model
    peft = require_peft()
    with compat.peft_wrapping():
        wrapped = peft.get_peft_model(model, peft_config(section))
    if adapter is not None:
        load_adapter(wrapped, adapter)
    return wrapped


def load_adapter(wrapped, adapter: dict) -> None:
    """Put saved adapter weights (as `split` gives them) into `wrapped`, which must have exactly those adapters."""
    peft = require_peft()
    expected = peft.get_peft_model_state_dict(wrapped, save_embedding_layers=False)
    if set(adapter) != set(expected):
        missing, unexpected = sorted(set(expected) - set(adapter)), sorted(set(adapter) - set(expected))
        raise UserError(f"the checkpoint's LoRA adapters do not fit its [lora] settings (missing {missing[:2]}, "
                        f"unexpected {unexpected[:2]}): the checkpoint is damaged")
    peft.set_peft_model_state_dict(wrapped, adapter)


def split(wrapped, weights: dict) -> tuple[dict, dict]:
    """A LoRA run's `weights` (its PeftModel's state dict) as (the GPT-2's weights under GPT-2's names,
    the adapters as peft saves them: the tensors of an adapter_model.safetensors)."""
    peft = require_peft()
    adapter = peft.get_peft_model_state_dict(wrapped, state_dict=weights, save_embedding_layers=False)
    return compat.peft_base_weights(weights), adapter


def merged(wrapped) -> GPT2LMHeadModel:
    """The plain GPT2LMHeadModel of `wrapped` with each adapter added into its layer's weight
    (W + B A lora_alpha / r), all of it trainable again as transformers builds it: it needs no peft."""
    return wrapped.merge_and_unload().requires_grad_(True)


def gpt2_of(model) -> GPT2LMHeadModel:
    """The GPT2LMHeadModel of a run's model: itself, or the one peft wraps (whose adapted layers run their adapters)."""
    peft = sys.modules.get("peft")  # a model can only be peft's if peft was imported
    return model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else model


def save_adapter(wrapped, folder: Path, base_model: str | None) -> None:
    """adapter_config.json and adapter_model.safetensors, which `PeftModel.from_pretrained(base, folder)` loads;
    `base_model`: the Hub id the adapters were trained on, for adapter_config.json (None: a local folder,
    whose path is never written)."""
    # peft names the wrapped model's own name_or_path when the config names none: the local path it was loaded from.
    wrapped.get_base_model().name_or_path = base_model
    wrapped.peft_config["default"].base_model_name_or_path = base_model
    # save_embedding_layers="auto" would ask the Hub whether the base model's vocabulary changed.
    wrapped.save_pretrained(folder, save_embedding_layers=False)


def from_adapter_folder(model: GPT2LMHeadModel, folder: Path):
    """`model` with the adapters of a PEFT adapter folder (peft's `PeftModel.from_pretrained`, local files only)."""
    peft = require_peft("loading LoRA adapters")
    with compat.peft_wrapping():
        return peft.PeftModel.from_pretrained(model, folder, local_files_only=True)


def section_of(payload: dict) -> LoraConfig:
    """The `[lora]` section a checkpoint's run trained with (off in checkpoints from before LoRA)."""
    return LoraConfig(**payload["config"].get("lora", {}))


def trainable_parameters(section: LoraConfig, n_layer: int, n_embd: int) -> int:
    """How many parameters a LoRA run trains on a GPT-2 of this shape (its adapters' A and B), known before
    any model is built: what a run keeps gradients and AdamW moments for."""
    per_layer = sum(inputs + outputs for target in section.target_modules for inputs, outputs in LAYER_WIDTHS[target])
    return n_layer * section.r * n_embd * per_layer


def describe(section: LoraConfig) -> str:
    """The adapters in words, for the banner: `rank 8 (lora_alpha 16) on c_attn, c_fc`."""
    return f"rank {section.r} (lora_alpha {section.lora_alpha}) on {', '.join(section.target_modules)}"
