"""The training loop: a GPT2LMHeadModel trained in a custom loop driven by `accelerate`.

The accelerate calls appear explicitly and in order: `prepare`, `accumulate`,
`backward`, `sync_gradients` / `clip_grad_norm_`; the evaluation's `gather_for_metrics` is in
`tinylm.run_eval`.
Everything here works unchanged on one process or many: batches are a pure
function of (seed, rank, step, micro_step), only the main process writes files
and prints, and every rank takes the same stop decisions.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.distributed.tensor import DTensor

from . import checkpoint, data, lora, memory, run_eval, run_report, shards
from .checkpoint import Loaded, RunState
from .compat import close_process_group_at_exit, skip_next_step_where
from .config import Config, check_seed_fits
from .hardware import (
    Hardware,
    cpu_matmul_for_run,
    choose_hardware,
    configure_backends,
    device_peak_flops,
    use_compile,
)
from .interrupts import InterruptFlag
from .model import build_optimizer, flops_per_token, per_block_loss, run_model
from .paths import BEST_NAME, LAST_NAME
from .run_log import RunLog
from .run_writer import RunWriter
from .schedule import build_scheduler
from .step_stats import StepStats, check_diverged, check_val_loss
from .tracking import check_tracker_installed


class Trainer:
    """One training run, from config (and optionally a checkpoint to resume) to checkpoints.

    `resume` is a checkpoint path or a `checkpoint.Loaded`. A run refuses an out_dir that holds
    another run unless `overwrite`, and one that another process is writing to, always; and one
    whose memory estimate exceeds `memory_limit` bytes (default: on a GPU, what it has free).
    """

    def __init__(self, config: Config, resume: str | Path | Loaded | None = None, *, overwrite: bool = False,
                 memory_limit: int | None = None):
        self.config, self.memory_limit = config, memory_limit
        training = config.training
        check_tracker_installed(training.tracker)  # before any work: not hours of training with no metrics
        lora.check_installed(config.lora)
        self.hardware = hardware = self.choose_hardware()
        self.compiled = use_compile(training.compile, hardware.device)
        self.accelerator = self.make_accelerator()
        close_process_group_at_exit()
        configure_backends(hardware.device)
        self.is_main = self.accelerator.is_main_process
        self.out_dir = Path(training.out_dir)
        for warning in hardware.warnings:
            self.print(f"warning: {warning}")

        self.data = data.resolve(config.data.processed_dir, training.data_format, config.data.tokenizer)
        self.train_tokens = self.data.split("train")
        self.val_tokens = self.data.split("val")
        self.tokenizer = self.data.tokenizer()
        newer = data.newer_data_warning(self.data, config.data.processed_dir)
        if newer:
            self.print(f"warning: {newer}")

        if isinstance(resume, (str, Path)):
            resume = Loaded(Path(resume), checkpoint.load(resume, flag="--resume"))
        check_seed_fits(training.seed, self.accelerator.num_processes)
        self.writer = RunWriter(self.accelerator, self.out_dir, config.hub)
        self.writer.claim(resumed_from=resume.path if resume else None, overwrite=overwrite, say=self.print)
        try:
            self._set_up(resume)
        except BaseException:
            self.close()
            raise

    def choose_hardware(self) -> Hardware:
        """The device and precision the config gets here, with the training page's fallbacks."""
        return choose_hardware(self.config.training.device, self.config.training.precision)

    def make_accelerator(self) -> Accelerator:
        training = self.config.training
        return Accelerator(
            cpu=self.hardware.device == "cpu",
            mixed_precision=self.hardware.mixed_precision,
            gradient_accumulation_steps=training.grad_accum_steps,
            log_with=None if training.tracker == "none" else training.tracker,
            project_dir=training.out_dir,
        )

    def _set_up(self, resume: Loaded | None) -> None:
        """Model, optimizer, scheduler and evaluation data, prepared by accelerate; restored when resuming."""
        training, hardware = self.config.training, self.hardware
        resumed = resume.payload if resume else None
        self.state = RunState()
        # Seeds differ per process, so dropout masks differ across ranks like their batches do.
        set_seed(training.seed, device_specific=True)
        model, self.config, self.base_model = run_model(self.config, self.data, self.tokenizer, resumed,
                                                        sharded=self.writer.sharded)
        self.batches = data.TrainBatches(
            self.train_tokens, block_size=self.config.model.block_size, batch_size=training.batch_size,
            seed=training.seed, grad_accum_steps=training.grad_accum_steps,
            process_index=self.accelerator.process_index, device=self.accelerator.device)
        # Measured on the main process on the first step's blocks; every rank takes the same decisions.
        chosen = [cpu_matmul_for_run(training.cpu_matmul, hardware.device, checkpoint.started_cpu_matmul(resumed),
                                     lambda rows: per_block_loss(model, self.batches.fetch(0)[0][:rows]).mean().backward(),
                                     rows=training.batch_size)
                  if self.is_main else None]
        self.cpu_matmul = broadcast_object_list(chosen)[0]
        model.zero_grad(set_to_none=True)
        if self.compiled:
            # In place (nn.Module.compile), not torch.compile(model): no wrapper module, so the
            # state dict keeps transformers' names ("_orig_mod." would break every checkpoint).
            model.compile()
        optimizer = build_optimizer(model, training)
        eval_loaders = run_eval.loaders(self.config, {"train": self.train_tokens, "val": self.val_tokens})
        self.model, self.optimizer, *prepared = self.accelerator.prepare(model, optimizer, *eval_loaders.values())
        self.evaluation = run_eval.Evaluation(dict(zip(eval_loaders, prepared)), self.accelerator, training,
                                              self.tokenizer, self.cpu_matmul)
        if resume:
            self._restore(resume)
        # Built for this config at the step the run is at: the schedule is a function of the step,
        # so a resumed run follows its own (possibly changed) learning-rate settings from there.
        self.scheduler = build_scheduler(optimizer, training, start_step=self.state.iter)
        self.stats = StepStats(self.accelerator.device, skipped_run=self.state.nonfinite_steps)
        self._flops_per_token = flops_per_token(model)
        self._peak_flops = device_peak_flops(self.accelerator.device, hardware.precision, self.accelerator.num_processes)

    # ----------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train until max_iters, early stopping or an interrupt; return the run's summary."""
        try:
            return self._fit()
        finally:
            self.close()

    def close(self) -> None:
        """Wait for the last upload to the Hub, then let another run use out_dir (fit does this at its end;
        call it for a Trainer never fitted)."""
        self.writer.close(say=self.print)

    def _fit(self) -> dict:
        training = self.config.training
        self._announce()
        stop_reason = "max_iters"
        log = RunLog(self.accelerator, self.config, self.out_dir, start=self.state.iter,
                     tokens_per_step=self.tokens_per_step, flops_per_token=self._flops_per_token,
                     peak_flops=self._peak_flops)
        interrupts = InterruptFlag()
        started = time.perf_counter() - self.state.elapsed_s
        self.model.train()
        with interrupts, log:
            while True:
                step = self.state.iter
                if self._eval_due(step):
                    self.state.elapsed_s = time.perf_counter() - started
                    if self._evaluate_and_checkpoint(step, log):
                        stop_reason = "early_stopping"
                        break
                    log.progress.restart_clock()
                if step >= training.max_iters:
                    break
                self.stats.add_loss(self.train_step(step))
                self.state.iter = step + 1
                log.progress.step()
                if self.state.iter % training.log_interval and self.state.iter != training.max_iters:
                    continue
                report = self.stats.report(self.accelerator)
                self.state.nonfinite_steps = report.skipped_run
                check_diverged(report, self.state.iter, self.out_dir)
                log.step(self.state.iter, report, self.scheduler.get_last_lr()[0],
                         elapsed_s=time.perf_counter() - started)
                if interrupts.raised:
                    self.accelerator.set_trigger()
                if self.accelerator.check_trigger():  # an all-reduce: every rank stops at the same step
                    stop_reason = "interrupted"
                    break
        self.state.elapsed_s = time.perf_counter() - started
        return self._finish(stop_reason)

    def _announce(self) -> None:
        """Before the first step: the banner, and the run --overwrite replaces cleared."""
        model = self.accelerator.unwrap_model(self.model)
        self.memory_estimate = estimate = memory.of_run(
            self.config, model.config, device=self.hardware.device, precision=self.hardware.precision,
            cpu_matmul=self.cpu_matmul.backend, world_size=self.accelerator.num_processes, sharded=self.writer.sharded)
        self.writer.stop_together(memory.refusal(estimate, self.accelerator.device, self.memory_limit))
        speed = (["torch.compile"] if self.compiled else []) + ([self.cpu_matmul.note] if self.cpu_matmul.note else [])
        self.print(run_report.banner(self.config, model, self.data, self.train_tokens.num_tokens,
                                     self.val_tokens.num_tokens, device=run_report.device_name(self.accelerator.device),
                                     precision=self.hardware.precision,
                                     world_size=self.accelerator.num_processes, speed=speed,
                                     memory=estimate.summary()))
        self.writer.clear_replaced_run(say=self.print)

    def _finish(self, stop_reason: str) -> dict:
        """After the last step: train_log.json's summary (and ckpt_last.pt when interrupted), what to do next."""
        summary = run_report.summary(self.state, stop_reason, tokens_per_step=self.tokens_per_step,
                                     world_size=self.accelerator.num_processes)
        self._save([LAST_NAME] if stop_reason == "interrupted" else [], val_loss=None, summary=summary)
        self.print(run_report.ending(summary, self.out_dir, world_size=self.accelerator.num_processes,
                                     distributed_type=self.accelerator.distributed_type,
                                     speed_text=run_report.speed(summary, self._flops_per_token, self._peak_flops)))
        return summary

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss, on the device.

        Nothing here waits for the device, so on a GPU the host queues this step's work and
        goes on to read the next step's batches while the GPU runs it.
        """
        loss_sum = torch.zeros((), device=self.accelerator.device)
        for blocks in self.batches.take(step):
            # accumulate() skips the DDP all-reduce on all but the last micro-step, and
            # backward() already divides the loss by grad_accum_steps: don't divide again.
            with self.accelerator.accumulate(self.model), self.cpu_matmul.active():
                loss = per_block_loss(self.model, blocks).mean()
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    self._optimizer_step()
            loss_sum += loss.detach()
        self.scheduler.step()
        self.batches.prefetch(step + 1)
        return loss_sum / self.config.training.grad_accum_steps

    def _optimizer_step(self) -> None:
        """Clip, then step; a step whose (already all-reduced) gradients are not finite changes nothing.

        Decided on the device, never waiting for it: with an fp16 loss scaler, the scaler found
        the inf/nan when clip_grad_norm_ unscaled, and step() lets it skip the update and halve
        the scale (skipping step() would skip the scaler's update() too, and the next unscale_
        would fail). Without one, fused AdamW skips the update itself where `found_inf` is set,
        the attribute GradScaler sets for fused optimizers. (accelerate's `step_was_skipped` can't
        tell here: for a fused optimizer GradScaler always calls step() and lets the kernel skip.)
        """
        max_norm = self.config.training.grad_clip or math.inf
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(grad_norm, DTensor):  # FSDP2: the norm of the sharded gradients, already all-reduced
            grad_norm = grad_norm.full_tensor()
        grad_norm = torch.as_tensor(grad_norm, device=self.accelerator.device)
        nonfinite = ~torch.isfinite(grad_norm)
        if self.accelerator.scaler is None:
            skip_next_step_where(self.optimizer, nonfinite)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stats.add_step(grad_norm, nonfinite)

    # ----------------------------------------------------- evaluation and saving

    def _eval_due(self, step: int) -> bool:
        training = self.config.training
        due = step % training.eval_interval == 0 or step >= training.max_iters
        return due and not self.state.logged(step)

    def evaluate(self) -> dict[str, float]:
        """Mean loss over the fixed evaluation blocks of each split (`run_eval.Evaluation.losses`)."""
        return self.evaluation.losses(self.model)

    def _evaluate_and_checkpoint(self, step: int, log: RunLog) -> bool:
        """Evaluate at `step`, log, save checkpoints; return True when early stopping says stop."""
        training = self.config.training
        losses = self.evaluate()
        val_loss = losses["val"]
        check_val_loss(val_loss, step, self.out_dir)
        state = self.state
        improved = state.note_eval(step, val_loss, training.early_stopping_min_delta)
        record = run_report.eval_record(step, losses, lr=self.scheduler.get_last_lr()[0],
                                        tokens_seen=step * self.tokens_per_step, elapsed_s=state.elapsed_s,
                                        tokens_per_s=log.progress.tokens_per_s)
        sample = self.evaluation.sample(self.model)
        if sample is not None:
            record["sample"] = sample
        state.records.append(record)
        log.evaluation(record, improved)
        self._save([LAST_NAME, BEST_NAME] if improved and training.save_best else [LAST_NAME], val_loss)
        self.writer.report(say=log.write)
        stop = training.early_stopping and state.evals_without_improvement >= training.early_stopping_patience
        if stop:
            log.write(run_report.early_stopping_line(step, state, training.early_stopping_min_delta))
        return stop

    def _save(self, names: list[str], val_loss: float | None, summary: dict | None = None) -> None:
        """One checkpoint under each of `names`, then train_log.json; see `RunWriter.save`."""
        def payload(weights: dict, rng_states: list, optimizer_shards: str | None) -> dict:
            return checkpoint.run_payload(
                weights=weights, model=self.accelerator.unwrap_model(self.model), tokenizer=self.tokenizer,
                data=self.data, config=self.config, base_model=self.base_model, state=self.state,
                val_loss=val_loss, optimizer_state=None if self.writer.sharded else self.optimizer.state_dict(),
                optimizer_shards=optimizer_shards, scaler=self.accelerator.scaler, rng_states=rng_states,
                world_size=self.accelerator.num_processes, cpu_matmul=self.cpu_matmul.backend)

        train_log = {"config": self.config.to_dict(), "records": self.state.records, "summary": summary}
        self.writer.save(names, self.model, self.optimizer.optimizer, payload, train_log, step=self.state.iter)

    # ------------------------------------------------------------------ resume

    def _restore(self, resume: Loaded) -> None:
        def load_shards() -> None:  # every process together, each its shard
            shards.load(shards.folder_of(resume.path, resume.payload), self.model, self.optimizer.optimizer)

        self.state, warning = checkpoint.restore_training(
            resume.payload, optimizer=self.optimizer, scaler=self.accelerator.scaler,
            process_index=self.accelerator.process_index, num_processes=self.accelerator.num_processes,
            load_shards=load_shards)
        if warning:
            self.print(f"warning: {warning}")
        self.print(f"resumed from iter {self.state.iter} (best val loss {self.state.best_val_loss:.4f})")

    # ------------------------------------------------------------------ helpers

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step across all processes."""
        return self.config.effective_batch_size * self.accelerator.num_processes * self.config.model.block_size

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def train(config: Config, resume: str | Path | Loaded | None = None, *, overwrite: bool,
          memory_limit: int | None = None) -> dict:
    """Run training end to end; return the summary also written to train_log.json."""
    return Trainer(config, resume, overwrite=overwrite, memory_limit=memory_limit).fit()
