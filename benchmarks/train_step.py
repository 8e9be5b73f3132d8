"""Overhead of tinylm's training step against a bare PyTorch loop, in the same process.

Both sides train the same GPT2LMHeadModel shape (the baby preset by default) with AdamW on
batches of the same size; the bare loop has no accelerate, no gradient clipping, no
schedule and reuses one pre-fetched batch, so it is the floor our loop is measured against
(on the same CPU matmul backend as tinylm's step). For the comparison with a plain PyTorch GPT
trained the nanoGPT way, see train_throughput.py.
The two alternate in rounds (never timed at once), and we print the median ratio.
Target: tinylm / bare <= 1.05.

    python benchmarks/train_step.py [--config configs/baby.toml] [--rounds 7] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tinylm import data
from tinylm.config import apply_overrides, load_config
from tinylm.model import build_model, gpt2_config, per_block_loss
from tinylm.prepare import main as prepare_main
from tinylm.trainer import Trainer


def bare_loop(config, vocab_size: int, blocks: torch.Tensor):
    """A minimal nanoGPT-style step: forward, backward, AdamW step. Returns a step function."""
    torch.manual_seed(0)
    model = build_model(gpt2_config(config.model, vocab_size)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.training.learning_rate)

    def step():
        loss = per_block_loss(model, blocks).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_steps(step_fn, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/baby.toml")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 threads stall on contention)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as workdir:
        prepared = Path(workdir) / "data"
        prepare_main(["--out", str(prepared)])  # the built-in corpus, char, bin
        config = apply_overrides(load_config(args.config), {
            "data.processed_dir": str(prepared), "training.out_dir": str(Path(workdir) / "ckpt"),
            "training.device": "cpu", "data.tokenizer": "char"})
        trainer = Trainer(config)
        stream = trainer.data.split("train")
        blocks = data.train_batch(stream, block_size=config.model.block_size, batch_size=config.training.batch_size,
                                  seed=0, step=0, slot=0)
        bare_step = bare_loop(config, trainer.data.vocab_size, blocks)

        def bare():  # on the matmul backend tinylm chose, so only the loop around the model differs
            with trainer.cpu_matmul.active():
                return bare_step()

        counter = iter(range(10**9))
        ours = lambda: trainer.train_step(next(counter))  # noqa: E731  (a step function like bare's)

        for fn in (bare, ours):  # warm up allocators and lazy initialisation
            time_steps(fn, 3)
        ratios, bare_times, our_times = [], [], []
        for _ in range(args.rounds):
            bare_times.append(time_steps(bare, args.steps))
            our_times.append(time_steps(ours, args.steps))
            ratios.append(our_times[-1] / bare_times[-1])

    tokens_per_step = config.effective_batch_size * config.model.block_size
    ours_median = statistics.median(our_times)
    print(f"config {args.config}: {tokens_per_step} tokens per step, torch threads {torch.get_num_threads()}")
    print(f"bare PyTorch loop : {statistics.median(bare_times) * 1e3:8.2f} ms/step (median of {args.rounds} rounds)")
    print(f"tinylm train_step : {ours_median * 1e3:8.2f} ms/step  -> {tokens_per_step / ours_median:,.0f} tokens/s")
    print(f"ratio tinylm/bare : median {statistics.median(ratios):.3f}  (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    print("target            : <= 1.05")
    return 0


if __name__ == "__main__":
    sys.exit(main())
