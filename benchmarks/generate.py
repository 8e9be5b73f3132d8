"""Tokens per second: `tinylm generate`'s cached sliding window vs nanoGPT's recompute-everything sampler.

Both samplers run on the same randomly initialised baby GPT (4 layers, 4 heads,
128 wide, a 65-character vocabulary, as nanoGPT's Shakespeare-char model) in
this process, alternating run by run so that machine noise hits both alike, for
500 and 2000 new tokens at block_size 64 and 256. Speed does not depend on what
the weights have learned, so no training is needed.

    python benchmarks/generate.py [--repeats 3] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from tinylm import generate
from tinylm.config import DEVICES, ModelConfig
from tinylm.model import build_model, gpt2_config

VOCAB_SIZE = 65
BLOCK_SIZES = (64, 256)
NEW_TOKENS = (500, 2000)
SAMPLERS = {
    "cached (tinylm)": lambda model, prompt, sampling, gen: generate.sample_tokens(model, prompt, sampling, gen),
    "no cache (nanoGPT)": lambda model, prompt, sampling, gen: generate.sample_tokens_recompute(
        model, prompt, sampling, gen, context="nanogpt"),
}


def tokens_per_second(sampler, model, sampling: generate.Sampling, device: torch.device) -> float:
    generator = generate.make_generator(device, 0)
    start = time.perf_counter()
    count = sum(1 for _ in sampler(model, [0], sampling, generator))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per sampler and case; the fastest is reported, the least disturbed by "
                             "other work on the machine")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); "
                        "1 is steadier on a machine shared with other work")
    args = parser.parse_args()
    device = generate.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"best of {args.repeats} alternating runs\n")

    rows = []
    cases = [(block, new) for block in BLOCK_SIZES for new in NEW_TOKENS]
    progress = tqdm(total=len(cases) * args.repeats * len(SAMPLERS), desc="timing", unit="run")
    for block_size, new_tokens in cases:
        torch.manual_seed(0)
        config = gpt2_config(ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=block_size), VOCAB_SIZE)
        model = build_model(config).to(device).eval()
        sampling = generate.Sampling(max_new_tokens=new_tokens)
        for sampler in SAMPLERS.values():  # warm-up: first calls allocate and pick kernels
            tokens_per_second(sampler, model, generate.Sampling(max_new_tokens=block_size + 8), device)
        speeds = {name: [] for name in SAMPLERS}
        for _ in range(args.repeats):
            for name, sampler in SAMPLERS.items():
                speeds[name].append(tokens_per_second(sampler, model, sampling, device))
                progress.update()
        rows.append((block_size, new_tokens, {name: max(runs) for name, runs in speeds.items()}))
    progress.close()

    cached, baseline = SAMPLERS
    print(f"\n{'block_size':>10} {'new tokens':>10} {cached + ' tok/s':>22} {baseline + ' tok/s':>25} {'speedup':>8}")
    for block_size, new_tokens, best in rows:
        print(f"{block_size:>10} {new_tokens:>10} {best[cached]:>22.0f} {best[baseline]:>25.0f} "
              f"{best[cached] / best[baseline]:>7.2f}x")


if __name__ == "__main__":
    main()
