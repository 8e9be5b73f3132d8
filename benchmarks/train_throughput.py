"""Training throughput: tinylm's training step against a plain PyTorch GPT trained the nanoGPT way.

In one process, for each shape and thread count, timed blocks of (a) `Trainer.train_step` exactly
as `tinylm train` runs it (its model, accelerate, data, clipping, schedule, its compile choice)
and (b) `reference_gpt.NanoGPTStep` (nanoGPT's model and train.py inner loop) alternate, on the
same prepared built-in corpus, shape, batch size and torch threads, each on both CPU matmul
backends (PyTorch's default BLAS, and oneDNN). We print the median ms/step, tokens/s, the achieved
GFLOP/s (`model.flops_per_token`: the same model FLOPs for both), its share of this CPU's measured
fp32 matmul peak (one large matmul, the faster backend), and the median of the per-round ratios
(reference time / tinylm time: above 1.0 means tinylm is faster). The headline is tinylm as a user
runs it (`cpu_matmul = "auto"`: the backend it chose here) against the reference as nanoGPT runs
(the default BLAS).

    python benchmarks/train_throughput.py [--shapes baby,large] [--threads 1,2] [--rounds 5] [--steps 10]
                                          [--compile]

Shapes: "baby" is configs/baby.toml (nanoGPT's CPU baby GPT: 4 layers, 128 wide, block 64,
batch 12); "large" is nanoGPT's Shakespeare-char GPU model (6 layers, 6 heads, 384 wide,
block 256) at batch 8. `--compile` compiles both models (nanoGPT's compile=True) and the
warm-up absorbs the compile time.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from reference_gpt import NanoGPTStep
from tinylm.config import apply_overrides, load_config
from tinylm.hardware import CpuMatmul
from tinylm.model import flops_per_token
from tinylm.prepare import main as prepare_main
from tinylm.trainer import Trainer

SHAPES = {
    "baby": {},
    "large": {"model.n_layer": 6, "model.n_head": 6, "model.n_embd": 384, "model.block_size": 256,
              "training.batch_size": 8},
}
BACKENDS = ("blas", "onednn")
PEAK_SIZE = 2048  # the peak probe: a 2048 x 2048 @ 2048 x 2048 fp32 matmul


def time_block(step_fn, steps: int) -> float:
    """Seconds per step over `steps` steps (the last loss is read, so queued device work finishes)."""
    started = time.perf_counter()
    for _ in range(steps):
        loss = step_fn()
    float(loss)
    return (time.perf_counter() - started) / steps


def matmul_peak() -> float:
    """This CPU's fp32 matmul FLOP/s at the current thread count: one large matmul, the faster backend."""
    a, b = torch.randn(PEAK_SIZE, PEAK_SIZE), torch.randn(PEAK_SIZE, PEAK_SIZE)
    best = 0.0
    for backend in BACKENDS:
        with CpuMatmul(backend).active():
            a @ b  # warm up
            seconds = min(time_block(lambda: (a @ b)[0, 0], 3) for _ in range(3))
        best = max(best, 2 * PEAK_SIZE**3 / seconds)
    return best


def on_backend(step_fn, backend: str):
    """`step_fn` with its matmuls on `backend` ("blas": PyTorch's default)."""
    matmul = CpuMatmul(backend)

    def step():
        with matmul.active():
            return step_fn()

    return step


def compare(config, rounds: int, steps: int, compile_both: bool) -> dict:
    """Alternate timed blocks of tinylm's step and the reference's on both backends; their medians and ratios."""
    trainer = Trainer(config)  # cpu_matmul = "auto": it chooses, and says why, as in a user's run
    chosen = trainer.cpu_matmul
    training, model = config.training, config.model
    reference = NanoGPTStep(
        str(trainer.train_tokens.files[0]), trainer.data.dtype, trainer.data.vocab_size,
        n_layer=model.n_layer, n_head=model.n_head, n_embd=model.n_embd, block_size=model.block_size,
        batch_size=training.batch_size, learning_rate=training.learning_rate, weight_decay=training.weight_decay,
        betas=(training.beta1, training.beta2), grad_clip=training.grad_clip, device=str(trainer.accelerator.device))
    if compile_both:
        reference.model = torch.compile(reference.model)
    counter = iter(range(10**9))

    def ours(backend: str):
        def step():
            trainer.cpu_matmul = CpuMatmul(backend)  # train_step runs its matmuls on the run's backend
            return trainer.train_step(next(counter))
        return step

    variants = {("reference", backend): on_backend(reference, backend) for backend in BACKENDS}
    variants |= {("tinylm", backend): ours(backend) for backend in BACKENDS}
    for fn in variants.values():  # warm up allocators, lazy initialisation, oneDNN kernels, any compilation
        time_block(fn, 3)
    times = {key: [] for key in variants}
    for _ in range(rounds):
        for key, fn in variants.items():
            times[key].append(time_block(fn, steps))
    trainer.cpu_matmul = chosen
    trainer.close()
    return {"times": times, "chosen": chosen, "compiled": trainer.compiled,
            "tokens_per_step": training.batch_size * model.block_size,
            "flops_per_token": flops_per_token(trainer.accelerator.unwrap_model(trainer.model))}


def report(shape: str, threads: int, result: dict, peak: float) -> list[str]:
    """The lines of one shape at one thread count: each variant, then the headline ratio."""
    times, tokens = result["times"], result["tokens_per_step"]
    baseline = times[("reference", "blas")]
    lines = []
    for (who, backend), seconds in times.items():
        median = statistics.median(seconds)
        flops = tokens * result["flops_per_token"] / median
        ratios = [r / s for r, s in zip(baseline, seconds)]
        lines.append(f"{shape:<6} {threads:>7} {who + ' ' + backend:<17} {median * 1e3:>9.2f} {tokens / median:>10,.0f} "
                     f"{flops / 1e9:>8.1f} {flops / peak:>7.1%} {statistics.median(ratios):>11.3f}  "
                     + ", ".join(f"{r:.2f}" for r in ratios))
    chosen = result["chosen"]
    ours = times[("tinylm", chosen.backend)]
    ratio = statistics.median(r / o for r, o in zip(baseline, ours))
    lines.append(f"  -> tinylm as run ({chosen.note or chosen.backend}"
                 + (", compiled" if result["compiled"] else "") + f"): {ratio:.3f}x the reference on the default BLAS")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/baby.toml", help="the preset the shapes start from")
    parser.add_argument("--shapes", default="baby,large", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--threads", default=None,
                        help="comma-separated torch thread counts, e.g. 1,2 (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()
    thread_counts = [int(n) for n in args.threads.split(",")] if args.threads else [torch.get_num_threads()]

    lines = []
    with tempfile.TemporaryDirectory() as workdir:
        prepared = Path(workdir) / "data"
        with contextlib.redirect_stdout(sys.stderr):
            prepare_main(["--out", str(prepared)])  # the built-in corpus, char, bin
        for threads in thread_counts:
            torch.set_num_threads(threads)
            peak = matmul_peak()
            lines.append(f"{threads} thread(s): fp32 matmul peak {peak / 1e9:.1f} GFLOP/s "
                         f"({PEAK_SIZE}^3, the faster backend)")
            for shape in args.shapes.split(","):
                config = apply_overrides(load_config(args.config), {
                    **SHAPES[shape], "data.processed_dir": str(prepared), "data.tokenizer": "char",
                    "training.out_dir": str(Path(workdir) / f"ckpt-{shape}-{threads}"), "training.device": "cpu",
                    "training.cpu_matmul": "auto", **({"training.compile": "on"} if args.compile else {})})
                lines.extend(report(shape, threads, compare(config, args.rounds, args.steps, args.compile), peak))

    print(f"\n{args.rounds} rounds of {args.steps} steps per variant, alternating; torch {torch.__version__}")
    print(f"{'shape':<6} {'threads':>7} {'variant':<17} {'ms/step':>9} {'tokens/s':>10} {'GFLOP/s':>8} "
          f"{'of peak':>7} {'ratio (ref blas / this)':>11}  per round")
    print("\n".join(lines))
    print("goal: tinylm as run >= 1.0x the reference everywhere, >= 1.25x where the step has something to gain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
