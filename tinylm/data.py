"""Reading prepared data back: meta.json, the tokenizer, and memory-mapped token streams.

`resolve(processed_dir, data_format, tokenizer_kind)` finds the files the training
page's table names, checks them against meta.json (see `tinylm.formats`: the checks
cost a few `stat` calls, not a scan), and returns a `PreparedData`. Its splits are
`TokenStream`s: token files memory-mapped (never read whole into RAM), from which

- `train_batch` draws random-offset blocks whose offsets depend only on
  (seed, rank, step, micro_step), so any batch can be recomputed after a resume,
- `eval_dataset` serves a fixed, evenly spaced set of blocks as a `datasets.Dataset`.

`load_blocks` is the same data for other code: a `datasets.Dataset` of
non-overlapping blocks whose arrow buffers are the memory-mapped files themselves.
Reading never writes anything.
"""

from __future__ import annotations

import functools
import mmap
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from . import formats, paths
from . import tokenizer as tok
from .compat import dataset_over_table
from .config import DATA_FORMATS
from .errors import (
    BINARY_SHARDS_NOT_FOUND,
    CHAR_VOCAB_MISSING,
    META_PATH_MISMATCH,
    UserError,
    command_line,
)
from .formats import DTYPES, open_tokens

if TYPE_CHECKING:  # imported where used: datasets (and pandas with it) costs a command 0.3 s to import
    import datasets


def resolve(processed_dir: str, data_format: str, tokenizer_kind: str) -> "PreparedData":
    """The prepared data training should read, as the training page's table lays it out.

    txt: `<processed_dir>/meta.json` with train/val .txt (tokenized into .npy) or .npy files beside it.
    bin: `meta.json` with train.bin/val.bin in `processed_dir`; when that folder is named
    "processed" and holds no .bin files, its parent (data/) is used instead.
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}")
    folder = Path(processed_dir)
    meta_path = find_bin_meta(folder) if data_format == "bin" else find_txt_meta(folder)
    meta = formats.load_meta(meta_path)
    if meta["data_format"] != data_format:
        raise UserError(
            f"{meta_path} describes {meta['data_format']} data, but training.data_format is {data_format!r}: "
            f"set training.data_format = \"{meta['data_format']}\", or run `{prepare_command(data_format, folder)}`",
            anchor=META_PATH_MISMATCH,
        )
    if meta["tokenizer_kind"] != tokenizer_kind:
        raise UserError(
            f"{meta_path} was prepared with the {meta['tokenizer_kind']} tokenizer, but training asks for "
            f"{tokenizer_kind} (data.tokenizer / --tokenizer): pass --tokenizer {meta['tokenizer_kind']}, or run "
            f"`{prepare_command(data_format, folder)} --tokenizer {tokenizer_kind}`",
            anchor=CHAR_VOCAB_MISSING if tokenizer_kind == "char" else None,
        )
    return PreparedData(meta, meta_path)


def find_txt_meta(folder: Path) -> Path:
    """`<folder>/meta.json`, or a meta-path-mismatch error when only binary data is around."""
    meta_path = folder / paths.META_NAME
    if meta_path.is_file():
        return meta_path
    binary = [c for c in bin_candidates(folder) if has_bin_files(c)]
    if binary:
        raise UserError(
            f"training.data_format is \"txt\" but {meta_path} is missing; {binary[0]} holds binary data "
            f"(.bin files): set training.data_format = \"bin\", or run `{prepare_command('txt', folder)}`",
            anchor=META_PATH_MISMATCH,
        )
    raise UserError(f"{meta_path} is missing: prepare the text data first with `{prepare_command('txt', folder)}`")


def find_bin_meta(folder: Path) -> Path:
    """The meta.json beside the .bin files: in `folder`, or in its parent when `folder` is ".../processed"."""
    candidates = bin_candidates(folder)
    found = next((c for c in candidates if has_bin_files(c)), None)
    if found is None:
        where = " or ".join(str(c) for c in candidates)
        txt_meta = folder / paths.META_NAME
        also = (
            f", or set training.data_format = \"txt\" to use {txt_meta}"
            if txt_meta.is_file() else ""
        )
        raise UserError(
            f"no train.bin/val.bin in {where}: run `{prepare_command('bin', folder)}`{also}",
            anchor=BINARY_SHARDS_NOT_FOUND,
        )
    meta_path = found / paths.META_NAME
    if not meta_path.is_file():
        raise UserError(
            f"found .bin files in {found} but no {meta_path} to describe them: re-run "
            f"`{prepare_command('bin', found)}` (it writes meta.json beside the .bin files)",
            anchor=META_PATH_MISMATCH,
        )
    return meta_path


def prepare_command(data_format: str, folder: Path) -> str:
    """The `tinylm prepare` command that writes `data_format` data where training looks in `folder`."""
    command = ["tinylm", "prepare", "--format", data_format]
    # prepare's default --out: data/ for bin (which training also finds from data/processed), data/processed for txt.
    defaults = {Path(paths.PROCESSED_DIR)} | ({Path(paths.DATA_DIR)} if data_format == "bin" else set())
    return command_line(*command) if folder in defaults else command_line(*command, "--out", folder)


def bin_candidates(folder: Path) -> list[Path]:
    # The training page: bin data for data/processed is looked for in data/ as well.
    return [folder, folder.parent] if folder.name == Path(paths.PROCESSED_DIR).name else [folder]


def has_bin_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.bin"))


class PreparedData:
    """A prepared dataset: its meta.json, its tokenizer and its train/val token streams."""

    def __init__(self, meta: dict, meta_path: Path):
        self.meta = meta
        self.meta_path = meta_path
        self.tokenizer_path = meta_path.parent / meta["tokenizer_file"]
        self.vocab_size: int = meta["vocab_size"]
        self.tokenizer_kind: str = meta["tokenizer_kind"]
        # A char vocabulary that is missing or does not match is the training page's "char vocab missing".
        anchor = CHAR_VOCAB_MISSING if self.tokenizer_kind == "char" else None
        source = f" --from {meta['tokenizer_from']['source']}" if meta.get("tokenizer_from") else ""
        rerun = f"re-run `{prepare_command(meta['data_format'], self.folder)} --tokenizer {self.tokenizer_kind}{source}`"
        if not self.tokenizer_path.is_file():
            raise UserError(
                f"{self.tokenizer_path} (the {self.tokenizer_kind} vocabulary named by {meta_path}) is missing: "
                f"{rerun}",
                anchor=anchor,
            )
        self._tokenizer = tok.load(self.tokenizer_path)
        found = (tok.kind_of(self._tokenizer), len(self._tokenizer))
        # A pretrained model's tokenizer is whatever the model uses: only its size is known.
        expected_kind = found[0] if self.tokenizer_kind == "pretrained" else self.tokenizer_kind
        if found != (expected_kind, self.vocab_size):
            raise UserError(
                f"{self.tokenizer_path} is a {found[0]} tokenizer of {found[1]} tokens, but {meta_path} says "
                f"{self.tokenizer_kind} with vocab_size {self.vocab_size}: they come from different prepare runs; "
                f"{rerun}",
                anchor=anchor,
            )
        if formats.sha256_of(self.tokenizer_path) != meta["tokenizer_sha256"]:
            raise UserError(
                f"{self.tokenizer_path} changed after {meta_path} was written (its SHA-256 differs): the token ids "
                f"no longer mean what they did; {rerun}",
                anchor=anchor,
            )

    @property
    def folder(self) -> Path:
        return self.meta_path.parent

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.meta["dtype"]]

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer the data was prepared with (a `transformers` tokenizer)."""
        return self._tokenizer

    def split(self, name: str) -> "TokenStream":
        """The "train" or "val" split: its token files checked against meta.json and memory-mapped."""
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        files = [self.token_file(entry) for entry in self.meta["splits"][name]["files"]]
        for path, entry in zip(files, self.meta["splits"][name]["files"]):
            formats.check_token_file(path, entry, self.dtype, self.meta_path)
        return TokenStream(files, self.meta["dtype"])

    def token_file(self, entry: dict) -> Path:
        """The file holding one entry's tokens; for txt, refused if its text was edited since."""
        tokens = self.folder / entry["tokens"]
        text = self.folder / entry["text"] if "text" in entry else None
        rerun = prepare_command(self.meta["data_format"], self.folder)
        if text is not None and text.is_file() and formats.text_changed(text, entry):
            raise UserError(
                f"{text} changed after its tokens ({tokens.name}) were made: run `tinylm prepare --retokenize "
                f"{self.folder}` to tokenize the edited text, or `{rerun}` to prepare afresh"
            )
        if not tokens.is_file():
            missing = f"{text} and {tokens} are" if text is not None and not text.is_file() else f"{tokens} is"
            raise UserError(
                f"{missing} missing (listed in {self.meta_path}): re-run `{rerun}`",
                anchor=BINARY_SHARDS_NOT_FOUND if self.meta["data_format"] == "bin" else None,
            )
        return tokens


class TokenStream:
    """The tokens of one split: one or more token files, read as one memory-mapped stream.

    The files are held open, so the stream keeps reading the very files it checked even if
    `prepare` atomically replaces them meanwhile. Each read maps them afresh and unmaps them
    when done (as nanoGPT's get_batch does): pages a long run touches at random never pile up
    in resident memory, which therefore does not grow with the size of the data.
    """

    def __init__(self, files: list[Path], dtype: str):
        self.files = [Path(f) for f in files]
        self.dtype = dtype
        arrays = [open_tokens(f, DTYPES[dtype]) for f in self.files]
        self.offsets = [getattr(a, "offset", 0) for a in arrays]  # bytes before the tokens: a .npy header
        self.lengths = [len(a) for a in arrays]
        self.ends = np.cumsum(self.lengths, dtype=np.int64)  # stream position where each file ends
        self.begins = self.ends - self.lengths  # ... and where it begins
        self.num_tokens = sum(self.lengths)
        self.handles = [open(f, "rb") for f in self.files]
        weakref.finalize(self, close_all, self.handles)

    def __reduce__(self):
        # Pickle (for DataLoader workers, or datasets' fingerprint hashing) by path: never the tokens.
        return TokenStream, (self.files, self.dtype)

    def __repr__(self) -> str:
        return f"TokenStream({', '.join(map(str, self.files))}; {self.num_tokens} tokens)"

    def num_starts(self, block_size: int) -> int:
        """How many block offsets fit; a UserError naming the files when not even one block does."""
        if self.num_tokens < block_size + 1:
            names = ", ".join(map(str, self.files))
            raise UserError(
                f"{names} holds {self.num_tokens} tokens, fewer than one block (model.block_size + 1 = "
                f"{block_size + 1}): use a smaller model.block_size, or prepare more text "
                "(or a larger --val-fraction for the validation split)"
            )
        return self.num_tokens - block_size

    def mapped(self, index: int) -> np.ndarray:
        """File `index`'s tokens, freshly memory-mapped; unmapped again once the array is dropped.

        A plain mmap viewed by np.frombuffer, not np.memmap: a batch maps a file per shard it
        touches, and np.memmap's Python-level construction and indexing cost ~3x as much.
        """
        if not self.lengths[index]:  # mmap cannot map an empty file
            return np.empty(0, dtype=DTYPES[self.dtype])
        mapping = mmap.mmap(self.handles[index].fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mapping, dtype=DTYPES[self.dtype], count=self.lengths[index], offset=self.offsets[index])

    def blocks(self, starts: np.ndarray, block_size: int) -> torch.Tensor:
        """The tokens [start, start + block_size] for each start: int64, shape (len(starts), block_size + 1).

        The files are one stream: a block may run from the end of one file into the next.
        """
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size and (starts.min() < 0 or starts.max() >= self.num_starts(block_size)):
            raise IndexError(f"block starts must lie in [0, {self.num_starts(block_size)}) for {self!r}")
        tokens = np.empty((len(starts), block_size + 1), dtype=DTYPES[self.dtype])
        first = np.searchsorted(self.ends, starts, side="right")  # the file holding each block's first token
        last = np.searchsorted(self.ends, starts + block_size, side="right")  # ... and its last
        inside = first == last
        # Blocks inside one file: one mapping and one fancy-indexing read per file, however many blocks.
        for index in np.unique(first[inside]):
            rows = inside & (first == index)
            offsets = starts[rows] - self.begins[index]
            tokens[rows] = self.mapped(index)[offsets[:, None] + np.arange(block_size + 1)]
        # Blocks that run on into the next file(s), rare unless the files are short: joined from their pieces.
        for row in np.flatnonzero(~inside):
            start, end = starts[row], starts[row] + block_size + 1
            tokens[row] = np.concatenate([
                self.mapped(index)[max(start - self.begins[index], 0) : end - self.begins[index]]
                for index in range(first[row], last[row] + 1)
            ])
        return torch.from_numpy(tokens.astype(np.int64))


def close_all(handles: list) -> None:
    for handle in handles:
        handle.close()


def train_batch(stream: TokenStream, *, block_size: int, batch_size: int, seed: int, step: int, slot: int) -> torch.Tensor:
    """`batch_size` blocks at random offsets: int64, shape (batch_size, block_size + 1).

    Each optimizer step draws one global batch from a generator seeded with (seed, step)
    alone; `slot` (= rank * grad_accum_steps + micro_step) picks this micro-batch's share.
    So a resumed run redraws exactly the batches it would have drawn, every rank and
    micro-step gets different blocks, and 1 x batch 8, 4 x batch 2 and 2 processes x
    batch 4 all see the same blocks in each step.
    """
    rng = np.random.default_rng([seed, step])
    # Generator.integers draws sequentially, so the first n values don't depend on size.
    starts = rng.integers(0, stream.num_starts(block_size), size=(slot + 1) * batch_size)
    return stream.blocks(starts[slot * batch_size :], block_size)


class TrainBatches:
    """This process's micro-batches of each optimizer step (`train_batch`), fetched a step ahead.

    `prefetch(step)`, called once a step's work is queued, reads the next step's blocks (and on a
    GPU starts their copies to the device) while the device still runs the step; `take(step)`
    hands them over, or reads them now when none were fetched for that step.
    """

    def __init__(self, stream: TokenStream, *, block_size: int, batch_size: int, seed: int, grad_accum_steps: int,
                 process_index: int, device: torch.device):
        self.stream, self.block_size, self.batch_size, self.seed = stream, block_size, batch_size, seed
        self.grad_accum_steps, self.process_index, self.device = grad_accum_steps, process_index, device
        self._ahead: tuple[int | None, list[torch.Tensor]] = (None, [])

    def fetch(self, step: int) -> list[torch.Tensor]:
        """The micro-batches of optimizer step `step`, on their way to the device."""
        batches = []
        for micro_step in range(self.grad_accum_steps):
            blocks = train_batch(self.stream, block_size=self.block_size, batch_size=self.batch_size, seed=self.seed,
                                 step=step, slot=self.process_index * self.grad_accum_steps + micro_step)
            if self.device.type == "cuda":
                # From page-locked memory the copy is asynchronous: it overlaps the running step.
                blocks = blocks.pin_memory().to(self.device, non_blocking=True)
            batches.append(blocks)
        return batches

    def prefetch(self, step: int) -> None:
        self._ahead = (step, self.fetch(step))

    def take(self, step: int) -> list[torch.Tensor]:
        ahead_step, batches = self._ahead
        self._ahead = (None, [])
        return batches if ahead_step == step else self.fetch(step)


def eval_starts(num_tokens: int, block_size: int, num_blocks: int) -> np.ndarray:
    """`num_blocks` evenly spaced block offsets, never overlapping (fewer if the split is short)."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
    count = min(num_blocks, num_tokens // (block_size + 1))
    # Spacing >= block_size + 1 when count is clamped, and floor keeps it so: no token is counted twice.
    return np.floor(np.linspace(0, num_tokens - (block_size + 1), count)).astype(np.int64)


def eval_dataset(stream: TokenStream, *, block_size: int, num_blocks: int) -> datasets.Dataset:
    """A fixed set of evenly spaced blocks as a `datasets.Dataset`: item i is {"input_ids": (block_size + 1,) int64}.

    The dataset holds only the block offsets (in memory, so nothing is cached on disk and a
    rewritten token file can never come back stale); its transform slices the memory map.
    """
    import datasets

    stream.num_starts(block_size)  # a clear error when the split is shorter than one block
    starts = eval_starts(stream.num_tokens, block_size, num_blocks)
    offsets = datasets.Dataset.from_dict({"start": starts})
    return offsets.with_transform(functools.partial(slice_blocks, stream=stream, block_size=block_size))


def eval_loader(stream: TokenStream, *, block_size: int, num_blocks: int, batch_size: int) -> DataLoader:
    """The `eval_dataset` blocks in batches, always in the same order."""
    return DataLoader(eval_dataset(stream, block_size=block_size, num_blocks=num_blocks), batch_size=batch_size,
                      shuffle=False)


def slice_blocks(batch: dict, *, stream: TokenStream, block_size: int) -> dict:
    """The eval dataset's transform: block offsets -> {"input_ids": int64 blocks}."""
    return {"input_ids": stream.blocks(np.asarray(batch["start"], dtype=np.int64), block_size)}


def newer_other_format(prepared: PreparedData, processed_dir: str) -> Path | None:
    """The other format's meta.json where training would look for it, when it was written after this data's.

    After `prepare --format txt --input mine.txt`, training with the default bin format would
    otherwise read the older data/*.bin without a word.
    """
    other = "txt" if prepared.meta["data_format"] == "bin" else "bin"
    folder = Path(processed_dir)
    try:
        meta_path = find_bin_meta(folder) if other == "bin" else find_txt_meta(folder)
    except UserError:
        return None
    newer = meta_path.stat().st_mtime_ns > prepared.meta_path.stat().st_mtime_ns
    return meta_path if newer and meta_path.resolve() != prepared.meta_path.resolve() else None


def newer_data_warning(prepared: PreparedData, processed_dir: str) -> str | None:
    """What to tell a run about to train on `prepared` when the other format's data is newer (else None)."""
    newer = newer_other_format(prepared, processed_dir)
    if newer is None:
        return None
    used = prepared.meta["data_format"]
    other = "txt" if used == "bin" else "bin"
    return (f"{newer} ({other} data) was prepared after {prepared.meta_path}, which training reads "
            f"(training.data_format = \"{used}\"): to train on the newer data, pass --data-format {other} "
            f"(training.data_format = \"{other}\")")


def load_blocks(folder: str | Path = paths.DATA_DIR, *, block_size: int, split: str = "train") -> datasets.Dataset:
    """A prepared split as a `datasets.Dataset` of non-overlapping `block_size`-token blocks, copying nothing.

    `folder` holds meta.json (either format). Row i of each token file's part is tokens
    [i * block_size, (i + 1) * block_size) of that file; the tokens after a file's last whole
    block are left out, as transformers' run_clm leaves out the end of its data. Columns:
    `input_ids` and `labels`, the same blocks (GPT2LMHeadModel shifts the labels itself), so
    transformers' `Trainer` with its default collator, or a torch `DataLoader`, can use it as it
    is; `with_format("torch")` gives int64 tensors. The arrow arrays are views of the memory-mapped
    files: nothing is read until a row is, and nothing is written to the `datasets` cache.
    """
    import pyarrow as pa

    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    meta_path = Path(folder) / paths.META_NAME
    prepared = PreparedData(formats.load_meta(meta_path), meta_path)
    stream = prepared.split(split)  # checks every file against meta.json
    value_type = pa.from_numpy_dtype(prepared.dtype)
    chunks = []
    for path in stream.files:
        tokens = open_tokens(path, prepared.dtype)
        count = len(tokens) // block_size * block_size
        if count:
            values = pa.Array.from_buffers(value_type, count, [None, pa.py_buffer(tokens[:count])])
            chunks.append(pa.FixedSizeListArray.from_arrays(values, block_size))
    if not chunks:
        raise UserError(f"no file of the {split} split ({', '.join(map(str, stream.files))}) holds a whole block "
                        f"of {block_size} tokens: use a smaller block_size")
    blocks = pa.chunked_array(chunks)
    entries = prepared.meta["splits"][split]["files"]
    return dataset_over_table(pa.table({"input_ids": blocks, "labels": blocks}),
                              fingerprint_of=[entry["sha256"] for entry in entries] + [block_size])
