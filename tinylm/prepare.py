"""`tinylm prepare`: turn a text corpus into train/val token files plus meta.json.

    tinylm prepare --input PATH|shakespeare [--tokenizer char|bpe] [--vocab-size N]
                   [--format txt|bin] [--shard-tokens N] [--out DIR] [--val-fraction 0.1]

The text is streamed twice, in chunks that end at line ends, so memory stays
bounded however large the input is: the first pass trains the tokenizer (and
counts characters), the second cuts the text at the train/val boundary (the
last `val_fraction` of the characters is validation, contiguous, as nanoGPT
does) and writes each split's tokens incrementally. In the bin format a split
of more than `--shard-tokens` tokens is cut into shards (train_000.bin,
train_001.bin, ...) that meta.json lists in order; a split that fits in one
shard is written as plain train.bin / val.bin.

Everything is written into a hidden staging folder inside the output folder and
only moved into place (meta.json last) once every file is complete, so a failure
at any point leaves the previous outputs as they were.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np
from numpy.lib import format as npy_format
from tokenizers import Encoding, Tokenizer
from tqdm import tqdm

from . import corpus, paths
from . import tokenizer as tok
from .atomic import atomic_path, write_json
from .errors import UserError, run_cli

FORMATS = ("bin", "txt")
SPLITS = ("train", "val")
DEFAULT_BPE_VOCAB_SIZE = 4096
# Text is read and encoded in pieces of about CHUNK_CHARS characters, ENCODE_BATCH pieces per
# encode_batch call (which tokenizers spreads over all cores). A batch's Encodings take ~100
# bytes per token, so batches of 128K characters hold them to ~10 MB; bigger ones are no faster.
CHUNK_CHARS = 1 << 13
ENCODE_BATCH = 16
# nanoGPT/llm.c's shard size for FineWeb: 100M tokens, a 200 MB file of uint16 ids.
DEFAULT_SHARD_TOKENS = 100_000_000
MIN_SPLIT_TOKENS = 2  # one input token and its target: the smallest block there is


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tinylm prepare",
        description="Tokenize a corpus into train/val token files and meta.json (see docs/data-pipeline.md).",
    )
    parser.add_argument(
        "--input", default=corpus.NAME,
        help=f"a UTF-8 text file, a folder of text files, or {corpus.NAME!r}, the built-in corpus (default)",
    )
    parser.add_argument("--tokenizer", choices=tok.KINDS, default="char", help="tokenizer to train (default: char)")
    parser.add_argument(
        "--vocab-size", type=int,
        help=f"BPE vocabulary size (bpe only; default {DEFAULT_BPE_VOCAB_SIZE}); char uses every character seen",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="bin",
        help=f"bin: {paths.DATA_DIR}/train.bin + val.bin (default); "
        f"txt: {paths.PROCESSED_DIR}/train.txt + val.txt (+ .npy tokens)",
    )
    parser.add_argument(
        "--shard-tokens", type=int,
        help=f"bin only: cut a split of more than N tokens into shards of N tokens, <split>_000.bin, "
        f"<split>_001.bin, ... (default {DEFAULT_SHARD_TOKENS:_}); a split that fits in one is <split>.bin",
    )
    parser.add_argument(
        "--out",
        help=f"output folder (default: {paths.DATA_DIR} for bin, {paths.PROCESSED_DIR} for txt)",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.1,
        help="the last this fraction of the text becomes the validation split (default: 0.1)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    vocab_size, shard_tokens = check_options(args)
    out = Path(args.out or (paths.DATA_DIR if args.format == "bin" else paths.PROCESSED_DIR))
    source = Source.open(args.input)
    started = time.perf_counter()
    meta, written = prepare(source, out, args.tokenizer, vocab_size, args.format, args.val_fraction, shard_tokens)
    seconds = time.perf_counter() - started
    print(
        f"prepared {source.name} with the {meta['tokenizer_kind']} tokenizer (vocab size {meta['vocab_size']}) "
        f"in {seconds:.1f}s ({source.size / 1e6 / seconds:.2f} MB/s)"
    )
    for split in SPLITS:
        entries = meta["splits"][split]["files"]
        files = str(out / entries[0]["tokens"])
        if len(entries) > 1:
            files += f" ... {entries[-1]['tokens']} ({len(entries)} shards)"
        print(f"  {split:<5} {meta['splits'][split]['num_tokens']:>12,} tokens  {files}")
    print(f"  wrote {len(written)} files into {out}: {', '.join(abridged(written, meta))}")
    return 0


def abridged(names: list[str], meta: dict) -> list[str]:
    """`names` with each split's shards between its first and last shown as one "..."."""
    inner_shards = {entry["tokens"] for split in SPLITS for entry in meta["splits"][split]["files"][1:-1]}
    shown: list[str] = []
    for name in names:
        if name not in inner_shards:
            shown.append(name)
        elif shown[-1] != "...":
            shown.append("...")
    return shown


def check_options(args: argparse.Namespace) -> tuple[int | None, int]:
    """Refuse bad flag values before any work is done; return the BPE vocab size (None for char) and shard size."""
    if not 0.0 < args.val_fraction < 1.0:
        raise UserError(
            f"--val-fraction {args.val_fraction} is out of range: it must be between 0 and 1 "
            "(exclusive), e.g. 0.1 keeps the last 10% of the text for validation"
        )
    if args.shard_tokens is not None:
        if args.format != "bin":
            raise UserError(
                "--shard-tokens applies to --format bin only: the txt format keeps each split as one .txt file; "
                "drop --shard-tokens or use --format bin"
            )
        if args.shard_tokens < 1:
            raise UserError(
                f"--shard-tokens {args.shard_tokens} is out of range: a shard holds at least 1 token; "
                f"the default is {DEFAULT_SHARD_TOKENS}"
            )
    shard_tokens = DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens
    if args.tokenizer == "char":
        if args.vocab_size is not None:
            raise UserError(
                "--vocab-size applies to --tokenizer bpe only: the char vocabulary is every character in the "
                "text; drop --vocab-size or add --tokenizer bpe"
            )
        return None, shard_tokens
    vocab_size = DEFAULT_BPE_VOCAB_SIZE if args.vocab_size is None else args.vocab_size
    tok.check_bpe_vocab_size(vocab_size)
    return vocab_size, shard_tokens


@dataclass
class Source:
    """The text to prepare: the name meta.json records, and how to stream it."""

    name: str
    files: list[Path]  # read in this order; empty for the built-in corpus
    size: int  # bytes, for progress bars and the throughput summary
    text: str | None = None  # the built-in corpus, held in memory (about 5 MB)

    @classmethod
    def open(cls, spec: str) -> "Source":
        """The built-in corpus by name, or a text file, or every file in a folder (sorted by name)."""
        if spec == corpus.NAME:
            text = corpus.text()
            return cls(corpus.NAME, [], len(text.encode("utf-8")), text)
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not files:
                raise UserError(f"input folder {path} holds no files: put .txt files in it, or pass a file")
        elif path.is_file():
            files = [path]
        else:
            raise UserError(
                f"input {path} does not exist: pass a text file, a folder of text files, or {corpus.NAME!r}"
            )
        size = sum(file.stat().st_size for file in files)
        if size == 0:
            raise UserError(f"input {path} is empty: pass a file with some text in it")
        return cls(str(path), files, size)

    def chunks(self) -> Iterator[str]:
        """The whole text, in chunks of about CHUNK_CHARS that end at line ends.

        Files of a folder are joined with a newline between them when one does not end with one.
        """
        if self.text is not None:
            yield from line_chunks(io.StringIO(self.text))
            return
        last = "\n"
        for path in self.files:
            if last != "\n":
                yield "\n"
            for chunk in file_chunks(path):
                yield chunk
                last = chunk[-1]


def line_chunks(handle: TextIO) -> Iterator[str]:
    """Read `handle` in chunks of about CHUNK_CHARS, each extended to the end of its line."""
    while chunk := handle.read(CHUNK_CHARS):
        # Ending chunks at line ends keeps words whole for BPE; the cap bounds memory on huge lines.
        yield chunk + handle.readline(CHUNK_CHARS)


def file_chunks(path: Path) -> Iterator[str]:
    """A UTF-8 file's text in line-ending chunks, exactly as stored (newline="" keeps \\r\\n)."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            yield from line_chunks(handle)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"input {path} is not UTF-8 text ({exc.reason}): convert it first, "
            f"e.g. iconv -f latin1 -t utf-8 {path} > {Path(path).stem}.utf8.txt"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read input {path}: {exc.strerror or exc}") from None


def prepare(
    source: Source, out: Path, kind: str, vocab_size: int | None, data_format: str, val_fraction: float,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> tuple[dict, list[str]]:
    """Write tokenizer, token files and meta.json for `source` into `out`; return the meta and file names."""
    staging = make_staging_folder(out)
    try:
        tokenizer, num_chars = train_tokenizer(source, kind, vocab_size)
        tok.save(tokenizer, staging)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        dtype = token_dtype(vocab)
        splits = write_splits(source, num_chars, val_fraction, tokenizer, dtype, data_format, shard_tokens, staging)
        meta = {
            "format_version": paths.META_FORMAT_VERSION,
            "data_format": data_format,
            "tokenizer_kind": kind,
            "tokenizer_file": paths.TOKENIZER_NAME,
            "vocab_size": vocab,
            "eos_token_id": tokenizer.token_to_id(tok.EOS_TOKEN),
            "dtype": dtype,
            "source": source.name,
            "val_fraction": val_fraction,
            "splits": splits,
        }
        write_json(staging / paths.META_NAME, meta)
        return meta, publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_splits(
    source: Source, num_chars: int, val_fraction: float, tokenizer: Tokenizer, dtype: str, data_format: str,
    shard_tokens: int, staging: Path,
) -> dict:
    """Cut the text into train and val, write each split's files into `staging`; return meta's `splits`."""
    train_chars = int(num_chars * (1 - val_fraction))
    split_chars = {"train": train_chars, "val": num_chars - train_chars}
    if min(split_chars.values()) == 0:
        raise UserError(
            f"input {source.name} has only {num_chars} characters: too little to split into train and "
            f"validation with --val-fraction {val_fraction}; use a longer text"
        )
    splits = {}
    labelled = label_splits(source.chunks(), train_chars)
    for split, pieces in itertools.groupby(labelled, key=itemgetter(0)):
        texts = progress((text for _, text in pieces), split_chars[split], f"encoding {split}")
        if data_format == "bin":
            entries = write_bin(encode(tokenizer, texts, dtype), staging, split, dtype, shard_tokens)
        else:
            entries = [write_txt(texts, staging / f"{split}.txt", staging / paths.TOKENIZER_NAME, dtype)]
        num_tokens = sum(entry["num_tokens"] for entry in entries)
        if num_tokens < MIN_SPLIT_TOKENS:
            raise UserError(
                f"input {source.name} is too small: its {split} split has {num_tokens} token(s), "
                f"fewer than one block; use a longer text or a different --val-fraction"
            )
        splits[split] = {"num_tokens": num_tokens, "num_chars": split_chars[split], "files": entries}
    return splits


def make_staging_folder(out: Path) -> Path:
    """A fresh hidden folder inside `out` (so moves into `out` are renames); fails early if `out` is unwritable."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    except OSError as exc:
        what = "is a file, not a folder" if out.is_file() else f"cannot be written ({exc.strerror or exc})"
        raise UserError(f"output folder {out} {what}: pass a writable folder with --out") from None


def publish(staging: Path, out: Path) -> list[str]:
    """Move every staged file into `out` by atomic rename, meta.json last; return their names.

    Then delete the data files that the replaced meta.json listed and this run did not
    rewrite (say train_000.bin ... of an earlier sharded run), so no stale shards pile up.
    """
    replaced = listed_files(out / paths.META_NAME)
    names = sorted(path.name for path in staging.iterdir() if path.name != paths.META_NAME)
    names.append(paths.META_NAME)  # last: until it lands, readers still see the previous, complete set
    for name in names:
        with atomic_path(out / name) as tmp:
            (staging / name).replace(tmp)
    for name in replaced - set(names):
        (out / name).unlink(missing_ok=True)
    return names


def listed_files(meta_path: Path) -> set[str]:
    """The data files (tokens, texts, .npy stamps) a meta.json lists beside itself; none if it is unreadable."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        entries = [entry for split in meta["splits"].values() for entry in split["files"]]
        names = {entry[key] for entry in entries for key in ("tokens", "text") if key in entry}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # no meta.json, or not one of ours: delete nothing
    names |= {stamp_path(Path(name)).name for name in names if str(name).endswith(".npy")}
    # Only plain names in the folder itself: a hand-edited "../x" must never delete anything elsewhere.
    return {name for name in names if isinstance(name, str) and Path(name).name == name}


def train_tokenizer(source: Source, kind: str, vocab_size: int | None) -> tuple[Tokenizer, int]:
    """Train a `kind` tokenizer on the whole text in one streaming pass; also count its characters."""
    num_chars = 0

    def counted() -> Iterator[str]:
        nonlocal num_chars
        for chunk in progress(source.chunks(), source.size, f"training {kind} tokenizer"):
            num_chars += len(chunk)
            yield chunk

    if kind == "char":
        return tok.train_char(counted()), num_chars
    # The trainer's own bars (merges) only on a terminal, like tqdm's; elsewhere they print blank lines.
    return tok.train_bpe(counted(), vocab_size, show_progress=sys.stderr.isatty()), num_chars


def token_dtype(vocab_size: int) -> str:
    """nanoGPT's layout: uint16 ids while the vocabulary fits, uint32 beyond."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def label_splits(chunks: Iterable[str], train_chars: int) -> Iterator[tuple[str, str]]:
    """("train" | "val", text) pieces: the first `train_chars` characters are train, the rest val."""
    position = 0
    for chunk in chunks:
        cut = min(max(train_chars - position, 0), len(chunk))
        if cut:
            yield "train", chunk[:cut]
        if cut < len(chunk):
            yield "val", chunk[cut:]
        position += len(chunk)


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


def shard_pieces(arrays: Iterable[np.ndarray], shard_tokens: int) -> Iterator[tuple[int, np.ndarray]]:
    """(shard index, ids) pieces: the concatenation of `arrays` cut every `shard_tokens` tokens."""
    position = 0
    for ids in arrays:
        while len(ids):
            piece = ids[: shard_tokens - position % shard_tokens]
            yield position // shard_tokens, piece
            position += len(piece)
            ids = ids[len(piece) :]


def write_bin(arrays: Iterable[np.ndarray], folder: Path, split: str, dtype: str, shard_tokens: int) -> list[dict]:
    """Write a split's token ids as flat little-endian files (nanoGPT's .bin); return their meta entries.

    Every `shard_tokens` tokens start a new file, `<split>_000.bin`, `<split>_001.bin`, ...;
    when the split fits in one, it is renamed to plain `<split>.bin`.
    """
    entries = []
    for index, pieces in itertools.groupby(shard_pieces(arrays, shard_tokens), key=itemgetter(0)):
        target = folder / f"{split}_{index:03d}.bin"
        num_tokens = 0
        with open(target, "wb") as handle:
            for _, ids in pieces:
                ids.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tofile(handle)
                num_tokens += len(ids)
        entries.append({"tokens": target.name, "num_tokens": num_tokens})
    if len(entries) == 1:
        (folder / entries[0]["tokens"]).rename(folder / f"{split}.bin")
        entries[0]["tokens"] = f"{split}.bin"
    return entries


def write_txt(texts: Iterable[str], target: Path, tokenizer_path: Path, dtype: str) -> dict:
    """Write the split's text to `target`, then its tokens to the .npy beside it; return its meta entry."""
    with open(target, "w", encoding="utf-8", newline="") as handle:
        for text in texts:
            handle.write(text)
    tokens = target.with_suffix(".npy")
    num_tokens = tokenize_text_file(target, tokens, tokenizer_path, dtype)
    return {"text": target.name, "tokens": tokens.name, "num_tokens": num_tokens}


# --- the .npy token cache of a text file (txt format), shared with tinylm.data -------------------------


def tokenize_text_file(text_path: Path, tokens_path: Path, tokenizer_path: Path, dtype: str) -> int:
    """Encode a UTF-8 text file into a 1-D .npy of token ids, atomically; return the token count.

    A stamp file beside the .npy (`train.npy.json`) records the text's size and
    modification time and the tokenizer's hash, so `tokens_are_current` can tell
    when the text or the tokenizer changed and the tokens must be rebuilt.
    """
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    header = {"descr": npy_format.dtype_to_descr(np.dtype(dtype).newbyteorder("<")), "fortran_order": False}
    num_tokens = 0
    texts = progress(file_chunks(text_path), text_path.stat().st_size, f"tokenizing {text_path.name}")
    with atomic_path(tokens_path) as tmp, open(tmp, "wb") as handle:
        # The length is known only at the end. numpy pads every header with room for the
        # shape to grow (GROWTH_AXIS_MAX_DIGITS), so the final header overwrites this one in place.
        npy_format.write_array_header_1_0(handle, {**header, "shape": (0,)})
        data_start = handle.tell()
        for ids in encode(tokenizer, texts, dtype):
            ids.astype(header["descr"], copy=False).tofile(handle)
            num_tokens += len(ids)
        handle.seek(0)
        npy_format.write_array_header_1_0(handle, {**header, "shape": (num_tokens,)})
        if handle.tell() != data_start:
            raise RuntimeError(f"npy header of {tokens_path} changed size; cannot rewrite it in place")
    write_json(stamp_path(tokens_path), {**text_stamp(text_path, tokenizer_path), "num_tokens": num_tokens})
    return num_tokens


def tokens_are_current(text_path: Path, tokens_path: Path, tokenizer_path: Path) -> bool:
    """Whether `tokens_path` was made from `text_path` as it is now, with this tokenizer file."""
    try:
        stamp = json.loads(stamp_path(tokens_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    current = text_stamp(text_path, tokenizer_path)
    return tokens_path.is_file() and all(stamp.get(key) == value for key, value in current.items())


def stamp_path(tokens_path: Path) -> Path:
    return tokens_path.with_name(tokens_path.name + ".json")


def text_stamp(text_path: Path, tokenizer_path: Path) -> dict:
    """What a .npy token cache depends on: the text file's size and mtime, the tokenizer's content."""
    stat = text_path.stat()
    digest = hashlib.sha256(tokenizer_path.read_bytes()).hexdigest()
    return {"text_size": stat.st_size, "text_mtime_ns": stat.st_mtime_ns, "tokenizer_sha256": digest}


def progress(items: Iterable[str], total: int, description: str) -> Iterator[str]:
    """Yield `items` while a tqdm bar counts their characters (shown only on a terminal)."""
    with tqdm(total=total, desc=description, unit="char", unit_scale=True, disable=None, leave=False) as bar:
        for item in items:
            yield item
            bar.update(len(item))


if __name__ == "__main__":
    sys.exit(run_cli(main))
