"""Prepared data on disk: the two formats, their token files and meta.json.

This module alone knows the layout. `tinylm.encoding` writes through it, `tinylm.data`
reads through it:

- bin: nanoGPT's flat little-endian token files, `train.bin` / `val.bin`, or shards
  `train_000.bin`, `train_001.bin`, ... for a split of more than `shard_tokens` tokens;
- txt: the split's text as `train.txt` / `val.txt`, and its tokens as a 1-D `train.npy` /
  `val.npy` beside it.

meta.json lists each split's files in stream order with what a reader needs to trust
them without reading them: `num_tokens`, `max_token_id`, the file's SHA-256 and its
modification time (and for txt, the text file's size and modification time). So
opening the data costs a few `stat` calls, not a scan of every token; a file whose
modification time differs from the record (copied, or edited) is checked against
its SHA-256 once, on open.

Files are written into a hidden staging folder inside the output folder and moved into
place by rename, meta.json last (`staging`, `publish`): a failure leaves the old data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
from numpy.lib import format as npy_format

from . import paths
from .atomic import atomic_path, write_json
from .config import DATA_FORMATS
from .errors import UserError

SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian, always
# nanoGPT/llm.c's shard size for FineWeb: 100M tokens, a 200 MB file of uint16 ids.
DEFAULT_SHARD_TOKENS = 100_000_000
REQUIRED_KEYS = ("data_format", "tokenizer_kind", "tokenizer_file", "tokenizer_sha256", "vocab_size", "dtype",
                 "source", "created", "splits")
FILE_KEYS = ("tokens", "num_tokens", "max_token_id", "sha256", "mtime_ns")
HASH_CHUNK = 1 << 24  # bytes read at a time when checking a file's SHA-256
STAGING_PREFIX = ".prepare-"
# The hidden names `staging` and `publish` write under (atomic_path: ".<name>.XXXX.tmp"): left in the
# folder only by a writer that was killed, so litter to whoever holds the folder's lock next.
TEMP_PATTERNS = (f"{STAGING_PREFIX}*", f".{paths.META_NAME}.*.tmp", ".tokenizer*.json.*.tmp", ".train*.tmp",
                 ".val*.tmp")
# What marks a folder as holding prepared data: these files, or token files by prepare's names
# (never a .txt: a folder's train.txt may be someone's input).
PREPARED_NAMES = (paths.META_NAME, paths.TOKENIZER_NAME, "tokenizer_config.json")
TOKEN_FILE_NAME = re.compile(r"(train|val)(_\d{3,})?\.bin|(train|val)\.npy")


def token_dtype(vocab_size: int) -> str:
    """nanoGPT's layout: uint16 ids while the vocabulary fits, uint32 beyond."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def now() -> str:
    """The time meta.json records as `created`: UTC, ISO 8601, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- writing --------------------------------------------------------------------------------------


class SplitWriter:
    """Write one split's token ids (and, for txt, its text) as they come; `finish()` returns meta entries.

    bin: every `shard_tokens` tokens start a new file `<split>_000.bin`, `<split>_001.bin`, ...;
    a split that fits in one is renamed to plain `<split>.bin`. txt: `<split>.txt` and a
    `<split>.npy` whose header is rewritten in place with the final length at the end.
    Counts, the largest id and each file's SHA-256 are taken on the way, not re-read.
    """

    def __init__(self, folder: Path, split: str, data_format: str, dtype: str,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if data_format not in DATA_FORMATS:
            raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
        self.folder, self.split, self.data_format = folder, split, data_format
        self.dtype = DTYPES[dtype]
        self.shard_tokens = shard_tokens if data_format == "bin" else None
        self.entries: list[dict] = []
        self.handle = None
        self.text_handle = None
        if data_format == "txt":
            self.text_handle = open(folder / f"{split}.txt", "w", encoding="utf-8", newline="")
            self._open(folder / f"{split}.npy")
            # The length is known only at the end. numpy pads every header with room for the shape
            # to grow (GROWTH_AXIS_MAX_DIGITS), so the final header overwrites this one in place.
            npy_format.write_array_header_1_0(self.handle, self._npy_header(0))
            self.data_start = self.handle.tell()

    def _npy_header(self, length: int) -> dict:
        return {"descr": npy_format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (length,)}

    def _open(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "wb")
        self.digest = hashlib.sha256()
        self.num_tokens = 0
        self.max_token_id = -1

    def write_text(self, text: str) -> None:
        """Append to the txt layout's `<split>.txt` (ignored for bin, which keeps no text)."""
        if self.text_handle is not None:
            self.text_handle.write(text)

    def write(self, ids: np.ndarray) -> None:
        """Append token ids to the split."""
        ids = np.asarray(ids).astype(self.dtype, copy=False)
        while len(ids):
            if self.handle is None:
                self._open(self.folder / f"{self.split}_{len(self.entries):03d}.bin")
            room = len(ids) if self.shard_tokens is None else self.shard_tokens - self.num_tokens
            piece, ids = ids[:room], ids[room:]
            self._append(piece)
            if self.shard_tokens is not None and self.num_tokens == self.shard_tokens:
                self._close_file()

    def _append(self, ids: np.ndarray) -> None:
        data = ids.tobytes()
        self.handle.write(data)
        self.digest.update(data)
        self.num_tokens += len(ids)
        self.max_token_id = max(self.max_token_id, int(ids.max()))

    def _close_file(self) -> None:
        if self.data_format == "txt":
            self.handle.seek(0)
            npy_format.write_array_header_1_0(self.handle, self._npy_header(self.num_tokens))
            if self.handle.tell() != self.data_start:
                raise RuntimeError(f"npy header of {self.path} changed size; cannot rewrite it in place")
        self.handle.close()
        self.handle = None
        entry = {"tokens": self.path.name, "num_tokens": self.num_tokens, "max_token_id": self.max_token_id}
        # The .npy header changed after the data was hashed: hash the file as it is on disk.
        entry["sha256"] = sha256_of(self.path) if self.data_format == "txt" else self.digest.hexdigest()
        self.entries.append(entry)

    def finish(self) -> list[dict]:
        """Close the files and return the split's meta entries (mtimes are stamped by `publish`)."""
        if self.handle is not None:
            self._close_file()
        if self.text_handle is not None:
            self.text_handle.close()
            self.entries[0]["text"] = f"{self.split}.txt"
        if len(self.entries) == 1 and self.data_format == "bin":
            (self.folder / self.entries[0]["tokens"]).rename(self.folder / f"{self.split}.bin")
            self.entries[0]["tokens"] = f"{self.split}.bin"
        return self.entries


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh hidden folder inside `out` (so moves into `out` are renames), removed when done.

    Fails early, with a UserError, if `out` cannot be created or written.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    except OSError as exc:
        what = "is a file, not a folder" if out.is_file() else f"cannot be written ({exc.strerror or exc})"
        raise UserError(f"output folder {out} {what}: pass a writable folder with --out") from None
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(folder: Path, out: Path, meta: dict) -> list[str]:
    """Move every file in the staging `folder` into `out` by atomic rename, then write `meta` (last).

    The mtimes of the token and text files are recorded into `meta` first (a rename keeps
    them). Afterwards the earlier data's files that this one did not rewrite are deleted, so
    none is ever read as part of the new data: the files the replaced meta.json listed (say
    train_000.bin ... of a sharded run, or the other format's), and token files by prepare's
    names that no meta.json lists. Returns the names written, meta.json last.
    """
    for entry in all_entries(meta):
        entry["mtime_ns"] = (folder / entry["tokens"]).stat().st_mtime_ns
        if "text" in entry and (folder / entry["text"]).is_file():
            text = (folder / entry["text"]).stat()
            entry["text_bytes"], entry["text_mtime_ns"] = text.st_size, text.st_mtime_ns
    replaced = listed_files(out / paths.META_NAME) | set(token_files(out))
    names = sorted(path.name for path in folder.iterdir())
    for name in names:
        with atomic_path(out / name) as tmp:
            (folder / name).replace(tmp)
    write_json(out / paths.META_NAME, meta)  # last: until it lands, readers see the previous, complete set
    written = [*names, paths.META_NAME]
    for name in replaced - set(written):
        (out / name).unlink(missing_ok=True)
    return written


def token_files(folder: Path) -> list[str]:
    """The token files in `folder`, by the names prepare gives them (train.bin, train_000.bin, train.npy, ...)."""
    return sorted(path.name for path in folder.iterdir() if TOKEN_FILE_NAME.fullmatch(path.name))


def prepared_files(folder: Path) -> list[str]:
    """The names of prepared data's files in `folder` (meta.json, the tokenizer, token files); none if no folder."""
    if not folder.is_dir():
        return []
    return sorted([name for name in PREPARED_NAMES if (folder / name).exists()] + token_files(folder))


def all_entries(meta: dict) -> list[dict]:
    return [entry for split in SPLITS for entry in meta["splits"][split]["files"]]


def listed_files(meta_path: Path) -> set[str]:
    """The data files (tokens, texts) a meta.json lists beside itself; none if it is unreadable."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        entries = [entry for split in meta["splits"].values() for entry in split["files"]]
        names = {entry[key] for entry in entries for key in ("tokens", "text") if key in entry}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # no meta.json, or not one of ours: delete nothing
    # Only plain names in the folder itself: a hand-edited "../x" must never delete anything elsewhere.
    return {name for name in names if isinstance(name, str) and Path(name).name == name}


def build_meta(folder: Path, data_format: str, kind: str, dtype: str, source: dict, splits: dict,
               tokenizer_from: dict | None = None) -> dict:
    """meta.json for the files staged in `folder` (the tokenizer saved there, `splits` from `SplitWriter`s).

    `tokenizer_from` names the model whose tokenizer a "pretrained" kind is: {"source", "revision"}.
    """
    from .tokenizer import EOS_TOKEN, load

    tokenizer = load(folder / paths.TOKENIZER_NAME)
    return {
        "format_version": paths.META_FORMAT_VERSION,
        "data_format": data_format,
        "tokenizer_kind": kind,
        "tokenizer_file": paths.TOKENIZER_NAME,
        "tokenizer_sha256": sha256_of(folder / paths.TOKENIZER_NAME),
        **({"tokenizer_from": tokenizer_from} if tokenizer_from else {}),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS_TOKEN),
        "dtype": dtype,
        "source": source,
        "created": now(),
        "splits": splits,
    }


# --- reading --------------------------------------------------------------------------------------


def load_meta(path: str | Path) -> dict:
    """Read meta.json and check it is one this tinylm can read back with no guessing."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "is missing"
        raise UserError(f"{path} {what}: prepare the data first (tinylm prepare, see docs/data-pipeline.md)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise UserError(f"{path} is not valid JSON ({exc}): re-run tinylm prepare to rewrite it") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a tinylm meta.json (expected a JSON object): re-run tinylm prepare")
    version = meta.get("format_version")
    if version != paths.META_FORMAT_VERSION:
        raise UserError(
            f"{path} has format_version {version!r}, but this tinylm reads version {paths.META_FORMAT_VERSION}: "
            "re-run tinylm prepare to rewrite the data in the current format"
        )
    check_meta(meta, path)
    return meta


def check_meta(meta: dict, path: Path) -> None:
    """Refuse a meta.json whose fields are missing or of the wrong kind (hand-edited or truncated)."""
    from .tokenizer import KINDS

    def bad(what: str) -> UserError:
        return UserError(f"{path} is malformed: {what}; re-run tinylm prepare to rewrite it")

    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    if meta["data_format"] not in DATA_FORMATS:
        raise bad(f"data_format {meta['data_format']!r} is not one of {', '.join(DATA_FORMATS)}")
    if meta["tokenizer_kind"] not in KINDS:
        raise bad(f"tokenizer_kind {meta['tokenizer_kind']!r} is not one of {', '.join(KINDS)}")
    if meta["dtype"] not in DTYPES:
        raise bad(f"dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    vocab_size = meta["vocab_size"]
    if not isinstance(vocab_size, int) or not 0 < vocab_size <= np.iinfo(DTYPES[meta["dtype"]]).max + 1:
        raise bad(f"vocab_size {vocab_size!r} is not a positive integer that fits {meta['dtype']}")
    for split in SPLITS:
        entry = meta["splits"].get(split) if isinstance(meta["splits"], dict) else None
        files = entry.get("files") if isinstance(entry, dict) else None
        listed = isinstance(files, list) and files and all(
            isinstance(e, dict) and all(key in e for key in FILE_KEYS) for e in files)
        if not listed:
            raise bad(f"splits.{split}.files must list the split's token files with {', '.join(FILE_KEYS)}")
        for file in files:
            if not isinstance(file["max_token_id"], int) or file["max_token_id"] >= vocab_size:
                raise bad(f"{file['tokens']} has max_token_id {file['max_token_id']!r}, "
                          f"not an id below vocab_size {vocab_size}")


def open_tokens(path: Path, dtype: np.dtype) -> np.ndarray:
    """Memory-map a token file: a flat .bin of `dtype`, or a 1-D .npy. Nothing is read yet."""
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise UserError(f"{path} is not a readable .npy token file ({exc}): re-run tinylm prepare") from None
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise UserError(
            f"{path} is {size} bytes, not a whole number of {dtype.name} tokens ({dtype.itemsize} bytes each): "
            "the file is truncated or was written with another dtype; re-run tinylm prepare"
        )
    if size == 0:  # mmap cannot map an empty file
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def check_token_file(path: Path, entry: dict, dtype: np.dtype, meta_path: Path) -> None:
    """Refuse a token file that is not the one meta.json describes, without reading its tokens.

    Its dtype, shape and length must match the entry. When its modification time differs
    from the recorded one (copied, touched or edited since prepare), its SHA-256 must match.
    """
    tokens = open_tokens(path, dtype)
    if tokens.ndim != 1 or tokens.dtype != dtype:
        raise UserError(
            f"{path} holds {tokens.dtype} of shape {tokens.shape}, but {meta_path} says a flat array of "
            f"{dtype.name}: re-run tinylm prepare"
        )
    if len(tokens) != entry["num_tokens"]:
        raise UserError(
            f"{path} holds {len(tokens)} tokens but {meta_path} says {entry['num_tokens']}: the files come "
            "from different prepare runs; re-run tinylm prepare"
        )
    if path.stat().st_mtime_ns != entry["mtime_ns"] and sha256_of(path) != entry["sha256"]:
        raise UserError(
            f"{path} changed after tinylm prepare wrote it (its SHA-256 is not the one {meta_path} records): "
            "re-run tinylm prepare"
        )


def text_changed(text_path: Path, entry: dict) -> bool:
    """Whether a txt entry's text file differs (size or mtime) from the one its tokens were made from."""
    stat = text_path.stat()
    return (stat.st_size, stat.st_mtime_ns) != (entry.get("text_bytes"), entry.get("text_mtime_ns"))


def describe_source(meta: dict) -> str:
    """One line saying where prepared data came from and when, for training's start-up summary."""
    source = meta["source"]
    if source.get("dataset") or source.get("datasets"):
        if source.get("datasets"):
            what = "mix of " + ", ".join(f"{entry['dataset']} (weight {entry['weight']:.3g})"
                                         for entry in source["datasets"])
        else:
            what = f"dataset {source['dataset']}"
        what += f" ({source['config_name']})" if source.get("config_name") else ""
        what += f", split {source['split']}, column {source['text_column']!r}"
        val = f"split {source['val_split']}" if source.get("val_split") else f"{source['val_fraction']:.0%} of the documents"
        counts = source["num_documents"]
        what += f"; {counts['train']:,} train / {counts['val']:,} val documents (val: {val})"
    else:
        what = f"{source['input']} (val: the last {source['val_fraction']:.0%} of the text)"
    return f"{what}; prepared {meta['created']}"


def source_name(source: dict) -> str | None:
    """meta.json's `source` in a few words: the input, the dataset, or a mix's datasets."""
    if source.get("datasets"):
        return " + ".join(entry["dataset"] for entry in source["datasets"])
    return source.get("dataset") or source.get("input")


def describe_mix(source: dict) -> list[str]:
    """One line per dataset of a mix (none for one dataset or an input): its weight, the shares of the
    documents and tokens it gave (train and val together), and how much of it was read."""
    lines = []
    for entry in source.get("datasets") or []:
        total = f" of {entry['num_rows']:,}" if entry["num_rows"] is not None else ""
        documents, tokens = sum(entry["num_documents"].values()), sum(entry["num_tokens"].values())
        lines.append(f"{entry['dataset']}: weight {entry['weight']:.3g}, documents {entry['share']['documents']:.1%} "
                     f"({documents:,}), tokens {entry['share']['tokens']:.1%} ({tokens:,}); "
                     f"read {entry['rows_read']:,}{total} rows")
    return lines
