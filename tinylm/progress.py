"""Progress reporting for the training loop, on the main process only.

On a terminal: a tqdm bar with loss, learning rate, tokens/s and ETA. When output
is not a terminal (a log file, CI): one plain line every `log_interval` iterations.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    def __init__(self, total: int, start: int, tokens_per_step: int, enabled: bool, log_interval: int):
        self.total, self.iter = total, start
        self.tokens_per_step = tokens_per_step
        self.enabled, self.log_interval = enabled, log_interval
        self.tokens_per_s = 0.0
        self._window_start, self._window_iters = time.perf_counter(), 0
        self._started = time.perf_counter()
        self._start_iter = start
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def step(self, loss: float, lr: float) -> None:
        """Record one finished optimizer step."""
        self.iter += 1
        self._window_iters += 1
        now = time.perf_counter()
        # Throughput over a window of at least a second, restarted after each full window.
        self.tokens_per_s = self._window_iters * self.tokens_per_step / max(now - self._window_start, 1e-9)
        if now - self._window_start >= 1.0:
            self._window_start, self._window_iters = now, 0
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens_per_s:,.0f}", refresh=False)
            self._bar.update(1)
        elif self.iter % self.log_interval == 0 or self.iter == self.total:
            print(f"iter {self.iter}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                  f"{self.tokens_per_s:,.0f} tok/s | eta {self._eta()}", flush=True)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def _eta(self) -> str:
        done = self.iter - self._start_iter
        if done <= 0:
            return "?"
        seconds = (time.perf_counter() - self._started) / done * (self.total - self.iter)
        minutes, seconds = divmod(int(seconds), 60)
        return f"{minutes}m{seconds:02d}s"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.close()
        return False
