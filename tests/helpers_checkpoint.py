"""Build tiny real checkpoints and exported model folders for tests (no training loop needed).

A 2-layer, 32-wide GPT-2 with a 16-token context is trained for a few dozen AdamW
steps on a repetitive sentence, so it has learned the sentence and its samples
are recognisably text, not noise. Import it from a test as
`from helpers_checkpoint import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from tinylm import checkpoint, model as tinymodel, tokenizer as tok
from tinylm.config import Config, ModelConfig

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
BLOCK_SIZE = 16


def train_tiny_model(text: str = TEXT, block_size: int = BLOCK_SIZE, steps: int = 60, seed: int = 0):
    """(model in eval mode, its GPT2Config, wrapped char tokenizer) after `steps` AdamW steps on `text`."""
    tokenizer = tok.wrap(tok.train_char([text]))
    config = tinymodel.gpt2_config(
        ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size), vocab_size=len(tokenizer)
    )
    torch.manual_seed(seed)
    model = tinymodel.build_model(config)
    data = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - block_size - 1, (16,), generator=batches)
        blocks = torch.stack([data[start : start + block_size + 1] for start in starts])
        loss = tinymodel.per_block_loss(model, blocks).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), config, tokenizer


def save_checkpoint(path: Path, model, config, tokenizer, iteration: int = 60) -> Path:
    """Write `model` + `tokenizer` as a tinylm checkpoint file at `path`."""
    checkpoint.save(path, {
        "model": model.state_dict(),
        "model_config": config.to_dict(),
        "tokenizer": {"kind": "char", "path": "", "json": tok.to_json(tokenizer)},
        "config": Config().to_dict(),
        "meta": {},
        "iter": iteration,
        "best_val_loss": float("inf"),
        "val_loss": None,
        "train_state": {},
    })
    return path


def save_exported(folder: Path, model, tokenizer) -> Path:
    """Write `model` + `tokenizer` as a plain transformers folder (what `tinylm export` produces)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_checkpoint(path: Path) -> Path:
    """Train the tiny model and save it as a checkpoint at `path`."""
    model, config, tokenizer = train_tiny_model()
    return save_checkpoint(path, model, config, tokenizer)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error from a CLI subprocess: exit 2 and exactly one `error: ...` line holding `needles`."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
