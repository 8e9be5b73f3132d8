"""Run `tinylm train` with test-only slowdowns, so a test can kill it at a chosen moment.

Usage: python tests/slow_train.py STEP_DELAY SLOW_SAVE_FROM [train flags...]
- STEP_DELAY: seconds to sleep before every optimizer step.
- SLOW_SAVE_FROM: the N-th checkpoint write (1-based) and later ones write half the file,
  touch `<file>.half-written`, then hang; 0 disables. The product code is untouched.
"""

import io
import sys
import time
from pathlib import Path

import torch

import tinylm.trainer as trainer_module
from tinylm.errors import run_cli
from tinylm.train import main

step_delay, slow_save_from = float(sys.argv[1]), int(sys.argv[2])
original_step = trainer_module.Trainer.train_step
original_save = torch.save
saves = 0


def slow_step(self, step):
    time.sleep(step_delay)
    return original_step(self, step)


def slow_save(obj, target, *args, **kwargs):
    global saves
    saves += 1
    if not slow_save_from or saves < slow_save_from:
        return original_save(obj, target, *args, **kwargs)
    buffer = io.BytesIO()
    original_save(obj, buffer, *args, **kwargs)
    payload = buffer.getvalue()
    with open(target, "wb") as handle:
        handle.write(payload[: len(payload) // 2])
        handle.flush()
        Path(f"{target}.half-written").touch()
        time.sleep(600)
        handle.write(payload[len(payload) // 2 :])


trainer_module.Trainer.train_step = slow_step
torch.save = slow_save
sys.exit(run_cli(main, sys.argv[3:]))
