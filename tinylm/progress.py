"""Progress reporting for the training loop, on the main process only.

On a terminal: a tqdm bar with loss, learning rate, tokens/s (and model FLOPs
utilisation on GPUs) and ETA. When output is not a terminal (a log file, CI): one plain
line per report. The loop reports every `log_interval` iterations, the only points where
it waits for the device to read the loss.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """Progress of one run. `flops_per_token` and `peak_flops` (known on GPUs only) give the MFU."""

    def __init__(self, total: int, start: int, tokens_per_step: int, enabled: bool,
                 flops_per_token: float | None = None, peak_flops: float | None = None):
        self.total, self.iter = total, start
        self.tokens_per_step = tokens_per_step
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.enabled = enabled
        self.tokens_per_s = 0.0
        self._started, self._start_iter = time.perf_counter(), start
        self.restart_clock()
        self._bar = None
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def step(self) -> None:
        """Count one finished optimizer step (cheap: called every step)."""
        self.iter += 1
        if self._bar is not None:
            self._bar.update(1)

    def log(self, loss: float, lr: float) -> None:
        """Report the loss (a host number, so the device work up to here is done) and throughput."""
        now = time.perf_counter()
        if self.iter > self._clock_iter:  # tokens/s since the last report, evaluations excluded
            elapsed = max(now - self._clock_start, 1e-9)
            self.tokens_per_s = (self.iter - self._clock_iter) * self.tokens_per_step / elapsed
        self._clock_iter, self._clock_start = self.iter, now
        if not self.enabled:
            return
        mfu_text = f"{self.mfu:.1%}" if self.mfu is not None else None
        if self._bar is not None:
            postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok_s": f"{self.tokens_per_s:,.0f}"}
            self._bar.set_postfix(postfix | ({"mfu": mfu_text} if mfu_text else {}), refresh=False)
        else:
            print(f"iter {self.iter}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                  f"{self.tokens_per_s:,.0f} tok/s" + (f" | mfu {mfu_text}" if mfu_text else "") +
                  f" | eta {self._eta()}", flush=True)

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation of the last report's window: achieved FLOP/s over the peak."""
        if not (self.flops_per_token and self.peak_flops):
            return None
        return self.tokens_per_s * self.flops_per_token / self.peak_flops

    def restart_clock(self) -> None:
        """Start the next throughput window now (after an evaluation, so it does not count as training)."""
        self._clock_iter, self._clock_start = self.iter, time.perf_counter()

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
