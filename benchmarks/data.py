"""Data pipeline benchmark: prepare throughput, batch fetch time, resident memory vs data size.

    python benchmarks/data.py [--rss-tokens 1000000 200000000]

1. `tinylm prepare` throughput (MB of input text per second, end to end: tokenizer
   training, encoding, writing) for the char and the BPE tokenizer, on the built-in
   corpus written to a file twice over (~10 MB).
2. Batch fetch: `data.train_batch` against nanoGPT's `get_batch` (a fresh np.memmap,
   one slice per row, torch.stack), alternated in rounds in this process, on a
   synthetic 200M-token .bin; set against one training step of the default model.
3. Resident memory of a fresh process that resolves a synthetic .bin, draws 1000
   training batches and runs the eval dataset, at two data sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from tinylm import config, corpus, data, model, paths, prepare
from tinylm import tokenizer as tok

ROUNDS = 7
BATCHES_PER_ROUND = 200
VOCAB_CHARS = "".join(chr(c) for c in range(32, 127))  # a char tokenizer of 97 ids for the synthetic data


def prepare_throughput(workdir: Path) -> None:
    text = corpus.text() * 2
    source = workdir / "corpus.txt"
    source.write_text(text, encoding="utf-8")
    megabytes = source.stat().st_size / 1e6
    print(f"prepare throughput on {megabytes:.1f} MB of text (best of 2, alternating):")
    runs = {"char": [], "bpe": []}
    for _ in range(2):
        for kind in runs:
            flags = ["--tokenizer", kind] + (["--vocab-size", "4096"] if kind == "bpe" else [])
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                prepare.main(["--input", str(source), *flags, "--out", str(workdir / kind)])
            runs[kind].append(time.perf_counter() - started)
    for kind, seconds in runs.items():
        print(f"  {kind:<4}  {megabytes / min(seconds):6.2f} MB/s  ({min(seconds):.1f}s)")


def synthetic_data(folder: Path, num_tokens: int) -> Path:
    """A bin-format prepared dataset of random char ids: train.bin of `num_tokens`, a small val.bin."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tok.train_char([VOCAB_CHARS])
    tok.save(tokenizer, folder)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    rng = np.random.default_rng(0)
    counts = {"train": num_tokens, "val": 100_000}
    for split, count in counts.items():
        with open(folder / f"{split}.bin", "wb") as handle:
            for begin in range(0, count, 10_000_000):
                rng.integers(0, vocab, min(10_000_000, count - begin), dtype=np.uint16).tofile(handle)
    meta = {
        "format_version": paths.META_FORMAT_VERSION, "data_format": "bin", "tokenizer_kind": "char",
        "tokenizer_file": paths.TOKENIZER_NAME, "vocab_size": vocab, "eos_token_id": 0, "dtype": "uint16",
        "source": "synthetic", "val_fraction": None,
        "splits": {s: {"num_tokens": n, "files": [{"tokens": f"{s}.bin", "num_tokens": n}]} for s, n in counts.items()},
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


def batch_fetch(folder: Path) -> None:
    stream = data.resolve(str(folder), "bin", "char").split("train")
    print(f"batch fetch on {stream.num_tokens / 1e6:.0f}M tokens, {ROUNDS} alternating rounds of "
          f"{BATCHES_PER_ROUND} batches (median per batch):")
    for block_size, batch_size in ((64, 12), (256, 64)):
        rng = np.random.default_rng(0)
        times = {"nanoGPT get_batch": [], "data.train_batch": []}
        step = 0
        for _ in range(ROUNDS):
            started = time.perf_counter()
            for _ in range(BATCHES_PER_ROUND):
                nanogpt_get_batch(stream.files[0], rng, block_size, batch_size)
            times["nanoGPT get_batch"].append((time.perf_counter() - started) / BATCHES_PER_ROUND)
            started = time.perf_counter()
            for _ in range(BATCHES_PER_ROUND):
                data.train_batch(stream, block_size=block_size, batch_size=batch_size, seed=0,
                                 step=step, slot=0)
                step += 1
            times["data.train_batch"].append((time.perf_counter() - started) / BATCHES_PER_ROUND)
        baseline, ours = (statistics.median(t) for t in times.values())
        step_seconds = training_step_seconds(block_size, batch_size)
        print(f"  block {block_size}, batch {batch_size}: nanoGPT {baseline * 1e6:7.1f} us, "
              f"train_batch {ours * 1e6:7.1f} us (ratio {ours / baseline:.2f}); "
              f"a default-model training step takes {step_seconds * 1e3:.1f} ms, so fetching is "
              f"{ours / step_seconds:.3%} of it")


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
    print("resident memory of a fresh process (MiB): imports -> resolve, 1000 batches of 64x257, eval pass:")
    for size in sizes:
        folder = synthetic_data(workdir / f"rss-{size}", size)
        result = subprocess.run([sys.executable, __file__, "--rss-child", str(folder)],
                                capture_output=True, text=True, check=True)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        after, before = report["after"], report["before"]
        print(f"  {size / 1e6:>5.0f}M tokens ({size * 2 / 1e6:.0f} MB .bin): RSS {before['VmRSS']} -> "
              f"{after['VmRSS']} (anon {after['RssAnon']}, file-backed {after['RssFile']}), peak {after['VmHWM']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rss-tokens", type=int, nargs=2, default=[1_000_000, 200_000_000])
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child)
        return
    transformers.logging.set_verbosity_error()  # the model warns about attention masks we do not need
    with tempfile.TemporaryDirectory(prefix="tinylm-bench-") as workdir:
        workdir = Path(workdir)
        prepare_throughput(workdir)
        resident_memory(workdir, args.rss_tokens)
        batch_fetch(workdir / f"rss-{max(args.rss_tokens)}")


if __name__ == "__main__":
    main()
