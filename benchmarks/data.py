"""Data pipeline benchmark: prepare throughput, cores and memory; batch fetch time; resident memory vs data size.

    python benchmarks/data.py [--prepare-mb 50] [--rss-tokens 1000000 200000000]

1. `tinylm prepare` on a large text (the built-in corpus repeated to `--prepare-mb` MB),
   sharded, for the char and the BPE tokenizer, each run in a fresh process: throughput
   (MB of input per second, end to end: tokenizer training, encoding, writing), CPU
   utilisation (user + sys CPU time over wall time: 2.0 means both of 2 cores busy the
   whole time) and peak resident memory (VmHWM) against a run on a tiny input. The
   baseline, alternated with it, is the same run with tokenizers' parallelism off
   (TOKENIZERS_PARALLELISM=false).
2. Batch fetch: `data.train_batch` against nanoGPT's `get_batch` (a fresh np.memmap,
   one slice per row, torch.stack), alternated in rounds in this process, on a
   synthetic 200M-token .bin, and on the same tokens as 20 shards of 10M; set against
   one training step of the default model.
3. Resident memory of a fresh process that resolves a synthetic .bin, draws 1000
   training batches and runs the eval dataset, at two data sizes and in 20 shards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from tinylm import config, corpus, data, model, paths
from tinylm import tokenizer as tok

ROUNDS = 7
BATCHES_PER_ROUND = 200
SYNTHETIC_PIECE = 10_000_000  # tokens generated at a time; shards of a multiple of it hold the same tokens
SHARD_TOKENS = 10_000_000  # the sharded copy of the largest data: 20 shards of the default 200M tokens
VOCAB_CHARS = "".join(chr(c) for c in range(32, 127))  # a char tokenizer of 97 ids for the synthetic data


# `python -m tinylm.prepare ARGS` that prints its own peak resident memory (VmHWM) on exit. Not
# ru_maxrss: a child started by (v)fork inherits its parent's high-water mark.
REPORT_PEAK = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print(*(l for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr))\n"
    "runpy.run_module('tinylm.prepare', run_name='__main__')\n"
)
SINGLE_THREADED = {"TOKENIZERS_PARALLELISM": "false"}


def run_prepare(args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run prepare in a fresh process: its wall time, CPU time (user + sys) and peak RSS in MiB."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", REPORT_PEAK, *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
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
        for _ in range(repeats):
            handle.write(text + "\n")
    tiny = workdir / "tiny.txt"
    tiny.write_text(text[:20_000], encoding="utf-8")
    size = source.stat().st_size / 1e6
    shard_tokens = 10_000_000
    print(f"prepare on {size:.1f} MB of text, --shard-tokens {shard_tokens}, a fresh process per run, "
          f"best of 2 alternating with tokenizers' parallelism off ({os.cpu_count()} cores):")
    for kind in ("char", "bpe"):
        flags = ["--tokenizer", kind, "--shard-tokens", str(shard_tokens), "--out", str(workdir / kind)]
        baseline_peak = run_prepare(["--input", str(tiny), *flags], {})["peak"]
        runs: dict[str, list[dict]] = {"parallel": [], "single": []}
        for _ in range(2):
            runs["parallel"].append(run_prepare(["--input", str(source), *flags], {}))
            runs["single"].append(run_prepare(["--input", str(source), *flags], SINGLE_THREADED))
        best = {variant: min(results, key=lambda r: r["wall"]) for variant, results in runs.items()}
        ours, single = best["parallel"], best["single"]
        print(f"  {kind:<4} {size / ours['wall']:5.2f} MB/s ({ours['wall']:.1f}s), CPU {ours['cpu']:.1f}s = "
              f"{ours['cpu'] / ours['wall']:.2f} x wall, peak RSS {ours['peak']:.0f} MiB "
              f"(tiny input: {baseline_peak:.0f} MiB) | parallelism off: {size / single['wall']:5.2f} MB/s, "
              f"CPU {single['cpu'] / single['wall']:.2f} x wall, peak {single['peak']:.0f} MiB "
              f"| speed-up {single['wall'] / ours['wall']:.2f}x")


def synthetic_data(folder: Path, num_tokens: int, shard_tokens: int | None = None) -> Path:
    """A bin-format prepared dataset of random char ids: `num_tokens` of train (in shards of
    `shard_tokens` if given: train_000.bin, ...), a small val.bin. The same seed gives the same tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tok.train_char([VOCAB_CHARS])
    tok.save(tokenizer, folder)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, count in {"train": num_tokens, "val": 100_000}.items():
        size = shard_tokens if split == "train" and shard_tokens else count
        names = [f"{split}.bin"] if size >= count else [f"{split}_{i:03d}.bin" for i in range(-(-count // size))]
        files = []
        for index, name in enumerate(names):
            length = min(size, count - index * size)
            with open(folder / name, "wb") as handle:
                for begin in range(0, length, SYNTHETIC_PIECE):
                    rng.integers(0, vocab, min(SYNTHETIC_PIECE, length - begin), dtype=np.uint16).tofile(handle)
            files.append({"tokens": name, "num_tokens": length})
        splits[split] = {"num_tokens": count, "files": files}
    meta = {
        "format_version": paths.META_FORMAT_VERSION, "data_format": "bin", "tokenizer_kind": "char",
        "tokenizer_file": paths.TOKENIZER_NAME, "vocab_size": vocab, "eos_token_id": 0, "dtype": "uint16",
        "source": "synthetic", "val_fraction": None, "splits": splits,
    }
    (folder / paths.META_NAME).write_text(json.dumps(meta))
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


def batch_fetch(folder: Path, sharded_folder: Path) -> None:
    stream = data.resolve(str(folder), "bin", "char").split("train")
    shards = data.resolve(str(sharded_folder), "bin", "char").split("train")
    assert shards.num_tokens == stream.num_tokens
    print(f"batch fetch on {stream.num_tokens / 1e6:.0f}M tokens (one file, or {len(shards.files)} shards), "
          f"{ROUNDS} alternating rounds of {BATCHES_PER_ROUND} batches (median per batch):")
    for block_size, batch_size in ((64, 12), (256, 64)):
        rng = np.random.default_rng(0)
        times = {"nanoGPT get_batch": [], "data.train_batch": [], "sharded": []}
        for _ in range(ROUNDS):
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


def resident_memory(workdir: Path, sizes: list[int]) -> Path:
    """Print the resident memory of reading each size of data, and of the largest in shards; return the shards."""
    print("resident memory of a fresh process (MiB): imports -> resolve, 1000 batches of 64x257, eval pass:")
    folders = {f"{size / 1e6:>5.0f}M tokens ({size * 2 / 1e6:.0f} MB .bin)": synthetic_data(workdir / f"rss-{size}", size)
               for size in sizes}
    sharded = synthetic_data(workdir / "sharded", max(sizes), SHARD_TOKENS)
    folders[f"{max(sizes) / 1e6:>5.0f}M tokens in {-(-max(sizes) // SHARD_TOKENS)} shards"] = sharded
    for label, folder in folders.items():
        result = subprocess.run([sys.executable, __file__, "--rss-child", str(folder)],
                                capture_output=True, text=True, check=True)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        after, before = report["after"], report["before"]
        print(f"  {label}: RSS {before['VmRSS']} -> {after['VmRSS']} (anon {after['RssAnon']}, "
              f"file-backed {after['RssFile']}), peak {after['VmHWM']}")
    return sharded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare-mb", type=float, default=50.0, help="size of the text prepare is timed on")
    parser.add_argument("--rss-tokens", type=int, nargs=2, default=[1_000_000, 200_000_000])
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    transformers.logging.set_verbosity_error()  # the model warns about attention masks we do not need
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-") as workdir:
        workdir = Path(workdir)
        prepare_at_scale(workdir, args.prepare_mb)
        sharded = resident_memory(workdir, args.rss_tokens)
        batch_fetch(workdir / f"rss-{max(args.rss_tokens)}", sharded)


if __name__ == "__main__":
    main()
