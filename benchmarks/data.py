"""Data pipeline benchmark: prepare (text, datasets) throughput and memory; batch fetch time; memory vs data size.

    python benchmarks/data.py [--only prepare datasets fetch view rss] [--prepare-mb 50] [--dataset-mb 10 40]
                              [--rss-tokens 1000000 200000000] [--rounds 7]

1. `tinylm prepare` on a large text (the built-in corpus repeated to `--prepare-mb` MB),
   sharded, for the char and the BPE tokenizer, each run in a fresh process: throughput
   (MB of input per second, end to end: tokenizer training, encoding, writing), CPU
   utilisation (user + sys CPU time over wall time: 2.0 means both of 2 cores busy the
   whole time) and peak resident memory (VmHWM) against a run on a tiny input. The
   baseline, alternated with it, is the same run with tokenizers' parallelism off
   (TOKENIZERS_PARALLELISM=false).
2. Prepare from datasets: the same corpus text as documents (split at blank lines into
   speeches, 20 speeches a row, column "text") in a Parquet file of row groups of 1000
   rows, at each of the `--dataset-mb` sizes, and the same documents as one plain text
   (joined by blank lines). Each run in a fresh process with an empty HF_DATASETS_CACHE
   of its own and TOKENIZERS_PARALLELISM unset, char tokenizer, several shards: (a)
   `--input text.txt`, the baseline; (b) `--dataset documents.parquet` (Dataset.map into the
   cache); (c) the same with `--streaming` (IterableDataset); (d) (b) again on (b)'s
   cache, which holds its tokenizer and tokens. Throughput (MB of text per second, end to
   end), wall time against (a)'s, peak resident memory, and how much each variant's peak
   grows from the smallest size to the largest (text stays flat; for streaming see
   docs/data-pipeline.md#datasets-throughput-and-memory).
3. Batch fetch: `data.train_batch` against nanoGPT's `get_batch` (a fresh np.memmap,
   one slice per row, torch.stack), alternated in rounds in this process, on a
   synthetic .bin of the largest `--rss-tokens` (200M), and on the same tokens as 20
   shards; set against one training step of the default model.
4. Dataset view fetch: `data.load_blocks(block_size=256).with_format("numpy")`, the
   memory-mapped token file as a `datasets.Dataset`, batches of 64 random blocks
   (`ds[indices]["input_ids"]`) against the baseline, the same 64 blocks sliced from an
   np.memmap of the file (mapped once, as the Dataset is), np.stack-ed and made int64 (the
   numpy format's integer dtype); alternated in rounds on the same indices, checked equal once.
5. Resident memory of a fresh process that resolves a synthetic .bin, draws 1000
   training batches and runs the eval dataset, at two data sizes and in 20 shards.

The synthetic data (sections 3 to 5) is written through `tinylm.formats`, as prepare writes
its own, so it is always data of the current format. `--only` runs some sections alone; every
size is a flag, so a smoke run can be small.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers

from tinylm import config, corpus, data, formats, model
from tinylm import tokenizer as tok

SECTIONS = ("prepare", "datasets", "fetch", "view", "rss")
ROUNDS = 7
BATCHES_PER_ROUND = 200
SYNTHETIC_PIECE = 10_000_000  # tokens generated (and written) at a time
SYNTHETIC_VAL_TOKENS = 100_000
SHARDS = 20  # the sharded copy of the largest data: 20 shards (of 10M tokens for the default 200M)
VOCAB_CHARS = "".join(chr(c) for c in range(32, 127))  # a char tokenizer of 97 ids for the synthetic data
SPEECHES_PER_ROW = 20  # a document of the Parquet file: 20 speeches, ~3 KB of text
ROW_GROUP_ROWS = 1000  # Parquet row group: ~3 MB of text, what a stream reads at a time
DATASET_SHARDS = 4  # --shard-tokens for section 2: about this many train shards at the smallest size
VIEW_BLOCK, VIEW_BATCH = 256, 64


# `python -m tinylm.prepare ARGS` that prints its own peak resident memory (VmHWM) on exit. Not
# ru_maxrss: a child started by (v)fork inherits its parent's high-water mark.
REPORT_PEAK = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print(*(l for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr))\n"
    "runpy.run_module('tinylm.prepare', run_name='__main__')\n"
)
SINGLE_THREADED = {"TOKENIZERS_PARALLELISM": "false"}
PARALLEL = {"TOKENIZERS_PARALLELISM": None}  # unset: tokenizers' default, every core


def run_prepare(args: list[str], env: dict[str, str | None]) -> dict[str, float]:
    """Run prepare in a fresh process: its wall time, CPU time (user + sys) and peak RSS in MiB.

    `env` is laid over this process's environment; a variable set to None is removed from it.
    """
    environment = {name: value for name, value in {**os.environ, **env}.items() if value is not None}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", REPORT_PEAK, *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=environment)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own CPU times
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"prepare {args} failed:\n{stderr}")
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", stderr).group(1)) / 1024
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak": peak}


def prepare_at_scale(workdir: Path, megabytes: float) -> None:
    text = corpus.text()
    repeats = int(megabytes * 1e6 // len(text.encode("utf-8"))) + 1
    source = workdir / "large.txt"
    with open(source, "w", encoding="utf-8") as handle:
        handle.writelines(text + "\n" for _ in range(repeats))
    tiny = workdir / "tiny.txt"
    tiny.write_text(text[:20_000], encoding="utf-8")
    size = source.stat().st_size / 1e6
    shard_tokens = 10_000_000
    print(f"prepare on {size:.1f} MB of text, --shard-tokens {shard_tokens}, a fresh process per run, "
          f"best of 2 alternating with tokenizers' parallelism off ({os.cpu_count()} cores):")
    for kind in ("char", "bpe"):
        flags = ["--tokenizer", kind, "--shard-tokens", str(shard_tokens), "--out", str(workdir / kind),
                 "--overwrite"]  # the same folder, run after run
        baseline_peak = run_prepare(["--input", str(tiny), *flags], PARALLEL)["peak"]
        runs: dict[str, list[dict]] = {"parallel": [], "single": []}
        for _ in range(2):
            runs["parallel"].append(run_prepare(["--input", str(source), *flags], PARALLEL))
            runs["single"].append(run_prepare(["--input", str(source), *flags], SINGLE_THREADED))
        best = {variant: min(results, key=lambda r: r["wall"]) for variant, results in runs.items()}
        ours, single = best["parallel"], best["single"]
        print(f"  {kind:<4} {size / ours['wall']:5.2f} MB/s ({ours['wall']:.1f}s), CPU {ours['cpu']:.1f}s = "
              f"{ours['cpu'] / ours['wall']:.2f} x wall, peak RSS {ours['peak']:.0f} MiB "
              f"(tiny input: {baseline_peak:.0f} MiB) | parallelism off: {size / single['wall']:5.2f} MB/s, "
              f"CPU {single['cpu'] / single['wall']:.2f} x wall, peak {single['peak']:.0f} MiB "
              f"| speed-up {single['wall'] / ours['wall']:.2f}x")
    for path in (source, tiny):
        path.unlink()
    for kind in ("char", "bpe"):
        shutil.rmtree(workdir / kind)


def document_files(folder: Path, megabytes: float) -> tuple[Path, Path]:
    """The corpus repeated to `megabytes` MB as documents: a Parquet file (column "text") and the same text.

    The corpus is split at blank lines into speeches, SPEECHES_PER_ROW speeches a row; the
    plain text is the rows joined by blank lines, so both hold the same characters.
    """
    folder.mkdir(parents=True, exist_ok=True)
    speeches = itertools.cycle(speech for speech in corpus.text().split("\n\n") if speech.strip())
    rows, total = [], 0
    while total < megabytes * 1e6:
        rows.append("\n\n".join(itertools.islice(speeches, SPEECHES_PER_ROW)))
        total += len(rows[-1].encode("utf-8")) + 2
    text, parquet = folder / "text.txt", folder / "documents.parquet"
    text.write_text("\n\n".join(rows) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"text": rows}), parquet, row_group_size=ROW_GROUP_ROWS)
    return text, parquet


DATASET_VARIANTS = {  # section 2's runs, in the order they run: (source, extra flags, whose cache it reuses)
    "(a) --input text.txt": ("text", [], None),
    "(b) --dataset documents.parquet": ("parquet", [], None),
    "(c) --dataset ... --streaming": ("parquet", ["--streaming"], None),
    "(d) --dataset again, (b)'s cache": ("parquet", [], "(b) --dataset documents.parquet"),
}


def prepare_from_datasets(workdir: Path, sizes: list[float]) -> None:
    shard_tokens = max(int(min(sizes) * 1e6 * 0.9 / DATASET_SHARDS), 1000)  # chars = tokens, 90% of them train
    print(f"prepare from datasets: the corpus as documents of {SPEECHES_PER_ROW} speeches (Parquet, row groups of "
          f"{ROW_GROUP_ROWS} rows) or as one text, char tokenizer, --shard-tokens {shard_tokens}; one run each, "
          f"in a fresh process with an empty HF_DATASETS_CACHE and TOKENIZERS_PARALLELISM unset "
          f"({os.cpu_count()} cores):")
    print(f"  {'text':>8}  {'variant':<32} {'MB/s':>6} {'wall s':>7} {'vs (a)':>7} {'peak RSS MiB':>13}  train shards")
    peaks: dict[str, list[float]] = {variant: [] for variant in DATASET_VARIANTS}
    for megabytes in sizes:
        folder = workdir / f"documents-{megabytes:g}"
        inputs = dict(zip(("text", "parquet"), document_files(folder, megabytes)))
        size = inputs["text"].stat().st_size / 1e6
        caches: dict[str, Path] = {}
        results: dict[str, dict] = {}
        for index, (variant, (source, extra, reused)) in enumerate(DATASET_VARIANTS.items()):
            cache = caches[reused] if reused else Path(tempfile.mkdtemp(prefix="hf-cache-", dir=folder))
            caches[variant] = cache
            out = folder / f"out-{index}"
            flags = ["--input" if source == "text" else "--dataset", str(inputs[source]), "--tokenizer", "char",
                     "--shard-tokens", str(shard_tokens), "--out", str(out), *extra]
            result = run_prepare(flags, {"HF_DATASETS_CACHE": str(cache), **PARALLEL})
            meta = formats.load_meta(out / "meta.json")
            result["shards"] = len(meta["splits"]["train"]["files"])
            result["tokens"] = tuple(meta["splits"][split]["num_tokens"] for split in formats.SPLITS)
            results[variant] = result
            peaks[variant].append(result["peak"])
            shutil.rmtree(out)
        written = {results[variant]["tokens"] for variant, (source, _, _) in DATASET_VARIANTS.items()
                   if source == "parquet"}
        assert len(written) == 1, f"the --dataset runs wrote different (train, val) token counts: {written}"
        baseline = results["(a) --input text.txt"]["wall"]
        for index, (variant, result) in enumerate(results.items()):
            label = f"{size:.1f} MB" if index == 0 else ""
            print(f"  {label:>8}  {variant:<32} {size / result['wall']:6.2f} {result['wall']:7.1f} "
                  f"{result['wall'] / baseline:6.2f}x {result['peak']:13.0f}  {result['shards']}")
        shutil.rmtree(folder)
    if len(sizes) > 1:
        growth = ", ".join(f"{variant[:3]} {peak[-1] - peak[0]:+.0f} MiB" for variant, peak in peaks.items())
        print(f"  peak RSS growth from {min(sizes):g} to {max(sizes):g} MB: {growth}")


def synthetic_data(folder: Path, num_tokens: int, shard_tokens: int | None = None,
                   vocab_size: int = len(VOCAB_CHARS) + 2) -> Path:
    """A bin-format prepared dataset of random char ids: `num_tokens` of train (in shards of
    `shard_tokens` if given: train_000.bin, ...), a small val.bin. The same seed gives the same
    tokens, however they are sharded. Written through `tinylm.formats`, as prepare writes.
    A `vocab_size` beyond VOCAB_CHARS' adds made-up characters (for GPT-2's 50,304 ids, say)."""
    tokenizer = tok.train_char([vocab_chars(vocab_size)])
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = formats.token_dtype(vocab)
    rng = np.random.default_rng(0)
    with formats.staging(folder) as staging:
        tok.save(tokenizer, staging)
        splits = {}
        for split, count in {"train": num_tokens, "val": SYNTHETIC_VAL_TOKENS}.items():
            size = shard_tokens if split == "train" and shard_tokens else count
            writer = formats.SplitWriter(staging, split, "bin", dtype, size)
            for begin in range(0, count, SYNTHETIC_PIECE):
                writer.write(rng.integers(0, vocab, min(SYNTHETIC_PIECE, count - begin), dtype=formats.DTYPES[dtype]))
            splits[split] = {"num_tokens": count, "files": writer.finish()}
        source = {"input": f"synthetic: uniform random ids of a {vocab}-token char vocabulary",
                  "val_fraction": SYNTHETIC_VAL_TOKENS / (num_tokens + SYNTHETIC_VAL_TOKENS)}
        meta = formats.build_meta(staging, "bin", "char", dtype, source, splits)
        formats.publish(staging, folder, meta)
    return folder


def vocab_chars(vocab_size: int) -> str:
    """`vocab_size` - 2 characters (a char tokenizer adds <|endoftext|> and [UNK]): VOCAB_CHARS, then
    code points from U+0100 on, which stay below the surrogates (U+D800) for any vocabulary up to 55,000."""
    extra = vocab_size - 2 - len(VOCAB_CHARS)
    return VOCAB_CHARS[: vocab_size - 2] + "".join(chr(0x100 + i) for i in range(max(extra, 0)))


def synthetic(workdir: Path, num_tokens: int, shards: int = 1) -> Path:
    """`synthetic_data` of `num_tokens` train tokens in `shards` files, written once per run and reused."""
    folder = workdir / (f"synthetic-{num_tokens}" + (f"-in-{shards}" if shards > 1 else ""))
    if not (folder / "meta.json").is_file():
        synthetic_data(folder, num_tokens, -(-num_tokens // shards) if shards > 1 else None)
    return folder


def nanogpt_get_batch(path: Path, rng: np.random.Generator, block_size: int, batch_size: int) -> torch.Tensor:
    """nanoGPT's get_batch (train.py), returning (B, T+1) blocks like ours: the baseline."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r")  # nanoGPT re-maps every batch to avoid a memory leak
    ix = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    return torch.stack([torch.from_numpy(tokens[i : i + block_size + 1].astype(np.int64)) for i in ix])


def training_step_seconds(block_size: int, batch_size: int) -> float:
    """One forward + backward + AdamW step of the default model on CPU (median of 10)."""
    defaults = config.Config()
    defaults.model.block_size = block_size
    gpt = model.build_model(model.gpt2_config(defaults.model, vocab_size=len(VOCAB_CHARS) + 2))
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-3)
    blocks = torch.randint(0, len(VOCAB_CHARS), (batch_size, block_size + 1))
    times = []
    for _ in range(12):
        started = time.perf_counter()
        model.next_token_loss(gpt, blocks).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def batch_fetch(folder: Path, sharded_folder: Path, rounds: int) -> None:
    stream = data.resolve(str(folder), "bin", "char").split("train")
    shards = data.resolve(str(sharded_folder), "bin", "char").split("train")
    assert shards.num_tokens == stream.num_tokens
    print(f"batch fetch on {stream.num_tokens / 1e6:.0f}M tokens (one file, or {len(shards.files)} shards), "
          f"{rounds} alternating rounds of {BATCHES_PER_ROUND} batches (median per batch):")
    for block_size, batch_size in ((64, 12), (256, 64)):
        rng = np.random.default_rng(0)
        times = {"nanoGPT get_batch": [], "data.train_batch": [], "sharded": []}
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(BATCHES_PER_ROUND):
                nanogpt_get_batch(stream.files[0], rng, block_size, batch_size)
            times["nanoGPT get_batch"].append((time.perf_counter() - started) / BATCHES_PER_ROUND)
            for variant, tokens in (("data.train_batch", stream), ("sharded", shards)):
                started = time.perf_counter()
                for step in range(BATCHES_PER_ROUND):  # the same steps, so the same offsets, for both
                    data.train_batch(tokens, block_size=block_size, batch_size=batch_size, seed=0, step=step, slot=0)
                times[variant].append((time.perf_counter() - started) / BATCHES_PER_ROUND)
        baseline, ours, sharded = (statistics.median(t) for t in times.values())
        step_seconds = training_step_seconds(block_size, batch_size)
        print(f"  block {block_size}, batch {batch_size}: nanoGPT {baseline * 1e6:7.1f} us, "
              f"train_batch {ours * 1e6:7.1f} us (ratio {ours / baseline:.2f}), "
              f"on shards {sharded * 1e6:7.1f} us (ratio {sharded / ours:.2f} to one file); "
              f"a default-model training step takes {step_seconds * 1e3:.1f} ms, so fetching is "
              f"{max(ours, sharded) / step_seconds:.3%} of it")


def dataset_view_fetch(folder: Path, rounds: int) -> None:
    """`load_blocks(...).with_format("numpy")[indices]` against the same blocks sliced from an np.memmap."""
    blocks = data.load_blocks(folder, block_size=VIEW_BLOCK).with_format("numpy")
    (entry,) = formats.load_meta(folder / "meta.json")["splits"]["train"]["files"]
    tokens = np.memmap(folder / entry["tokens"], dtype=np.uint16, mode="r")  # mapped once, like the Dataset

    def memmap_batch(rows: list[int]) -> np.ndarray:  # int64, as the numpy format gives integer columns
        return np.stack([tokens[row * VIEW_BLOCK : (row + 1) * VIEW_BLOCK] for row in rows]).astype(np.int64)

    def view_batch(rows: list[int]) -> np.ndarray:
        return blocks[rows]["input_ids"]

    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(blocks), size=VIEW_BATCH).tolist()
    ours, expected = view_batch(rows), memmap_batch(rows)
    assert ours.shape == expected.shape == (VIEW_BATCH, VIEW_BLOCK) and ours.dtype == expected.dtype, (
        ours.shape, ours.dtype, expected.shape, expected.dtype)
    assert np.array_equal(ours, expected), "load_blocks rows differ from the token file's blocks"
    print(f"Dataset view fetch: load_blocks(block_size={VIEW_BLOCK}).with_format('numpy') on {len(blocks):,} blocks "
          f"({entry['num_tokens'] / 1e6:.0f}M tokens), batches of {VIEW_BATCH} random blocks, {rounds} alternating "
          f"rounds of {BATCHES_PER_ROUND} batches on the same indices (median per batch):")
    times: dict[str, list[float]] = {"np.memmap + np.stack": [], "ds[indices]['input_ids']": []}
    for _ in range(rounds):
        batches = [rng.integers(0, len(blocks), size=VIEW_BATCH).tolist() for _ in range(BATCHES_PER_ROUND)]
        for variant, fetch in zip(times, (memmap_batch, view_batch)):
            started = time.perf_counter()
            for rows in batches:
                fetch(rows)
            times[variant].append((time.perf_counter() - started) / BATCHES_PER_ROUND)
    baseline, ours = (statistics.median(t) for t in times.values())
    print(f"  np.memmap + np.stack {baseline * 1e3:.3f} ms, ds[indices]['input_ids'] {ours * 1e3:.3f} ms "
          f"(ratio {ours / baseline:.2f}); the view also formats the labels column, the same blocks")


def rss_child(folder: Path) -> None:
    """Run in a fresh process: print resident memory before and after reading the data."""

    def status() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[name] = int(value.split()[0]) // 1024  # MiB
        return fields

    before = status()
    prepared = data.resolve(str(folder), "bin", "char")
    train, val = prepared.split("train"), prepared.split("val")
    for step in range(1000):
        data.train_batch(train, block_size=256, batch_size=64, seed=0, step=step, slot=0)
    for _ in torch.utils.data.DataLoader(data.eval_dataset(val, block_size=256, num_blocks=200), batch_size=20):
        pass
    print(json.dumps({"tokens": train.num_tokens, "before": before, "after": status()}))


def resident_memory(workdir: Path, sizes: list[int]) -> None:
    """Print the resident memory of reading each size of data, and of the largest in shards."""
    print("resident memory of a fresh process (MiB): imports -> resolve, 1000 batches of 64x257, eval pass:")
    folders = {f"{size / 1e6:>5.0f}M tokens ({size * 2 / 1e6:.0f} MB .bin)": synthetic(workdir, size)
               for size in sizes}
    folders[f"{max(sizes) / 1e6:>5.0f}M tokens in {SHARDS} shards"] = synthetic(workdir, max(sizes), SHARDS)
    for label, folder in folders.items():
        result = subprocess.run([sys.executable, __file__, "--rss-child", str(folder)],
                                capture_output=True, text=True, check=True)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        after, before = report["after"], report["before"]
        print(f"  {label}: RSS {before['VmRSS']} -> {after['VmRSS']} (anon {after['RssAnon']}, "
              f"file-backed {after['RssFile']}), peak {after['VmHWM']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"run only these sections, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--prepare-mb", type=float, default=50.0, help="size of the text prepare is timed on")
    parser.add_argument("--dataset-mb", type=float, nargs="+", default=[10.0, 40.0],
                        help="sizes of the documents prepare --dataset is timed on (default: 10 40)")
    parser.add_argument("--rss-tokens", type=int, nargs=2, default=[1_000_000, 200_000_000],
                        help="train tokens of the synthetic data; the larger is also used for fetching")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating rounds of the fetch sections")
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    transformers.logging.set_verbosity_error()  # the model warns about attention masks we do not need
    largest = max(args.rss_tokens)
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-") as workdir:
        workdir = Path(workdir)
        sections = {
            "prepare": lambda: prepare_at_scale(workdir, args.prepare_mb),
            "datasets": lambda: prepare_from_datasets(workdir, sorted(args.dataset_mb)),
            "fetch": lambda: batch_fetch(synthetic(workdir, largest), synthetic(workdir, largest, SHARDS), args.rounds),
            "view": lambda: dataset_view_fetch(synthetic(workdir, largest), args.rounds),
            "rss": lambda: resident_memory(workdir, args.rss_tokens),
        }
        for name in SECTIONS:
            if name in args.only:
                started = time.perf_counter()
                sections[name]()
                print(f"  ({name}: {time.perf_counter() - started:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
