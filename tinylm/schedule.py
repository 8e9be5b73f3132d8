"""The learning-rate schedule: linear warmup, then cosine decay to `min_lr` (as nanoGPT)."""

from __future__ import annotations

import math

import torch

from .config import TrainingConfig


def lr_at(step: int, training: TrainingConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < training.warmup_iters:
        return training.learning_rate * (step + 1) / (training.warmup_iters + 1)
    if step >= training.lr_decay_iters:
        return training.min_lr
    # Here warmup_iters <= step < lr_decay_iters, so the span is at least one step.
    progress = (step - training.warmup_iters) / (training.lr_decay_iters - training.warmup_iters)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return training.min_lr + cosine * (training.learning_rate - training.min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, training: TrainingConfig, *,
                    start_step: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_at`, at `start_step`. Step it once per optimizer step, on every process.

    It is deliberately not passed to `accelerator.prepare`: accelerate would step it
    once per process per call, advancing the schedule `num_processes` times too fast.
    """
    peak = training.learning_rate
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = peak  # LambdaLR scales initial_lr; a resumed run has a new peak
    # last_epoch is the step before: the constructor takes one step, to `start_step`.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, training) / peak,
                                             last_epoch=start_step - 1)
