"""`tinylm prepare --dataset`: documents from `datasets` files and folders, streaming, the cache,
bad input; and `data.load_blocks`, the prepared shards as one `datasets.Dataset`."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from tinylm import data, formats, paths, prepare
from tinylm import tokenizer as tok
from training_helpers import prepare_peak_mib

WORDS = "the king my lord thou art good night sweet prince what is this speak to me come hither".split()
EXTRA = ["é", "ß", "—", "日本", "\t", "\n", "  "]


def documents(count: int, seed: int = 0) -> list[str]:
    """Varied documents: words, unicode, tabs and newlines inside, lengths from 0 (empty) to ~400 chars."""
    rng = random.Random(seed)
    texts = []
    for index in range(count):
        if index % 37 == 5:
            texts.append("")  # an empty row is no document: no tokens, no eos
            continue
        words = [rng.choice(WORDS + EXTRA) for _ in range(rng.randint(1, 70))]
        texts.append(f"Doc {index}: " + " ".join(words).capitalize() + rng.choice([".", "!\n", "?"]))
    return texts


DOCS = documents(600)


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """A fresh, empty datasets cache per test, in process and for subprocesses; the Hub is off limits."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def rows(texts: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})


def write_dataset(kind: str, folder: Path, texts: list[str] = DOCS) -> Path:
    """`texts` as a dataset of `kind`, the way a user would have it on disk; returns what --dataset takes."""
    folder.mkdir(parents=True, exist_ok=True)
    table = rows(texts)
    if kind == "jsonl":
        table.to_json(folder / "docs.jsonl")
        return folder / "docs.jsonl"
    if kind == "parquet":
        table.to_parquet(folder / "docs.parquet")
        return folder / "docs.parquet"
    if kind == "csv":
        table.to_csv(folder / "docs.csv", index=False)
        return folder / "docs.csv"
    if kind == "saved":
        table.save_to_disk(folder / "saved")
        return folder / "saved"
    raise ValueError(kind)


def run_prepare(*args) -> int:
    return prepare.main([str(arg) for arg in args])


def tokens(path: Path) -> np.ndarray:
    return np.load(path) if path.suffix == ".npy" else np.fromfile(path, dtype="<u2")


def split_documents(out: Path, split: str) -> list[str]:
    """A prepared split's tokens cut at <|endoftext|> and decoded: its documents, if each ends with eos."""
    meta = formats.load_meta(out / paths.META_NAME)
    ids = np.concatenate([tokens(out / entry["tokens"]) for entry in meta["splits"][split]["files"]])
    eos = meta["eos_token_id"]
    assert ids[-1] == eos  # every document, the last one too, ends with <|endoftext|>
    tokenizer = tok.load(out / paths.TOKENIZER_NAME)
    pieces = np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]
    return [tokenizer.decode(piece[:-1].tolist()) for piece in pieces]


def expected_split(texts: list[str], every: int) -> dict[str, list[str]]:
    """Val: rows 9, 19, 29, ... for a tenth (every = 10); empty rows are dropped from both."""
    val = [text for index, text in enumerate(texts) if (index + 1) % every == 0 and text]
    train = [text for index, text in enumerate(texts) if (index + 1) % every != 0 and text]
    return {"train": train, "val": val}


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv", "saved"])
def test_each_row_becomes_a_document_followed_by_eos_token_exact(kind, tmp_path):
    source = write_dataset(kind, tmp_path / "in")
    assert run_prepare("--dataset", source, "--out", tmp_path / "out") == 0
    expected = expected_split(DOCS, 10)
    for split in formats.SPLITS:
        assert split_documents(tmp_path / "out", split) == expected[split]
    meta = formats.load_meta(tmp_path / "out" / paths.META_NAME)
    assert meta["source"]["num_documents"] == {split: len(expected[split]) for split in formats.SPLITS}
    assert meta["source"]["dataset"] == str(source) and meta["source"]["text_column"] == "text"


def test_bpe_and_the_txt_format_round_trip_too(tmp_path):
    source = write_dataset("parquet", tmp_path / "in")
    out = tmp_path / "out"
    assert run_prepare("--dataset", source, "--out", out, "--tokenizer", "bpe", "--vocab-size", 400,
                       "--format", "txt", "--val-fraction", 0.25) == 0
    expected = expected_split(DOCS, 4)
    for split in formats.SPLITS:
        assert split_documents(out, split) == expected[split]
        # The .txt holds the documents with <|endoftext|> written out, and tokenizes back to the .npy.
        text = (out / f"{split}.txt").read_text(encoding="utf-8")
        assert text == "".join(doc + tok.EOS_TOKEN for doc in expected[split])
        tokenizer = tok.load(out / paths.TOKENIZER_NAME)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == tokens(out / f"{split}.npy").tolist()
    # The split is data that trains: resolve and read it like any other.
    stream = data.resolve(str(out), "txt", "bpe").split("val")
    assert stream.num_tokens == len(tokens(out / "val.npy"))


def test_a_folder_with_a_loading_layout_its_configs_and_validation_split(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "data").mkdir(parents=True)
    rows(DOCS[:500]).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
    rows(DOCS[500:]).to_parquet(folder / "data" / "validation-00000-of-00001.parquet")
    rows(DOCS[:50]).to_parquet(folder / "data" / "small.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  default: true\n  data_files:\n"
        "  - split: train\n    path: data/train-*.parquet\n  - split: validation\n    path: data/validation-*.parquet\n"
        "- config_name: small\n  data_files:\n  - split: train\n    path: data/small.parquet\n---\n# corpus\n"
    )
    # The dataset's own validation split is used when it has one (as transformers' run_clm does).
    assert run_prepare("--dataset", folder, "--out", tmp_path / "out") == 0
    assert split_documents(tmp_path / "out", "train") == [text for text in DOCS[:500] if text]
    assert split_documents(tmp_path / "out", "val") == [text for text in DOCS[500:] if text]
    assert formats.load_meta(tmp_path / "out" / paths.META_NAME)["source"]["val_split"] == "validation"
    # A named configuration, which has no validation split: a tenth of its documents.
    assert run_prepare("--dataset", folder, "--config-name", "small", "--out", tmp_path / "small") == 0
    assert split_documents(tmp_path / "small", "val") == expected_split(DOCS[:50], 10)["val"]


def test_streaming_and_worker_processes_write_the_same_files_as_the_map(tmp_path):
    source = write_dataset("jsonl", tmp_path / "in")
    variants = {"mapped": [], "streamed": ["--streaming"], "workers": ["--num-proc", 2]}
    for name, flags in variants.items():
        assert run_prepare("--dataset", source, "--out", tmp_path / name, "--shard-tokens", 5000, *flags) == 0
    metas = {name: formats.load_meta(tmp_path / name / paths.META_NAME) for name in variants}
    assert len(metas["mapped"]["splits"]["train"]["files"]) > 3
    for name in ("streamed", "workers"):
        for split in formats.SPLITS:
            files = zip(metas["mapped"]["splits"][split]["files"], metas[name]["splits"][split]["files"], strict=True)
            for a, b in files:
                assert (a["tokens"], a["sha256"]) == (b["tokens"], b["sha256"])
    assert metas["streamed"]["source"]["streaming"] and not metas["mapped"]["source"]["streaming"]


def test_streaming_trains_the_tokenizer_on_a_bounded_sample(tmp_path):
    texts = ["abc abc abc"] * 100 + ["xyz"] * 100  # the sample (first 500 characters) never sees x, y, z
    source = write_dataset("jsonl", tmp_path / "in", texts)
    assert run_prepare("--dataset", source, "--streaming", "--tokenizer-sample", 500, "--out", tmp_path / "out") == 0
    tokenizer = tok.load(tmp_path / "out" / paths.TOKENIZER_NAME)
    assert set(tokenizer.get_vocab()) == {tok.EOS_TOKEN, tok.UNK_TOKEN, "a", "b", "c", " "}


def test_streaming_holds_no_more_in_memory_for_a_larger_corpus(tmp_path):
    """Python-side peak memory (tracemalloc: tinylm's batches, encodings and ids) at two corpus sizes.

    Resident memory also counts the allocators' retained pages (pyarrow's pool), which settle
    only after ~70 MB of input; benchmarks/data.py measures RSS at larger sizes.
    """
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    peaks = {}
    for name, copies in {"small": 10, "large": 40}.items():
        source = tmp_path / f"{name}.parquet"
        # Row groups of 1000 rows, as Hub Parquet files have row groups: the reader reads one at a time.
        pq.write_table(pa.table({"text": DOCS * copies}), source, row_group_size=1000)
        tracemalloc.start()
        assert run_prepare("--dataset", source, "--streaming", "--out", tmp_path / name, "--shard-tokens", 100_000) == 0
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    grown = len("".join(DOCS).encode()) * 30  # bytes more text in the large corpus
    # Holding the corpus's text or ids would add at least `grown`: streaming adds nothing like it.
    assert peaks["large"] - peaks["small"] < 0.1 * grown, (peaks, grown)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak memory from /proc")
def test_streaming_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """Resident memory of `prepare --streaming` over Parquet (row groups of 1000 rows, as Hub files
    have them) at two sizes. A scan over a whole file kept memory for every row group it had read
    (+57 MiB from 8 to 32 MB before tinylm read row group by row group, +12 MiB after; the peak
    moves by up to ~15 MiB from run to run, hence sizes ~40 MB apart)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    unit = [text for text in DOCS if text] * 20  # ~2.4 MB of text
    peaks, sizes = {}, {}
    for name, copies in {"small": 3, "large": 24}.items():
        source = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"text": unit * copies}), source, row_group_size=1000)
        sizes[name] = sum(len(text.encode()) for text in unit) * copies / 2**20
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / f"cache-{name}")}
        peaks[name] = prepare_peak_mib(tmp_path, "--dataset", source, "--streaming", "--out", tmp_path / name,
                                       "--shard-tokens", 4_000_000, env=env)
    grown = sizes["large"] - sizes["small"]
    assert peaks["large"] - peaks["small"] < 0.8 * grown, (peaks, grown)


def test_preparing_the_same_dataset_again_reuses_the_cache(tmp_path, datasets_cache):
    source = write_dataset("parquet", tmp_path / "in")
    assert run_prepare("--dataset", source, "--tokenizer", "bpe", "--vocab-size", 400, "--out", tmp_path / "a") == 0
    cached = {path: path.stat().st_mtime_ns for path in datasets_cache.rglob("*") if path.is_file()}
    assert any(path.name.startswith("cache-") for path in cached)  # Dataset.map's tokens
    assert any(path.parent.name == "tinylm-tokenizers" for path in cached)
    assert run_prepare("--dataset", source, "--tokenizer", "bpe", "--vocab-size", 400, "--out", tmp_path / "b") == 0
    again = {path: path.stat().st_mtime_ns for path in datasets_cache.rglob("*") if path.is_file()}
    assert again == cached  # nothing trained or tokenized anew, nothing added
    for name in ("train.bin", "val.bin", paths.TOKENIZER_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # Another tokenizer setting is another entry, not a stale hit.
    assert run_prepare("--dataset", source, "--tokenizer", "bpe", "--vocab-size", 300, "--out", tmp_path / "c") == 0
    assert formats.load_meta(tmp_path / "c" / paths.META_NAME)["vocab_size"] == 300


# --- bad input -------------------------------------------------------------------------------------


def prepare_cli(cwd: Path, *args, env_cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if env_cache is not None:
        env["HF_DATASETS_CACHE"] = str(env_cache)
    return subprocess.run([sys.executable, "-m", "tinylm.prepare", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def make_bad_inputs(root: Path) -> None:
    write_dataset("jsonl", root)
    write_dataset("parquet", root)
    write_dataset("saved", root)
    write_dataset("jsonl", root / "empty", ["", ""] * 5)
    write_dataset("jsonl", root / "one", ["just one document, so there is nothing left to validate on"])
    (root / "blob.bin").write_bytes(bytes(range(256)) * 8)


BAD = [
    (["--dataset", "docs.jsonl", "--text-column", "body"],
     r"dataset docs\.jsonl has no column 'body'; its columns are text, id: pass --text-column NAME"),
    (["--dataset", "docs.parquet", "--text-column", "id"],
     r"column 'id' of dataset docs\.parquet holds Value\('int64'\), not text"),
    (["--dataset", "empty/docs.jsonl"], r"dataset empty/docs\.jsonl is too small: its train split has 0 token"),
    (["--dataset", "one/docs.jsonl"], r"dataset one/docs\.jsonl is too small: its val split has 0 token"),
    (["--dataset", "saved", "--split", "test"], r"dataset saved has no split 'test'; its splits are train: pass --split"),
    (["--dataset", "docs.jsonl", "--val-split", "train"], r"--val-split train is also the training --split"),
    (["--dataset", "docs.jsonl", "--val-split", "validation", "--val-fraction", "0.2"],
     r"--val-split and --val-fraction both say where validation comes from"),
    (["--dataset", "docs.parquet", "--config-name", "small"], r"--config-name small: docs\.parquet is a single dataset"),
    (["--dataset", "./missing.jsonl"], r"--dataset \./missing\.jsonl does not exist"),
    (["--dataset", "missing.txt"], r"--dataset missing\.txt does not exist"),  # a file name, never a Hub id
    (["--dataset", "nobody/no-such-corpus"],
     r"dataset nobody/no-such-corpus is not a local file or folder and cannot be fetched from the Hub"),
    (["--input", "docs.jsonl"], r"input docs\.jsonl is a JSON Lines file, not plain text: read it with --dataset docs\.jsonl"),
    (["--input", "docs.parquet"], r"input docs\.parquet is a Parquet file, not plain text: read it with --dataset"),
    (["--input", "saved"], r"input saved is a datasets save_to_disk folder, not plain text: read it with --dataset saved"),
    (["--input", "blob.bin"], r"input blob\.bin is a binary file, not text"),
    (["--dataset", "blob.bin"], r"--dataset blob\.bin is a \.bin file; datasets are read from"),
    (["--input", "docs.jsonl", "--text-column", "body"], r"--text-column applies to --dataset only"),
    (["--dataset", "docs.jsonl", "--streaming", "--num-proc", "2"], r"--num-proc applies to a map over a whole dataset"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """The bad inputs, and data/ prepared from a good one, made once; each test works on a copy."""
    root = tmp_path_factory.mktemp("bad")
    make_bad_inputs(root)
    good = prepare_cli(root, "--out", "data", "--dataset", "docs.jsonl", env_cache=root / "hf-datasets")
    assert good.returncode == 0, good.stderr
    return root


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(args) for args, _ in BAD])
def test_bad_dataset_input_is_one_line_and_leaves_outputs_intact(args, message, bad_inputs, tmp_path, snapshot):
    shutil.copytree(bad_inputs, tmp_path, dirs_exist_ok=True, symlinks=True)
    before = snapshot(tmp_path / "data")
    result = prepare_cli(tmp_path, "--out", "data", "--overwrite", *args)  # replacing, had it not failed
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(tmp_path / "data") == before


# --- the prepared shards as one datasets.Dataset ----------------------------------------------------


@pytest.mark.parametrize("data_format", ["bin", "txt"])
def test_load_blocks_rows_are_the_memory_mapped_blocks(data_format, tmp_path):
    source = write_dataset("parquet", tmp_path / "in")
    shard = ["--shard-tokens", 7000] if data_format == "bin" else []
    assert run_prepare("--dataset", source, "--format", data_format, "--out", tmp_path / "out", *shard) == 0
    meta = formats.load_meta(tmp_path / "out" / paths.META_NAME)
    block = 48
    blocks = data.load_blocks(tmp_path / "out", block_size=block)
    files = [tmp_path / "out" / entry["tokens"] for entry in meta["splits"]["train"]["files"]]
    tokens = [np.load(f, mmap_mode="r") if f.suffix == ".npy" else np.memmap(f, dtype="<u2", mode="r") for f in files]
    expected = np.concatenate([arr[: len(arr) // block * block].reshape(-1, block) for arr in tokens])
    assert blocks.num_rows == len(expected) and blocks.column_names == ["input_ids", "labels"]
    numpy_rows = blocks.with_format("numpy")
    for index in [0, 1, len(expected) // 2, len(expected) - 1]:
        assert np.array_equal(numpy_rows[index]["input_ids"], expected[index])
    assert np.array_equal(np.stack(numpy_rows[[3, 1, 4]]["input_ids"]), expected[[3, 1, 4]])
    torch_rows = blocks.with_format("torch")
    first = torch_rows[len(expected) - 2]
    assert first["input_ids"].dtype == torch.int64 and torch.equal(first["input_ids"], first["labels"])
    assert torch.equal(first["input_ids"], torch.from_numpy(expected[-2].astype(np.int64)))
    loader = torch.utils.data.DataLoader(torch_rows, batch_size=4, shuffle=False)
    assert torch.equal(next(iter(loader))["input_ids"], torch.from_numpy(expected[:4].astype(np.int64)))
    # block_size 1: every token its own row; 0 is refused.
    single = data.load_blocks(tmp_path / "out", block_size=1).with_format("numpy")
    assert single.num_rows == sum(map(len, tokens)) and single[0]["input_ids"].tolist() == [expected[0][0]]
    with pytest.raises(ValueError, match="block_size must be at least 1, got 0"):
        data.load_blocks(tmp_path / "out", block_size=0)


def test_load_blocks_trains_a_model_with_the_transformers_trainer(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    source = write_dataset("jsonl", tmp_path / "in")
    assert run_prepare("--dataset", source, "--out", tmp_path / "out") == 0
    blocks = data.load_blocks(tmp_path / "out", block_size=32)
    vocab = formats.load_meta(tmp_path / "out" / paths.META_NAME)["vocab_size"]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    result = Trainer(model=model, args=args, train_dataset=blocks).train()
    assert result.global_step == 3 and np.isfinite(result.training_loss)


# --- training on it, and stale data ------------------------------------------------------------------


def test_training_says_where_its_data_came_from_and_warns_of_newer_data_in_the_other_format(
        tmp_path, capsys, fresh_accelerate_state):
    from training_helpers import make_trainer

    source = write_dataset("jsonl", tmp_path / "in")
    processed = tmp_path / "data" / "processed"
    assert run_prepare("--dataset", source, "--out", tmp_path / "data") == 0  # bin, found from data/processed
    capsys.readouterr()
    make_trainer(processed, tmp_path, max_iters=1, warmup_iters=0).fit()  # one step: no warmup to warn of
    out = capsys.readouterr().out
    counts = {split: len(texts) for split, texts in expected_split(DOCS, 10).items()}
    assert (f"source: dataset {source}, split train, column 'text'; {counts['train']} train / {counts['val']} val "
            "documents (val: 10% of the documents); prepared 20") in out
    assert "warning" not in out
    # Now someone prepares other text in the txt format; a bin run would silently keep the old data.
    (tmp_path / "mine.txt").write_text("some newer text of mine, long enough to split. " * 40)
    assert run_prepare("--input", tmp_path / "mine.txt", "--format", "txt", "--out", processed) == 0
    capsys.readouterr()
    (tmp_path / "again").mkdir()
    make_trainer(processed, tmp_path / "again", max_iters=1).fit()
    out = capsys.readouterr().out
    assert (f"warning: {processed / paths.META_NAME} (txt data) was prepared after {tmp_path / paths.META_BIN}, "
            "which training reads") in out
    assert "pass --data-format txt" in out
    # Data prepared at the same instant, to the nanosecond, is not newer: no warning.
    (tmp_path / "same").mkdir()
    trainer = make_trainer(processed, tmp_path / "same", max_iters=1)
    read = trainer.data.meta_path.stat()
    os.utime(processed / paths.META_NAME, ns=(read.st_atime_ns, read.st_mtime_ns))
    assert data.newer_other_format(trainer.data, str(processed)) is None
