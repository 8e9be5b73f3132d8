"""A LoRA training step against a full fine-tuning step of the same GPT-2, in the same process.

Both sides train the same GPT2LMHeadModel (GPT-2's 50257-token vocabulary, a smaller shape) on the same
batch with tinylm's loss (`model.per_block_loss`) and optimizer (`model.build_optimizer`); the LoRA side
wraps a copy in adapters (`lora.adapt`: rank 16 on c_attn, c_proj and c_fc, as
configs/finetune-gpt2-medium-lora.toml). They alternate in rounds (never timed at once); printed: the
median ratio of LoRA's time per step to full fine-tuning's, and each step's memory: the weights and
AdamW's moments held between steps, plus the peak of what one step allocates (gradients and
activations, measured by compat.TensorBytes: every CPU tensor an op makes, while it is alive).

    python benchmarks/lora_step.py [--layers 6] [--width 384] [--block 256] [--batch 4] [--rounds 7] [--steps 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from train_step import time_steps
from transformers import GPT2Config, GPT2LMHeadModel

from tinylm import lora
from tinylm.compat import TensorBytes
from tinylm.config import LoraConfig, TrainingConfig
from tinylm.model import build_optimizer, count_parameters, per_block_loss

ADAPTERS = LoraConfig(enabled=True, r=16, lora_alpha=32, target_modules=["c_attn", "c_proj", "c_fc"])


def step_function(model, blocks: torch.Tensor):
    """One training step of `model` on `blocks`: forward, backward, AdamW step (tinylm's groups); and the
    bytes it holds between steps (weights, AdamW's moments)."""
    optimizer = build_optimizer(model, TrainingConfig())

    def step():
        per_block_loss(model, blocks).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def held() -> int:
        moments = [value for state in optimizer.state.values() for value in state.values()
                   if isinstance(value, torch.Tensor)]
        return sum(tensor.nbytes for tensor in [*model.parameters(), *moments])

    return step, held


def peak_bytes(step, held) -> int:
    """What one step needs at its peak: what it holds between steps, and the most its own tensors take at once."""
    with TensorBytes() as counted:
        step()
    return held() + counted.peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64,
                                      n_positions=args.block)).train()
    adapted = lora.adapt(copy.deepcopy(full), ADAPTERS).train()
    blocks = torch.randint(0, full.config.vocab_size, (args.batch, args.block + 1))
    sides = {"full": step_function(full, blocks), "lora": step_function(adapted, blocks)}
    steps = {name: step for name, (step, _) in sides.items()}
    for step in steps.values():  # warm up: first-call allocations, the optimizer's state
        step()
    peaks = {name: peak_bytes(step, held) for name, (step, held) in sides.items()}
    ratios = []
    for _ in range(args.rounds):
        seconds = {name: time_steps(step, args.steps) for name, step in steps.items()}
        ratios.append(seconds["lora"] / seconds["full"])
    trained = count_parameters(adapted, trainable=True)
    print(f"GPT-2 of {args.layers} layers, {args.width} wide, vocab {full.config.vocab_size}; "
          f"batch {args.batch} x {args.block} tokens, {args.threads} thread(s)")
    print(f"parameters: full fine-tuning trains {count_parameters(full):,}, LoRA {trained:,} "
          f"({trained / count_parameters(adapted):.2%} of its {count_parameters(adapted):,})")
    print(f"gradients + AdamW moments: full {12 * count_parameters(full) / 2**20:.1f} MiB, "
          f"LoRA {12 * trained / 2**20:.1f} MiB")
    print(f"peak of a step (weights, moments, then the step's own tensors at their most): full "
          f"{peaks['full'] / 2**20:.0f} MiB, LoRA {peaks['lora'] / 2**20:.0f} MiB, LoRA / full "
          f"{peaks['lora'] / peaks['full']:.2f}")
    print(f"time per step, LoRA / full: median {statistics.median(ratios):.2f} "
          f"(rounds: {', '.join(f'{ratio:.2f}' for ratio in ratios)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
