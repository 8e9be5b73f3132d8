"""Where tinylm relies on a library's internals or works around its bugs: each in one place, with
its reason, and pinned by tests/test_compat.py to the behaviour it relies on, so a new release that
changes it fails there, by name, rather than somewhere in a training run."""

from __future__ import annotations

import atexit
import gc

import torch
from accelerate import Accelerator, PartialState


def close_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, once what uses it is freed.

    Two gloo bugs meet at the end of a multi-process run (torch 2.13): a rank that exits with
    its group alive can abort in C++ ("terminate called without an active exception",
    pytorch#190489), and a DDP reducer freed after the group was destroyed holds the group's last
    reference and deadlocks in its destructor (it joins a gloo worker that waits for the GIL).
    So at exit: collect the reducer first, then destroy the group. Registering twice is harmless.
    """
    atexit.unregister(_close_process_group)
    atexit.register(_close_process_group)


def _close_process_group() -> None:
    if torch.distributed.is_initialized():
        gc.collect()  # frees the DDP reducer (it sits in reference cycles) while the group still lives
        PartialState().destroy_process_group()


def use_loss_scaler(accelerator: Accelerator, scaler: torch.amp.GradScaler) -> None:
    """Run accelerate's fp16 path with `scaler` on any device, the CPU included.

    accelerate turns that path on only for GPUs; these are its own switches (accelerate 1.x):
    `scaler` makes prepare() hand the optimizer the scaler and backward() scale the loss,
    `native_amp` makes autocast() and clip_grad_norm_ (which unscales first) take the fp16 path.
    Call before prepare().
    """
    accelerator.scaler, accelerator.native_amp = scaler, True


def skip_next_step_where(optimizer, nonfinite: torch.Tensor) -> None:
    """Make a fused torch optimizer (as accelerate wraps it) skip its next step where `nonfinite` is true.

    Fused AdamW reads `found_inf`, the tensor GradScaler sets for fused optimizers, and leaves
    weights and moments alone where it is 1: the skip is decided on the device, with no host sync.
    """
    optimizer.optimizer.found_inf = nonfinite.float()
