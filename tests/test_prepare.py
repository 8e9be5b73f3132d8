"""`tinylm prepare` end to end: outputs, read-back, and every bad input.

Most runs go through the command's entry point in this process (`cli_here`); fresh processes where the
process matters: killed or paused while it works, holding the lock, its peak memory, the console script,
and one refusal's exit code.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import training_helpers
from training_helpers import cli_here, prepare_peak_mib

from tinylm import corpus, data, formats, locks, paths
from tinylm import prepare as prepare_module
from tinylm.errors import UserError

BLOCK = 32
WORDS = "the king my lord thou art good night sweet prince what is this speak to me come hither".split()
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")  # for the runs that train


def prepare(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m tinylm.prepare ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "tinylm.prepare", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def prepare_in(cwd: Path, *args, capsys=None, check: bool = False) -> subprocess.CompletedProcess:
    """`tinylm prepare ARGS` run from `cwd`, in this process (`cli_here`; a fixture passes no `capsys`)."""
    return cli_here(prepare_module.main, list(args), capsys, check=check, cwd=cwd)


def play_text(chars: int, seed: int = 0) -> str:
    """A deterministic ASCII play-like text of about `chars` characters."""
    rng = random.Random(seed)
    speeches = []
    while sum(map(len, speeches)) < chars:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        speeches.append(f"{rng.choice(['HAMLET', 'KING'])}:\n{words.capitalize()}.\n\n")
    return "".join(speeches)


def assert_blocks_match_text(prepared: data.PreparedData, split: str, text: str, char_offset: int = 0) -> None:
    """Random training blocks and the eval blocks decode to the text at their (char = token) offsets."""
    stream = prepared.split(split)
    tokenizer = prepared.tokenizer()
    rng = np.random.default_rng(0)
    starts = rng.integers(0, stream.num_tokens - BLOCK, size=8)
    for start, row in zip(starts, stream.blocks(starts, BLOCK)):
        assert tokenizer.decode(row.tolist()) == text[char_offset + start : char_offset + start + BLOCK + 1]
    batch = data.train_batch(stream, block_size=BLOCK, batch_size=4, seed=1, step=3, slot=0)
    for row in batch:
        assert tokenizer.decode(row.tolist()) in text
    evaluation = data.eval_dataset(stream, block_size=BLOCK, num_blocks=5)
    for start, item in zip(evaluation.with_format(None)["start"], evaluation):
        expected = text[char_offset + start : char_offset + start + BLOCK + 1]
        assert tokenizer.decode(item["input_ids"].tolist()) == expected


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """The built-in corpus prepared with the char tokenizer in both formats, plus its text."""
    root = tmp_path_factory.mktemp("shakespeare")
    for fmt in ("txt", "bin"):
        prepare_in(root, "--format", fmt, check=True)
    return root, corpus.text()


def test_builtin_corpus_is_tiny_shakespeare_style_plain_text(shakespeare):
    _, text = shakespeare
    assert len(corpus.play_files()) == 38
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert "\n\nHAMLET:\n" in text and "BERNARDO:\nWho's there?\n\nFRANCISCO:\n" in text
    for markup in ("**", "_", "#", "\\", "  \n"):
        assert markup not in text, markup
    for direction in ("Enter HORATIO and MARCELLUS", "\nExit\n", "[Aside]", "SCENE I."):
        assert direction not in text, direction


def test_builtin_bin_outputs_and_meta(shakespeare):
    root, text = shakespeare
    out = root / paths.DATA_DIR
    meta = json.loads((root / paths.META_BIN).read_text())
    train_chars = int(len(text) * 0.9)
    assert meta["format_version"] == paths.META_FORMAT_VERSION
    described = (meta["data_format"], meta["tokenizer_kind"], meta["dtype"], meta["source"])
    assert described == ("bin", "char", "uint16", {"input": "shakespeare", "bytes": len(text.encode()),
                                                   "val_fraction": 0.1})
    assert meta["vocab_size"] == len(set(text)) + 2  # every character, plus <|endoftext|> and [UNK]
    (entry,) = meta["splits"]["train"]["files"]
    tokens = np.fromfile(out / "train.bin", dtype="<u2")
    # What training trusts instead of reading the file: its length, largest id, checksum and mtime.
    assert entry == {"tokens": "train.bin", "num_tokens": train_chars, "max_token_id": int(tokens.max()),
                     "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
                     "mtime_ns": (out / "train.bin").stat().st_mtime_ns}
    assert meta["splits"]["val"]["num_tokens"] == len(text) - train_chars
    assert (out / "train.bin").stat().st_size == 2 * train_chars
    assert (out / meta["tokenizer_file"]).is_file()
    assert not list(out.glob(".prepare-*"))  # no staging leftovers


def test_builtin_bin_reads_back_as_the_text(shakespeare):
    root, text = shakespeare
    prepared = data.resolve(str(root / paths.PROCESSED_DIR), "bin", "char")  # falls back to data/
    assert prepared.meta_path == root / paths.META_BIN
    train_chars = int(len(text) * 0.9)
    assert_blocks_match_text(prepared, "train", text)
    assert_blocks_match_text(prepared, "val", text, char_offset=train_chars)


def test_builtin_txt_outputs_and_read_back(shakespeare):
    root, text = shakespeare
    out = root / paths.PROCESSED_DIR
    train_chars = int(len(text) * 0.9)
    assert (out / "train.txt").read_text(encoding="utf-8") + (out / "val.txt").read_text(encoding="utf-8") == text
    assert (out / "val.txt").read_text(encoding="utf-8") == text[train_chars:]
    prepared = data.resolve(str(out), "txt", "char")
    assert prepared.meta_path == root / paths.META_TXT
    (entry,) = prepared.meta["splits"]["val"]["files"]
    assert (entry["text"], entry["tokens"], entry["num_tokens"]) == ("val.txt", "val.npy", len(text) - train_chars)
    assert (entry["text_bytes"], entry["text_mtime_ns"]) == ((out / "val.txt").stat().st_size,
                                                            (out / "val.txt").stat().st_mtime_ns)
    assert entry["sha256"] == hashlib.sha256((out / "val.npy").read_bytes()).hexdigest()
    # The same tokens as the binary pipeline, stored as .npy next to the text.
    assert np.array_equal(np.load(out / "train.npy"), np.fromfile(root / "data" / "train.bin", dtype="<u2"))
    assert_blocks_match_text(prepared, "val", text, char_offset=train_chars)


def test_user_file_with_bpe_reads_back_exactly(tmp_path, capsys):
    text = play_text(30_000)
    source = tmp_path / "plays.txt"
    source.write_text(text, encoding="utf-8")
    result = prepare_in(tmp_path, "--input", source, "--tokenizer", "bpe", "--vocab-size", 340, "--out", "out",
                        capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "vocab size 340" in result.stdout
    prepared = data.resolve(str(tmp_path / "out"), "bin", "bpe")
    assert prepared.meta["source"]["input"] == str(source)
    tokenizer = prepared.tokenizer()
    train_chars = int(len(text) * 0.9)
    for split, expected in (("train", text[:train_chars]), ("val", text[train_chars:])):
        stream = prepared.split(split)
        everything = stream.blocks(np.array([0]), stream.num_tokens - 1)[0].tolist()
        assert tokenizer.decode(everything) == expected
        assert len(everything) < len(expected) / 2  # BPE merged the frequent words
        # Each random block decodes to the text right where its tokens sit.
        batch = data.train_batch(stream, block_size=BLOCK, batch_size=6, seed=0, step=0, slot=0)
        for row in batch.tolist():
            start = next(i for i in range(len(everything)) if everything[i : i + len(row)] == row)
            offset = len(tokenizer.decode(everything[:start]))
            assert expected[offset:].startswith(tokenizer.decode(row))


def test_user_file_keeps_unicode_tabs_and_crlf_exactly(tmp_path, capsys):
    text = play_text(4_000, seed=1).replace("\n", "\r\n") + "\tcafé 日本語 🙂\n" + play_text(1_000, seed=2)
    source = tmp_path / "mixed.txt"
    source.write_bytes(text.encode("utf-8"))
    result = prepare_in(tmp_path, "--input", source, "--format", "txt", "--out", "out", capsys=capsys)
    assert result.returncode == 0, result.stderr
    prepared = data.resolve(str(tmp_path / "out"), "txt", "char")
    train_chars = int(len(text) * 0.9)
    assert (tmp_path / "out" / "train.txt").read_bytes() == text[:train_chars].encode("utf-8")
    assert_blocks_match_text(prepared, "train", text)
    assert_blocks_match_text(prepared, "val", text, char_offset=train_chars)


def test_folder_input_joins_sorted_files_with_newlines(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("second file\n" * 20)
    (folder / "a.txt").write_text("first file, no final newline")
    (folder / ".hidden").write_text("never read")
    result = prepare_in(tmp_path, "--input", folder, "--format", "txt", "--out", "out", "--val-fraction", 0.5,
                        capsys=capsys)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    joined = (out / "train.txt").read_text() + (out / "val.txt").read_text()
    assert joined == "first file, no final newline\n" + "second file\n" * 20


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A folder already holding a good prepared dataset (made in-process: it is only the backdrop)."""
    root = tmp_path_factory.mktemp("existing")
    source = write(root / "good.txt", play_text(3_000))
    assert prepare_module.main(["--input", str(source), "--out", str(root / "out")]) == 0
    return root / "out"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def make_dir(path: Path) -> Path:
    path.mkdir()
    return path


BAD_INPUTS = {
    "missing input": (lambda tmp: ["--input", tmp / "nope.txt"], "input {tmp}/nope.txt does not exist"),
    "empty file": (lambda tmp: ["--input", write(tmp / "empty.txt", "")], "input {tmp}/empty.txt is empty"),
    "empty folder": (lambda tmp: ["--input", make_dir(tmp / "void")], "input folder {tmp}/void holds no files"),
    "not utf-8": (lambda tmp: ["--input", write(tmp / "latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))],
                  "input {tmp}/latin1.txt is not UTF-8 text"),
    "too short to split": (lambda tmp: ["--input", write(tmp / "tiny.txt", "x")],
                           "too little to split into train and validation"),
    "val split under one block": (
        lambda tmp: ["--input", write(tmp / "short.txt", "ab" * 20 + "c"), "--tokenizer", "bpe",
                     "--vocab-size", 300, "--val-fraction", 0.02],
        "its val split has 1 token(s), fewer than one block"),
    "vocab below the byte alphabet": (lambda tmp: ["--tokenizer", "bpe", "--vocab-size", 100],
                                      "--vocab-size 100 is out of range"),
    "vocab too big": (lambda tmp: ["--tokenizer", "bpe", "--vocab-size", 10**9],
                      "--vocab-size 1000000000 is out of range"),
    "vocab size with char": (lambda tmp: ["--vocab-size", 500], "--vocab-size applies to --tokenizer bpe only"),
    "val fraction out of range": (lambda tmp: ["--val-fraction", 1.5], "--val-fraction 1.5 is out of range"),
    "shards of no tokens": (lambda tmp: ["--shard-tokens", 0], "--shard-tokens 0 is out of range"),
    "shards with txt": (lambda tmp: ["--format", "txt", "--shard-tokens", 1000],
                        "--shard-tokens applies to --format bin only"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_line_and_leaves_outputs_intact(case, existing, snapshot, tmp_path, capsys):
    out, before = existing, snapshot(existing)
    make_args, message = BAD_INPUTS[case]
    args = make_args(tmp_path)
    # --overwrite: even a run allowed to replace the data leaves it as it was when it fails.
    result = prepare_in(tmp_path, *args, "--out", out, "--overwrite", capsys=capsys)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert message.format(tmp=tmp_path) in result.stderr
    assert snapshot(out) == before  # same bytes, not even rewritten
    assert not list(out.glob(".prepare-*"))


@pytest.mark.parametrize("blocker", ["file", "under a file"])
def test_unwritable_output_folder_is_refused_before_any_work(blocker, tmp_path, capsys):
    source = write(tmp_path / "text.txt", play_text(2_000))
    afile = write(tmp_path / "afile", "not a folder")
    out = afile if blocker == "file" else afile / "sub"
    result = prepare_in(tmp_path, "--input", source, "--out", out, capsys=capsys)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"output folder {out}" in result.stderr and "--out" in result.stderr
    assert afile.read_text() == "not a folder"


def test_console_command_and_help(tmp_path):
    console = Path(sys.executable).parent / "tinylm"
    result = subprocess.run([console, "prepare", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--input", "--tokenizer", "--vocab-size", "--format", "--shard-tokens", "--out", "--val-fraction"):
        assert flag in result.stdout


# --- sharded binaries ----------------------------------------------------------------------------------

SHARD = 250  # tokens per shard: the few-KB text below makes 3+ shards in each split


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The same text prepared (char: a token per character) whole and in shards of SHARD tokens."""
    root = tmp_path_factory.mktemp("sharded")
    text = play_text(6_000, seed=3)
    source = write(root / "plays.txt", text)
    for name, flags in (("whole", []), ("sharded", ["--shard-tokens", SHARD])):
        prepare_in(root, "--input", source, "--out", name, *flags, check=True)
    return root, text


def test_sharded_bin_outputs_and_meta(sharded):
    root, text = sharded
    out = root / "sharded"
    meta = json.loads((out / paths.META_NAME).read_text())
    train_chars = int(len(text) * 0.9)
    names = {paths.META_NAME, paths.TOKENIZER_NAME, "tokenizer_config.json"}
    for split, num_tokens in (("train", train_chars), ("val", len(text) - train_chars)):
        count = -(-num_tokens // SHARD)
        assert count >= 3
        files = meta["splits"][split]["files"]
        assert [entry["tokens"] for entry in files] == [f"{split}_{i:03d}.bin" for i in range(count)]
        assert [entry["num_tokens"] for entry in files] == [SHARD] * (count - 1) + [num_tokens - SHARD * (count - 1)]
        assert meta["splits"][split]["num_tokens"] == num_tokens
        # The shards, end to end, are byte for byte the unsharded file.
        joined = b"".join((out / entry["tokens"]).read_bytes() for entry in files)
        assert joined == (root / "whole" / f"{split}.bin").read_bytes()
        names |= {entry["tokens"] for entry in files}
    # No staging leftovers, no plain train.bin; the lock file (empty) stays.
    assert {path.name for path in out.iterdir()} - {locks.LOCK_NAME} == names


def test_sharded_split_reads_exactly_as_the_whole_one(sharded):
    root, _ = sharded
    for split in formats.SPLITS:
        whole = data.resolve(str(root / "whole"), "bin", "char").split(split)
        shards = data.resolve(str(root / "sharded"), "bin", "char").split(split)
        assert len(shards.files) >= 3 and shards.num_tokens == whole.num_tokens
        boundaries = np.cumsum(shards.lengths)[:-1]
        for block_size in (BLOCK, 2 * SHARD + 10):  # the second always spans three shards
            last = shards.num_starts(block_size) - 1
            # Every block that ends just before, crosses, or starts at a boundary; the first and the last.
            near = (boundaries[:, None] + np.arange(-block_size - 2, 2)).ravel()
            starts = np.unique(np.clip(np.concatenate([[0, last], near]), 0, last))
            assert torch.equal(shards.blocks(starts, block_size), whole.blocks(starts, block_size))
        coords = dict(block_size=BLOCK, batch_size=64, seed=5, step=2, slot=1)
        assert torch.equal(data.train_batch(shards, **coords), data.train_batch(whole, **coords))
        evaluation = [data.eval_dataset(s, block_size=BLOCK, num_blocks=20)[:]["input_ids"] for s in (shards, whole)]
        assert torch.equal(*evaluation)


def test_training_on_sharded_data_matches_unsharded(sharded, tmp_path, capsys):
    root, _ = sharded
    runs = {}
    for name in ("sharded", "whole"):  # both in this process: the same arithmetic
        config = training_helpers.write_config(tmp_path / f"{name}.toml", root / name, tmp_path / name)
        result = training_helpers.train_here(config, capsys=capsys)
        assert str(root / name / paths.META_NAME) in result.stdout
        runs[name] = training_helpers.losses(tmp_path / name)
    assert len(runs["sharded"]) >= 3 and all(np.isfinite(loss) for record in runs["sharded"] for loss in record[1:])
    assert runs["sharded"] == runs["whole"]  # the same batches from the same token stream
    assert (tmp_path / "sharded" / paths.LAST_NAME).is_file()


def test_training_with_a_shard_missing_is_a_clean_error(sharded, tmp_path, capsys):
    out = shutil.copytree(sharded[0] / "sharded", tmp_path / "data")
    (out / "train_001.bin").unlink()
    config = training_helpers.write_config(tmp_path / "tiny.toml", out, tmp_path / "ckpt")
    result = training_helpers.train_here(config, capsys=capsys, check=False)
    training_helpers.assert_clean_error(
        result, f"{out / 'train_001.bin'} is missing (listed in {out / paths.META_NAME})", "tinylm prepare --format bin"
    )
    assert not (tmp_path / "ckpt" / paths.LAST_NAME).exists()


def test_re_preparing_removes_the_files_the_old_meta_listed(sharded, tmp_path, capsys):
    source = sharded[0] / "plays.txt"
    out = tmp_path / "out"
    write(out / "notes.txt", "mine, not prepare's")
    for flags, expected in (([], ["train.bin", "val.bin"]), (["--shard-tokens", SHARD], ["train_000.bin", "val_002.bin"]),
                            ([], ["train.bin", "val.bin"])):
        result = prepare_in(tmp_path, "--input", source, "--out", out, "--overwrite", *flags, capsys=capsys)
        assert result.returncode == 0, result.stderr
        bins = sorted(path.name for path in out.glob("*.bin"))
        meta = json.loads((out / paths.META_NAME).read_text())
        listed = sorted(entry["tokens"] for split in meta["splits"].values() for entry in split["files"])
        assert bins == listed and set(expected) <= set(bins)
    assert (out / "notes.txt").read_text() == "mine, not prepare's"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc")
def test_memory_does_not_grow_with_the_input(tmp_path):
    unit = play_text(1_000_000)
    inputs = {"small": write(tmp_path / "small.txt", unit * 2), "large": write(tmp_path / "large.txt", unit * 16)}
    # Two malloc arenas at most: how many a process gets otherwise depends on how busy the machine is.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    peaks = {
        name: prepare_peak_mib(tmp_path, "--input", path, "--out", tmp_path / name, "--shard-tokens", 4_000_000,
                               env=env)
        for name, path in inputs.items()
    }
    assert len(json.loads((tmp_path / "large" / paths.META_NAME).read_text())["splits"]["train"]["files"]) == 4
    grown = (inputs["large"].stat().st_size - inputs["small"].stat().st_size) / 2**20  # 14 MiB more text
    # Holding the text would add at least `grown`, its uint16 tokens twice that: 3 x grown in all. Streaming
    # adds only allocator noise (13.4 MiB seen on 2 busy cores before the arenas were capped; the bound is
    # `grown`, a third of the bug's cost).
    assert peaks["large"] - peaks["small"] < grown, (peaks, grown)


# --- one prepare per folder: nothing replaced unasked, nothing left behind --------------------------------------


def cli(*args) -> list[str]:
    """`tinylm prepare ARGS` as a command line, through the console dispatcher."""
    return [sys.executable, "-m", "tinylm.cli", "prepare", *map(str, args)]


def listing(folder: Path) -> set[str]:
    """The names in `folder`, less the lock's own files."""
    return {path.name for path in folder.iterdir()} - {locks.LOCK_NAME, locks.OWNER_NAME}


@pytest.fixture(scope="module")
def big_text(tmp_path_factory) -> Path:
    """About 4 MB of text: seconds of work for prepare, time enough to catch it at work."""
    return write(tmp_path_factory.mktemp("big") / "big.txt", play_text(50_000, seed=4) * 80)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "prepare finished before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out waiting for prepare"
        time.sleep(0.005)


def test_a_folder_of_prepared_data_is_refused_without_overwrite(sharded, snapshot, tmp_path, capsys):
    source = sharded[0] / "plays.txt"
    out = tmp_path / "out"
    assert prepare_in(tmp_path, "--input", source, "--out", out, "--shard-tokens", SHARD, capsys=capsys).returncode == 0
    write(out / "notes.txt", "mine, not prepare's")
    before = snapshot(out)
    again = ["--input", source, "--out", out, "--format", "txt", "--tokenizer", "bpe", "--vocab-size", 300]
    result = prepare_in(tmp_path, *again, capsys=capsys)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (f"error: output folder {out} already holds bin data prepared from {source} with the char tokenizer "
            "(vocab size ") in result.stderr
    assert result.stderr.rstrip().endswith(": pass --overwrite to replace it, or --out another folder")
    assert snapshot(out) == before and not list(out.glob(".prepare-*"))
    # --overwrite replaces it, leaving no file of the old data to be read with the new: neither the other
    # format's shards (the old meta.json lists them) nor a shard no meta.json lists. Other files stay.
    write(out / "train_999.bin", b"\0\0" * 10)
    result = prepare_in(tmp_path, *again, "--overwrite", capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert listing(out) == {paths.META_NAME, paths.TOKENIZER_NAME, "tokenizer_config.json", "train.txt", "val.txt",
                            "train.npy", "val.npy", "notes.txt"}
    assert (out / "notes.txt").read_text() == "mine, not prepare's"
    assert (out / "train.txt").read_text() + (out / "val.txt").read_text() == source.read_text()
    assert data.resolve(str(out), "txt", "bpe").split("val").num_tokens > 0
    # Token files without a meta.json are prepared data too.
    bare = write(tmp_path / "bare" / "train_000.bin", b"\0\0" * 10).parent
    with pytest.raises(UserError, match=r"output folder \S+/bare already holds prepared data files \(train_000\.bin\)"):
        prepare_module.main(["--input", str(source), "--out", str(bare)])


def test_an_input_given_twice_is_refused(tmp_path):
    """(Several --dataset are a mix: tests/test_prepare_dataset.py.) In a fresh process: the exit code a user
    sees (found before any heavy import, so it costs little)."""
    first, second = write(tmp_path / "a.txt", play_text(3_000)), write(tmp_path / "b.txt", play_text(3_000, 1))
    result = prepare(tmp_path, "--input", first, "--input", second, "--out", tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"error: --input is given twice ({first}, then {second}): prepare reads one" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_failed_prepare_removes_the_out_folder_it_created(tmp_path):
    tiny = write(tmp_path / "tiny.txt", "x")  # fails at work, in the staging folder: too short to split
    kept = make_dir(tmp_path / "kept")
    for out in (tmp_path / "new" / "deeper", kept):
        with pytest.raises(UserError, match="too little to split"):
            prepare_module.main(["--input", str(tiny), "--out", str(out)])
    assert not (tmp_path / "new").exists()  # both folders were the run's own
    assert kept.is_dir() and listing(kept) == set()  # not the run's: kept


def test_a_killed_prepare_leaves_litter_that_the_next_one_removes(big_text, tmp_path, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen(cli("--input", big_text, "--out", out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:  # killed once the tokenizer is staged: encoding has begun, the token files are half-written
        wait_for(lambda: any(out.glob(f"{formats.STAGING_PREFIX}*/{paths.TOKENIZER_NAME}")), first)
    finally:
        first.kill()
        first.wait()
    (staging,) = out.glob(f"{formats.STAGING_PREFIX}*")
    result = prepare_in(tmp_path, "--input", big_text, "--out", out, capsys=capsys)
    assert result.returncode == 0, result.stderr
    assert f"removed 1 unfinished file(s) a stopped prepare left in {out}: {staging.name}\n" in result.stdout
    assert listing(out) == {paths.META_NAME, paths.TOKENIZER_NAME, "tokenizer_config.json", "train.bin", "val.bin"}
    text = big_text.read_text()
    assert_blocks_match_text(data.resolve(str(out), "bin", "char"), "val", text, char_offset=int(len(text) * 0.9))


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="pauses the first prepare with SIGSTOP")
def test_a_second_prepare_on_a_folder_being_prepared_is_refused(big_text, tmp_path, capsys):
    out = tmp_path / "out"
    first = subprocess.Popen(cli("--input", big_text, "--out", out), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)

    def lock_held() -> bool:
        try:
            return json.loads((out / locks.OWNER_NAME).read_text())["pid"] == first.pid
        except (OSError, ValueError, KeyError):
            return False

    try:
        wait_for(lock_held, first)
        first.send_signal(signal.SIGSTOP)  # paused while it holds the lock: the second surely finds it held
        second = prepare_in(tmp_path, "--input", big_text, "--out", out, capsys=capsys)  # the lock is another process's
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert f"error: {out} is in use by another tinylm prepare (pid {first.pid} on " in second.stderr
    assert "wait for it to finish (or stop it), or choose another folder" in second.stderr
    assert first.returncode == 0, stderr  # undisturbed
    text = big_text.read_text()
    assert_blocks_match_text(data.resolve(str(out), "bin", "char"), "val", text, char_offset=int(len(text) * 0.9))
