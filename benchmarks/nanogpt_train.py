"""nanoGPT's train.py cut to what the start-up timing needs: everything up to its first training step.

    python benchmarks/nanogpt_train.py SETTINGS_JSON

SETTINGS_JSON holds `reference_gpt.NanoGPTStep`'s keyword arguments (token_file is the train split,
dtype a numpy dtype name) plus "val_file" and "eval_iters". As nanoGPT's train.py: build the model
and optimizer, estimate the loss of both splits at iter 0 (eval_iters random batches each), print
"step 0: ...", take the first step and print "iter 0: loss ...". nanoGPT saves no checkpoint at
iter 0 and samples no text during training. Nothing here imports tinylm; benchmarks/generate.py
starts it as a process.
"""

import json
import sys

import numpy as np
import torch

from reference_gpt import NanoGPTStep


@torch.no_grad()
def estimate_loss(step: NanoGPTStep, files: dict[str, str], eval_iters: int) -> dict[str, float]:
    """nanoGPT's estimate_loss: the mean loss of `eval_iters` random batches of each split."""
    step.model.eval()
    losses = {}
    for split, path in files.items():
        step.token_file = path
        losses[split] = torch.stack([step.model(*step.get_batch()) for _ in range(eval_iters)]).mean().item()
    step.token_file = files["train"]
    step.model.train()
    return losses


def main(settings: dict) -> None:
    files = {"train": settings["token_file"], "val": settings.pop("val_file")}
    eval_iters = settings.pop("eval_iters")
    step = NanoGPTStep(**{**settings, "dtype": np.dtype(settings["dtype"])})
    losses = estimate_loss(step, files, eval_iters)
    print(f"step 0: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
    print(f"iter 0: loss {step().item():.4f}", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
