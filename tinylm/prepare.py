"""`tinylm prepare`: turn a text corpus or a `datasets` dataset into train/val token files plus meta.json.

    tinylm prepare [--input PATH|shakespeare | --dataset NAME_OR_PATH ...] [--tokenizer char|bpe]
                   [--vocab-size N] [--format bin|txt] [--shard-tokens N] [--out DIR] [--overwrite]
                   [--val-fraction F]
    tinylm prepare --retokenize DIR

Plain text (`--input`) is streamed twice, in chunks that end at line ends, so memory
stays bounded however large the input is: the first pass trains the tokenizer (and
counts characters), the second cuts the text at the train/val boundary (the last
`val_fraction` of the characters is validation, contiguous, as nanoGPT does) and
writes each split's tokens as they come. A dataset (`--dataset`, see
`tinylm.documents`) is a set of documents: the tokenizer trains on their text,
`Dataset.map` tokenizes them (cached by `datasets`), and each split's ids are written
the same way. The files and meta.json are `tinylm.formats`' business: this module
only decides what goes into them.

Everything is written into a hidden staging folder inside the output folder and
only moved into place (meta.json last) once every file is complete, so a failure
at any point leaves the previous outputs as they were. Prepare holds the output
folder's lock while it works there (`output_folder`), and refuses a folder that
already holds prepared data unless `--overwrite`, as training refuses a run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import numpy as np
from tokenizers import Encoding, Tokenizer
from tqdm import tqdm

from . import corpus, formats, locks, paths
from . import tokenizer as tok
from .atomic import atomic_path
from .config import DATA_FORMATS
from .errors import UserError, run_cli

DEFAULT_BPE_VOCAB_SIZE = 4096
DEFAULT_VAL_FRACTION = 0.1
# Text is read and encoded in pieces of about CHUNK_CHARS characters, ENCODE_BATCH pieces per
# encode_batch call (which tokenizers spreads over all cores). A batch's Encodings take ~100
# bytes per token, so batches of 128K characters hold them to ~10 MB; bigger ones are no faster.
CHUNK_CHARS = 1 << 13
ENCODE_BATCH = 16
MIN_SPLIT_TOKENS = 2  # one input token and its target: the smallest block there is
SNIFF_BYTES = 1 << 13  # how much of an input file is looked at to tell text from binary
STREAMING_TOKENIZER_SAMPLE = 100_000_000  # characters the tokenizer trains on by default when streaming
LOCK_FILES = {locks.LOCK_NAME, locks.OWNER_NAME}  # what holding the output folder's lock puts there


class Once(argparse.Action):
    """Store a flag's value, refusing a second one: argparse would keep the last and silently drop the first."""

    WAY_ON = {
        "input": "prepare reads one input per run; to read several text files, put them in one folder and pass that",
        "dataset": "prepare reads one dataset per run; to read several data files of one kind (say .jsonl), put "
                   "them in one folder and pass that",
        "retokenize": "prepare retokenizes one folder per run; run it once for each",
    }

    def __call__(self, parser, namespace, value, option_string=None):
        first = getattr(namespace, self.dest)
        if first is not None:
            raise UserError(f"{option_string} is given twice ({first}, then {value}): {self.WAY_ON[self.dest]}")
        setattr(namespace, self.dest, value)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tinylm prepare",
        description="Tokenize a corpus into train/val token files and meta.json (see docs/data-pipeline.md).",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--input", action=Once,
        help=f"a UTF-8 text file, a folder of text files, or {corpus.NAME!r}, the built-in corpus "
        "(the default when no --dataset is given)",
    )
    source.add_argument(
        "--dataset", action=Once,
        help="a Hugging Face dataset: a Hub id (e.g. roneneldan/TinyStories), a .jsonl/.json/.csv/.parquet/.arrow "
        "file, a folder of such files, or a save_to_disk folder; each row is a document",
    )
    source.add_argument("--retokenize", metavar="DIR", action=Once,
                        help="txt data only: tokenize the (edited) train.txt/val.txt in DIR again, with its tokenizer")
    parser.add_argument(
        "--tokenizer", choices=tok.KINDS, default="char",
        help="tokenizer to train, char or bpe (default: char); pretrained: use the tokenizer of the model --from "
        "names, to fine-tune that model (model.init_from)",
    )
    parser.add_argument("--from", dest="from_model", metavar="MODEL",
                        help="--tokenizer pretrained: the model (Hub id or local folder) whose tokenizer to use")
    parser.add_argument("--revision", help="with --from: a branch, tag or commit of the Hub model")
    parser.add_argument(
        "--vocab-size", type=int,
        help=f"BPE vocabulary size (bpe only; default {DEFAULT_BPE_VOCAB_SIZE}); char uses every character seen",
    )
    parser.add_argument(
        "--format", choices=DATA_FORMATS, default="bin",
        help=f"bin: {paths.DATA_DIR}/train.bin + val.bin (default); "
        f"txt: {paths.PROCESSED_DIR}/train.txt + val.txt (+ .npy tokens)",
    )
    parser.add_argument(
        "--shard-tokens", type=int,
        help=f"bin only: cut a split of more than N tokens into shards of N tokens, <split>_000.bin, "
        f"<split>_001.bin, ... (default {formats.DEFAULT_SHARD_TOKENS:_}); a split that fits in one is <split>.bin",
    )
    parser.add_argument(
        "--out",
        help=f"output folder (default: {paths.DATA_DIR} for bin, {paths.PROCESSED_DIR} for txt)",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the prepared data already in the output folder (otherwise refused)")
    parser.add_argument(
        "--val-fraction", type=float,
        help=f"the validation share (default {DEFAULT_VAL_FRACTION}): the last this fraction of a text; "
        "for a dataset, an evenly spread this fraction of its documents",
    )
    dataset = parser.add_argument_group("--dataset options")
    dataset.add_argument("--config-name", help="the dataset's configuration (load_dataset's name), if it has several")
    dataset.add_argument("--split", default="train", help="the split to train on (default: train)")
    dataset.add_argument("--text-column", default="text", help="the column that holds the text (default: text)")
    dataset.add_argument(
        "--val-split",
        help="a split to validate on (default: the dataset's 'validation' split if it has one and no "
        "--val-fraction is given, else --val-fraction of --split)",
    )
    dataset.add_argument(
        "--streaming", action="store_true",
        help="read the dataset as a stream (IterableDataset), tokenizing and writing shards as rows arrive, with no "
        "copy in the datasets cache: for corpora larger than RAM or disk; the tokenizer trains on the first "
        "--tokenizer-sample characters",
    )
    dataset.add_argument(
        "--tokenizer-sample", type=int, metavar="CHARS",
        help=f"train the tokenizer on the first CHARS characters of the documents (default: all of them; "
        f"{STREAMING_TOKENIZER_SAMPLE:_} with --streaming)",
    )
    dataset.add_argument(
        "--num-proc", type=int,
        help="processes for Dataset.map (default: one, which already encodes on every core through tokenizers)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.retokenize:
        folder = Path(args.retokenize)
        with output_folder(folder):  # new tokens for the folder's own text: replacing them is the point
            return retokenize(folder)
    settings = check_options(args)
    out = Path(args.out or (paths.DATA_DIR if args.format == "bin" else paths.PROCESSED_DIR))
    started = time.perf_counter()
    with output_folder(out, refuse_prepared=not args.overwrite):
        if args.dataset:
            from . import documents  # datasets: imported only for --dataset

            docs = documents.open_documents(
                args.dataset, config_name=args.config_name, split=args.split, column=args.text_column,
                val_split=args.val_split, val_fraction=args.val_fraction, default_val_fraction=DEFAULT_VAL_FRACTION,
                streaming=args.streaming,
            )
            meta, written = prepare_documents(docs, out, settings)
        else:
            source = Source.open(args.input or corpus.NAME)
            meta, written = prepare(source, out, settings)
    seconds = time.perf_counter() - started
    print(f"source: {formats.describe_source(meta)}")
    print(f"  {meta['tokenizer_kind']} tokenizer, vocab size {meta['vocab_size']}, in {seconds:.1f}s"
          + rate(meta, seconds))
    for split in formats.SPLITS:
        entries = meta["splits"][split]["files"]
        files = str(out / entries[0]["tokens"])
        if len(entries) > 1:
            files += f" ... {entries[-1]['tokens']} ({len(entries)} shards)"
        print(f"  {split:<5} {meta['splits'][split]['num_tokens']:>12,} tokens  {files}")
    print(f"  wrote {len(written)} files into {out}: {', '.join(abridged(written, meta))}")
    return 0


@contextlib.contextmanager
def output_folder(out: Path, refuse_prepared: bool = False) -> Iterator[None]:
    """Hold `out`'s lock for the block: a second prepare there is refused, naming this one.

    Holding it, remove what a killed prepare left there (nobody alive is writing it), then
    refuse, if asked, a folder that already holds prepared data. When the block fails, the
    folders this call created are removed again if nothing but the lock is in them.
    """
    created = list(itertools.takewhile(lambda folder: not folder.exists(), (out, *out.parents)))
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            what = "is a file, not a folder" if out.is_file() else f"cannot be written ({exc.strerror or exc})"
            raise UserError(f"output folder {out} {what}: pass a writable folder with --out") from None
        with locks.FolderLock(out, "tinylm prepare"):
            try:
                stale = locks.remove_stale(out, formats.TEMP_PATTERNS)
                if stale:
                    print(f"removed {len(stale)} unfinished file(s) a stopped prepare left in {out}: "
                          + ", ".join(path.name for path in stale))
                held = formats.prepared_files(out) if refuse_prepared else []
                if held:
                    raise UserError(f"output folder {out} already holds {describe_prepared(out, held)}: pass "
                                    "--overwrite to replace it, or --out another folder")
                yield
            except BaseException:
                if created and {path.name for path in out.iterdir()} <= LOCK_FILES:
                    for name in LOCK_FILES:  # while still held: nobody can have taken the lock meanwhile
                        (out / name).unlink(missing_ok=True)
                raise
    except BaseException:
        for folder in created:  # deepest first; rmdir removes only an empty folder
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break
        raise


def describe_prepared(out: Path, names: list[str]) -> str:
    """What prepared data `out` holds, in a few words: from its meta.json, or else its files' names."""
    try:
        meta = formats.load_meta(out / paths.META_NAME)
    except UserError:  # no meta.json, or not one this tinylm reads
        return f"prepared data files ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"
    source = meta["source"] if isinstance(meta["source"], dict) else {}
    return (f"{meta['data_format']} data prepared from {source.get('dataset') or source.get('input')} with the "
            f"{meta['tokenizer_kind']} tokenizer (vocab size {meta['vocab_size']}) on {meta['created']}")


def rate(meta: dict, seconds: float) -> str:
    """The throughput: MB of text per second for a text input, documents per second for a dataset."""
    source = meta["source"]
    if seconds <= 0:
        return ""
    if "bytes" in source:
        return f" ({source['bytes'] / 1e6 / seconds:.2f} MB/s)"
    return f" ({sum(source['num_documents'].values()) / seconds:,.0f} documents/s)"


def abridged(names: list[str], meta: dict) -> list[str]:
    """`names` with each split's shards between its first and last shown as one "..."."""
    inner_shards = {entry["tokens"] for split in formats.SPLITS for entry in meta["splits"][split]["files"][1:-1]}
    shown: list[str] = []
    for name in names:
        if name not in inner_shards:
            shown.append(name)
        elif shown[-1] != "...":
            shown.append("...")
    return shown


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


def check_options(args: argparse.Namespace) -> Settings:
    """Refuse bad flag values before any work is done."""
    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        raise UserError(
            f"--val-fraction {args.val_fraction} is out of range: it must be between 0 and 1 "
            "(exclusive), e.g. 0.1 keeps the last 10% of the text for validation"
        )
    if not args.dataset:
        given = [flag for flag, value, default in (
            ("--config-name", args.config_name, None), ("--split", args.split, "train"),
            ("--text-column", args.text_column, "text"), ("--val-split", args.val_split, None),
            ("--streaming", args.streaming, False), ("--tokenizer-sample", args.tokenizer_sample, None),
            ("--num-proc", args.num_proc, None),
        ) if value != default]
        if given:
            raise UserError(f"{', '.join(given)} applies to --dataset only: --input reads one plain text; "
                            "drop it or read the data with --dataset")
    if args.val_split is not None and args.val_fraction is not None:
        raise UserError("--val-split and --val-fraction both say where validation comes from: pass one of them")
    for flag, value in (("--tokenizer-sample", args.tokenizer_sample), ("--num-proc", args.num_proc)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} is out of range: it must be 1 or more")
    if args.num_proc and args.streaming:
        raise UserError("--num-proc applies to a map over a whole dataset, not to --streaming, which tokenizes "
                        "as it reads (on every core through tokenizers): drop one of them")
    if args.shard_tokens is not None:
        if args.format != "bin":
            raise UserError(
                "--shard-tokens applies to --format bin only: the txt format keeps each split as one .txt file; "
                "drop --shard-tokens or use --format bin"
            )
        if args.shard_tokens < 1:
            raise UserError(
                f"--shard-tokens {args.shard_tokens} is out of range: a shard holds at least 1 token; "
                f"the default is {formats.DEFAULT_SHARD_TOKENS}"
            )
    shard_tokens = formats.DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens
    val_fraction = args.val_fraction if args.dataset or args.val_fraction is not None else DEFAULT_VAL_FRACTION
    sample = args.tokenizer_sample
    if sample is None and args.streaming:
        sample = STREAMING_TOKENIZER_SAMPLE
    settings = Settings(args.tokenizer, None, args.format, shard_tokens, val_fraction, sample, args.num_proc,
                        args.from_model, args.revision)
    if args.tokenizer == "pretrained":
        if not args.from_model:
            raise UserError("--tokenizer pretrained needs --from MODEL: the Hub id or folder of the model you "
                            "will fine-tune (model.init_from), e.g. --from gpt2")
        for flag, value in (("--vocab-size", args.vocab_size), ("--tokenizer-sample", args.tokenizer_sample)):
            if value is not None:
                raise UserError(f"{flag} shapes a tokenizer that prepare trains; --tokenizer pretrained uses the "
                                f"model's own: drop {flag}")
        return settings
    if args.from_model or args.revision:
        raise UserError(f"--from and --revision apply to --tokenizer pretrained; --tokenizer {args.tokenizer} is "
                        "trained on your text: drop them, or pass --tokenizer pretrained")
    if args.tokenizer == "char":
        if args.vocab_size is not None:
            raise UserError(
                "--vocab-size applies to --tokenizer bpe only: the char vocabulary is every character in the "
                "text; drop --vocab-size or add --tokenizer bpe"
            )
        return settings
    settings.vocab_size = DEFAULT_BPE_VOCAB_SIZE if args.vocab_size is None else args.vocab_size
    tok.check_bpe_vocab_size(settings.vocab_size)
    return settings


@dataclass
class Source:
    """The plain text to prepare: what meta.json records about it, and how to stream it."""

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
            refuse_dataset_input(path, files)
            if not files:
                raise UserError(f"input folder {path} holds no files: put .txt files in it, or pass a file")
        elif path.is_file():
            files = [path]
            refuse_dataset_input(path, files)
        else:
            raise UserError(
                f"input {path} does not exist: pass a text file, a folder of text files, or {corpus.NAME!r}"
            )
        size = sum(file.stat().st_size for file in files)
        if size == 0:
            raise UserError(f"input {path} is empty: pass a file with some text in it")
        return cls(str(path), files, size)

    def record(self, val_fraction: float) -> dict:
        """meta.json's `source`."""
        return {"input": self.name, "bytes": self.size, "val_fraction": val_fraction}

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




def refuse_dataset_input(path: Path, files: list[Path]) -> None:
    """A dataset passed to --input would be trained on as text (its JSON syntax, its bytes): say what to do."""
    if path.is_dir() and any((path / name).is_file() for name in paths.SAVED_DATASET_MARKERS):
        kind = "a datasets save_to_disk folder"
    else:
        suffixes = {f.suffix.lower() for f in files} & paths.DATASET_FILES.keys()
        kinds = sorted({paths.DATASET_FILES[suffix][1] for suffix in suffixes})
        if not kinds:
            return
        kind = f"{' and '.join(kinds)} data" if path.is_dir() else f"a {kinds[0]} file"
    raise UserError(
        f"input {path} is {kind}, not plain text: read it with --dataset {path} "
        "(--text-column NAME picks the column that holds the text, default 'text')"
    )


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
        with open(path, "rb") as handle:
            binary = b"\0" in handle.read(SNIFF_BYTES)
        if binary:  # NUL bytes: an archive, an image, a database... not text in some other encoding
            raise UserError(
                f"input {path} is a binary file, not text: pass a text file (a dataset file goes to --dataset)"
            ) from None
        raise UserError(
            f"input {path} is not UTF-8 text ({exc.reason}): convert it first, "
            f"e.g. iconv -f latin1 -t utf-8 {path} > {Path(path).stem}.utf8.txt"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read input {path}: {exc.strerror or exc}") from None


# --- plain text -----------------------------------------------------------------------------------


def prepare(source: Source, out: Path, settings: Settings) -> tuple[dict, list[str]]:
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


# --- datasets -------------------------------------------------------------------------------------


def prepare_documents(docs, out: Path, settings: Settings) -> tuple[dict, list[str]]:
    """Write tokenizer, token files and meta.json for a dataset's documents (`tinylm.documents.Documents`)."""
    from . import documents

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
                rows_seen += rows.num_rows
                bar.update(rows.num_rows)
        skipped = rows_seen - sum(counts.values())
        if skipped:
            print(f"note: {skipped:,} rows of {docs.spec} have no text (empty or null) and were left out")
        what = f"dataset {docs.spec}"
        fix = "use more (or longer) documents, or another --split / --val-split / --val-fraction"
        splits = {split: finished(writers[split], what, fix) for split in formats.SPLITS}
        record = {**docs.record, "num_documents": counts, "tokenizer_sample_chars": settings.tokenizer_sample}
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


# --- retokenizing edited txt data -----------------------------------------------------------------


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


if __name__ == "__main__":
    sys.exit(run_cli(main))
