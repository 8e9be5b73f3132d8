"""Reading prepared data back: resolve(), token streams, training batches, the eval dataset, and bad data."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tinylm import data, formats, paths, prepare
from tinylm.errors import UserError

TEXT = "".join(f"SPEAKER {i % 7}:\nline {i}, with words and {'spaces  ' * (i % 3)}more words.\n\n" for i in range(400))
BLOCK = 16


def make_data(root: Path, *flags: str, text: str = TEXT) -> Path:
    """Prepare `text` in-process into `root` with the given prepare flags; return `root`."""
    root.mkdir(parents=True, exist_ok=True)
    source = root / "input.txt"
    source.write_text(text, encoding="utf-8")
    assert prepare.main(["--input", str(source), *flags]) == 0
    return root


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder (the cwd) with data/ and data/processed/ prepared at the default paths."""
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path)  # bin -> data/
    make_data(tmp_path, "--format", "txt", "--tokenizer", "bpe", "--vocab-size", "300")  # -> data/processed/
    return tmp_path


def whole(stream: data.TokenStream) -> list[int]:
    """Every token of a split, read through the stream."""
    return stream.blocks(np.array([0]), stream.num_tokens - 1)[0].tolist()


def tokens_of(path: Path) -> np.ndarray:
    return np.load(path) if path.suffix == ".npy" else np.fromfile(path, dtype="<u2")


def test_bin_resolves_through_the_processed_dir_to_its_parent(project):
    prepared = data.resolve(paths.PROCESSED_DIR, "bin", "char")
    assert prepared.meta_path == Path(paths.META_BIN)
    assert prepared.tokenizer_path == Path(paths.DATA_DIR) / paths.TOKENIZER_NAME
    assert prepared.tokenizer_kind == "char" and prepared.vocab_size == len(set(TEXT)) + 2
    assert len(prepared.tokenizer()) == prepared.vocab_size
    assert prepared.split("train").num_tokens == int(len(TEXT) * 0.9)


def test_txt_resolves_in_the_processed_dir(project):
    prepared = data.resolve(paths.PROCESSED_DIR, "txt", "bpe")
    assert prepared.meta_path == Path(paths.META_TXT)
    assert prepared.tokenizer_kind == "bpe" and prepared.vocab_size == 300
    val = prepared.split("val")
    assert prepared.tokenizer().decode(whole(val)) == TEXT[int(len(TEXT) * 0.9):]


def test_train_batch_is_a_function_of_its_coordinates(project):
    stream = data.resolve(paths.DATA_DIR, "bin", "char").split("train")
    everything = tokens_of(Path(paths.DATA_DIR) / "train.bin")
    coords = dict(block_size=BLOCK, batch_size=6, seed=3, step=10, slot=1)
    batch = data.train_batch(stream, **coords)
    assert batch.shape == (6, BLOCK + 1) and batch.dtype == torch.int64
    assert torch.equal(batch, data.train_batch(stream, **coords))  # recomputed from the coordinates alone
    for change in ({"slot": 2}, {"step": 11}, {"slot": 0}, {"seed": 4}):
        assert not torch.equal(batch, data.train_batch(stream, **{**coords, **change})), change
    windows = np.lib.stride_tricks.sliding_window_view(everything, BLOCK + 1)
    for row in batch.numpy():
        assert (windows == row).all(axis=1).any()  # a real window of the file, not a corrupted one


def test_train_batch_slots_split_one_global_batch(project):
    """1 x batch 8 == 4 micro-batches (or ranks) of 2: the same blocks in the same order."""
    stream = data.resolve(paths.DATA_DIR, "bin", "char").split("train")
    whole = data.train_batch(stream, block_size=BLOCK, batch_size=8, seed=5, step=3, slot=0)
    parts = [data.train_batch(stream, block_size=BLOCK, batch_size=2, seed=5, step=3, slot=i) for i in range(4)]
    assert torch.equal(whole, torch.cat(parts))


def test_train_batch_offsets_cover_the_whole_split(project):
    stream = data.TokenStream([Path(paths.DATA_DIR) / "val.bin"], "uint16")
    block = stream.num_tokens - 3  # exactly 3 possible offsets: 0, 1, 2
    firsts = {int(data.train_batch(stream, block_size=block, batch_size=1, seed=0, step=s, slot=0)[0, 0])
              for s in range(60)}
    assert firsts == set(tokens_of(Path(paths.DATA_DIR) / "val.bin")[:3].tolist())


def test_eval_dataset_is_fixed_evenly_spaced_and_clamped(project):
    stream = data.resolve(paths.DATA_DIR, "bin", "char").split("val")
    everything = tokens_of(Path(paths.DATA_DIR) / "val.bin")
    evaluation = data.eval_dataset(stream, block_size=BLOCK, num_blocks=10)
    assert len(evaluation) == 10 and evaluation.cache_files == []  # in memory: nothing cached on disk
    starts = np.array(evaluation.with_format(None)["start"])
    assert starts[0] == 0 and starts[-1] == stream.num_tokens - (BLOCK + 1)
    assert np.ptp(np.diff(starts)) <= 1  # evenly spaced
    for start, item in zip(starts, evaluation):
        assert item["input_ids"].dtype == torch.int64
        assert np.array_equal(item["input_ids"].numpy(), everything[start : start + BLOCK + 1])
    again = data.eval_dataset(stream, block_size=BLOCK, num_blocks=10)
    assert np.array_equal(np.array(again.with_format(None)["start"]), starts)
    # More blocks than fit: clamped to non-overlapping blocks, never an error.
    most = data.eval_dataset(stream, block_size=BLOCK, num_blocks=10**6)
    assert len(most) == stream.num_tokens // (BLOCK + 1)
    assert np.diff(np.array(most.with_format(None)["start"])).min() >= BLOCK + 1
    # eval_iters = 1 (the least config allows): the one block at the start; 0 is refused.
    assert np.array(data.eval_dataset(stream, block_size=BLOCK, num_blocks=1).with_format(None)["start"]).tolist() == [0]
    with pytest.raises(ValueError, match="num_blocks must be at least 1, got 0"):
        data.eval_dataset(stream, block_size=BLOCK, num_blocks=0)


def test_eval_dataset_works_in_a_dataloader(project):
    stream = data.resolve(paths.DATA_DIR, "bin", "char").split("val")
    evaluation = data.eval_dataset(stream, block_size=BLOCK, num_blocks=7)
    batches = list(torch.utils.data.DataLoader(evaluation, batch_size=4))
    assert [b["input_ids"].shape for b in batches] == [(4, BLOCK + 1), (3, BLOCK + 1)]


def test_rewritten_file_at_the_same_path_is_never_stale(project):
    before = data.eval_dataset(data.resolve(paths.DATA_DIR, "bin", "char").split("val"), block_size=BLOCK, num_blocks=4)
    old = [item["input_ids"] for item in before]
    make_data(project, "--overwrite", text=TEXT.upper())  # same paths, new content
    assert all(torch.equal(a, b["input_ids"]) for a, b in zip(old, before))  # open streams keep their files
    after = data.eval_dataset(data.resolve(paths.DATA_DIR, "bin", "char").split("val"), block_size=BLOCK, num_blocks=4)
    tokenizer = data.resolve(paths.DATA_DIR, "bin", "char").tokenizer()
    new = [tokenizer.decode(item["input_ids"].tolist()) for item in after]
    assert all(text == text.upper() for text in new) and any(text != text.lower() for text in new)
    assert not all(torch.equal(a, b["input_ids"]) for a, b in zip(old, after))


def test_edited_text_is_refused_until_retokenized_and_training_never_writes(project):
    folder = Path(paths.PROCESSED_DIR)
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    (folder / "val.txt").write_text("KING:\nan entirely new validation text, long enough for a block.\n" * 4)
    prepared = data.resolve(paths.PROCESSED_DIR, "txt", "bpe")
    with raises(r"data/processed/val\.txt changed after its tokens \(val\.npy\) were made: run "
                r"`tinylm prepare --retokenize data/processed`"):
        prepared.split("val")
    after = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert after == {**before, "val.txt": after["val.txt"]}  # reading wrote nothing
    assert prepare.main(["--retokenize", str(folder)]) == 0
    prepared = data.resolve(paths.PROCESSED_DIR, "txt", "bpe")
    val = prepared.split("val")
    assert prepared.tokenizer().decode(whole(val)) == (folder / "val.txt").read_text()
    assert prepared.meta["splits"]["val"]["num_tokens"] == val.num_tokens
    assert np.array_equal(whole(prepared.split("train")), tokens_of(folder / "train.npy"))


def test_a_changed_tokenizer_is_refused(project):
    tokenizer_file = Path(paths.PROCESSED_DIR) / paths.TOKENIZER_NAME
    tokenizer_file.write_text(tokenizer_file.read_text().replace('"<|endoftext|>"', '"<|endoftext|>" '))
    with raises(r"data/processed/tokenizer\.json changed after data/processed/meta\.json was written"):
        data.resolve(paths.PROCESSED_DIR, "txt", "bpe")


def test_a_touched_or_copied_file_is_checked_by_checksum_and_accepted(project):
    path = Path(paths.DATA_DIR) / "train.bin"
    expected = tokens_of(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # as `cp` without -p leaves it
    assert np.array_equal(whole(data.resolve(paths.DATA_DIR, "bin", "char").split("train")), expected)


def test_npy_alone_is_enough_for_txt(project):
    folder = Path(paths.PROCESSED_DIR)
    expected = tokens_of(folder / "train.npy")
    (folder / "train.txt").unlink()
    stream = data.resolve(paths.PROCESSED_DIR, "txt", "bpe").split("train")
    assert np.array_equal(whole(stream), expected)


def test_token_stream_reads_across_shard_files(tmp_path):
    # Tokens 0..84 over four files, one of them empty: the stream is their concatenation.
    pieces = {"train_000.bin": range(0, 50), "train_001.bin": range(50, 50), "train_002.bin": range(50, 80),
              "train_003.bin": range(80, 85)}
    for name, ids in pieces.items():
        np.array(ids, dtype="<u2").tofile(tmp_path / name)
    stream = data.TokenStream([tmp_path / name for name in pieces], "uint16")
    assert stream.num_tokens == 85
    for block_size in (10, 40):  # 40: a block from the first file through the empty one to the last
        starts = np.arange(stream.num_starts(block_size))
        expected = starts[:, None] + np.arange(block_size + 1)
        assert np.array_equal(stream.blocks(starts, block_size).numpy(), expected)
        assert np.array_equal(stream.blocks(starts[::-1], block_size).numpy(), expected[::-1])
    for outside in (-1, 75):  # -1 would wrap around to the stream's last token
        with pytest.raises(IndexError, match=r"block starts must lie in \[0, 75\)"):
            stream.blocks(np.array([0, outside]), 10)


def test_token_stream_pickles_by_path_not_by_content(project):
    stream = data.resolve(paths.DATA_DIR, "bin", "char").split("train")
    payload = pickle.dumps(stream)
    assert len(payload) < 1000
    copy = pickle.loads(payload)
    starts = np.array([0, 5, 100])
    assert torch.equal(copy.blocks(starts, BLOCK), stream.blocks(starts, BLOCK))


# --- bad data: each raises a UserError that names the file, says what is wrong and how to fix it ---


@contextlib.contextmanager
def raises(match: str, anchor: str | None = None):
    """Expect a UserError matching `match` that links `anchor` of docs/troubleshooting.md (or none)."""
    with pytest.raises(UserError, match=match) as info:
        yield
    assert info.value.anchor == anchor


def test_split_shorter_than_one_block_names_the_file(project):
    stream = data.resolve(paths.DATA_DIR, "bin", "char").split("val")
    too_big = stream.num_tokens
    with raises(rf"data/val\.bin holds {too_big} tokens, fewer than one block \(model\.block_size \+ 1 = "
                rf"{too_big + 1}\): use a smaller model\.block_size"):
        data.train_batch(stream, block_size=too_big, batch_size=2, seed=0, step=0, slot=0)
    with raises(r"data/val\.bin holds \d+ tokens, fewer than one block"):
        data.eval_dataset(stream, block_size=too_big, num_blocks=2)
    assert data.eval_dataset(stream, block_size=too_big - 1, num_blocks=2).num_rows == 1


def test_bin_size_not_a_whole_number_of_tokens(project):
    with open(Path(paths.DATA_DIR) / "val.bin", "ab") as handle:
        handle.write(b"\x00")
    with raises(r"data/val\.bin is \d+ bytes, not a whole number of uint16 tokens"):
        data.resolve(paths.DATA_DIR, "bin", "char").split("val")


def test_bin_length_disagreeing_with_meta(project):
    with open(Path(paths.DATA_DIR) / "val.bin", "ab") as handle:
        handle.write(b"\x01\x00")
    with raises(r"data/val\.bin holds \d+ tokens but data/meta\.json says \d+"):
        data.resolve(paths.DATA_DIR, "bin", "char").split("val")


def test_a_file_changed_since_prepare_is_refused(project):
    path = Path(paths.DATA_DIR) / "train.bin"
    tokens = tokens_of(path)
    tokens[123] = 999
    tokens.tofile(path)
    with raises(r"data/train\.bin changed after tinylm prepare wrote it \(its SHA-256 is not the one "
                r"data/meta\.json records\): re-run tinylm prepare"):
        data.resolve(paths.DATA_DIR, "bin", "char").split("train")


@pytest.mark.parametrize("damage, match", [
    (lambda meta: meta.unlink(), r"data/meta\.json"),
    (lambda meta: meta.write_text("{not json"), r"data/meta\.json is not valid JSON"),
    (lambda meta: meta.write_bytes(b"\xff\xfe"), r"data/meta\.json is not valid JSON"),
    (lambda meta: meta.write_text("[1, 2]"), r"data/meta\.json is not a tinylm meta\.json"),
    (lambda meta: meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 99})),
     r"data/meta\.json has format_version 99, but this tinylm reads version 2"),
    (lambda meta: meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "dtype"})),
     r"data/meta\.json is malformed: missing dtype"),
])
def test_broken_meta(project, damage, match):
    damage(Path(paths.META_BIN))
    with pytest.raises(UserError, match=match):
        data.resolve(paths.PROCESSED_DIR, "bin", "char")


def test_unreadable_meta(project):
    meta = Path(paths.META_BIN)
    meta.unlink()
    meta.mkdir()  # reading a folder fails whatever the permissions (tests may run as root)
    with pytest.raises(UserError, match=r"data/meta\.json is a folder, not a file"):
        formats.load_meta(meta)


def test_binary_shards_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_data(tmp_path, "--format", "txt")  # only data/processed exists
    with raises(r"no train\.bin/val\.bin in data/processed or data: run `tinylm prepare --format bin`.*"
                r"set training\.data_format = \"txt\"", anchor=data.BINARY_SHARDS_NOT_FOUND):
        data.resolve(paths.PROCESSED_DIR, "bin", "char")


def test_bin_file_listed_in_meta_but_missing(project):
    (Path(paths.DATA_DIR) / "val.bin").rename(Path(paths.DATA_DIR) / "val.bin.bak")
    prepared = data.resolve(paths.PROCESSED_DIR, "bin", "char")
    with raises(r"data/val\.bin is missing \(listed in data/meta\.json\)", anchor=data.BINARY_SHARDS_NOT_FOUND):
        prepared.split("val")


def test_txt_tokens_listed_in_meta_but_missing_name_the_text_too_when_it_is_gone(project):
    """txt data: a missing token file is named alone while its text is there (re-tokenizing would do),
    and with its text when both are gone."""
    prepared = data.resolve(paths.PROCESSED_DIR, "txt", "bpe")
    entry = prepared.meta["splits"]["val"]["files"][0]
    tokens, text = Path(paths.PROCESSED_DIR) / entry["tokens"], Path(paths.PROCESSED_DIR) / entry["text"]
    tokens.unlink()
    with raises(rf"^{re.escape(str(tokens))} is missing \(listed in data/processed/meta\.json\)"):
        prepared.split("val")
    text.unlink()
    with raises(rf"^{re.escape(str(text))} and {re.escape(str(tokens))} are missing \(listed in"):
        prepared.split("val")


def test_bin_files_without_their_meta_is_a_meta_path_mismatch(project):
    Path(paths.META_BIN).rename(Path(paths.DATA_DIR) / "elsewhere.json")
    with raises(r"found \.bin files in data but no data/meta\.json", anchor=data.META_PATH_MISMATCH):
        data.resolve(paths.PROCESSED_DIR, "bin", "char")


def test_txt_asked_but_only_binary_data_is_a_meta_path_mismatch(project):
    shutil.rmtree(paths.PROCESSED_DIR)
    with raises(r"training\.data_format is \"txt\" but data/processed/meta\.json is missing; data holds binary",
                anchor=data.META_PATH_MISMATCH):
        data.resolve(paths.PROCESSED_DIR, "txt", "char")


def test_meta_of_the_other_format_is_a_meta_path_mismatch(project):
    for name in ("train.npy", "val.npy"):  # put binary-looking files next to the txt meta
        os.link(Path(paths.PROCESSED_DIR) / name, Path(paths.PROCESSED_DIR) / name.replace(".npy", ".bin"))
    with raises(r"data/processed/meta\.json describes txt data, but training\.data_format is 'bin'",
                anchor=data.META_PATH_MISMATCH):
        data.resolve(paths.PROCESSED_DIR, "bin", "bpe")


def test_nothing_prepared_yet_says_to_run_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with raises(r"data/processed/meta\.json is missing: prepare the text data first with "
                r"`tinylm prepare --format txt`"):
        data.resolve(paths.PROCESSED_DIR, "txt", "char")


def test_char_vocab_missing(project):
    (Path(paths.DATA_DIR) / paths.TOKENIZER_NAME).unlink()
    with raises(r"data/tokenizer\.json \(the char vocabulary named by data/meta\.json\) is missing",
                anchor=data.CHAR_VOCAB_MISSING):
        data.resolve(paths.PROCESSED_DIR, "bin", "char")


def test_char_asked_of_bpe_data_is_char_vocab_missing(project):
    with raises(r"data/processed/meta\.json was prepared with the bpe tokenizer, but training asks for char",
                anchor=data.CHAR_VOCAB_MISSING):
        data.resolve(paths.PROCESSED_DIR, "txt", "char")
    with raises(r"data/meta\.json was prepared with the char tokenizer, but training asks for bpe"):
        data.resolve(paths.PROCESSED_DIR, "bin", "bpe")


def test_tokenizer_from_another_run(project):
    shutil.copy(Path(paths.PROCESSED_DIR) / paths.TOKENIZER_NAME, Path(paths.DATA_DIR) / paths.TOKENIZER_NAME)
    with raises(r"data/tokenizer\.json is a bpe tokenizer of 300 tokens, but data/meta\.json says char",
                anchor=data.CHAR_VOCAB_MISSING):
        data.resolve(paths.PROCESSED_DIR, "bin", "char")


def test_vocab_beyond_uint16_is_stored_as_uint32(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(70_000)) * 2  # 70000 distinct characters
    make_data(tmp_path, "--out", str(tmp_path / "out"), text=text)
    prepared = data.resolve(str(tmp_path / "out"), "bin", "char")
    assert prepared.meta["dtype"] == "uint32" and prepared.vocab_size == 70_002
    train = prepared.split("train")
    assert (tmp_path / "out" / "train.bin").stat().st_size == 4 * train.num_tokens
    block = train.blocks(np.array([69_990]), 20)[0]
    assert int(block.max()) > 65_535
    assert prepared.tokenizer().decode(block.tolist()) == text[69_990:70_011]


def test_the_suggested_prepare_command_leaves_out_only_the_default_out():
    """prepare writes bin data to data/ and txt data to data/processed by default: the command an error
    suggests names --out exactly when the folder is not that default (bin is found in either)."""
    assert data.prepare_command("bin", Path("data")) == "tinylm prepare --format bin"
    assert data.prepare_command("bin", Path("data/processed")) == "tinylm prepare --format bin"
    assert data.prepare_command("txt", Path("data/processed")) == "tinylm prepare --format txt"
    assert data.prepare_command("txt", Path("data")) == "tinylm prepare --format txt --out data"
    assert data.prepare_command("bin", Path("mine")) == "tinylm prepare --format bin --out mine"


def test_a_token_stream_closes_the_files_it_holds_when_it_is_dropped(project):
    """A stream holds its files open (so it keeps reading the files it checked); once it is dropped they
    are closed by the stream itself, not left to whenever the file objects are collected."""
    import gc

    stream = data.resolve(paths.DATA_DIR, "bin", "char").split("train")
    handles = stream.handles  # kept: only an explicit close can close them now
    assert handles and not any(handle.closed for handle in handles)
    del stream
    gc.collect()
    assert all(handle.closed for handle in handles)
