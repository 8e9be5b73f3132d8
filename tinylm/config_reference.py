"""The configuration reference page, rendered from the config dataclasses so that it cannot drift.

`reference_markdown()` returns docs/configuration.md's Markdown: every section of `SECTIONS`, every
key with its TOML type, default, allowed values (from `CHOICES`, `POSITIVE`, `NON_NEGATIVE`,
`UNIT_INTERVAL`, `MAX_SEED`, `HUB_CARD_PATTERNS`: what `tinylm.config` validates against) and
meaning (`KEY_HELP`, here), and the `tinylm train` flag that overrides it. The site build calls it from
docs/hooks/config_reference.py; nobody has to remember to regenerate the page.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

from . import config as cfg

TOML_TYPES = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array of strings"}

# What each key means, in Markdown: the page renders it with the type, default and allowed values read
# from tinylm.config, and tests/test_docs_site.py checks that every field of every section has an entry.
# Links are relative to docs/.
KEY_HELP = {
    "model.n_layer": "transformer blocks",
    "model.n_head": "attention heads per block; `n_embd` must be divisible by it",
    "model.n_embd": "embedding width (the size of every token's vector)",
    "model.block_size": "context length in tokens. Fine-tuning: the model's own context unless set here; "
                        "a smaller one crops the learned position table, a larger one is an error",
    "model.dropout": "dropout probability (also when fine-tuning: nanoGPT's override of GPT-2's 0.1)",
    "model.init_from": '`"scratch"`, or a Hub id (`"gpt2"`, `"user/model"`) or local folder of a GPT-2 to '
                       "fine-tune, which needs `data.tokenizer = \"pretrained\"`: see "
                       "[Fine-tuning a pretrained GPT-2](training.md#fine-tuning-a-pretrained-gpt-2). "
                       "The fine-tuned model's shape is its own: `n_layer`, `n_head` and `n_embd` given here "
                       "must agree with it",
    "model.init_revision": "a branch, tag or commit of `init_from`'s Hub repo; `\"\"`: the default branch. "
                           "Only with `init_from`",
    "data.processed_dir": "where the prepared data lives (`tinylm prepare`'s output); for binary data in "
                          '`"data/processed"`, training also looks in `data/`: see '
                          "[data_format and Metadata Mapping](training.md#data_format-and-metadata-mapping)",
    "data.tokenizer": 'the tokenizer the data was prepared with; `"pretrained"`: a model\'s own '
                      "(`tinylm prepare --tokenizer pretrained --from MODEL`), to fine-tune it",
    "training.data_format": "the prepared data's layout, `tinylm prepare --format`'s: see "
                            "[data_format and Metadata Mapping](training.md#data_format-and-metadata-mapping)",
    "training.device": '`"auto"` picks CUDA when available, else the CPU',
    "training.precision": "mixed precision on CUDA (fp16 with loss scaling); the CPU trains in fp32: see "
                          "[Precision and Gradient Accumulation](training.md#precision-and-gradient-accumulation)",
    "training.batch_size": "sequences per micro-batch, per process",
    "training.grad_accum_steps": "micro-batches per optimizer step",
    "training.max_iters": "optimizer steps",
    "training.learning_rate": "peak learning rate, reached after `warmup_iters`",
    "training.min_lr": "final learning rate, reached at `lr_decay_iters`; at most `learning_rate`",
    "training.warmup_iters": "steps of linear warmup",
    "training.lr_decay_iters": "the step where the cosine decay reaches `min_lr`",
    "training.weight_decay": "AdamW weight decay, applied to weight matrices only (not biases or LayerNorm)",
    "training.beta1": "AdamW beta1",
    "training.beta2": "AdamW beta2",
    "training.grad_clip": "clip the gradient norm (0 disables)",
    "training.eval_interval": "evaluate every N steps (and at iteration 0 and the last)",
    "training.eval_iters": "each evaluation scores `eval_iters` x `batch_size` fixed blocks of each split",
    "training.log_interval": "steps between progress reports (loss, lr, tokens/s; MFU on GPUs): the only points "
                             "where the loop waits for the device",
    "training.seed": "everything random derives from it (per process)",
    "training.out_dir": "where checkpoints and `train_log.json` go",
    "training.save_best": "write `ckpt_best.pt` on improvement",
    "training.early_stopping": "stop when validation stops improving: see "
                               "[Best Checkpoint & Early Stopping](training.md#best-checkpoint-early-stopping)",
    "training.early_stopping_patience": "evaluations without sufficient improvement before stopping",
    "training.early_stopping_min_delta": "minimum `val_loss` improvement that counts",
    "training.tracker": "log metrics through one of `accelerate`'s trackers; its package must be installed "
                        "(`pip install 'tinylm[tracking]'` brings tensorboard): see [Tracking](training.md#tracking)",
    "training.compile": '`torch.compile` the model: `"auto"` compiles on CUDA only: see [Speed](training.md#speed)',
    "training.eval_sample_tokens": "each evaluation prints a sample of this many new tokens under its line, keeps it "
                                   "in `train_log.json` and sends it to the tracker as text; `0`: no samples",
    "training.eval_sample_prompt": 'the text the samples continue (the same at every evaluation, seeded by `seed`, so '
                                   'they show what the model learned in between); `""`: from `<|endoftext|>`',
    "training.cpu_matmul": 'CPU matrix-multiply library: `"auto"` times the model\'s step both ways at start and '
                           'takes oneDNN only where it is reliably faster, `"blas"` is PyTorch\'s default, '
                           '`"onednn"`: see [Speed](training.md#speed)',
    "training.gradient_checkpointing": "keep only each transformer block's input in the forward pass and recompute "
                                       "the block in the backward (transformers' activation checkpointing): far "
                                       "less activation memory for about a third more compute, the same gradients. "
                                       "See [Fine-tune on a small GPU](small-gpu.md)",
    "lora.enabled": "fine-tune through LoRA adapters (`peft`): the pretrained weights stay frozen and only the "
                    "adapters train and are saved with the optimizer state; only with `model.init_from`. Needs "
                    "`pip install 'tinylm[lora]'`. See [Fine-tuning with LoRA](training.md#fine-tuning-with-lora)",
    "lora.r": "the adapters' rank: each adapted layer gains `r` x (inputs + outputs) trainable parameters",
    "lora.lora_alpha": "the adapters' output is scaled by `lora_alpha / r`",
    "lora.lora_dropout": "dropout on the adapters' input (may change when resuming, as `model.dropout` may)",
    "lora.target_modules": "the GPT-2 layers that get adapters, in every block: `c_attn` (attention's query, key "
                           "and value), `c_proj` (attention's and the MLP's output projections), `c_fc` (the MLP's "
                           "first layer)",
    "hub.repo_id": '`"user/name"`: when training ends, export the best checkpoint and push it to this Hub repo; '
                   '`""`: don\'t push. See [Export & Deployment](export-and-deployment.md)',
    "hub.private": "create the Hub repo private",
    "hub.push_checkpoints": "at each evaluation, push `ckpt_last.pt` (and `ckpt_best.pt` when it changed; "
                            "under FSDP the optimizer shards they name), "
                            "`train_log.json` and `metrics.jsonl` to the repo's `checkpoints` branch, in the "
                            "background, so `tinylm train --resume REPO_ID` resumes the run on any machine. "
                            "Needs `repo_id`. See [The Hub as the run's home](training.md#the-hub-as-the-runs-home)",
    "hub.license": 'the model card\'s license; `""`: the card says none is stated. See '
                   "[The model card](export-and-deployment.md#the-model-card)",
    "hub.language": 'the model card\'s language, the training text\'s; `""`: the card names none',
}


def toml_literal(value) -> str:
    """`value` as it is written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_literal, value)) + "]"
    return repr(value)


def allowed(dotted: str) -> str:
    """What `tinylm.config` accepts for `dotted`, in words ("" when any value of its type is fine)."""
    if dotted in cfg.CHOICES:
        return "one of " + ", ".join(f"`{toml_literal(choice)}`" for choice in cfg.CHOICES[dotted])
    if dotted == "training.seed":
        return f"0 to {cfg.MAX_SEED}"
    if dotted in cfg.POSITIVE:
        return "greater than 0"
    if dotted in cfg.NON_NEGATIVE:
        return "0 or more"
    if dotted in cfg.UNIT_INTERVAL:
        low, high = cfg.UNIT_INTERVAL[dotted]
        return f"at least {low} and less than {high}"
    if dotted == "lora.target_modules":
        return "one or more of " + ", ".join(f"`{toml_literal(layer)}`" for layer in cfg.LORA_TARGETS) + ", each once"
    key = dotted.split(".", 1)[1]
    if dotted.startswith("hub.") and key in cfg.HUB_CARD_PATTERNS:
        return f'`""`, or {cfg.HUB_CARD_PATTERNS[key][1]}'
    return ""


def overriding_flags() -> dict[str, str]:
    """Dotted key -> the `tinylm train` flag that overrides it."""
    from .train import (
        OVERRIDES,  # the CLI's own table; imported here only, config.py stays CLI-free
    )

    return {dotted: "--" + flag.replace("_", "-") for flag, dotted in OVERRIDES.items()}


def _cell(text: str) -> str:
    """`text` as one table cell: `|` escaped, but not inside a code span.

    Python-Markdown's tables never split a row at a `|` inside backticks, and there an escape
    would show on the page as a literal backslash (`<\\|endoftext\\|>`).
    """
    spans = text.replace("\n", " ").split("`")  # the odd ones are inside code spans
    return "`".join(span if index % 2 else span.replace("|", "\\|") for index, span in enumerate(spans))


def reference_markdown() -> str:
    """The Markdown of the configuration reference page."""
    flags = overriding_flags()
    lines = [
        "# Configuration reference",
        "",
        "A run is configured by a TOML file (`tinylm train --config FILE`; `configs/base.toml` by default)",
        "with up to five sections. Every key is optional: a missing key takes its default. An unknown",
        "section or key is an error that names the closest valid one, and a wrong type or a value out of",
        "range is an error naming the key and what was expected. The `tinylm train` flag shown under a key",
        "overrides it (flags always win over the file). Presets and how the settings play together:",
        "[Training](training.md).",
        "",
        "!!! note \"Generated from the code\"",
        "    This page is rendered from the dataclasses in `tinylm/config.py` (types, defaults and the",
        "    checks `tinylm.config` applies; meanings from `KEY_HELP`) each time the site is built.",
        "",
    ]
    for name, section in cfg.SECTIONS.items():
        doc = inspect.cleandoc(section.__doc__ or "")
        defaults = section()
        lines += [f"## `[{name}]`", "", doc, "",
                  "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for field in dataclasses.fields(section):
            dotted = f"{name}.{field.name}"
            value = getattr(defaults, field.name)
            key = f"`{field.name}`" + (f"<br>`{flags[dotted]}`" if dotted in flags else "")
            meaning = KEY_HELP[dotted]
            if allowed(dotted):
                meaning += f"<br>**Allowed:** {allowed(dotted)}"
            cells = [key, TOML_TYPES[type(value)], f"`{toml_literal(value)}`", meaning]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)
