"""Sampling text from a checkpoint or an exported model folder (the engine of `tinylm generate` and the demo).

Generation runs for any number of tokens, far past the model's context
(`block_size`, GPT-2's `n_positions`), on a sliding window with a KV cache:

- The window starts as the prompt's last `block_size` tokens. The model reads
  it once (prefill) and keeps every layer's keys/values.
- Each new token is fed alone with the cache, at position `window - 1`, so a
  step costs one token's work instead of a whole window's.
- When the window is full (`block_size` tokens) and one more token arrives, the
  cache is dropped and rebuilt from the newest `keep` tokens (default
  `block_size // 2`, the new token included) at positions `0 .. keep-1`: GPT-2's
  positions are learned and absolute, so a kept token cannot keep its old
  position. One prefill every `block_size - keep` tokens keeps the cost per
  token about constant however long the text gets.

So every token is predicted from the newest `keep` to `block_size` tokens.
nanoGPT's sampler instead slides by one token and always sees the newest
`block_size` tokens, recomputing the whole window for every token;
`sample_tokens_recompute` implements both context rules without a cache, as the
reference for the tests and the baseline for `benchmarks/generate.py`.

A GPT-2 (what tinylm trains and exports) is run by `GPT2Decoder`, which calls
the model's own modules directly on a preallocated cache; any other causal LM
in an exported folder goes through transformers' `DynamicCache`
(`DynamicCacheDecoder`). Both read the same window; see `GPT2Decoder` for why.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tokenizers.decoders import DecodeStream
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GPT2LMHeadModel,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from . import checkpoint, paths
from . import tokenizer as tok
from .config import DEVICES, Sampling
from .errors import UserError


def logits_warpers(sampling: Sampling, vocab_size: int) -> LogitsProcessorList:
    """transformers' logits warpers for these settings, in `generate`'s order (no-ops left out)."""
    processors = LogitsProcessorList()
    if sampling.temperature not in (0.0, 1.0):
        processors.append(TemperatureLogitsWarper(sampling.temperature))
    if 0 < sampling.top_k < vocab_size:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(sampling.top_p))
    return processors


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when a GPU is visible, else CPU."""
    if name not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible; use --device cpu (or auto)")
    return torch.device(name)


def load(path: str | os.PathLike, device: torch.device | str = "cpu"):
    """(model, tokenizer) from a tinylm checkpoint file or an exported transformers folder.

    The model is in eval mode on `device`. Nothing is fetched from the Hub.
    """
    path = Path(path)
    if path.is_dir():
        model, tokenizer = _load_exported(path)
    else:
        payload = checkpoint.load(path)
        model, tokenizer = checkpoint.model_from(payload), checkpoint.tokenizer_from(payload)
    tok.check_fits(tokenizer, model.config.vocab_size, path)
    return model.to(device).eval(), tokenizer


def load_model(name: str, revision: str | None = None, device: torch.device | str = "cpu"):
    """(model, tokenizer) of a model folder or a Hub id (at `revision`), in eval mode on `device`."""
    from . import pretrained
    from .hub_names import is_local

    if is_local(name):
        if revision:
            raise UserError(f"--revision applies to a Hub id; {name} is a local folder: drop --revision")
        model, tokenizer = _load_exported(Path(name).expanduser())
    else:
        model, tokenizer = pretrained.causal_lm(name, revision), pretrained.tokenizer(name, revision)
    tok.check_fits(tokenizer, model.config.vocab_size, name)
    return model.to(device).eval(), tokenizer


def _load_exported(folder: Path):
    if not (folder / "config.json").is_file():
        what = "a folder without config.json" if folder.is_dir() else "a file, not a model folder"
        raise UserError(
            f"{folder} is {what}: pass a checkpoint file "
            f"(e.g. {paths.CHECKPOINT_BEST}) or a folder written by `tinylm export`"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... for broken folders
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the model folder {folder}: {reason[:300]}") from None
    return model, tokenizer


def context_length(model) -> int:
    """The model's context (`block_size`): the most positions it has embeddings for."""
    return model.config.max_position_embeddings


def encode_prompt(tokenizer, prompt: str, bos_token_id: int = 0) -> list[int]:
    """Token ids of `prompt`; an empty prompt is the single `<|endoftext|>` (bos) token.

    A character the tokenizer never saw (a char tokenizer's `[UNK]`) is refused,
    naming the characters: the model never saw `[UNK]` in training either.
    """
    if not prompt:
        return [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else bos_token_id]
    encoding = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    unknown = {
        prompt[start:end]
        for token, (start, end) in zip(ids, encoding["offset_mapping"])
        if token == tokenizer.unk_token_id
    }
    if unknown:
        shown = ", ".join(f"{char!r} (U+{ord(char[0]):04X})" for char in sorted(unknown)[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise UserError(
            f"the prompt has characters the tokenizer never saw in training: {shown}{more}; "
            "remove or replace them (a char tokenizer knows only the characters of its training text)"
        )
    return ids


def model_prompt_ids(model, tokenizer, prompt: str) -> list[int]:
    """`encode_prompt` for `model`: an empty prompt falls back to the model's bos id (0 if it has none)."""
    return encode_prompt(tokenizer, prompt, model.config.bos_token_id or 0)


def choose(logits: torch.Tensor, sampling: Sampling, warpers: LogitsProcessorList, generator) -> int:
    """Draw the next token id from a (1, vocab) row of logits."""
    if sampling.temperature == 0:
        return int(logits.argmax(dim=-1))
    # These warpers read only the scores, never the ids, so none are passed.
    scores = warpers(None, logits.float())
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))


def next_logits(model, ids: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None = None):
    """The (1, vocab) logits for the token after `ids` (at `positions`), extending `cache` when given.

    The embeddings are looked up here instead of passing `input_ids`: given ids,
    transformers checks on every call whether the input ends in the pad token
    (our pad is <|endoftext|>) and warns that it "may be padded", which it never is.
    """
    embeds = model.get_input_embeddings()(ids)
    out = model(inputs_embeds=embeds, position_ids=positions, use_cache=cache is not None, logits_to_keep=1,
                **{cache_keyword(type(model)): cache})
    return out.logits[:, -1, :]


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The keyword `model_class.forward` takes its key/value cache by.

    transformers renamed `past_key_values` to `cache` during v5; the old name still works but
    warns that it will be removed (in 5.40). Versions before the rename only know `past_key_values`.
    (`inspect.signature` sees through transformers' decorators to the real `forward`.)
    """
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def refill_length(block_size: int) -> int:
    """How many of the newest tokens the window keeps when it overflows (default `block_size // 2`)."""
    return max(1, block_size // 2)


class KVDecoder:
    """A model plus a key/value cache over one window: `prefill` a window, then `step` token by token.

    Subclasses say how to empty the cache (`_reset`) and how to run new tokens at
    positions `start..end-1` against it (`_run`); the window bookkeeping lives here.
    """

    def __init__(self, model):
        self.model = model
        self.block_size = context_length(model)
        self.positions = torch.arange(self.block_size, device=model.device)
        self.length = 0  # how many cache positions are filled

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Empty the cache, read `ids` at positions 0.. and return the (1, vocab) logits after them."""
        self._reset()
        self.length = 0
        return self._forward(ids)

    def step(self, token: int) -> torch.Tensor:
        """Read one token at the next position and return the (1, vocab) logits after it."""
        return self._forward([token])

    @torch.inference_mode()
    def _forward(self, ids: list[int]) -> torch.Tensor:
        start, end = self.length, self.length + len(ids)
        if end > self.block_size:
            raise ValueError(f"{end} positions do not fit the {self.block_size}-position cache; prefill less")
        logits = self._run(torch.tensor([ids], device=self.model.device), start, end)
        self.length = end
        return logits

    def _reset(self) -> None:
        raise NotImplementedError

    def _run(self, tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
        raise NotImplementedError


class GPT2Decoder(KVDecoder):
    """Runs a GPT2LMHeadModel's own modules by hand on a preallocated key/value cache.

    Why not `model(..., cache=DynamicCache())`: at the sizes tinylm
    trains, a token's arithmetic is tiny, and the Python work of one call through
    transformers' forward (argument handling, mask building, cache bookkeeping)
    makes a one-token step about 40% slower. Calling the blocks' submodules
    (`ln_1`, `attn.c_attn`, `attn.c_proj`, `ln_2`, `mlp`) directly does the same
    computation, so the logits agree with the full model's to float rounding
    (tests/test_generate.py checks it). Dropout is never applied, as in eval mode.

    The cache holds `block_size` positions per layer, written in place, so a step
    allocates no new cache memory.
    """

    def __init__(self, model: GPT2LMHeadModel):
        super().__init__(model)
        self.gpt = model.transformer
        config = model.config
        self.heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        shape = (1, self.heads, self.block_size, self.head_dim)
        with torch.inference_mode():
            self.keys = [torch.empty(shape, dtype=model.dtype, device=model.device) for _ in self.gpt.h]
            self.values = [torch.empty(shape, dtype=model.dtype, device=model.device) for _ in self.gpt.h]

    def _reset(self) -> None:
        pass  # positions past `length` are never read, so stale keys/values can stay

    def _run(self, tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
        count = end - start
        x = self.gpt.wte(tokens) + self.gpt.wpe(self.positions[start:end])
        for block, keys, values in zip(self.gpt.h, self.keys, self.values):
            attn = block.attn
            # (1, count, heads * head_dim) -> (1, heads, count, head_dim), the layout attention wants.
            q, k, v = (t.view(1, count, self.heads, self.head_dim).transpose(1, 2)
                       for t in attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=2))
            keys[:, :, start:end] = k
            values[:, :, start:end] = v
            # SDPA's causal mask is the lower triangle from the top-left corner: right for a
            # prefill, which starts at position 0. One new token sees every cached position: no mask.
            y = torch.nn.functional.scaled_dot_product_attention(
                q, keys[:, :, :end], values[:, :, :end], is_causal=count > 1, scale=attn.scaling)
            x = x + attn.c_proj(y.transpose(1, 2).reshape(1, count, -1))
            x = x + block.mlp(block.ln_2(x))
        return self.model.lm_head(self.gpt.ln_f(x[:, -1]))


class DynamicCacheDecoder(KVDecoder):
    """`GPT2Decoder`'s interface for any other causal LM: the model's forward with a `DynamicCache`."""

    def __init__(self, model):
        super().__init__(model)
        self.cache = None

    def _reset(self) -> None:
        self.cache = DynamicCache(config=self.model.config)

    def _run(self, tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return next_logits(self.model, tokens, self.positions[start:end].unsqueeze(0), self.cache)


def decoder_for(model) -> KVDecoder:
    """The fastest KV-cache decoder that can run `model`."""
    return GPT2Decoder(model) if isinstance(model, GPT2LMHeadModel) else DynamicCacheDecoder(model)


@torch.inference_mode()
def sample_tokens(
    model, prompt_ids: list[int], sampling: Sampling, generator: torch.Generator | None = None,
    keep: int | None = None,
) -> Iterator[int]:
    """Yield up to `sampling.max_new_tokens` new token ids, one at a time (the KV-cached sliding window).

    The model sees the prompt's last `block_size` tokens; see the module docstring
    for how the window slides. `keep` overrides `refill_length(block_size)`. With
    `sampling.stop_at_eos`, sampling ends at the model's eos token (not yielded).
    """
    block_size = context_length(model)
    keep = refill_length(block_size) if keep is None else keep
    if not 1 <= keep <= block_size:
        raise ValueError(f"keep must be in [1, {block_size}], got {keep}")
    warpers = logits_warpers(sampling, model.config.vocab_size)
    decoder = decoder_for(model)
    tokens = list(prompt_ids)
    logits = decoder.prefill(tokens[-block_size:])
    for step in range(sampling.max_new_tokens):
        token = choose(logits, sampling, warpers, generator)
        if is_end(token, model, sampling):
            return
        yield token
        if step == sampling.max_new_tokens - 1:
            return
        tokens.append(token)
        if decoder.length < block_size:
            logits = decoder.step(token)
        else:
            logits = decoder.prefill(tokens[-keep:])


@torch.inference_mode()
def sample_tokens_recompute(
    model, prompt_ids: list[int], sampling: Sampling, generator: torch.Generator | None = None,
    context: str = "nanogpt", keep: int | None = None,
) -> Iterator[int]:
    """The reference sampler: no cache, the whole window recomputed for every token.

    `context="nanogpt"` slides one token at a time and always sees the newest
    `block_size` tokens (nanoGPT's sample.py). `context="refill"` sees exactly the
    window `sample_tokens` sees, so under greedy decoding the two must agree.
    """
    if context not in ("nanogpt", "refill"):
        raise ValueError(f"context must be 'nanogpt' or 'refill', got {context!r}")
    block_size = context_length(model)
    keep = refill_length(block_size) if keep is None else keep
    warpers = logits_warpers(sampling, model.config.vocab_size)
    positions = torch.arange(block_size, device=model.device).unsqueeze(0)
    tokens = list(prompt_ids)
    window = min(len(tokens), block_size)
    for _ in range(sampling.max_new_tokens):
        ids = torch.tensor([tokens[-window:]], device=model.device)
        logits = next_logits(model, ids, positions[:, :window])
        token = choose(logits, sampling, warpers, generator)
        if is_end(token, model, sampling):
            return
        yield token
        tokens.append(token)
        if window < block_size:
            window += 1
        elif context == "refill":
            window = keep


def is_end(token: int, model, sampling: Sampling) -> bool:
    """Whether `token` ends the sample: the model's eos token, when `sampling.stop_at_eos`."""
    return sampling.stop_at_eos and token == model.config.eos_token_id


def decode_stream(tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as the tokens arrive; a character split over several byte-level tokens waits until whole."""
    stream = DecodeStream(skip_special_tokens=False)
    backend = tokenizer.backend_tokenizer
    for token in token_ids:
        piece = stream.step(backend, token)
        if piece:
            yield piece


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A random generator on `device`: the same seed gives the same samples (on the same device)."""
    return torch.Generator(device=device).manual_seed(seed)


def stream_completion(model, tokenizer, prompt: str, sampling: Sampling, generator) -> Iterator[str]:
    """The continuation of `prompt` (the prompt itself not included), as text pieces while it is sampled."""
    prompt_ids = model_prompt_ids(model, tokenizer, prompt)
    return decode_stream(tokenizer, sample_tokens(model, prompt_ids, sampling, generator))


def complete(model, tokenizer, prompt: str, sampling: Sampling = Sampling(), seed: int = 1337) -> str:
    """The whole continuation of `prompt` as one string (seeded, so repeatable), written with dropout off
    (a model in training mode is put back in it after)."""
    generator = make_generator(model.device, seed)
    training = model.training
    model.eval()
    try:
        return "".join(stream_completion(model, tokenizer, prompt, sampling, generator))
    finally:
        model.train(training)
