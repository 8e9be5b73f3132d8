"""`tinylm prepare`: the command. Flags, their checks, the output folder's lock, and what it prints.

    tinylm prepare [--input PATH|shakespeare | --dataset NAME_OR_PATH ... [--weights W,W,...]]
                   [--tokenizer char|bpe] [--vocab-size N] [--format bin|txt] [--shard-tokens N] [--out DIR]
                   [--overwrite] [--val-fraction F]
    tinylm prepare --retokenize DIR

The work is elsewhere: `plain_text` reads an `--input`, `documents` a `--dataset`, `mixing` several, `encoding`
trains the tokenizer and writes the token files, `formats` owns the files and meta.json. Prepare
holds the output folder's lock while it works there (`output_folder`), and refuses a folder that
already holds prepared data unless `--overwrite`, as training refuses a run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from pathlib import Path
from typing import Iterator

from . import corpus, formats, locks, paths, startup
from . import tokenizer as tok
from .config import DATA_FORMATS
from .encoding import Settings, prepare_documents, prepare_text, retokenize
from .errors import UserError, run_cli
from .plain_text import Source

DEFAULT_BPE_VOCAB_SIZE = 4096
DEFAULT_VAL_FRACTION = 0.1
STREAMING_TOKENIZER_SAMPLE = 100_000_000  # characters the tokenizer trains on by default when streaming
LOCK_FILES = {locks.LOCK_NAME, locks.OWNER_NAME}  # what holding the output folder's lock puts there


class Once(argparse.Action):
    """Store a flag's value, refusing a second one: argparse would keep the last and silently drop the first."""

    WAY_ON = {
        "input": "prepare reads one input per run; to read several text files, put them in one folder and pass that",
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
        "--dataset", action="append",
        help="a Hugging Face dataset: a Hub id (e.g. roneneldan/TinyStories), a .jsonl/.json/.csv/.parquet/.arrow "
        "file, a folder of such files, or a save_to_disk folder; each row is a document. Repeat it to mix several "
        "datasets (see --weights)",
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
    add_dataset_options(parser)
    return parser.parse_args(argv)


def add_dataset_options(parser: argparse.ArgumentParser) -> None:
    """The flags that only a --dataset reads, in their own group of the help."""
    dataset = parser.add_argument_group("--dataset options")
    dataset.add_argument(
        "--weights", metavar="W,W,...",
        help="with several --dataset: each one's share of the documents, in --dataset order (e.g. 0.7,0.3; scaled "
        "to sum to 1; default: equal shares); the mix stops when one dataset runs out",
    )
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.retokenize:
        folder = Path(args.retokenize)
        with output_folder(folder):  # new tokens for the folder's own text: replacing them is the point
            return retokenize(folder)
    settings = check_options(args)
    weights = None
    if args.dataset and len(args.dataset) > 1:
        from . import mixing  # datasets: imported only for --dataset

        weights = mixing.parse_weights(args.weights, args.dataset)
    out = Path(args.out or (paths.DATA_DIR if args.format == "bin" else paths.PROCESSED_DIR))
    started = time.perf_counter()
    with output_folder(out, refuse_prepared=not args.overwrite):
        if args.dataset:
            from . import documents, mixing

            options = dict(config_name=args.config_name, split=args.split, column=args.text_column,
                           val_split=args.val_split, val_fraction=args.val_fraction,
                           default_val_fraction=DEFAULT_VAL_FRACTION, streaming=args.streaming)
            if weights:
                docs = mixing.open_mix(args.dataset, weights, **options)
            else:
                docs = documents.open_documents(args.dataset[0], **options)
            meta, written = prepare_documents(docs, out, settings)
        else:
            source = Source.open(args.input or corpus.NAME)
            meta, written = prepare_text(source, out, settings)
    seconds = time.perf_counter() - started
    print(f"source: {formats.describe_source(meta)}")
    for line in formats.describe_mix(meta["source"]):
        print(f"  {line}")
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
    return (f"{meta['data_format']} data prepared from {formats.source_name(source)} with the "
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


def check_options(args: argparse.Namespace) -> Settings:
    """Refuse bad flag values before any work is done; the settings they make."""
    check_source_flags(args)
    check_shard_flags(args)
    shard_tokens = formats.DEFAULT_SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens
    val_fraction = args.val_fraction if args.dataset or args.val_fraction is not None else DEFAULT_VAL_FRACTION
    sample = args.tokenizer_sample
    if sample is None and args.streaming:
        sample = STREAMING_TOKENIZER_SAMPLE
    settings = Settings(args.tokenizer, None, args.format, shard_tokens, val_fraction, sample, args.num_proc,
                        args.from_model, args.revision)
    return with_tokenizer_flags(args, settings)


def check_source_flags(args: argparse.Namespace) -> None:
    """What to read (--input, one --dataset or a mix) and where validation comes from."""
    if args.val_fraction is not None and not 0.0 < args.val_fraction < 1.0:
        raise UserError(
            f"--val-fraction {args.val_fraction} is out of range: it must be between 0 and 1 "
            "(exclusive), e.g. 0.1 keeps the last 10% of the text for validation"
        )
    if args.weights is not None and len(args.dataset or []) < 2:
        raise UserError(f"--weights {args.weights} sets the shares of a mix of several --dataset, but this run reads "
                        f"{'one dataset' if args.dataset else 'one --input'}: drop --weights, or add the datasets "
                        "to mix (--dataset A --dataset B --weights 0.7,0.3)")
    repeated = sorted({spec for spec in args.dataset or [] if args.dataset.count(spec) > 1})
    if repeated:
        raise UserError(f"--dataset {repeated[0]} is given twice: a mix reads each dataset once; to take more of it, "
                        "give it a larger share with --weights")
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


def check_shard_flags(args: argparse.Namespace) -> None:
    """--shard-tokens: bin only, at least one token a shard."""
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


def with_tokenizer_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """`settings` with the tokenizer flags checked (--tokenizer, --vocab-size, --from, --revision) and applied."""
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


if __name__ == "__main__":
    startup.command_process()
    sys.exit(run_cli(main))
