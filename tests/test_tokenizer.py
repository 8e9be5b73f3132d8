"""Char and byte-level BPE tokenizers: exact round trips, unseen characters, loading through transformers."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tinylm import tokenizer as tok
from tinylm.errors import UserError

TRICKY = (
    "First line\n\n  indented,   runs of   spaces\t\ttabs\r\nwindows line\n"
    "café naïve Ελληνικά 日本語 🙂🚀 e\u0301 \u00a0nbsp\n"
)


def random_unicode(length: int, seed: int) -> str:
    """Text from all over Unicode: ASCII, accents, CJK, emoji, whitespace and controls (no surrogates)."""
    rng = random.Random(seed)
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x2FF), (0x370, 0x3FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    chars = []
    for _ in range(length):
        low, high = rng.choice(pools)
        chars.append(chr(rng.randint(low, high)))
    return "".join(chars)


@pytest.fixture(scope="module")
def bpe():
    training_text = "plain words and more plain words, said the king.\n" * 200 + random_unicode(3000, seed=1)
    return tok.wrap(tok.train_bpe([training_text], vocab_size=400, show_progress=False))


def test_char_round_trip_keeps_newlines_spaces_tabs_and_unicode():
    tokenizer = tok.wrap(tok.train_char([TRICKY]))
    ids = tokenizer.encode(TRICKY)
    assert len(ids) == len(TRICKY)  # one id per character, nothing added
    assert tokenizer.decode(ids) == TRICKY


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=200))
def test_char_round_trip_on_any_text_of_known_characters(text):
    tokenizer = tok.wrap(tok.train_char([text]))
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_char_vocab_reserves_eos_and_unk_then_sorted_characters():
    tokenizer = tok.wrap(tok.train_char(["cab", "ba\n"]))
    vocab = tokenizer.get_vocab()
    assert vocab[tok.EOS_TOKEN] == 0 and vocab[tok.UNK_TOKEN] == 1
    assert [vocab[c] for c in "\nabc"] == [2, 3, 4, 5]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0


def test_unseen_characters_become_unk_and_are_never_dropped():
    tokenizer = tok.wrap(tok.train_char(["abc \n"]))
    text = "ab☃c\tc"
    ids = tokenizer.encode(text)
    unk = tokenizer.convert_tokens_to_ids(tok.UNK_TOKEN)
    assert len(ids) == len(text)
    assert [i for i, token in enumerate(ids) if token == unk] == [2, 4]
    assert tokenizer.decode(ids) == "ab[UNK]c[UNK]c"


def test_bpe_round_trips_long_random_unicode_exactly(bpe):
    text = random_unicode(20_000, seed=2)  # mostly characters the tokenizer never saw as a whole
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=300))
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_merges_frequent_text_into_fewer_tokens(bpe):
    assert len(bpe.encode("plain words and more plain words")) < len("plain words and more plain words") / 2


@pytest.mark.parametrize("kind", tok.TRAINED_KINDS)
def test_saved_tokenizer_loads_with_auto_tokenizer(kind, bpe, tmp_path):
    raw = tok.train_char([TRICKY]) if kind == "char" else bpe.backend_tokenizer
    path = tok.save(raw, tmp_path)
    assert path == tmp_path / "tokenizer.json" and path.is_file()
    auto = AutoTokenizer.from_pretrained(tmp_path)  # plain transformers, no tinylm code
    ours = tok.load(path)
    assert auto.encode(TRICKY) == ours.encode(TRICKY)
    assert auto.decode(auto.encode(TRICKY)) == TRICKY
    assert auto.eos_token == tok.EOS_TOKEN and auto.eos_token_id == 0
    assert auto.clean_up_tokenization_spaces is False
    assert tok.kind_of(ours) == kind
    assert tok.from_json(tok.to_json(ours)).encode(TRICKY) == ours.encode(TRICKY)


def test_decode_keeps_spaces_before_punctuation():
    text = "Nay , answer me : stand ! ' tis so ."  # the spaces clean_up_tokenization_spaces would remove
    tokenizer = tok.wrap(tok.train_char([text]))
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("vocab_size", [0, 256, tok.MAX_VOCAB_SIZE + 1])
def test_bpe_vocab_size_out_of_range_is_refused(vocab_size):
    with pytest.raises(UserError, match=f"--vocab-size {vocab_size} is out of range"):
        tok.train_bpe(["some text"], vocab_size=vocab_size)


def test_load_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read tokenizer"):
        tok.load(tmp_path / "nothing.json")
