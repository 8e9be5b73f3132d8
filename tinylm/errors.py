"""The one exception type for mistakes a user can fix.

Command-line entry points catch `UserError`, print its message on one line
(plus the docs link when there is one) and exit non-zero without a traceback.
Anything else is a bug in tinylm and keeps its traceback.
"""

from __future__ import annotations

from .paths import TROUBLESHOOTING

# Sections of docs/troubleshooting.md that messages link to. Every one is linked from a message the
# code prints, and every section of that page (but its closing list) is one of these: tests check both.
BINARY_SHARDS_NOT_FOUND = "binary-shards-not-found"
META_PATH_MISMATCH = "meta-path-mismatch"
CHAR_VOCAB_MISSING = "char-vocab-missing"
CUDA_NOT_DETECTED = "cuda-not-detected"
ANCHORS = (BINARY_SHARDS_NOT_FOUND, META_PATH_MISMATCH, CHAR_VOCAB_MISSING, CUDA_NOT_DETECTED)


def troubleshooting_link(anchor: str) -> str:
    """Where the docs explain `anchor`: docs/troubleshooting.md#anchor."""
    if anchor not in ANCHORS:
        raise ValueError(f"{anchor!r} is not a section of {TROUBLESHOOTING}: one of {ANCHORS}")
    return f"{TROUBLESHOOTING}#{anchor}"


def command_line(*words: object) -> str:
    """A command for a message, quoted for the shell: a path with a space pastes as one argument."""
    import shlex

    return shlex.join(map(str, words))


class UserError(Exception):
    """A problem with the user's input: a file, a flag or a config key.

    The message says what is wrong, which file or key, and how to fix it.
    `anchor` names a section of docs/troubleshooting.md when one applies.
    """

    exit_code = 2

    def __init__(self, message: str, *, anchor: str | None = None):
        super().__init__(message)
        self.anchor = anchor

    def __str__(self) -> str:
        text = super().__str__()
        if self.anchor:
            text += f" (see {troubleshooting_link(self.anchor)})"
        return text


def run_cli(main, argv=None) -> int:
    """Run a command's `main(argv)`; turn a `UserError` into one line on stderr and exit code 2."""
    import sys

    try:
        return main(argv) or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
