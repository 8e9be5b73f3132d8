"""Where a run's numbers go as it trains: the progress bar or lines, training.tracker and metrics.jsonl.

Each logged step (every log_interval) and each evaluation is told once, here, and this fans it out;
only the main process prints and writes, accelerate's trackers log on the main process only.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from .config import Config
from .metrics_log import MetricsLog
from .paths import METRICS_NAME
from .progress import Progress
from .run_folder import TRACKER_PROJECT
from .run_report import eval_line
from .step_stats import Report
from .tracking import flat_config


class RunLog:
    """The numbers of one run from step `start`; a context manager (it closes the bar and the trackers).

    Open it after the replaced run's files are cleared: the trackers create their files in out_dir.
    """

    def __init__(self, accelerator: Accelerator, config: Config, out_dir: Path, *, start: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops: float | None):
        self.accelerator = accelerator
        self.tokens_per_step = tokens_per_step
        self.tracking = config.training.tracker != "none"
        self.progress = Progress(config.training.max_iters, start, tokens_per_step, accelerator.is_main_process,
                                 flops_per_token, peak_flops)
        if self.tracking:
            accelerator.init_trackers(TRACKER_PROJECT, config=flat_config(config.to_dict()))
        self.metrics = MetricsLog(out_dir / METRICS_NAME, start) if accelerator.is_main_process else None

    def step(self, step: int, report: Report, lr: float, elapsed_s: float) -> None:
        """A logged step: the progress line, the tracker and metrics.jsonl."""
        self.progress.log(report.loss, lr)
        tokens_per_s = self.progress.tokens_per_s
        self._track({"train/loss": report.loss, "train/lr": lr, "train/grad_norm": report.grad_norm,
                     "train/tokens_per_s": tokens_per_s}, step)
        if self.metrics is not None:
            self._warn(self.metrics.log_step({
                "iter": step, "train_loss": report.loss, "lr": lr, "grad_norm": report.grad_norm,
                "tokens_seen": step * self.tokens_per_step, "tokens_per_s": tokens_per_s,
                "elapsed_s": round(elapsed_s, 3)}))

    def evaluation(self, record: dict, improved: bool) -> None:
        """An evaluation (its train_log.json record, with the sample if it has one)."""
        step = record["iter"]
        self.write(eval_line(record, improved))
        if self.metrics is not None:
            self._warn(self.metrics.log_eval(record))
        self._track({"train/eval_loss": record["train_loss"], "train/eval_ppl": record["train_ppl"],
                     "val/loss": record["val_loss"], "val/ppl": record["val_ppl"]}, step)
        if "sample" in record:
            self.write("\n".join(f"  > {line}" for line in record["sample"].split("\n")))
            self._track({"eval/sample": record["sample"]}, step)

    def write(self, message: str) -> None:
        """Print a line (main process) without breaking the progress bar."""
        self.progress.write(message)

    def _track(self, metrics: dict, step: int) -> None:
        if self.tracking:
            self.accelerator.log(metrics, step=step)

    def _warn(self, warning: str | None) -> None:
        if warning:
            self.write(f"warning: {warning}")

    def __enter__(self) -> RunLog:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self.progress.__exit__(*exc)
        for tracker in self.accelerator.trackers:  # end_training() would also destroy the process group,
            tracker.finish()                        # too early: see compat.close_process_group_at_exit
        return False
