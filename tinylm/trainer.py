"""The training loop: a GPT2LMHeadModel trained in a custom loop driven by `accelerate`.

The accelerate calls appear explicitly and in order: `prepare`, `accumulate`,
`backward`, `sync_gradients` / `clip_grad_norm_`, `gather_for_metrics`.
Everything here works unchanged on one process or many: batches are a pure
function of (seed, rank, step, micro_step), only the main process writes files
and prints, and every rank takes the same stop decisions.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed

from . import checkpoint, data, rng, run_folder, run_report, sampler
from .atomic import write_json
from .checkpoint import Loaded, RunState
from .compat import close_process_group_at_exit, skip_next_step_where
from .config import Config, Sampling, check_seed_fits
from .errors import UserError
from .hardware import (
    Hardware,
    cpu_matmul_for_run,
    choose_hardware,
    configure_backends,
    peak_flops,
    use_compile,
)
from .model import flops_per_token, optimizer_groups, per_block_loss, run_model
from .metrics_log import MetricsLog
from .paths import BEST_NAME, LAST_NAME, METRICS_NAME, TRAIN_LOG_NAME
from .progress import Progress
from .run_folder import TRACKER_PROJECT
from .schedule import build_scheduler
from .schedule import warning as schedule_warning
from .step_stats import Report, StepStats, check_diverged
from .tracking import check_tracker_installed, flat_config


class Trainer:
    """One training run, from config (and optionally a checkpoint to resume) to checkpoints.

    `resume` is a checkpoint path or a `checkpoint.Loaded`. A run refuses an out_dir that holds
    another run unless `overwrite`, and one that another process is writing to, always.
    """

    def __init__(self, config: Config, resume: str | Path | Loaded | None = None, *, overwrite: bool = False):
        self.config = config
        training = config.training
        check_tracker_installed(training.tracker)  # before any work: not hours of training with no metrics
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
        self._lock = run_folder.lock(self.out_dir)
        self._check_before_training(resume, overwrite)
        try:
            self._set_up(resume.payload if resume else None)
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

    def _set_up(self, resumed: dict | None) -> None:
        """Model, optimizer, scheduler and evaluation data, prepared by accelerate; restored when resuming."""
        training, hardware = self.config.training, self.hardware
        self.cpu_matmul = cpu_matmul_for_run(training.cpu_matmul, hardware.device, self.config.model.n_embd,
                                             training.batch_size * self.config.model.block_size,
                                             started_with=checkpoint.started_cpu_matmul(resumed))
        self.state = RunState()
        # Seeds differ per process, so dropout masks differ across ranks like their batches do.
        set_seed(training.seed, device_specific=True)
        if resumed:
            checkpoint.check_same_origin(resumed, self.config.model, self.data, self.tokenizer)
        model, self.config, self.base_model = run_model(self.config, self.data, self.tokenizer, resumed)
        if resumed:
            checkpoint.check_resumable(resumed, model.config, training.max_iters)
            model.load_state_dict(resumed["model"])
        if self.compiled:
            # In place (nn.Module.compile), not torch.compile(model): no wrapper module, so the
            # state dict keeps transformers' names ("_orig_mod." would break every checkpoint).
            model.compile()
        optimizer = torch.optim.AdamW(
            optimizer_groups(model, training.weight_decay),
            lr=training.learning_rate,
            betas=(training.beta1, training.beta2),
            # One kernel over all parameters: 3-5x faster than the default on CPU too, and it
            # can skip a step on the device (found_inf, see _optimizer_step) without a host sync.
            fused=True,
        )
        eval_loaders = [data.eval_loader(tokens, block_size=self.config.model.block_size, batch_size=training.batch_size,
                                         num_blocks=training.eval_iters * training.batch_size)
                        for tokens in (self.train_tokens, self.val_tokens)]
        self.model, self.optimizer, train_eval, val_eval = self.accelerator.prepare(model, optimizer, *eval_loaders)
        self.eval_loaders = {"train": train_eval, "val": val_eval}
        if resumed:
            self._restore(resumed)
        # Built for this config at the step the run is at: the schedule is a function of the step,
        # so a resumed run follows its own (possibly changed) learning-rate settings from there.
        self.scheduler = build_scheduler(optimizer, training, start_step=self.state.iter)
        self.batches = data.TrainBatches(
            self.train_tokens, block_size=self.config.model.block_size, batch_size=training.batch_size,
            seed=training.seed, grad_accum_steps=training.grad_accum_steps,
            process_index=self.accelerator.process_index, device=self.accelerator.device)
        self.stats = StepStats(self.accelerator.device, skipped_run=self.state.nonfinite_steps)
        self._flops_per_token = flops_per_token(model)
        self._peak_flops = (peak_flops(torch.cuda.get_device_name(self.accelerator.device), hardware.precision,
                                       self.accelerator.num_processes)
                            if self.accelerator.device.type == "cuda" else None)

    # ----------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train until max_iters, early stopping or an interrupt; return the run's summary."""
        try:
            return self._fit()
        finally:
            self.close()

    def close(self) -> None:
        """Let another run use out_dir (fit does this at its end; call it for a Trainer never fitted)."""
        self._lock.release()

    def _fit(self) -> dict:
        training = self.config.training
        self._announce()
        stop_reason = "max_iters"
        progress = Progress(training.max_iters, self.state.iter, self.tokens_per_step, self.is_main,
                            self._flops_per_token, self._peak_flops)
        interrupts = _InterruptFlag()
        started = time.perf_counter() - self.state.elapsed_s
        self.model.train()
        with interrupts, progress:
            while True:
                step = self.state.iter
                if self._eval_due(step):
                    self.state.elapsed_s = time.perf_counter() - started
                    if self._evaluate_and_checkpoint(step, progress):
                        stop_reason = "early_stopping"
                        break
                    progress.restart_clock()
                if step >= training.max_iters:
                    break
                self.stats.add_loss(self.train_step(step))
                self.state.iter = step + 1
                progress.step()
                if self.state.iter % training.log_interval and self.state.iter != training.max_iters:
                    continue
                report = self.stats.report(self.accelerator)
                self.state.nonfinite_steps = report.skipped_run
                check_diverged(report, self.state.iter, self.out_dir)
                self._log_step(report, progress, elapsed_s=time.perf_counter() - started)
                if interrupts.raised:
                    self.accelerator.set_trigger()
                if self.accelerator.check_trigger():  # an all-reduce: every rank stops at the same step
                    stop_reason = "interrupted"
                    break
        self.state.elapsed_s = time.perf_counter() - started
        return self._finish(stop_reason)

    def _log_step(self, report: Report, progress: Progress, elapsed_s: float) -> None:
        """Every log_interval steps: the progress line, the tracker and metrics.jsonl."""
        lr = self.scheduler.get_last_lr()[0]
        progress.log(report.loss, lr)
        self._log({"train/loss": report.loss, "train/lr": lr, "train/grad_norm": report.grad_norm,
                   "train/tokens_per_s": progress.tokens_per_s}, self.state.iter)
        if self.metrics is not None:
            warning = self.metrics.log_step({
                "iter": self.state.iter, "train_loss": report.loss, "lr": lr, "grad_norm": report.grad_norm,
                "tokens_seen": self.state.iter * self.tokens_per_step, "tokens_per_s": progress.tokens_per_s,
                "elapsed_s": round(elapsed_s, 3)})
            if warning:
                progress.write(f"warning: {warning}")

    def _announce(self) -> None:
        """Before the first step: the banner and warnings, the trackers, and the replaced run cleared."""
        training = self.config.training
        model = self.accelerator.unwrap_model(self.model)
        speed = (["torch.compile"] if self.compiled else []) + ([self.cpu_matmul.note] if self.cpu_matmul.note else [])
        self.print(run_report.banner(self.config, model, self.data, self.train_tokens.num_tokens,
                                     self.val_tokens.num_tokens, device=run_report.device_name(self.accelerator.device),
                                     precision=self.hardware.precision,
                                     world_size=self.accelerator.num_processes, speed=speed))
        short_of_the_peak = schedule_warning(training)
        if short_of_the_peak:
            self.print(f"warning: {short_of_the_peak}")
        if self._holds_other_run and self.is_main:  # before the trackers open their files in out_dir
            replaced = run_folder.clear_replaced_run(self.out_dir)
            self.print(f"--overwrite: removed the previous run's {', '.join(replaced)} from {self.out_dir}")
        if training.tracker != "none":
            self.accelerator.init_trackers(TRACKER_PROJECT, config=flat_config(self.config.to_dict()))
        self.metrics = MetricsLog(self.out_dir / METRICS_NAME, self.state.iter) if self.is_main else None

    def _finish(self, stop_reason: str) -> dict:
        """After the last step: train_log.json's summary (and ckpt_last.pt when interrupted), what to do next."""
        summary = run_report.summary(self.state, stop_reason, tokens_per_step=self.tokens_per_step,
                                     world_size=self.accelerator.num_processes)
        resume = run_report.resume_command(self.out_dir / LAST_NAME, self.accelerator.num_processes,
                                           self.accelerator.distributed_type,
                                           # set by the launcher (torchrun, accelerate launch) on each machine
                                           int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes)))
        if stop_reason == "interrupted":
            self._save([LAST_NAME], val_loss=None, summary=summary)
            self.print(f"interrupted at iter {self.state.iter}: saved {self.out_dir / LAST_NAME}. Resume with: {resume}")
        else:
            self._save([], val_loss=None, summary=summary)
            self.print(run_report.outputs(summary, self.out_dir, resume,
                                          run_report.speed(summary, self._flops_per_token, self._peak_flops)))
        for tracker in self.accelerator.trackers:  # end_training() would also destroy the process group,
            tracker.finish()                        # too early: see compat.close_process_group_at_exit
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
        grad_norm = torch.as_tensor(self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm),
                                    device=self.accelerator.device)
        nonfinite = ~torch.isfinite(grad_norm)
        if self.accelerator.scaler is None:
            skip_next_step_where(self.optimizer, nonfinite)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.stats.add_step(grad_norm, nonfinite)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        """Send metrics to training.tracker (accelerate logs on the main process only)."""
        if self.config.training.tracker != "none":
            self.accelerator.log(metrics, step=step)

    # ----------------------------------------------------- evaluation and saving

    def _eval_due(self, step: int) -> bool:
        training = self.config.training
        due = step % training.eval_interval == 0 or step >= training.max_iters
        return due and not self.state.logged(step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the fixed evaluation blocks of each split, gathered from all processes."""
        self.model.eval()
        losses = {}
        with self.cpu_matmul.active():
            for split, loader in self.eval_loaders.items():
                per_block = [self.accelerator.gather_for_metrics(per_block_loss(self.model, batch["input_ids"]))
                             for batch in loader]
                losses[split] = torch.cat(per_block).float().mean().item()
        self.model.train()
        return losses

    def _evaluate_and_checkpoint(self, step: int, progress: Progress) -> bool:
        """Evaluate at `step`, log, save checkpoints; return True when early stopping says stop."""
        training = self.config.training
        losses = self.evaluate()
        val_loss = losses["val"]
        if not math.isfinite(val_loss):
            raise UserError(
                f"validation loss is {val_loss} at iter {step}; nothing was saved over the last good checkpoint "
                f"in {self.out_dir}. Lower training.learning_rate or use precision = \"fp32\""
            )
        state = self.state
        improved = state.note_eval(step, val_loss, training.early_stopping_min_delta)
        record = run_report.eval_record(step, losses, lr=self.scheduler.get_last_lr()[0],
                                        tokens_seen=step * self.tokens_per_step, elapsed_s=state.elapsed_s,
                                        tokens_per_s=progress.tokens_per_s)
        state.records.append(record)
        progress.write(run_report.eval_line(record, improved))
        if self.metrics is not None and (warning := self.metrics.log_eval(record)):
            progress.write(f"warning: {warning}")
        self._log({"train/eval_loss": record["train_loss"], "train/eval_ppl": record["train_ppl"],
                   "val/loss": val_loss, "val/ppl": record["val_ppl"]}, step)
        sample = self._sample()
        if sample is not None:
            record["sample"] = sample
            progress.write("\n".join(f"  > {line}" for line in sample.split("\n")))
            self._log({"eval/sample": sample}, step)
        self._save([LAST_NAME, BEST_NAME] if improved and training.save_best else [LAST_NAME], val_loss)
        stop = training.early_stopping and state.evals_without_improvement >= training.early_stopping_patience
        if stop:
            progress.write(run_report.early_stopping_line(step, state, training.early_stopping_min_delta))
        return stop

    def _sample(self) -> str | None:
        """The evaluation's sample (main process): the prompt and what the model writes after it, seeded.

        Its own random generator leaves training's untouched, so a run with samples trains
        exactly like one without. Not under FSDP, where no process holds the whole model.
        """
        training = self.config.training
        if not run_report.samples_here(training.eval_sample_tokens, self.is_main, self.accelerator.distributed_type):
            return None
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        with self.cpu_matmul.active():
            written = sampler.complete(model, self.tokenizer, training.eval_sample_prompt,
                                       Sampling(max_new_tokens=training.eval_sample_tokens), seed=training.seed)
        model.train()
        return training.eval_sample_prompt + written

    def _save(self, names: list[str], val_loss: float | None, summary: dict | None = None) -> None:
        """Write one checkpoint under each of `names`, then train_log.json (main process).

        Every process contributes its RNG state, and every process learns whether the writes
        worked: when the main process cannot write (a full disk), all of them stop here with its
        message, instead of the others waiting for it in the next collective until a timeout.
        """
        rng_states = gather_object([rng.capture()])
        # A collective under FSDP (it gathers the shards), so every process calls it.
        weights = self.accelerator.get_state_dict(self.model) if names else None
        failure = None
        if self.is_main:
            try:
                for name in names:
                    checkpoint.save(self.out_dir / name, self._payload(weights, rng_states, val_loss))
                write_json(self.out_dir / TRAIN_LOG_NAME, {"config": self.config.to_dict(),
                                                           "records": self.state.records, "summary": summary})
            except UserError as exc:
                failure = exc
        self._stop_together(failure)

    def _payload(self, weights: dict, rng_states: list, val_loss: float | None) -> dict:
        return checkpoint.run_payload(
            weights=weights, model=self.accelerator.unwrap_model(self.model), tokenizer=self.tokenizer,
            data=self.data, config=self.config, base_model=self.base_model, state=self.state, val_loss=val_loss,
            optimizer=self.optimizer, scaler=self.accelerator.scaler, rng_states=rng_states,
            world_size=self.accelerator.num_processes, cpu_matmul=self.cpu_matmul.backend)

    def _stop_together(self, failure: UserError | None) -> None:
        """Raise on every process the first failure any process had (one gather); nothing if none had."""
        messages = gather_object([str(failure) if failure else None])
        first = next((message for message in messages if message), None)
        if first is not None:
            raise UserError(first)

    # ------------------------------------------------------------------ resume

    def _check_before_training(self, resume: Loaded | None, overwrite: bool) -> None:
        """Refuse, before any work, what would lose a run or fail later (see `run_folder.claim`), and a
        seed too large for the process count; every process stops together with the first refusal."""
        failure = None
        try:
            self._holds_other_run = run_folder.claim(self.out_dir, self._lock, is_main=self.is_main,
                                                     resumed_from=resume.path if resume else None,
                                                     overwrite=overwrite, say=self.print)
            check_seed_fits(self.config.training.seed, self.accelerator.num_processes)
        except UserError as exc:
            failure = exc
        try:
            self._stop_together(failure)
        except UserError:
            self.close()
            raise

    def _restore(self, payload: dict) -> None:
        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise UserError("cannot resume under FSDP: the checkpoint holds only the main process's optimizer shard; "
                            "resume with DDP (configs/accelerate/multi-gpu.yaml) or start a new run")
        training = self.config.training
        this_run = [{"weight_decay": group["weight_decay"], "betas": (training.beta1, training.beta2)}
                    for group in optimizer_groups(self.accelerator.unwrap_model(self.model), training.weight_decay)]
        self.state, warning = checkpoint.restore_training(
            payload, optimizer=self.optimizer, scaler=self.accelerator.scaler, group_settings=this_run,
            process_index=self.accelerator.process_index, num_processes=self.accelerator.num_processes)
        if warning:
            self.print(f"warning: {warning}")
        self.print(f"resumed from iter {self.state.iter} (best val loss {self.state.best_val_loss:.4f})")

    # ------------------------------------------------------------------ helpers

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step across all processes."""
        return self.global_batch_size * self.config.model.block_size

    @property
    def global_batch_size(self) -> int:
        return self.config.effective_batch_size * self.accelerator.num_processes

    def print(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


class _InterruptFlag:
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


def train(config: Config, resume: str | Path | Loaded | None = None, *, overwrite: bool) -> dict:
    """Run training end to end; return the summary also written to train_log.json."""
    return Trainer(config, resume, overwrite=overwrite).fit()
