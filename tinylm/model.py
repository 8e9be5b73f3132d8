"""The model: a plain `transformers` GPT2LMHeadModel, so weights are ordinary transformers weights."""

from __future__ import annotations

import dataclasses

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from . import checkpoint, lora, pretrained
from .compat import checkpoint_activations
from .config import SCRATCH, SHAPE_KEYS, Config, ModelConfig, TrainingConfig
from .errors import UserError, command_line
from .hub_names import is_local


def gpt2_config(model: ModelConfig, vocab_size: int, eos_token_id: int = 0) -> GPT2Config:
    """The GPT2Config for our `[model]` section and the tokenizer's vocab size."""
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=model.block_size,
        n_embd=model.n_embd,
        n_layer=model.n_layer,
        n_head=model.n_head,
        # nanoGPT uses one dropout rate everywhere; GPT-2 splits it three ways.
        resid_pdrop=model.dropout,
        embd_pdrop=model.dropout,
        attn_pdrop=model.dropout,
        # GPT2Config defaults to GPT-2's 50256, which is outside a small vocab.
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        # Share the input embedding with the output projection (fewer parameters, as GPT-2).
        tie_word_embeddings=True,
        # Exact GELU (one fused kernel, as nanoGPT) rather than GPT-2's default "gelu_new", a
        # tanh approximation built from five elementwise ops and their backward: it was ~20%
        # of a CPU training step. Both are stock GPT2Config values that from_pretrained reads.
        activation_function="gelu",
        # PyTorch's fused attention kernels (flash / memory-efficient) on every device.
        attn_implementation="sdpa",
    )


def build_model(config: GPT2Config) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 (transformers applies GPT-2's scaled residual init)."""
    return GPT2LMHeadModel(config)


def fit_to_pretrained(config: Config, model: GPT2LMHeadModel) -> Config:
    """The run's config with a pretrained model's shape (`fitted_config`), the model's context cropped to it."""
    fitted = fitted_config(config, model.config)
    if fitted.model.block_size < model.config.n_positions:
        crop_positions(model, fitted.model.block_size)
    return fitted


def fitted_config(config: Config, pretrained: GPT2Config) -> Config:
    """The run's config with the shape of the pretrained model whose config is `pretrained`.

    Shape keys the config names must be the model's; `block_size`, when named, may be at most
    the model's `n_positions` (default: all of them).
    """
    name = config.model.init_from
    conflicts = [f"model.{key} = {getattr(config.model, key)} but {name} has {getattr(pretrained, key)}"
                 for key in SHAPE_KEYS
                 if f"model.{key}" in config.given and getattr(config.model, key) != getattr(pretrained, key)]
    if conflicts:
        raise UserError(f"{'; '.join(conflicts)}: a fine-tuned model keeps its shape; remove these keys from "
                        "[model] (or make them the model's)")
    context = pretrained.n_positions
    block_size = config.model.block_size if "model.block_size" in config.given else context
    if block_size > context:
        raise UserError(f"model.block_size = {block_size} is longer than the context of {name} "
                        f"(n_positions = {context}): use a block_size of at most {context}")
    shape = {key: getattr(pretrained, key) for key in SHAPE_KEYS}
    return dataclasses.replace(config, model=dataclasses.replace(config.model, block_size=block_size, **shape))


def run_model(config: Config, data, tokenizer, resumed: dict | None, *, sharded: bool
              ) -> tuple[torch.nn.Module, Config, str | None]:
    """The model a run trains, the run's config fitted to it, and the Hub model it fine-tunes (`base_model`).

    With LoRA, the peft model of it with its adapters (those of `resumed`, the checkpoint being
    resumed, whose weights and settings are checked against this run's first); with
    training.gradient_checkpointing, its activations checkpointed.
    """
    if resumed:
        checkpoint.check_same_origin(resumed, config.model, data, tokenizer)
    model, config, base_model = base_model_of_run(config, data, tokenizer, resumed)
    if resumed:
        checkpoint.check_resumable(resumed, model.config, config.lora, config.training.max_iters)
        checkpoint.check_optimizer_fits(resumed, sharded_run=sharded)
        model.load_state_dict(resumed["model"])
    model = lora.adapt(model, config.lora, resumed.get("adapter") if resumed else None)
    if config.training.gradient_checkpointing:
        checkpoint_activations(model)
    return model, config, base_model


def base_model_of_run(config: Config, data, tokenizer, resumed: dict | None
                      ) -> tuple[GPT2LMHeadModel, Config, str | None]:
    """The GPT-2 a run trains (before adapters and weights from a checkpoint), the run's config fitted to it,
    and the Hub model it fine-tunes.

    A new GPT-2 of the config's shape, or the pretrained one `model.init_from` names (whose
    tokenizer must be the one `data`, a `data.PreparedData`, was prepared with); a resumed
    fine-tune rebuilds its own shape, and its weights come from the checkpoint. The Hub id is
    for the model card: a local folder is never named as one, and a resumed run keeps what its
    start saw (from another working folder a relative path is not found).
    """
    init_from = config.model.init_from
    base_model = (resumed["base_model"] if resumed and "base_model" in resumed else
                  None if init_from == SCRATCH or is_local(init_from) else init_from)
    if init_from == SCRATCH:
        return build_model(gpt2_config(config.model, data.vocab_size, tokenizer.eos_token_id)), config, base_model
    if resumed:
        dropout = config.model.dropout  # the run's own rate, which the command may have changed
        model = build_model(GPT2Config.from_dict({**resumed["model_config"], "resid_pdrop": dropout,
                                                  "embd_pdrop": dropout, "attn_pdrop": dropout}))
        return model, fit_to_pretrained(config, model), base_model
    model = pretrained.gpt2(init_from, config.model.init_revision, config.model.dropout)
    own = pretrained.tokenizer(init_from, config.model.init_revision)
    if own.get_vocab() != tokenizer.get_vocab():
        prepare_again = command_line("tinylm", "prepare", "--tokenizer", "pretrained", "--from",
                                     init_from, "--out", data.folder, "--overwrite")
        raise UserError(
            f"{data.meta_path} was prepared with another tokenizer than {init_from}'s: "
            f"run `{prepare_again}` (with your --input or --dataset) so the model reads the text the way it "
            "was trained to"
        )
    return model, fit_to_pretrained(config, model), base_model


def crop_positions(model: GPT2LMHeadModel, block_size: int) -> None:
    """Keep the first `block_size` position embeddings (nanoGPT's crop_block_size).

    GPT-2's positions are learned and absolute: a shorter context needs only the first rows,
    and a smaller table is less memory and a model that says what it was trained for.
    """
    wpe = model.transformer.wpe
    wpe.weight = torch.nn.Parameter(wpe.weight[:block_size].detach().clone())
    wpe.num_embeddings = block_size
    model.config.n_positions = block_size


def count_parameters(model: torch.nn.Module, *, trainable: bool = False) -> int:
    """The model's parameters (`trainable`: those that train), counting the tied embedding once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay the matrices only, never biases or LayerNorm gains."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, training: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over `optimizer_groups`, with training's learning rate and betas."""
    return torch.optim.AdamW(
        optimizer_groups(model, training.weight_decay),
        lr=training.learning_rate,
        betas=(training.beta1, training.beta2),
        # One kernel over all parameters: 3-5x faster than the default on CPU too, and it can skip
        # a step on the device (found_inf, see Trainer._optimizer_step) without a host sync.
        fused=True,
    )


def per_block_loss(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting `blocks[:, 1:]` from `blocks[:, :-1]` (nanoGPT's x/y split),
    per block: shape (batch,).

    We compute the loss ourselves rather than passing `labels=`: transformers would
    shift inside the block and score only block_size - 1 positions.
    """
    inputs, targets = blocks[:, :-1], blocks[:, 1:]
    # use_cache=False: by default (config.use_cache, kept on for generate) GPT-2 also builds a
    # KV cache, concatenating every layer's keys and values, which a loss never reads.
    logits = model(input_ids=inputs, use_cache=False).logits
    # Score in fp32 even under autocast: fp16 log-softmax over the vocab loses precision.
    # Rows of (batch * block, vocab), as nanoGPT: log-softmax over a contiguous last dim is
    # faster than over dim 1 of the (batch, vocab, block) transpose cross_entropy also accepts.
    losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view_as(targets).mean(dim=1)


def flops_per_token(model: GPT2LMHeadModel) -> float:
    """Training FLOPs per token, forward and backward: 6N for the weights + 12 * layers * width * context
    for attention (PaLM's appendix B, as nanoGPT's estimate_mfu). N leaves out the position table,
    which is looked up, not multiplied. Frozen weights (LoRA's) cost 4 of the 6: the backward pass
    through them, but no gradient of their own."""
    config = model.config
    looked_up = model.transformer.wpe.weight
    multiplied = [param for param in model.parameters() if param is not looked_up]
    weights = sum(param.numel() for param in multiplied)
    frozen = sum(param.numel() for param in multiplied if not param.requires_grad)
    return 6 * weights - 2 * frozen + 12 * config.n_layer * config.n_embd * config.n_positions
