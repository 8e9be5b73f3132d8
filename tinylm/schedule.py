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


def describe(training: TrainingConfig) -> str:
    """The schedule in one line, and where this run stops on it (its last step's learning rate)."""
    peak, last = training.learning_rate, lr_at(training.max_iters - 1, training)
    start = f"warmup to {rate(peak)} over {training.warmup_iters} steps" if training.warmup_iters else rate(peak)
    return (f"{start}, cosine to min_lr {rate(training.min_lr)} at step {training.lr_decay_iters}; this run stops "
            f"at step {training.max_iters}, its last step at lr {rate(last)} ({last / peak:.0%} of the peak)")


def rate(value: float) -> str:
    """A learning rate as people write them: 6e-4, 5.88e-4."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def warning(training: TrainingConfig) -> str | None:
    """What to tell a run that stops before its warmup ends: it never trains at learning_rate."""
    if training.max_iters > training.warmup_iters:
        return None
    return (f"this run stops at step {training.max_iters}, before its warmup ends at step {training.warmup_iters}: "
            "the learning rate never reaches training.learning_rate; pass a larger --max-iters or a shorter "
            "--warmup-iters")


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
