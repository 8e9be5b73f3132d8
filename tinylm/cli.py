"""`tinylm COMMAND ...`: a thin dispatcher to each command's module.

Each command lives in its own module with a `main(argv) -> int`; modules are
imported only when their command runs, so `tinylm --help` stays instant.
"""

from __future__ import annotations

import importlib
import sys

from . import startup
from .errors import run_cli

COMMANDS = {
    "prepare": ("tinylm.prepare", "tokenize a corpus into train/val token files"),
    "train": ("tinylm.train", "train a model (also: python tinylm/train.py, accelerate launch)"),
    "generate": ("tinylm.generate", "sample text from a checkpoint or exported model"),
    "eval": ("tinylm.evaluate", "score a model on a text: loss, perplexity, bits per byte"),
    "demo": ("tinylm.demo", "serve a browser demo of a checkpoint (needs tinylm[demo])"),
    "export": ("tinylm.export", "write a transformers model folder (and ONNX) from a checkpoint"),
    "push": ("tinylm.push", "upload an exported model folder to the Hugging Face Hub"),
    "plot": ("tinylm.plot", "draw runs' loss, best val loss and learning rate to a PNG"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tinylm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "Run `tinylm COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    startup.command_process()
    module = importlib.import_module(COMMANDS[name][0])
    return run_cli(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
