"""Sampling speed: `tinylm generate`'s cached sliding window vs nanoGPT's recompute-everything sampler.

After load (in this process): tokens per second of both samplers.

Both samplers run on the same randomly initialised baby GPT (4 layers, 4 heads,
128 wide, a 65-character vocabulary, as nanoGPT's Shakespeare-char model) in
this process, alternating run by run so that machine noise hits both alike, for
500 and 2000 new tokens at block_size 64 and 256. Speed does not depend on what
the weights have learned, so no training is needed.

End to end (fresh processes, as a user runs them): seconds for `tinylm generate` on a real
checkpoint (one training step of the baby preset on the built-in corpus) against
`nanogpt_sample.py` (nanoGPT's sample.py on the same shape), alternating, best of --repeats,
for 1 new token (the time to the first token: start-up and load) and for 500.

    python benchmarks/generate.py [--repeats 3] [--device auto] [--threads N] [--skip-end-to-end]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tinylm import sampler
from reference_gpt import GPT
from tinylm.config import DEVICES, ModelConfig, apply_overrides, load_config
from tinylm.model import build_model, gpt2_config
from tinylm.prepare import main as prepare_main
from tinylm.trainer import Trainer

VOCAB_SIZE = 65
BLOCK_SIZES = (64, 256)
NEW_TOKENS = (500, 2000)
SAMPLERS = {
    "cached (tinylm)": lambda model, prompt, sampling, gen: sampler.sample_tokens(model, prompt, sampling, gen),
    "no cache (nanoGPT)": lambda model, prompt, sampling, gen: sampler.sample_tokens_recompute(
        model, prompt, sampling, gen, context="nanogpt"),
}


def tokens_per_second(sample_fn, model, sampling: sampler.Sampling, device: torch.device) -> float:
    generator = sampler.make_generator(device, 0)
    start = time.perf_counter()
    count = sum(1 for _ in sample_fn(model, [0], sampling, generator))
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
    parser.add_argument("--skip-end-to-end", action="store_true", help="only time the samplers after load")
    args = parser.parse_args()
    device = sampler.pick_device(args.device)
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
        sampling = sampler.Sampling(max_new_tokens=new_tokens)
        for sample_fn in SAMPLERS.values():  # warm-up: first calls allocate and pick kernels
            tokens_per_second(sample_fn, model, sampler.Sampling(max_new_tokens=block_size + 8), device)
        speeds = {name: [] for name in SAMPLERS}
        for _ in range(args.repeats):
            for name, sample_fn in SAMPLERS.items():
                speeds[name].append(tokens_per_second(sample_fn, model, sampling, device))
                progress.update()
        rows.append((block_size, new_tokens, {name: max(runs) for name, runs in speeds.items()}))
    progress.close()

    cached, baseline = SAMPLERS
    print(f"\n{'block_size':>10} {'new tokens':>10} {cached + ' tok/s':>22} {baseline + ' tok/s':>25} {'speedup':>8}")
    for block_size, new_tokens, best in rows:
        print(f"{block_size:>10} {new_tokens:>10} {best[cached]:>22.0f} {best[baseline]:>25.0f} "
              f"{best[cached] / best[baseline]:>7.2f}x")
    if not args.skip_end_to_end:
        end_to_end(args.repeats)


def end_to_end(repeats: int) -> None:
    """Wall seconds of whole sampling processes, tinylm's CLI against nanoGPT's sample.py."""
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        prepare_main(["--out", str(work / "data")])
        config = apply_overrides(load_config(here.parent / "configs" / "baby.toml"), {
            "data.processed_dir": str(work / "data"), "training.out_dir": str(work / "ckpt"),
            "training.max_iters": 1, "training.eval_iters": 1, "training.device": "cpu"})
        trainer = Trainer(config)
        trainer.fit()
        shape = config.model
        vocab_size = trainer.data.vocab_size
        reference = GPT(vocab_size, shape.block_size, shape.n_layer, shape.n_head, shape.n_embd)
        torch.save({"model_args": {"vocab_size": vocab_size, "block_size": shape.block_size, "n_layer": shape.n_layer,
                                   "n_head": shape.n_head, "n_embd": shape.n_embd},
                    "model": reference.state_dict(),
                    "itos": trainer.tokenizer.convert_ids_to_tokens(list(range(vocab_size)))}, work / "nanogpt.pt")
        commands = {
            "tinylm generate": lambda n: [sys.executable, "-m", "tinylm.cli", "generate", "--device", "cpu",
                                          "--checkpoint", str(work / "ckpt" / "ckpt_last.pt"),
                                          "--max-new-tokens", str(n)],
            "nanoGPT sample.py": lambda n: [sys.executable, str(here / "nanogpt_sample.py"),
                                            str(work / "nanogpt.pt"), str(n)],
        }
        print(f"\nend to end, fresh processes, best of {repeats} alternating runs (seconds)")
        print(f"{'new tokens':>10} " + " ".join(f"{name:>18}" for name in commands) + f" {'tinylm/nanoGPT':>15}")
        for new_tokens in (1, 500):
            runs = {name: [] for name in commands}
            for _ in range(repeats):
                for name, command in commands.items():
                    runs[name].append(wall_seconds(command(new_tokens)))
            ours, theirs = (min(seconds) for seconds in runs.values())
            print(f"{new_tokens:>10} {ours:>18.2f} {theirs:>18.2f} {ours / theirs:>14.2f}x")


def wall_seconds(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
