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


# --- mixes of several datasets ----------------------------------------------------------------------

LATIN, CYRILLIC = "abcdefghijklm", "абвгдежзийклм"  # two alphabets: each document says which dataset it came from


def words_of(alphabet: str, count: int, words: tuple[int, int], seed: int, empty_every: int = 0) -> list[str]:
    """`count` documents of `words` (min, max) random words over `alphabet`; every `empty_every`-th row empty."""
    rng = random.Random(seed)
    return ["" if empty_every and index % empty_every == empty_every - 1 else
            " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
                     for _ in range(rng.randint(*words)))
            for index in range(count)]


def write_mix_sources(folder: Path, count: int) -> tuple[Path, Path, list[str], list[str]]:
    """Dataset A: short Latin documents, JSON Lines; B: longer Cyrillic ones, some empty, an Arrow file of large
    strings (as pandas writes them: a type interleave_datasets will not mix with A's strings unasked)."""
    import pyarrow as pa

    texts_a = words_of(LATIN, count, (1, 4), seed=1)
    texts_b = words_of(CYRILLIC, count, (4, 12), seed=2, empty_every=50)
    path_a = write_dataset("jsonl", folder, texts_a)
    path_b = folder / "b.arrow"
    table = pa.table({"text": pa.array(texts_b, pa.large_string())})
    with pa.ipc.new_stream(path_b, table.schema) as writer:
        writer.write_table(table, max_chunksize=1000)
    return path_a, path_b, texts_a, texts_b


def documents_by_alphabet(out: Path, split: str) -> dict[str, list[np.ndarray]]:
    """A prepared split's documents (ids, eos included) by alphabet; refuses a document of both, or of neither."""
    split_ids = np.concatenate([tokens(out / entry["tokens"])
                                for entry in formats.load_meta(out / paths.META_NAME)["splits"][split]["files"]])
    vocab = tok.load(out / paths.TOKENIZER_NAME).get_vocab()
    alphabet = np.zeros(len(vocab), np.int8)  # per id: 1 Latin, 2 Cyrillic, 0 anything else
    for letters, code in ((LATIN, 1), (CYRILLIC, 2)):
        alphabet[[vocab[letter] for letter in letters]] = code
    ends = np.flatnonzero(split_ids == vocab[tok.EOS_TOKEN]) + 1
    document = np.repeat(np.arange(len(ends)), np.diff(ends, prepend=0))  # each token's document, eos included
    seen = {code: np.bincount(document, alphabet[split_ids] == code, minlength=len(ends)) > 0 for code in (1, 2)}
    assert not (seen[1] & seen[2]).any() and (seen[1] | seen[2]).all()
    pieces = np.split(split_ids, ends)[:-1]
    return {"a": [ids for ids, latin in zip(pieces, seen[1]) if latin],
            "b": [ids for ids, cyrillic in zip(pieces, seen[2]) if cyrillic]}


def test_a_mix_holds_each_dataset_in_the_share_of_its_weight_streamed_or_not(tmp_path, capsys):
    """Kills: the weights ignored, swapped or not normalized; the shares, counts or rows read recorded or printed
    wrong; documents repeated or dropped; the tokenizer trained on one dataset only; a streamed mix that differs."""
    path_a, path_b, texts_a, texts_b = write_mix_sources(tmp_path / "in", 20_000)
    out = tmp_path / "out"
    assert run_prepare("--dataset", path_a, "--dataset", path_b, "--weights", "7,3", "--out", out) == 0
    printed = capsys.readouterr().out
    meta = formats.load_meta(out / paths.META_NAME)
    found = {split: documents_by_alphabet(out, split) for split in formats.SPLITS}
    # The shares measured in the prepared files: documents within 1% of the weights (in each split, within 1%
    # for the 26K training documents, 2.5% for the 2.9K validation ones), tokens as they fall.
    for split, tolerance in (("train", 0.01), ("val", 0.025)):
        share_a = len(found[split]["a"]) / (len(found[split]["a"]) + len(found[split]["b"]))
        assert abs(share_a - 0.7) < tolerance, (split, share_a)
    documents = {name: sum(len(found[split][name]) for split in formats.SPLITS) for name in "ab"}
    tokens_of = {name: sum(len(ids) for split in formats.SPLITS for ids in found[split][name]) for name in "ab"}
    assert abs(documents["a"] / sum(documents.values()) - 0.7) < 0.01, documents
    # A's documents are shorter: its share of the tokens is far below its share of the documents.
    assert tokens_of["a"] / sum(tokens_of.values()) < 0.5, tokens_of
    # Every document once: all of A (it ran out first), and B's non-empty rows up to where the mix stopped.
    tokenizer = tok.load(out / paths.TOKENIZER_NAME)
    decoded = {name: sorted(tokenizer.batch_decode([ids[:-1].tolist() for split in formats.SPLITS
                                                    for ids in found[split][name]]))
               for name in "ab"}
    entries = meta["source"]["datasets"]
    assert decoded["a"] == sorted(text for text in texts_a if text) and entries[0]["rows_read"] == 20_000
    assert decoded["b"] == sorted(text for text in texts_b[:entries[1]["rows_read"]] if text)
    # One tokenizer over the mix: both alphabets are in it (and no [UNK] in the data, checked above).
    assert set(LATIN) | set(CYRILLIC) <= set(tokenizer.get_vocab())
    # meta.json records what the files hold, and prepare prints it.
    for name, entry, weight, path, texts in zip("ab", entries, (0.7, 0.3), (path_a, path_b), (texts_a, texts_b)):
        assert entry["dataset"] == str(path) and entry["weight"] == pytest.approx(weight)
        assert entry["num_documents"] == {split: len(found[split][name]) for split in formats.SPLITS}
        assert entry["num_tokens"] == {split: sum(map(len, found[split][name])) for split in formats.SPLITS}
        share = {"documents": documents[name] / sum(documents.values()),
                 "tokens": tokens_of[name] / sum(tokens_of.values())}
        assert entry["share"] == pytest.approx(share, abs=1e-12)
        assert (f"  {path}: weight {weight:g}, documents {share['documents']:.1%} ({documents[name]:,}), "
                f"tokens {share['tokens']:.1%} ({tokens_of[name]:,}); read {entry['rows_read']:,} of "
                f"{len(texts):,} rows\n") in printed
    assert meta["source"]["num_documents"] == {split: sum(map(len, found[split].values())) for split in formats.SPLITS}
    assert f"source: mix of {path_a} (weight 0.7), {path_b} (weight 0.3), split train" in printed
    # Streamed, the same mix: the same files.
    assert run_prepare("--dataset", path_a, "--dataset", path_b, "--weights", "0.7,0.3", "--streaming",
                       "--out", tmp_path / "streamed") == 0
    streamed = formats.load_meta(tmp_path / "streamed" / paths.META_NAME)
    for split in formats.SPLITS:
        assert [entry["sha256"] for entry in streamed["splits"][split]["files"]] == \
               [entry["sha256"] for entry in meta["splits"][split]["files"]]
    assert [entry["share"] for entry in streamed["source"]["datasets"]] == [entry["share"] for entry in entries]


def test_a_mix_validates_on_its_datasets_own_validation_splits_when_each_has_one(tmp_path, capsys):
    """Kills: the validation splits left out of the mix (or mixed into training); the default weights unequal."""
    folders = []
    for name, alphabet in (("latin", LATIN), ("cyrillic", CYRILLIC)):
        folder = tmp_path / name
        (folder / "data").mkdir(parents=True)
        rows(words_of(alphabet, 3000, (2, 6), seed=3)).to_parquet(folder / "data" / "train-00000-of-00001.parquet")
        rows(words_of(alphabet, 1500, (8, 10), seed=4)).to_parquet(
            folder / "data" / "validation-00000-of-00001.parquet")
        folders.append(folder)
    out = tmp_path / "out"
    assert run_prepare("--dataset", folders[0], "--dataset", folders[1], "--out", out) == 0
    source = formats.load_meta(out / paths.META_NAME)["source"]
    assert [entry["weight"] for entry in source["datasets"]] == [0.5, 0.5]
    assert source["val_split"] == "validation" and source["val_fraction"] is None
    tokenizer = tok.load(out / paths.TOKENIZER_NAME)
    for split in formats.SPLITS:
        found = documents_by_alphabet(out, split)
        share = len(found["a"]) / (len(found["a"]) + len(found["b"]))
        assert abs(share - 0.5) < 0.03, (split, share)
        # Validation documents are those of the validation splits (8 to 10 words), training ones never.
        words = {len(text.split(" ")) for text in tokenizer.batch_decode([ids[:-1].tolist()
                                                                          for ids in found["a"] + found["b"]])}
        assert words <= ({8, 9, 10} if split == "val" else {2, 3, 4, 5, 6}), (split, words)
    # A dataset without a validation split: the mix holds out a tenth of its documents, and says so.
    plain = write_dataset("jsonl", tmp_path / "plain", words_of(CYRILLIC, 500, (2, 6), seed=5))
    capsys.readouterr()
    assert run_prepare("--dataset", folders[0], "--dataset", plain, "--out", tmp_path / "some") == 0
    assert (f"note: {plain} has no validation split, so validation is 10% of the mixed documents"
            in capsys.readouterr().out)
    source = formats.load_meta(tmp_path / "some" / paths.META_NAME)["source"]
    assert source["val_split"] is None and source["val_fraction"] == 0.1


def test_a_mix_with_other_weights_trains_its_own_tokenizer(tmp_path, datasets_cache):
    """Kills: the tokenizer cache key blind to the mix (the same datasets' files, other weights)."""
    path_a, path_b, _, _ = write_mix_sources(tmp_path / "in", 3000)
    bpe = ["--tokenizer", "bpe", "--vocab-size", 300]
    for name, weights in (("a", "0.9,0.1"), ("b", "0.1,0.9")):
        assert run_prepare("--dataset", path_a, "--dataset", path_b, "--weights", weights, *bpe, "--out",
                           tmp_path / name) == 0
    first, second = ((tmp_path / name / paths.TOKENIZER_NAME).read_bytes() for name in "ab")
    assert first != second
    assert len(list((datasets_cache / "tinylm-tokenizers").iterdir())) == 2


@pytest.mark.parametrize("text, message", [
    ("nan,1", "the weight of a.jsonl is nan"), ("1,inf", "the weight of b.jsonl is inf"),
    ("1,", "'' (for b.jsonl) is not a number"), ("0.5, 0.25", None),
])
def test_weights_are_positive_finite_numbers_scaled_to_sum_to_one(text, message):
    from tinylm import mixing
    from tinylm.errors import UserError

    if message is None:
        assert mixing.parse_weights(text, ["a.jsonl", "b.jsonl"]) == pytest.approx([2 / 3, 1 / 3])
        return
    with pytest.raises(UserError, match=re.escape(message)):
        mixing.parse_weights(text, ["a.jsonl", "b.jsonl"])


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
    (["--dataset", "docs.jsonl", "--dataset", "docs.parquet", "--weights", "0.7,0.2,0.1"],
     r"--weights 0\.7,0\.2,0\.1 gives 3 weight\(s\) for 2 --dataset: give one number per --dataset"),
    (["--dataset", "docs.jsonl", "--dataset", "docs.parquet", "--weights", "0.7,-0.3"],
     r"--weights 0\.7,-0\.3: the weight of docs\.parquet is -0\.3, but a weight must be a positive number"),
    (["--dataset", "docs.jsonl", "--dataset", "docs.parquet", "--weights", "0,0"],
     r"--weights 0,0: the weight of docs\.jsonl is 0, but a weight must be a positive number"),
    (["--dataset", "docs.jsonl", "--dataset", "docs.parquet", "--weights", "0.7,much"],
     r"--weights 0\.7,much: 'much' \(for docs\.parquet\) is not a number"),
    (["--dataset", "docs.jsonl", "--weights", "1"], r"--weights 1 sets the shares of a mix of several --dataset, but "
     r"this run reads one dataset"),
    (["--input", "docs.jsonl", "--weights", "1,1"], r"--weights 1,1 sets the shares of a mix of several --dataset"),
    (["--dataset", "docs.jsonl", "--dataset", "docs.jsonl"], r"--dataset docs\.jsonl is given twice: a mix reads each "
     r"dataset once"),
    (["--dataset", "docs.jsonl", "--dataset", "saved", "--val-split", "validation"],
     r"dataset docs\.jsonl has no split 'validation'"),
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
