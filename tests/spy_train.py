"""Run `tinylm train` while recording which process renames files into place.

Usage: python tests/spy_train.py WRITES_LOG [train flags...]
Every os.replace (how tinylm's atomic writes land) appends "RANK TARGET" to WRITES_LOG.
The product code is untouched; this only observes it.
"""

import os
import sys

from tinylm.errors import run_cli
from tinylm.train import main

writes_log = sys.argv[1]
original_replace = os.replace


def spying_replace(source, target, *args, **kwargs):
    with open(writes_log, "a") as log:
        log.write(f"{os.environ.get('RANK', '0')} {os.fspath(target)}\n")
    return original_replace(source, target, *args, **kwargs)


os.replace = spying_replace
sys.exit(run_cli(main, sys.argv[2:]))
