"""The one exception type for mistakes a user can fix.

Command-line entry points catch `UserError`, print its message on one line
(plus the docs link when there is one) and exit non-zero without a traceback.
Anything else is a bug in tinylm and keeps its traceback.
"""

from __future__ import annotations

from .paths import TROUBLESHOOTING


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
            text += f" (see {TROUBLESHOOTING}#{self.anchor})"
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
