"""Run `tinylm train` while recording which process renames files into place.

Usage: python tests/spy_train.py WRITES_LOG [train flags...]
Every os.replace (how tinylm's atomic writes land) appends "RANK TARGET" to WRITES_LOG, and a rank
whose process group is still open when the interpreter shuts down appends
"RANK process-group-left-open" (such a gloo rank can abort at exit and fail a finished run).
The product code is untouched; this only observes it.
"""

import atexit
import os
import sys

import torch

writes_log = sys.argv[1]
rank = os.environ.get("RANK", "0")


def check_process_group() -> None:
    if torch.distributed.is_initialized():
        with open(writes_log, "a") as log:
            log.write(f"{rank} process-group-left-open\n")


atexit.register(check_process_group)  # registered before tinylm's own: atexit runs it after them

from tinylm.errors import run_cli  # noqa: E402
from tinylm.train import main  # noqa: E402

original_replace = os.replace


def spying_replace(source, target, *args, **kwargs):
    with open(writes_log, "a") as log:
        log.write(f"{rank} {os.fspath(target)}\n")
    return original_replace(source, target, *args, **kwargs)


os.replace = spying_replace
sys.exit(run_cli(main, sys.argv[2:]))
