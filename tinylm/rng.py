"""Capture and restore every random number generator a training process uses.

States are plain tensors, ints and lists, so they fit a `weights_only` checkpoint.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    """The current state of Python's, NumPy's and torch's (CPU and CUDA) generators."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore(state: dict) -> None:
    """Put every generator back to a state returned by `capture`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": state["numpy"]["key"].numpy().astype(np.uint32), "pos": state["numpy"]["pos"]},
        "has_gauss": 0,
        "gauss": 0.0,
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
