"""Char and byte-level BPE tokenizers, built with `tokenizers`, used as `transformers` tokenizers.

Both are saved the standard way (`tokenizer.json` + `tokenizer_config.json`), so
`AutoTokenizer.from_pretrained(folder)` loads them with no tinylm code.

- char: one id per character seen in the training text. A character never seen
  in training encodes to `[UNK]` (it is never dropped), and decodes as "[UNK]".
- bpe: GPT-2 style byte-level BPE: every string round-trips exactly.

Both reserve id 0 for `<|endoftext|>`, the model's bos/eos token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .errors import UserError

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "[UNK]"
TRAINED_KINDS = ("char", "bpe")  # the tokenizers tinylm trains (what `kind_of` tells apart)
KINDS = (*TRAINED_KINDS, "pretrained")  # pretrained: a model's own tokenizer (tinylm.pretrained), not trained here
BYTE_ALPHABET_SIZE = 256
MAX_VOCAB_SIZE = 1 << 20  # far beyond any small model; guards against typos like 5000000


def train_char(texts: Iterable[str]) -> Tokenizer:
    """A character-level tokenizer over every character in `texts`."""
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    vocab = {EOS_TOKEN: 0, UNK_TOKEN: 1}
    for char in sorted(chars):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Every character is its own "word". Not `.`: it does not match a newline.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Without Fuse the WordLevel decoder would join characters with spaces.
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([EOS_TOKEN, UNK_TOKEN])
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """A GPT-2 style byte-level BPE tokenizer with `vocab_size` entries, trained on `texts`."""
    check_bpe_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def check_bpe_vocab_size(vocab_size: int) -> None:
    """Refuse a BPE vocab size that cannot hold the byte alphabet, or is absurdly large."""
    smallest = BYTE_ALPHABET_SIZE + 1  # every byte, plus <|endoftext|>
    if not smallest <= vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {vocab_size} is out of range: a byte-level BPE vocab needs between "
            f"{smallest} (the 256 bytes + {EOS_TOKEN}) and {MAX_VOCAB_SIZE} entries; try 4096"
        )


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The `transformers` view of a `tokenizers.Tokenizer` built here."""
    has_unk = tokenizer.token_to_id(UNK_TOKEN) is not None
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN if has_unk else None,
        clean_up_tokenization_spaces=False,
    )


def save(tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Save `tokenizer` into `folder` as a `transformers` tokenizer; return the tokenizer.json path."""
    folder = Path(folder)
    wrap(tokenizer).save_pretrained(folder)
    return folder / "tokenizer.json"


def load(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a `tokenizer.json` file or a folder holding one."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for missing or malformed files
        raise UserError(
            f"cannot read tokenizer {file}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "re-run `tinylm prepare` to rebuild it"
        ) from None
    return wrap(tokenizer)


def from_json(text: str) -> PreTrainedTokenizerFast:
    """Rebuild a tokenizer from its serialized JSON (as stored inside a checkpoint)."""
    return wrap(Tokenizer.from_str(text))


def to_json(tokenizer: PreTrainedTokenizerFast) -> str:
    """The tokenizer.json text of a wrapped tokenizer (to embed in a checkpoint)."""
    return tokenizer.backend_tokenizer.to_str()


def kind_of(tokenizer: PreTrainedTokenizerFast) -> str:
    """"char" or "bpe", read from the tokenizer's model type."""
    model_type = json.loads(to_json(tokenizer))["model"]["type"]
    return "char" if model_type == "WordLevel" else "bpe"


def batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Group `texts` into lists of `size` (the last may be shorter)."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def check_fits(tokenizer, vocab_size: int, source: object) -> None:
    """Refuse a tokenizer with more tokens than the model has embeddings (`vocab_size`): its extra ids
    would index past them. `source` names where the pair came from."""
    if len(tokenizer) > vocab_size:
        raise UserError(
            f"{source}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size}; "
            "the model and tokenizer do not belong together"
        )
