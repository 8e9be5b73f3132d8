"""A command's start and exit: Python's cyclic garbage collector around torch and transformers.

Importing transformers' GPT-2 (and with it torch, torch._dynamo and DTensor) creates millions of
Python objects. The cyclic collector walks them over and over while they are being created, and
again at interpreter shutdown, where clearing the modules sets off full collections: about 0.3 s
and 1 s of CPU on the AMD EPYC where it was measured, out of 3.5 s for a bare
`import transformers.models.gpt2.modeling_gpt2` (docs/inference-and-demo.md#start-up).

- `heavy_imports()` pauses the collector while a command imports them. In a command's own process
  (`command_process()`) it then freezes what they built (`gc.freeze`): those objects live as long
  as the process, and the collector never walks them again, in the run or at exit. Used as a
  library (tests, a notebook), the collector is only paused and then restored.
- `command_process()`, at a command's entry point, also freezes every object at exit, after the
  other exit handlers have run, so shutdown skips the collections over the whole heap. Nothing at
  exit depends on them: Python never promises to call `__del__` of objects alive at exit, and
  tinylm closes, flushes and renames its files itself (`tinylm.atomic`).

Only cyclic garbage is affected: reference counting frees everything else as before.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from collections.abc import Iterator

_command = False  # this process runs one tinylm command, then exits


def command_process() -> None:
    """Called by a command's entry point (`tinylm ...`, `python tinylm/train.py`): freeze at exit."""
    global _command
    if not _command:
        _command = True
        atexit.register(gc.freeze)  # handlers run last-registered first: those of libraries imported later, before it


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """Import torch and transformers inside this block: the collector waits, then keeps off them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if _command:
            gc.freeze()
        if enabled:
            gc.enable()
