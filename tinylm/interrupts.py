"""Stopping a run cleanly: the first Ctrl-C or SIGTERM becomes a flag the training loop reads."""

from __future__ import annotations

import signal


class InterruptFlag:
    """Turn the first Ctrl-C / SIGTERM into a flag the loop checks after the current step.

    A second Ctrl-C interrupts at once (the default behaviour comes back).
    """

    def __init__(self):
        self.raised = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.raised = True
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False
