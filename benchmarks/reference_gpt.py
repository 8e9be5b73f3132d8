"""The baseline users compare tinylm with: a GPT written plainly in PyTorch, the way nanoGPT writes it.

nn.Linear layers, one fused qkv projection, `scaled_dot_product_attention(is_causal=True)`,
exact GELU, LayerNorm, tied embeddings, GPT-2's init (normal 0.02, residual projections
scaled by 1/sqrt(2 * n_layer)), biases everywhere (the same parameters as a GPT2LMHeadModel
of the same shape), AdamW over nanoGPT's two groups, and nanoGPT's training step: get_batch
from a memory-mapped token file, forward (under autocast in bf16/fp16), backward (through its
GradScaler, enabled in fp16 only), clip, step, zero_grad. Nothing here imports tinylm, so nothing
of ours can speed up or slow down the baseline.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.dropout = n_head, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float = 0.0):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss against `targets`; without targets, the last position's logits (as nanoGPT)."""
        positions = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :])
        logits = self.lm_head(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.8, top_k: int = 200):
        """nanoGPT's sampler: every token recomputes the whole (cropped) context."""
        block_size = self.wpe.weight.size(0)
        for _ in range(max_new_tokens):
            logits = self(idx[:, -block_size:])[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # nanoGPT: the fused kernel on CUDA, PyTorch's default (foreach) elsewhere.
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


class NanoGPTStep:
    """nanoGPT's train.py inner loop for one iteration, on its own model, optimizer and data."""

    def __init__(self, token_file: str, dtype: np.dtype, vocab_size: int, *, n_layer: int, n_head: int, n_embd: int,
                 block_size: int, batch_size: int, learning_rate: float, weight_decay: float,
                 betas: tuple[float, float], grad_clip: float, device: str = "cpu", precision: str = "fp32",
                 seed: int = 1337):
        torch.manual_seed(seed)
        self.token_file, self.dtype = token_file, dtype
        self.block_size, self.batch_size, self.grad_clip, self.device = block_size, batch_size, grad_clip, device
        self.device_type = "cuda" if "cuda" in device else "cpu"
        self.model = GPT(vocab_size, block_size, n_layer, n_head, n_embd).to(device).train()
        self.optimizer = self.model.configure_optimizers(weight_decay, learning_rate, betas, self.device_type)
        # nanoGPT's `ctx` and `scaler` ("bf16"/"fp16"; nanoGPT itself never autocasts on CPU, gpu_check --smoke does)
        half = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.autocast = torch.autocast(self.device_type, dtype=half) if half else contextlib.nullcontext()
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        # nanoGPT re-creates the memmap every batch to avoid a memory leak.
        data = np.memmap(self.token_file, dtype=self.dtype, mode="r")
        ix = torch.randint(len(data) - self.block_size, (self.batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + self.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + self.block_size].astype(np.int64)) for i in ix])
        if self.device_type == "cuda":  # pinned, so the copies are asynchronous
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def __call__(self) -> torch.Tensor:
        x, y = self.get_batch()
        with self.autocast:
            loss = self.model(x, y)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()
