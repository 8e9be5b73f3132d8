"""`tinylm prepare --dataset`: documents from `datasets`, tokenized with `Dataset.map`.

A dataset is a Hub id (read from the `datasets` cache when offline), a local JSON
Lines / JSON / CSV / Parquet / Arrow file, a folder `load_dataset` can read (data
files, or a loading layout with a README's `configs`), or a `save_to_disk` folder.
Each row's text column is one document. Documents are tokenized in batches by
`Dataset.map` into an `input_ids` column, `<|endoftext|>` appended to each, so the
model learns where a text ends; the result lands in `datasets`' cache, so preparing
the same data with the same tokenizer again skips the work. With `streaming` the
dataset is an `IterableDataset`: rows are fetched, tokenized and written as they
come, and memory stays flat however large the corpus.

The validation split is a named split (`val_split`, say "validation") or every
document whose index i has floor((i + 1) * f) > floor(i * f), an evenly spread
fraction f of the documents that a stream can pick without knowing its length.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer

from . import paths
from .errors import UserError
from .hub_names import reads_as_hub_id

BUILDERS = {suffix: builder for suffix, (builder, _) in paths.DATASET_FILES.items()}
MAP_BATCH = 1000  # rows per `map` call
ENCODE_CHARS = 1 << 17  # characters per encode_batch call: enough for every core, few Encodings in memory
SOURCE_COLUMN = "tinylm_source"  # a mix's rows: the index of the --dataset each came from (`tinylm.mixing`)


@dataclass
class Documents:
    """The rows to prepare: the training split, and the validation split or the fraction to take from it."""

    spec: str
    train: datasets.Dataset | datasets.IterableDataset
    val: datasets.Dataset | datasets.IterableDataset | None  # None: take `val_fraction` of `train`'s rows
    column: str
    record: dict  # what meta.json's `source` says about the dataset

    @property
    def val_fraction(self) -> float | None:
        return self.record["val_fraction"]

    @property
    def streaming(self) -> bool:
        return isinstance(self.train, datasets.IterableDataset)

    def texts(self, limit_chars: int | None = None) -> Iterator[str]:
        """Every document's text (train, then a named val split), up to about `limit_chars` characters."""
        sources = [self.train] if self.val is None or limit_chars else [self.train, self.val]
        seen = 0
        for dataset in sources:
            for batch in dataset.with_format("arrow").iter(batch_size=MAP_BATCH):
                for text in column_of(batch, self.column, self.spec).to_pylist():
                    if text:
                        yield text
                        seen += len(text)
                        if limit_chars and seen >= limit_chars:
                            return

    def num_rows(self) -> int | None:
        """Rows in all, when known up front (not for most streams)."""
        parts = [self.train] if self.val is None else [self.train, self.val]
        try:
            return sum(part.num_rows for part in parts)
        except (AttributeError, TypeError):
            return None


def open_documents(spec: str, *, config_name: str | None, split: str, column: str, val_split: str | None,
                   val_fraction: float | None, default_val_fraction: float, streaming: bool) -> Documents:
    """Load `spec` and pick its splits and text column; every mistake is a UserError saying how to fix it.

    With neither `val_split` nor `val_fraction`: the dataset's "validation" split, else `default_val_fraction`.
    """
    if not sys.stderr.isatty():  # datasets' bars would print line after line into a log; tinylm's bars don't
        datasets.disable_progress_bars()
    splits = load(spec, config_name, streaming)
    names = list(splits)
    for flag, name in (("--split", split), ("--val-split", val_split)):
        if name is not None and name not in splits:
            raise UserError(f"dataset {spec} has no split {name!r}; its splits are {', '.join(names)}: "
                            f"pass {flag} NAME")
    if val_split == split:
        raise UserError(f"--val-split {val_split} is also the training --split: pick another split, "
                        "or use --val-fraction to hold out part of it")
    if val_split is None and val_fraction is None:
        # Like transformers' run_clm: a dataset's own validation split if it has one.
        val_split = "validation" if "validation" in splits and split != "validation" else None
        val_fraction = None if val_split else default_val_fraction
    train, val = splits[split], splits[val_split] if val_split else None
    if streaming:
        # One shard per Parquet row group, in order: pyarrow's scan of a whole file keeps memory for
        # every row group it has read, a row group's own scan does not (prepare --streaming peaked
        # at 620 and 836 MiB on 40 and 160 MB of Parquet, and at 540 and 544 MiB so). Other formats
        # keep their shards.
        train, val = train.reshard(), val.reshard() if val is not None else None
    for part in (train, val):
        if part is not None:
            check_column(part, column, spec)
    record = {"dataset": spec, "config_name": config_name, "split": split, "text_column": column,
              "val_split": val_split, "val_fraction": val_fraction, "streaming": streaming}
    return Documents(spec, train, val, column, record)


def load(spec: str, config_name: str | None, streaming: bool) -> dict:
    """The splits of `spec` by name: a `DatasetDict` or `IterableDatasetDict`."""
    path = Path(spec).expanduser()
    saved = path.is_dir() and any((path / marker).is_file() for marker in paths.SAVED_DATASET_MARKERS)
    if config_name is not None and (saved or path.is_file()):
        raise UserError(f"--config-name {config_name}: {spec} is a single dataset with no configurations; "
                        "drop --config-name (it picks one of a Hub dataset's or a folder's configs)")
    try:
        if saved:
            saved = datasets.load_from_disk(str(path))
            splits = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
            return {name: part.to_iterable_dataset() if streaming else part for name, part in splits.items()}
        if path.is_file():
            builder = BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserError(f"--dataset {spec} is a {path.suffix or 'suffix-less'} file; datasets are read from "
                                f"{', '.join(BUILDERS)} files or folders: for plain text use --input {spec}")
            return datasets.load_dataset(builder, data_files=str(path), streaming=streaming)
        if not path.is_dir() and not reads_as_hub_id(spec):
            raise UserError(f"--dataset {spec} does not exist: pass a dataset file or folder, or a Hub id such as "
                            "roneneldan/TinyStories")
        return datasets.load_dataset(str(path) if path.is_dir() else spec, name=config_name, streaming=streaming)
    except ConnectionError as exc:
        raise UserError(
            f"dataset {spec} is not a local file or folder and cannot be fetched from the Hub ({reason(exc)}): "
            "check the id, or load it once while online so it is in the datasets cache "
            "(with HF_HUB_OFFLINE unset), or pass a local file or folder"
        ) from None
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError, pa.ArrowException) as exc:
        raise UserError(f"cannot load dataset {spec}: {reason(exc)}") from None


def reason(exc: BaseException) -> str:
    """An exception's message, or its cause's, on one line."""
    while not str(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def check_column(part, column: str, spec: str) -> None:
    """Refuse a missing or non-text column, naming the columns there are (when the schema is known)."""
    features = part.features
    if features is None:  # some streams learn their schema from the first rows: checked per batch instead
        return
    if column not in features:
        raise UserError(f"dataset {spec} has no column {column!r}; its columns are {', '.join(features)}: "
                        "pass --text-column NAME")
    feature = features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise UserError(f"column {column!r} of dataset {spec} holds {feature}, not text: pass the column "
                        f"that holds the text with --text-column (columns: {', '.join(features)})")


def column_of(batch: pa.Table, column: str, spec: str) -> pa.ChunkedArray:
    """A batch's text column, checked: present, and strings (nulls, no text, are allowed: CSV reads "" as null)."""
    if column not in batch.column_names:
        raise UserError(f"dataset {spec} has no column {column!r}; its columns are {', '.join(batch.column_names)}: "
                        "pass --text-column NAME")
    texts = batch.column(column)
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)):
        raise UserError(f"column {column!r} of dataset {spec} holds {texts.type}, not text: pass the column "
                        f"that holds the text with --text-column (columns: {', '.join(batch.column_names)})")
    return texts


def tokenize(part, documents: Documents, tokenizer: Tokenizer, dtype: str, keep_text: bool, num_proc: int | None):
    """`part` mapped to an `input_ids` column (each non-empty document's ids, then `<|endoftext|>`).

    A `Dataset` is mapped once into `datasets`' cache, fingerprinted by the data and the
    tokenizer: the same data and tokenizer are not tokenized twice. A stream maps lazily.
    """
    from .tokenizer import EOS_TOKEN

    encode = functools.partial(
        encode_documents, tokenizer=tokenizer, column=documents.column, spec=documents.spec,
        eos_id=tokenizer.token_to_id(EOS_TOKEN), dtype=dtype, keep_text=keep_text,
    )
    kept = {SOURCE_COLUMN, documents.column} if keep_text else {SOURCE_COLUMN}
    removed = [name for name in (part.column_names or []) if name not in kept]
    options = {"batched": True, "batch_size": MAP_BATCH, "remove_columns": removed}
    if isinstance(part, datasets.Dataset):
        if num_proc and num_proc > 1:
            # Each worker encodes on its own; tokenizers' threads in forked workers would only contend.
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        options.update(num_proc=num_proc, desc="tokenizing")
    return part.with_format("arrow").map(encode, **options)


def encode_documents(batch: pa.Table, *, tokenizer: Tokenizer, column: str, spec: str, eos_id: int, dtype: str,
                     keep_text: bool) -> pa.Table:
    """`Dataset.map`'s function: a batch of rows -> `input_ids`, one list of ids per row (empty rows: none).

    A mix's source column goes through as it is (an arrow-format map keeps only what this returns)."""
    texts = [text or "" for text in column_of(batch, column, spec).to_pylist()]  # null: no text
    pieces, lengths = [], []
    for group in groups_of_chars(texts, ENCODE_CHARS):
        for text, encoding in zip(group, tokenizer.encode_batch_fast(group, add_special_tokens=False)):
            ids = np.array(encoding.ids + [eos_id], dtype=dtype) if text else np.empty(0, dtype=dtype)
            pieces.append(ids)
            lengths.append(len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    ids = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
    columns = {"input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids))}
    if keep_text:
        columns[column] = batch.column(column)
    if SOURCE_COLUMN in batch.column_names:
        columns[SOURCE_COLUMN] = batch.column(SOURCE_COLUMN)
    return pa.table(columns)


def groups_of_chars(texts: list[str], limit: int) -> Iterator[list[str]]:
    """`texts` in order, in groups of about `limit` characters (a longer text is a group of its own).

    A batch's Encodings take ~100 bytes per token: encoding 1000 long documents at once would
    hold hundreds of MB of them, a group of ENCODE_CHARS characters about 10 MB.
    """
    group: list[str] = []
    size = 0
    for text in texts:
        if group and size + len(text) > limit:
            yield group
            group, size = [], 0
        group.append(text)
        size += len(text)
    if group:
        yield group


def tokenized_splits(documents: Documents, tokenizer: Tokenizer, dtype: str, keep_text: bool,
                     num_proc: int | None) -> Iterator[tuple[str, pa.Table]]:
    """("train" | "val", rows) for every batch of tokenized rows, in order; rows hold `input_ids`
    (and, with `keep_text`, the text column). The training split comes first, then a named val split."""
    parts = [(documents.train, "train")] + ([(documents.val, "val")] if documents.val is not None else [])
    for part, name in parts:
        position = 0
        for batch in tokenize(part, documents, tokenizer, dtype, keep_text, num_proc).iter(batch_size=MAP_BATCH):
            if documents.val is None:
                val = in_val(np.arange(position, position + batch.num_rows), documents.val_fraction)
                yield "train", batch.filter(pa.array(~val))
                yield "val", batch.filter(pa.array(val))
            else:
                yield name, batch
            position += batch.num_rows


def in_val(index: np.ndarray, fraction: float) -> np.ndarray:
    """Which row indices are validation documents: an evenly spread `fraction` of them."""
    return np.floor((index + 1) * fraction) > np.floor(index * fraction)


def tokenizer_cache_key(documents: Documents, kind: str, vocab_size: int | None, sample_chars: int | None) -> str | None:
    """A key for a tokenizer trained on these documents, or None when they have no cache files to name them."""
    parts = [documents.train] if documents.val is None else [documents.train, documents.val]
    if documents.streaming or not all(part.cache_files for part in parts):
        return None
    files = [
        (file["filename"], os.stat(file["filename"]).st_size, os.stat(file["filename"]).st_mtime_ns)
        for part in parts for file in part.cache_files
    ]
    mix = [(entry["dataset"], entry["weight"]) for entry in documents.record.get("datasets", [])]
    settings = [kind, vocab_size, sample_chars, documents.column, files, mix]
    return datasets.fingerprint.Hasher.hash(json.dumps(settings))


def cached_tokenizer_path(key: str) -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "tinylm-tokenizers" / f"{key}.json"
