"""Models and tokenizers read by name: a Hub id (optionally at a revision) or a local folder.

One place for `from_pretrained` and its failures, used by fine-tuning (`model.init_from`),
`tinylm prepare --tokenizer pretrained --from` and `tinylm generate/demo --model`. A Hub id
is read from the Hugging Face cache when it is there (and only from it with
`HF_HUB_OFFLINE=1`, or when the Hub cannot be reached); anything that cannot be had becomes one
line saying why and what to do.
"""

from __future__ import annotations

import functools
import os
import sys

from huggingface_hub import constants, get_session
from huggingface_hub.errors import HTTPError  # the base class of huggingface_hub's HTTP client's errors
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from . import compat
from .errors import UserError
from .hub_names import is_local

# How long the reachability check waits for the Hub, unless HF_HUB_ETAG_TIMEOUT says otherwise.
REACH_TIMEOUT_S = 5

# OpenAI's GPT-2 sizes and DistilGPT2 (n_layer, n_head, n_embd) by Hub id: GPT2Config's defaults otherwise (vocab
# 50257, context 1024, gelu_new), so their shape is known without the network (`gpt2_config`).
GPT2_SIZES = {
    "gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600),
    "distilgpt2": (6, 12, 768),
}
GPT2_SIZES |= {f"openai-community/{name}": size for name, size in GPT2_SIZES.items() if name != "distilgpt2"}
GPT2_SIZES["distilbert/distilgpt2"] = GPT2_SIZES["distilgpt2"]


def describe(source: str, revision: str | None = None) -> str:
    """`source`, or `source@revision`: how messages name what was asked for."""
    return f"{source}@{revision}" if revision else source


@functools.cache
def unreachable(endpoint: str) -> str | None:
    """Why the Hub at `endpoint` cannot be reached, or None when it answers (asked once a process).

    Without it, a Hub id that is not in the cache costs huggingface_hub a first try, then five
    more 1, 2, 4, 8 and 8 s apart, each printing a "Retrying" line and waiting up to 60 s for an
    answer: 27-32 s before the error when DNS fails at once, minutes when connections hang, and
    10 s a file for a cached model. One request, no retries, at most REACH_TIMEOUT_S, answers first.
    """
    timeout = constants.HF_HUB_ETAG_TIMEOUT if os.environ.get("HF_HUB_ETAG_TIMEOUT") else REACH_TIMEOUT_S
    try:
        get_session().head(endpoint, timeout=timeout)  # any answer, even an error status, is an answer
    except HTTPError as exc:  # no answer: DNS, refused, timed out, TLS, proxy
        return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
    return None


def load(what: str, loader, source: str, revision: str | None = None, **kwargs):
    """`loader(source, revision=..., **kwargs)` (a `from_pretrained`), any failure one UserError.

    A Hub id is read from the cache alone when the Hub cannot be reached (see `unreachable`),
    with a note saying so, so that an answer never waits for huggingface_hub's retries.
    """
    offline = None if is_local(source) or constants.HF_HUB_OFFLINE else unreachable(constants.ENDPOINT)
    try:
        loaded = loader(source, revision=revision or None, local_files_only=bool(offline), **kwargs)
    except (OSError, ValueError) as exc:
        raise failure(what, source, revision, exc, offline) from None
    if offline:
        note_cached(describe(source, revision), offline)
    return loaded


@functools.cache
def note_cached(name: str, why: str) -> None:
    print(f"note: the Hugging Face Hub at {constants.ENDPOINT} cannot be reached ({why}), so {name} comes from "
          "the local cache; set HF_HUB_OFFLINE=1 to skip this check", file=sys.stderr)


def failure(what: str, source: str, revision: str | None, exc: BaseException,
            unreachable_why: str | None = None) -> UserError:
    """The one-line error for a model or tokenizer that could not be loaded (`unreachable_why`: the Hub's silence)."""
    reason = " ".join(str(exc).split())[:300] or type(exc).__name__
    name = describe(source, revision)
    if is_local(source):
        return UserError(f"cannot load the {what} in {name}: {reason}")
    if unreachable_why:
        return UserError(f"cannot load the {what} {name}: there is no local folder of that name, it is not in the "
                         f"Hugging Face cache, and the Hub at {constants.ENDPOINT} cannot be reached "
                         f"({unreachable_why}); pass a local folder (e.g. one written by `tinylm export`), or "
                         f"download it once online (`hf download {source}`) and it is read from the cache")
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
    return load("model", AutoConfig.from_pretrained, source, revision).model_type


def causal_lm(source: str, revision: str | None = None, **overrides):
    """Any causal language model, in eval mode; `overrides` are config values (e.g. dropout rates)."""
    return load("model", compat.causal_lm_from_pretrained, source, revision, **overrides).eval()


def gpt2(source: str, revision: str | None = None, dropout: float = 0.0) -> GPT2LMHeadModel:
    """A pretrained GPT-2 (`GPT2LMHeadModel`, any size, a tinylm export included) to fine-tune.

    Dropout is the config's, as nanoGPT overrides it when it starts from GPT-2 (GPT-2's own
    rate is 0.1); PyTorch's fused attention as for models trained from scratch.
    """
    check_gpt2(model_type(source, revision), source, revision)
    return load("model", GPT2LMHeadModel.from_pretrained, source, revision, attn_implementation="sdpa",
                resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)


def check_gpt2(kind: str, source: str, revision: str | None) -> None:
    """Refuse a `model_type` other than GPT-2's for model.init_from."""
    if kind != "gpt2":
        raise UserError(f"model.init_from = {describe(source, revision)!r} is a {kind} model; tinylm fine-tunes "
                        "GPT-2 models (GPT2LMHeadModel: gpt2, distilgpt2, a tinylm export, ...)")


def gpt2_config(source: str, revision: str | None = None) -> GPT2Config:
    """The config of the GPT-2 `source` names, without its weights: one of GPT2_SIZES without the network,
    otherwise its config.json from the local folder, the Hugging Face cache or the Hub."""
    if source in GPT2_SIZES and not revision and not is_local(source):
        n_layer, n_head, n_embd = GPT2_SIZES[source]
        return GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    config = load("model", AutoConfig.from_pretrained, source, revision)
    check_gpt2(config.model_type, source, revision)
    return config


def tokenizer(source: str, revision: str | None = None) -> PreTrainedTokenizerFast:
    """The tokenizer that comes with a model: a fast (`tokenizers`-backed) one, or a UserError."""
    loaded = load("tokenizer", AutoTokenizer.from_pretrained, source, revision)
    if not isinstance(loaded, PreTrainedTokenizerFast):
        raise UserError(f"the tokenizer of {describe(source, revision)} has no fast (tokenizers) version, "
                        "which tinylm needs to encode data")
    return loaded
