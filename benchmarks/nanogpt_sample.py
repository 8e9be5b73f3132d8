"""nanoGPT's sample.py, cut to what the end-to-end timing needs: load a checkpoint, sample, print.

    python benchmarks/nanogpt_sample.py CKPT MAX_NEW_TOKENS

CKPT holds {"model_args": GPT(...) keyword arguments, "model": state dict, "itos": id -> char};
benchmarks/generate.py writes it. Nothing here imports tinylm.
"""

import sys

import torch

from reference_gpt import GPT

path, max_new_tokens = sys.argv[1], int(sys.argv[2])
checkpoint = torch.load(path, map_location="cpu", weights_only=True)
model = GPT(**checkpoint["model_args"])
model.load_state_dict(checkpoint["model"])
model.eval()
torch.manual_seed(1337)
start = torch.zeros((1, 1), dtype=torch.long)
tokens = model.generate(start, max_new_tokens)[0].tolist()
print("".join(checkpoint["itos"][t] for t in tokens))
