"""Run `tinylm train` with test-only slowdowns, so a test can kill it at a chosen moment.

Usage: python tests/slow_train.py STEP_DELAY SLOW_SAVE_FROM [train flags...]
- STEP_DELAY: seconds to sleep before every optimizer step.
- SLOW_SAVE_FROM: the N-th file write (1-based; checkpoints through torch.save, train_log.json
  through tinylm.atomic's json.dump) and later ones write half the file, touch
  `<file>.half-written`, then hang; 0 disables. The product code is untouched.
"""

import io
import json
import sys
import time
import types
from pathlib import Path

import torch

import tinylm.atomic as atomic_module
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


def is_slow_write() -> bool:
    global saves
    saves += 1
    return bool(slow_save_from) and saves >= slow_save_from


def hang_half_way(handle, payload, name) -> None:
    handle.write(payload[: len(payload) // 2])
    handle.flush()
    Path(f"{name}.half-written").touch()
    time.sleep(600)
    handle.write(payload[len(payload) // 2 :])


def slow_save(obj, target, *args, **kwargs):
    if not is_slow_write():
        return original_save(obj, target, *args, **kwargs)
    buffer = io.BytesIO()
    original_save(obj, buffer, *args, **kwargs)
    with open(target, "wb") as handle:
        hang_half_way(handle, buffer.getvalue(), target)


def slow_json_dump(data, handle, **kwargs):
    if not is_slow_write():
        return json.dump(data, handle, **kwargs)
    hang_half_way(handle, json.dumps(data, **kwargs), handle.name)


trainer_module.Trainer.train_step = slow_step
torch.save = slow_save
atomic_module.json = types.SimpleNamespace(dump=slow_json_dump)  # only the json that tinylm.atomic writes with
sys.exit(run_cli(main, sys.argv[3:]))
