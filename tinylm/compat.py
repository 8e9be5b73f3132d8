"""Work-arounds for bugs in the libraries tinylm builds on: each in one place, with its reason."""

from __future__ import annotations

import atexit
import gc

import torch
from accelerate import PartialState


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
