"""Training throughput: tinylm's training step against a plain PyTorch GPT trained the nanoGPT way.

In one process, for each shape, timed blocks of (a) `Trainer.train_step` exactly as
`tinylm train` runs it (its model, accelerate, data, clipping, schedule, its compile
choice) and (b) `reference_gpt.NanoGPTStep` (nanoGPT's model and train.py inner loop)
alternate, on the same prepared built-in corpus, shape, batch size and torch threads.
We print the median ms/step, tokens/s and the median of the per-round ratios
(reference time / tinylm time: above 1.0 means tinylm is faster).

    python benchmarks/train_throughput.py [--shapes baby,large] [--rounds 7] [--steps 20] [--threads N]
                                          [--compile] [--cpu-matmul auto|blas|onednn]

Shapes: "baby" is configs/baby.toml (nanoGPT's CPU baby GPT: 4 layers, 128 wide, block 64,
batch 12); "large" is nanoGPT's Shakespeare-char GPU model (6 layers, 6 heads, 384 wide,
block 256) at batch 8. `--compile` compiles both models (nanoGPT's compile=True) and the
warm-up absorbs the compile time. `--cpu-matmul blas` makes tinylm use PyTorch's default
matmul library, as the reference does, to see what the rest of the step costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from reference_gpt import NanoGPTStep
from tinylm.config import apply_overrides, load_config
from tinylm.prepare import main as prepare_main
from tinylm.trainer import Trainer

SHAPES = {
    "baby": {},
    "large": {"model.n_layer": 6, "model.n_head": 6, "model.n_embd": 384, "model.block_size": 256,
              "training.batch_size": 8},
}


def time_block(step_fn, steps: int) -> float:
    """Seconds per step over `steps` steps (the last loss is read, so queued device work finishes)."""
    started = time.perf_counter()
    for _ in range(steps):
        loss = step_fn()
    float(loss)
    return (time.perf_counter() - started) / steps


def compare(config, rounds: int, steps: int, compile_both: bool) -> dict:
    """Alternate timed blocks of tinylm's step and the reference's; return their medians and ratios."""
    trainer = Trainer(config)
    training, model = config.training, config.model
    reference = NanoGPTStep(
        str(trainer.train_tokens.files[0]), trainer.data.dtype, trainer.data.vocab_size,
        n_layer=model.n_layer, n_head=model.n_head, n_embd=model.n_embd, block_size=model.block_size,
        batch_size=training.batch_size, learning_rate=training.learning_rate, weight_decay=training.weight_decay,
        betas=(training.beta1, training.beta2), grad_clip=training.grad_clip, device=str(trainer.accelerator.device))
    if compile_both:
        reference.model = torch.compile(reference.model)
    counter = iter(range(10**9))
    ours = lambda: trainer.train_step(next(counter))  # noqa: E731  (a step function like the reference's)

    for fn in (reference, ours):  # warm up allocators, lazy initialisation and any compilation
        time_block(fn, 5)
    reference_times, our_times = [], []
    for _ in range(rounds):
        reference_times.append(time_block(reference, steps))
        our_times.append(time_block(ours, steps))
    return {
        "reference": statistics.median(reference_times),
        "tinylm": statistics.median(our_times),
        "ratios": [r / o for r, o in zip(reference_times, our_times)],
        "tokens_per_step": training.batch_size * model.block_size,
        "compiled": trainer.compiled,
        "matmul": trainer.cpu_matmul.backend,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/baby.toml", help="the preset the shapes start from")
    parser.add_argument("--shapes", default="baby,large", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--cpu-matmul", choices=("auto", "blas", "onednn"), default="auto",
                        help="tinylm's training.cpu_matmul (blas: the same matmul library as the reference)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as workdir:
        prepared = Path(workdir) / "data"
        prepare_main(["--out", str(prepared)])  # the built-in corpus, char, bin
        rows = []
        for shape in args.shapes.split(","):
            config = apply_overrides(load_config(args.config), {
                **SHAPES[shape], "data.processed_dir": str(prepared), "data.tokenizer": "char",
                "training.out_dir": str(Path(workdir) / "ckpt"), "training.device": "cpu",
                "training.cpu_matmul": args.cpu_matmul, **({"training.compile": "on"} if args.compile else {})})
            rows.append((shape, config, compare(config, args.rounds, args.steps, args.compile)))

    print(f"\ntorch threads {torch.get_num_threads()}, {args.rounds} rounds of {args.steps} steps, alternating")
    print(f"{'shape':<6} {'tokens/step':>11} {'nanoGPT-style ms':>16} {'tinylm ms':>10} {'tinylm tok/s':>13} "
          f"{'ratio (ref/tinylm)':>19}  rounds")
    for shape, config, result in rows:
        ratios = result["ratios"]
        print(f"{shape:<6} {result['tokens_per_step']:>11} {result['reference'] * 1e3:>16.2f} "
              f"{result['tinylm'] * 1e3:>10.2f} {result['tokens_per_step'] / result['tinylm']:>13,.0f} "
              f"{statistics.median(ratios):>19.3f}  {', '.join(f'{r:.2f}' for r in ratios)}"
              + f"  (tinylm: {result['matmul']} matmuls" + (", compiled)" if result["compiled"] else ")"))
    print("goal: ratio >= 1.0 (tinylm at least as fast), stretch 1.25")
    return 0


if __name__ == "__main__":
    sys.exit(main())
