"""What the training loop counts between two reports, kept on the device.

Reading a tensor makes the host wait for the device, so a step only adds to these counters;
`StepStats.report` reads them back, with one all-reduce and one host read, every log_interval steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UserError

# Optimizer steps in a row whose gradients are inf/nan before we give up. Under fp16
# the loss scaler skips a few such steps while it finds its scale; more means divergence.
MAX_NONFINITE_STEPS = 10


@dataclass
class Report:
    loss: float  # the mean train loss since the last report, over every process
    grad_norm: float  # the mean pre-clip gradient norm of the steps applied since then (nan if none)
    skipped_run: int  # how many optimizer steps in a row, up to now, had inf/nan gradients
    longest_skipped_run: int  # the longest such run since the last report


class StepStats:
    """Train losses, gradient norms and runs of skipped (non-finite) steps, summed on the device."""

    def __init__(self, device: torch.device, skipped_run: int):
        self.loss_sum = torch.zeros((), device=device)
        self.losses = 0
        self.grad_norm_sum = torch.zeros((), device=device)
        self.grad_norm_steps = torch.zeros((), device=device)
        # A resumed run carries on the run of skipped steps it was in.
        self.skipped_run = torch.tensor(skipped_run, device=device)
        self.longest_skipped_run = self.skipped_run.clone()

    def add_loss(self, loss: torch.Tensor) -> None:
        """One optimizer step's mean loss."""
        self.loss_sum += loss
        self.losses += 1

    def add_step(self, grad_norm: torch.Tensor, nonfinite: torch.Tensor) -> None:
        """One optimizer step's pre-clip gradient norm; `nonfinite` when the step was skipped."""
        self.skipped_run = (self.skipped_run + 1) * nonfinite  # back to 0 after a good step
        self.longest_skipped_run = torch.maximum(self.longest_skipped_run, self.skipped_run)
        self.grad_norm_sum += torch.where(nonfinite, 0.0, grad_norm)  # a skipped step's inf/nan left out
        self.grad_norm_steps += (~nonfinite).float()

    def report(self, accelerator) -> Report:
        """The means since the last report, then start counting afresh.

        Every process ran the same steps on equal batches, so the mean loss over processes is
        their sum over num_processes; the gradient norm (of all-reduced gradients) is the same on all.
        """
        sums = accelerator.reduce(torch.stack([self.loss_sum, self.grad_norm_sum, self.grad_norm_steps]), "sum")
        loss_total, grad_norm_total, grad_norm_steps = sums.tolist()
        report = Report(loss=loss_total / (self.losses * accelerator.num_processes),
                        grad_norm=grad_norm_total / grad_norm_steps if grad_norm_steps else math.nan,
                        skipped_run=int(self.skipped_run), longest_skipped_run=int(self.longest_skipped_run))
        self.loss_sum.zero_()
        self.losses = 0
        self.grad_norm_sum.zero_()
        self.grad_norm_steps.zero_()
        self.longest_skipped_run = self.skipped_run.clone()
        return report


def check_diverged(report: Report, iteration: int, out_dir) -> None:
    """Stop the run when MAX_NONFINITE_STEPS optimizer steps in a row were skipped."""
    if report.longest_skipped_run >= MAX_NONFINITE_STEPS:
        raise UserError(
            f"training diverged: {report.longest_skipped_run} optimizer steps in a row had inf/nan gradients "
            f"(by iter {iteration}); lower training.learning_rate, or use precision = \"bf16\"/\"fp32\". "
            f"The last good checkpoint in {out_dir} was kept"
        )


def check_val_loss(val_loss: float, iteration: int, out_dir) -> None:
    """Stop the run, before anything is saved, when an evaluation's validation loss is not finite."""
    if not math.isfinite(val_loss):
        raise UserError(
            f"validation loss is {val_loss} at iter {iteration}; nothing was saved over the last good checkpoint "
            f"in {out_dir}. Lower training.learning_rate or use precision = \"fp32\""
        )
