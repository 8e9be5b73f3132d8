"""Text into prepared data: train the tokenizer (or take a model's), encode, write each split.

Plain text (`plain_text.Source`) is streamed twice: the first pass trains the tokenizer and
counts characters, the second cuts the text at the train/val boundary (the last `val_fraction`
of the characters is validation, contiguous, as nanoGPT does) and writes each split's tokens
as they come, encoded on a helper thread (`encode`). A dataset's documents
(`documents.Documents`) are tokenized by `Dataset.map` (cached by `datasets`) and written the
same way. Everything is written into a staging folder and published by `formats` (meta.json
last), so a failure at any point leaves the previous outputs as they were.
"""

from __future__ import annotations

import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Encoding, Tokenizer
from tqdm import tqdm

from . import formats, paths
from . import tokenizer as tok
from .atomic import atomic_path
from .errors import UserError
from .plain_text import Source, file_chunks, label_splits

# Pieces of text (about plain_text.CHUNK_CHARS characters each) per encode_batch call, which
# tokenizers spreads over all cores. A batch's Encodings take ~100 bytes per token, so batches
# of 128K characters hold them to ~10 MB; bigger ones are no faster.
ENCODE_BATCH = 16
MIN_SPLIT_TOKENS = 2  # one input token and its target: the smallest block there is


@dataclass
class Settings:
    """What to write, checked: the tokenizer to train and the layout of the files."""

    kind: str
    vocab_size: int | None  # None for char
    data_format: str
    shard_tokens: int
    val_fraction: float | None  # None: for a dataset, its validation split
    tokenizer_sample: int | None = None
    num_proc: int | None = None
    from_model: str | None = None  # --tokenizer pretrained: the model whose tokenizer this is
    revision: str | None = None

    @property
    def tokenizer_from(self) -> dict | None:
        """meta.json's `tokenizer_from`, for a pretrained model's tokenizer."""
        return {"source": self.from_model, "revision": self.revision} if self.from_model else None


def prepare_text(source: Source, out: Path, settings: Settings) -> tuple[dict, list[str]]:
    """Write tokenizer, token files and meta.json for `source` into `out`; return the meta and file names."""
    with formats.staging(out) as folder:
        tokenizer, num_chars = train_tokenizer(source, settings)
        tok.save(tokenizer, folder)
        dtype = formats.token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
        splits = write_text_splits(source, num_chars, tokenizer, dtype, settings, folder)
        meta = formats.build_meta(folder, settings.data_format, settings.kind, dtype,
                                  source.record(settings.val_fraction), splits, settings.tokenizer_from)
        return meta, formats.publish(folder, out, meta)


def write_text_splits(source: Source, num_chars: int, tokenizer: Tokenizer, dtype: str, settings: Settings,
                      folder: Path) -> dict:
    """Cut the text into train and val, write each split's files into `folder`; return meta's `splits`."""
    train_chars = int(num_chars * (1 - settings.val_fraction))
    split_chars = {"train": train_chars, "val": num_chars - train_chars}
    if min(split_chars.values()) == 0:
        raise UserError(
            f"input {source.name} has only {num_chars} characters: too little to split into train and "
            f"validation with --val-fraction {settings.val_fraction}; use a longer text"
        )
    splits = {}
    labelled = label_splits(source.chunks(), train_chars)
    for split, pieces in itertools.groupby(labelled, key=itemgetter(0)):
        writer = formats.SplitWriter(folder, split, settings.data_format, dtype, settings.shard_tokens)
        texts = progress((text for _, text in pieces), split_chars[split], f"encoding {split}")
        for ids in encode(tokenizer, written_to(writer, texts), dtype):
            writer.write(ids)
        splits[split] = finished(writer, f"input {source.name}", "use a longer text or a different --val-fraction")
        splits[split]["num_chars"] = split_chars[split]
    return splits


def written_to(writer: formats.SplitWriter, texts: Iterable[str]) -> Iterator[str]:
    """Pass `texts` through, appending each to the writer's text file (txt format) on the way."""
    for text in texts:
        writer.write_text(text)
        yield text


def finished(writer: formats.SplitWriter, what: str, fix: str) -> dict:
    """Close a split's writer; its meta entry, or a UserError if it is smaller than one block."""
    entries = writer.finish()
    num_tokens = sum(entry["num_tokens"] for entry in entries)
    if num_tokens < MIN_SPLIT_TOKENS:
        raise UserError(f"{what} is too small: its {writer.split} split has {num_tokens} token(s), "
                        f"fewer than one block; {fix}")
    return {"num_tokens": num_tokens, "files": entries}


def train_tokenizer(source: Source, settings: Settings) -> tuple[Tokenizer, int]:
    """Train the tokenizer on the whole text in one streaming pass (or load a model's); count its characters."""
    num_chars = 0
    doing = "counting characters" if settings.kind == "pretrained" else f"training {settings.kind} tokenizer"

    def counted() -> Iterator[str]:
        nonlocal num_chars
        for chunk in progress(source.chunks(), source.size, doing):
            num_chars += len(chunk)
            yield chunk

    return new_tokenizer(settings, counted()), num_chars


def new_tokenizer(settings: Settings, texts: Iterable[str]) -> Tokenizer:
    """A tokenizer trained on `texts`, or, for "pretrained", the model's own (`texts` are still read through)."""
    if settings.kind == "char":
        return tok.train_char(texts)
    if settings.kind == "bpe":
        # The trainer's own bars (merges) only on a terminal, like tqdm's; elsewhere they print blank lines.
        return tok.train_bpe(texts, settings.vocab_size, show_progress=sys.stderr.isatty())
    for _ in texts:
        pass
    return model_tokenizer(settings.from_model, settings.revision)


def model_tokenizer(source: str, revision: str | None) -> Tokenizer:
    """The `tokenizers` object behind a pretrained model's tokenizer, set to encode plain text."""
    from . import pretrained

    backend = Tokenizer.from_str(pretrained.tokenizer(source, revision).backend_tokenizer.to_str())  # a copy
    backend.no_truncation()
    backend.no_padding()
    if backend.token_to_id(tok.EOS_TOKEN) is None:
        raise UserError(f"the tokenizer of {pretrained.describe(source, revision)} has no {tok.EOS_TOKEN} token, "
                        "which tinylm uses as the model's end of text: tinylm fine-tunes GPT-2 style models")
    return backend


def encode(tokenizer: Tokenizer, texts: Iterable[str], dtype: str) -> Iterator[np.ndarray]:
    """The token ids of `texts`, in order, one array per batch of ENCODE_BATCH texts.

    tokenizers encodes a batch on all cores and releases the GIL meanwhile, so a helper
    thread encodes the next batch while this one reads the text and turns the last
    batch's ids into an array for the caller to write: the cores seldom wait on Python.
    Only two batches are ever in flight, so memory stays bounded.
    """
    with ThreadPoolExecutor(max_workers=1) as encoder:
        previous = None
        for batch in tok.batched(texts, ENCODE_BATCH):
            current = encoder.submit(tokenizer.encode_batch_fast, batch, add_special_tokens=False)
            if previous is not None:
                yield ids_of(previous.result(), dtype)
            previous = current
        if previous is not None:
            yield ids_of(previous.result(), dtype)


def ids_of(encodings: list[Encoding], dtype: str) -> np.ndarray:
    """The ids of a batch's encodings, one after another, as one array."""
    return np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype=dtype)


def prepare_documents(docs, out: Path, settings: Settings) -> tuple[dict, list[str]]:
    """Write tokenizer, token files and meta.json for a dataset's documents (`tinylm.documents.Documents`)."""
    from . import documents, mixing

    mixed = docs.record.get("datasets")
    tally = mixing.Tally(len(mixed)) if mixed else None
    with formats.staging(out) as folder:
        tokenizer = documents_tokenizer(docs, settings)
        tok.save(tokenizer, folder)
        dtype = formats.token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
        writers = {split: formats.SplitWriter(folder, split, settings.data_format, dtype, settings.shard_tokens)
                   for split in formats.SPLITS}
        counts = dict.fromkeys(formats.SPLITS, 0)
        rows_seen = 0
        batches = documents.tokenized_splits(docs, tokenizer, dtype, settings.data_format == "txt", settings.num_proc)
        with tqdm(total=docs.num_rows(), desc=f"writing {docs.spec}", unit="doc", unit_scale=True, disable=None,
                  leave=False) as bar:
            for split, rows in batches:
                counts[split] += write_rows(writers[split], rows, docs.column)
                if tally:
                    tally.add(split, rows)
                rows_seen += rows.num_rows
                bar.update(rows.num_rows)
        skipped = rows_seen - sum(counts.values())
        if skipped:
            print(f"note: {skipped:,} rows of {docs.spec} have no text (empty or null) and were left out")
        what = f"dataset {docs.spec}"
        fix = "use more (or longer) documents, or another --split / --val-split / --val-fraction"
        splits = {split: finished(writers[split], what, fix) for split in formats.SPLITS}
        record = {**docs.record, "num_documents": counts, "tokenizer_sample_chars": settings.tokenizer_sample}
        if tally:
            record["datasets"] = tally.record(mixed)
        meta = formats.build_meta(folder, settings.data_format, settings.kind, dtype, record, splits,
                                  settings.tokenizer_from)
        return meta, formats.publish(folder, out, meta)


def write_rows(writer: formats.SplitWriter, rows, column: str) -> int:
    """Append a batch of tokenized rows (a pyarrow table) to a split; return how many documents it held."""
    ids = rows.column("input_ids").combine_chunks()
    writer.write(ids.flatten().to_numpy(zero_copy_only=False))
    if column in rows.column_names:  # txt format: the documents' text, each followed by <|endoftext|>
        writer.write_text("".join(text + tok.EOS_TOKEN for text in rows.column(column).to_pylist() if text))
    return int(np.count_nonzero(ids.value_lengths().to_numpy(zero_copy_only=False)))


def documents_tokenizer(docs, settings: Settings) -> Tokenizer:
    """The tokenizer trained on the documents' text (or its first `tokenizer_sample` characters).

    A tokenizer trained on a `Dataset` is kept in `datasets`' cache, under a key made from
    the dataset's cache files and the settings, so preparing the same data again reuses it
    (and, since the tokenizer is then the same, `Dataset.map`'s cached tokens too).
    """
    from . import documents

    if settings.kind == "pretrained":
        return model_tokenizer(settings.from_model, settings.revision)
    key = documents.tokenizer_cache_key(docs, settings.kind, settings.vocab_size, settings.tokenizer_sample)
    cached = documents.cached_tokenizer_path(key) if key else None
    if cached is not None and cached.is_file():
        return Tokenizer.from_file(str(cached))
    texts = docs.texts(settings.tokenizer_sample)
    description = f"training {settings.kind} tokenizer"
    with tqdm(total=docs.num_rows(), desc=description, unit="doc", unit_scale=True, disable=None, leave=False) as bar:
        tokenizer = new_tokenizer(settings, counted(texts, bar))
    if cached is not None:
        with atomic_path(cached) as tmp:
            tokenizer.save(str(tmp))
    return tokenizer


def counted(texts: Iterable[str], bar: tqdm) -> Iterator[str]:
    for text in texts:
        yield text
        bar.update()


def retokenize(folder: Path) -> int:
    """Tokenize the txt layout's train.txt/val.txt in `folder` again, with its own tokenizer, after a hand edit."""
    meta_path = folder / paths.META_NAME
    meta = formats.load_meta(meta_path)
    if meta["data_format"] != "txt":
        raise UserError(f"--retokenize {folder}: {meta_path} describes {meta['data_format']} data, which keeps no "
                        "text to tokenize again; prepare it afresh with tinylm prepare")
    tokenizer = Tokenizer.from_file(str(folder / meta["tokenizer_file"]))
    with formats.staging(folder) as staging:
        for split in formats.SPLITS:
            (entry,) = meta["splits"][split]["files"]
            text_path = folder / entry.get("text", f"{split}.txt")
            if not text_path.is_file():
                raise UserError(f"--retokenize {folder}: {text_path} is missing, so there is nothing to tokenize; "
                                "prepare the data afresh with tinylm prepare --format txt")
            writer = formats.SplitWriter(staging, split, "txt", meta["dtype"])
            texts = progress(file_chunks(text_path), text_path.stat().st_size, f"tokenizing {text_path.name}")
            for ids in encode(tokenizer, written_to(writer, texts), meta["dtype"]):
                writer.write(ids)
            meta["splits"][split] = finished(writer, str(text_path), "add text to it")
        meta["retokenized"] = formats.now()
        written = formats.publish(staging, folder, meta)
    for split in formats.SPLITS:
        print(f"  {split:<5} {meta['splits'][split]['num_tokens']:>12,} tokens  {folder / f'{split}.npy'}")
    print(f"  retokenized {folder}: wrote {', '.join(written)}")
    return 0


def progress(items: Iterable[str], total: int, description: str) -> Iterator[str]:
    """Yield `items` while a tqdm bar counts their characters (shown only on a terminal)."""
    with tqdm(total=total, desc=description, unit="char", unit_scale=True, disable=None, leave=False) as bar:
        for item in items:
            yield item
            bar.update(len(item))
