"""Models and tokenizers read by name: a Hub id (optionally at a revision) or a local folder.

One place for `from_pretrained` and its failures, used by fine-tuning (`model.init_from`),
`tinylm prepare --tokenizer pretrained --from` and `tinylm generate/demo --model`. A Hub id
is read from the Hugging Face cache when it is there (and only from it with
`HF_HUB_OFFLINE=1`); anything that cannot be had becomes one line saying why and what to do.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import constants
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from .errors import UserError


def describe(source: str, revision: str | None = None) -> str:
    """`source`, or `source@revision`: how messages name what was asked for."""
    return f"{source}@{revision}" if revision else source


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def failure(what: str, source: str, revision: str | None, exc: BaseException) -> UserError:
    """The one-line error for a model or tokenizer that could not be loaded."""
    reason = " ".join(str(exc).split())[:300] or type(exc).__name__
    name = describe(source, revision)
    if is_local(source):
        return UserError(f"cannot load the {what} in {name}: {reason}")
    if constants.HF_HUB_OFFLINE:
        fix = (f"HF_HUB_OFFLINE is set and it is not in the Hugging Face cache: download it once online "
               f"(`hf download {source}`), or pass a local folder")
    else:
        fix = ("check the id (and the revision), your network and, for a private or gated model, your login "
               "(`hf auth login`); or pass a local folder")
    return UserError(f"cannot load the {what} {name}: there is no local folder of that name, and loading it from "
                     f"the Hub failed ({reason}); {fix}")


def model_type(source: str, revision: str | None = None) -> str:
    """The `model_type` of `source`'s config.json ("gpt2", "llama", ...)."""
    try:
        return AutoConfig.from_pretrained(source, revision=revision or None).model_type
    except (OSError, ValueError) as exc:
        raise failure("model", source, revision, exc) from None


def causal_lm(source: str, revision: str | None = None, **overrides):
    """Any causal language model, in eval mode; `overrides` are config values (e.g. dropout rates)."""
    try:
        return AutoModelForCausalLM.from_pretrained(source, revision=revision or None, **overrides).eval()
    except (OSError, ValueError) as exc:
        raise failure("model", source, revision, exc) from None


def gpt2(source: str, revision: str | None = None, dropout: float = 0.0) -> GPT2LMHeadModel:
    """A pretrained GPT-2 (`GPT2LMHeadModel`, any size, a tinylm export included) to fine-tune.

    Dropout is the config's, as nanoGPT overrides it when it starts from GPT-2 (GPT-2's own
    rate is 0.1); PyTorch's fused attention as for models trained from scratch.
    """
    kind = model_type(source, revision)
    if kind != "gpt2":
        raise UserError(f"model.init_from = {describe(source, revision)!r} is a {kind} model; tinylm fine-tunes "
                        "GPT-2 models (GPT2LMHeadModel: gpt2, distilgpt2, a tinylm export, ...)")
    try:
        return GPT2LMHeadModel.from_pretrained(
            source, revision=revision or None, attn_implementation="sdpa",
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        )
    except (OSError, ValueError) as exc:
        raise failure("model", source, revision, exc) from None


def tokenizer(source: str, revision: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer that comes with a model: a fast (`tokenizers`-backed) one, or a UserError."""
    try:
        loaded = AutoTokenizer.from_pretrained(source, revision=revision or None)
    except (OSError, ValueError) as exc:
        raise failure("tokenizer", source, revision, exc) from None
    if not isinstance(loaded, PreTrainedTokenizerFast):
        raise UserError(f"the tokenizer of {describe(source, revision)} has no fast (tokenizers) version, "
                        "which tinylm needs to encode data")
    return loaded
