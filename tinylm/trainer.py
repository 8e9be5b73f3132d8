"""The training loop: a GPT2LMHeadModel trained in a custom loop driven by `accelerate`.

The accelerate calls appear explicitly and in order: `prepare`, `accumulate`,
`backward`, `sync_gradients` / `clip_grad_norm_`, `gather_for_metrics`.
Everything here works unchanged on one process or many: batches are a pure
function of (seed, rank, step, micro_step), only the main process writes files
and prints, and every rank takes the same stop decisions.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from . import checkpoint, data, formats, locks, pretrained, rng
from . import tokenizer as tok
from .atomic import write_json
from .checkpoint import Loaded
from .compat import close_process_group_at_exit, skip_next_step_where, use_loss_scaler
from .config import MAX_SEED, SCRATCH, SHAPE_KEYS, Config
from .errors import UserError, command_line
from .hardware import (
    CpuMatmul,
    Hardware,
    choose_cpu_matmul,
    choose_hardware,
    configure_backends,
    peak_flops,
    use_compile,
)
from .model import (
    build_model,
    count_parameters,
    fit_to_pretrained,
    flops_per_token,
    gpt2_config,
    optimizer_groups,
    per_block_loss,
)
from .paths import BEST_NAME, LAST_NAME, TRAIN_LOG_NAME
from .progress import Progress
from .schedule import build_scheduler
from .step_stats import Report, StepStats
from .tracking import check_tracker_installed

# Optimizer steps in a row whose gradients are inf/nan before we give up. Under fp16
# the loss scaler skips a few such steps while it finds its scale; more means divergence.
MAX_NONFINITE_STEPS = 10
# Where a run that pushes to the Hub writes its export folder, inside out_dir.
EXPORT_NAME = "exported"
# The trackers' project name; tensorboard logs go to <out_dir>/<TRACKER_PROJECT>.
TRACKER_PROJECT = "tinylm"
# The GPT2Config keys that fix every weight's shape: a checkpoint resumes only into a model that agrees.
WEIGHT_SHAPE_KEYS = ("vocab_size", "n_positions", *SHAPE_KEYS)
# What a run writes into its out_dir: what --overwrite clears, and what makes a folder "hold a run".
RUN_FILES = (BEST_NAME, LAST_NAME, TRAIN_LOG_NAME)
# Temp files of the run's atomic writes (atomic_path: ".<name>.XXXX.tmp"): a dead writer's are litter.
STALE_PATTERNS = tuple(f".{name}.*.tmp" for name in RUN_FILES)


@dataclass
class RunState:
    """Everything about the run's progress that a checkpoint must carry to resume it."""

    iter: int = 0
    best_val_loss: float = math.inf
    best_iter: int = -1
    evals_without_improvement: int = 0
    nonfinite_steps: int = 0
    elapsed_s: float = 0.0
    records: list[dict] = field(default_factory=list)

    def logged(self, step: int) -> bool:
        return any(record["iter"] == step for record in self.records)


class Trainer:
    """One training run, from config (and optionally a checkpoint to resume) to checkpoints.

    `resume` is a checkpoint path or a `checkpoint.Loaded`. A run refuses an out_dir that holds
    another run unless `overwrite`, and one that another process is writing to, always. `hardware` overrides the device and
    precision that `choose_hardware` picks from the config. `grad_scaler` is an fp16 loss scaler
    to use instead of the one accelerate makes on GPUs only: with it, the whole fp16 path
    (autocast, scaled backward, unscale before clipping, overflow steps skipped by the scaler)
    runs on any device, the CPU included.
    """

    def __init__(self, config: Config, resume: str | Path | Loaded | None = None, *, overwrite: bool = False,
                 hardware: Hardware | None = None, grad_scaler: torch.amp.GradScaler | None = None):
        self.config = config
        training = config.training
        check_tracker_installed(training.tracker)  # before any work: not hours of training with no metrics
        self.hardware = hardware = hardware or choose_hardware(training.device, training.precision)
        if grad_scaler is not None and hardware.precision != "fp16":
            raise ValueError(f"a grad_scaler needs precision fp16, not {hardware.precision}")
        self.compiled = use_compile(training.compile, hardware.device)
        self.accelerator = Accelerator(
            cpu=hardware.device == "cpu",
            mixed_precision=hardware.mixed_precision,
            gradient_accumulation_steps=training.grad_accum_steps,
            log_with=None if training.tracker == "none" else training.tracker,
            project_dir=training.out_dir,
        )
        if grad_scaler is not None:
            use_loss_scaler(self.accelerator, grad_scaler)
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
        newer = data.newer_other_format(self.data, config.data.processed_dir)
        if newer is not None:
            other = "txt" if training.data_format == "bin" else "bin"
            self.print(f"warning: {newer} ({other} data) was prepared after {self.data.meta_path}, which training "
                       f"reads (training.data_format = \"{training.data_format}\"): to train on the newer data, "
                       f"pass --data-format {other} (training.data_format = \"{other}\")")

        if config.hub.repo_id:  # fail now, not after hours of training (the push itself is train.py's)
            from . import push

            warning = push.check_run_push(config.hub)
            if warning:
                self.print(warning)
        if isinstance(resume, (str, Path)):
            resume = Loaded(Path(resume), checkpoint.load(resume, flag="--resume"))
        self._lock = locks.FolderLock(self.out_dir, "training run")
        self._check_before_training(resume, overwrite)
        try:
            self._set_up(resume.payload if resume else None)
        except BaseException:
            self._lock.release()
            raise

    def _set_up(self, resumed: dict | None) -> None:
        """Model, optimizer, scheduler and evaluation data, prepared by accelerate; restored when resuming."""
        training, hardware = self.config.training, self.hardware
        self.cpu_matmul = self._choose_cpu_matmul(resumed)
        self.state = RunState()
        # Seeds differ per process, so dropout masks differ across ranks like their batches do.
        set_seed(training.seed, device_specific=True)
        if resumed:
            self._check_same_origin(resumed)
        model = self._build_model(resumed)
        if resumed:
            self._check_resumable(resumed, model.config)
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
        eval_loaders = [self._eval_loader(self.train_tokens), self._eval_loader(self.val_tokens)]
        self.model, self.optimizer, train_eval, val_eval = self.accelerator.prepare(model, optimizer, *eval_loaders)
        self.eval_loaders = {"train": train_eval, "val": val_eval}
        if resumed:
            self._restore(resumed)
        # Built for this config at the step the run is at: the schedule is a function of the step,
        # so a resumed run follows its own (possibly changed) learning-rate settings from there.
        self.scheduler = build_scheduler(optimizer, training, start_step=self.state.iter)
        self._prefetched: tuple[int | None, list[torch.Tensor]] = (None, [])
        self.stats = StepStats(self.accelerator.device, skipped_run=self.state.nonfinite_steps)
        self._flops_per_token = flops_per_token(model)
        # The peak of all processes together: tokens/s counts every process's tokens.
        peak = (peak_flops(torch.cuda.get_device_name(self.accelerator.device), hardware.precision)
                if self.accelerator.device.type == "cuda" else None)
        self._peak_flops = peak * self.accelerator.num_processes if peak else None

    def _build_model(self, resumed: dict | None) -> GPT2LMHeadModel:
        """A new GPT-2 of the config's shape, or the pretrained one `model.init_from` names, fitted to the run."""
        config = self.config
        init_from = config.model.init_from
        # The Hub model this run fine-tunes, for the model card (a local folder is never named as one); a
        # resumed run keeps what its start saw (from another working folder a relative path is not found).
        self.base_model = (resumed["base_model"] if resumed and "base_model" in resumed else
                           None if init_from == SCRATCH or pretrained.is_local(init_from) else init_from)
        if init_from == SCRATCH:
            return build_model(gpt2_config(config.model, self.data.vocab_size, self.tokenizer.eos_token_id))
        if resumed:  # the fine-tuned run's own shape: the weights come from the checkpoint
            dropout = config.model.dropout  # the run's own rate, which the command may have changed
            model = build_model(GPT2Config.from_dict({**resumed["model_config"], "resid_pdrop": dropout,
                                                      "embd_pdrop": dropout, "attn_pdrop": dropout}))
            self.config = fit_to_pretrained(config, model)
            return model
        model = pretrained.gpt2(config.model.init_from, config.model.init_revision, config.model.dropout)
        own = pretrained.tokenizer(config.model.init_from, config.model.init_revision)
        if own.get_vocab() != self.tokenizer.get_vocab():
            prepare_again = command_line("tinylm", "prepare", "--tokenizer", "pretrained", "--from",
                                         config.model.init_from, "--out", self.data.folder, "--overwrite")
            raise UserError(
                f"{self.data.meta_path} was prepared with another tokenizer than {config.model.init_from}'s: "
                f"run `{prepare_again}` (with your --input or --dataset) so the model reads the text the way it "
                "was trained to"
            )
        self.config = fit_to_pretrained(config, model)
        return model

    # ----------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train until max_iters, early stopping or an interrupt; return the run's summary."""
        try:
            return self._fit()
        finally:
            self._lock.release()

    def _fit(self) -> dict:
        training = self.config.training
        self._describe()
        if training.tracker != "none":
            self.accelerator.init_trackers(TRACKER_PROJECT, config=_flat(self.config.to_dict()))
        stop_reason = "max_iters"
        progress = Progress(training.max_iters, self.state.iter, self.tokens_per_step, self.is_main,
                            self._flops_per_token, self._peak_flops)
        interrupts = _InterruptFlag()
        self._clear_replaced_run()
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
                self._check_finite_steps(report)
                lr = self.scheduler.get_last_lr()[0]
                progress.log(report.loss, lr)
                self._log({"train/loss": report.loss, "train/lr": lr, "train/grad_norm": report.grad_norm,
                           "train/tokens_per_s": progress.tokens_per_s}, self.state.iter)
                if interrupts.raised:
                    self.accelerator.set_trigger()
                if self.accelerator.check_trigger():  # an all-reduce: every rank stops at the same step
                    stop_reason = "interrupted"
                    break
        self.state.elapsed_s = time.perf_counter() - started
        summary = self._summary(stop_reason)
        if stop_reason == "interrupted":
            self._save([LAST_NAME], val_loss=None, summary=summary)
            self.print(f"interrupted at iter {self.state.iter}: saved {self.out_dir / LAST_NAME}. "
                       f"Resume with: {command_line('tinylm', 'train', '--resume', self.out_dir / LAST_NAME)}")
        else:
            self._save([], val_loss=None, summary=summary)
        if stop_reason != "interrupted":
            self._print_outputs(summary)
        for tracker in self.accelerator.trackers:  # end_training() would also destroy the process group,
            tracker.finish()                        # too early: see compat.close_process_group_at_exit
        return summary

    def _print_outputs(self, summary: dict) -> None:
        """Where the run's files are, and how to use them."""
        model = final_checkpoint(self.out_dir)
        best_text = (f", best val loss {summary['best_val_loss']:.4f} at iter {summary['best_iter']}"
                     if summary["best_val_loss"] is not None else "")
        self.print(f"done: {summary['iters']} iters ({summary['stop_reason']}){best_text}. Checkpoints and "
                   f"{TRAIN_LOG_NAME} are in {self.out_dir}\n"
                   f"sample from it: {command_line('tinylm', 'generate', '--checkpoint', model)}\n"
                   f"train longer:   {command_line('tinylm', 'train', '--resume', self.out_dir / LAST_NAME)} --max-iters N")

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the mean loss, on the device.

        Nothing here waits for the device, so on a GPU the host queues this step's work and
        goes on to read the next step's batches while the GPU runs it.
        """
        loss_sum = torch.zeros((), device=self.accelerator.device)
        for blocks in self._take_batches(step):
            # accumulate() skips the DDP all-reduce on all but the last micro-step, and
            # backward() already divides the loss by grad_accum_steps: don't divide again.
            with self.accelerator.accumulate(self.model), self.cpu_matmul.active():
                loss = per_block_loss(self.model, blocks).mean()
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    self._optimizer_step()
            loss_sum += loss.detach()
        self.scheduler.step()
        self._prefetched = (step + 1, self._fetch_batches(step + 1))
        return loss_sum / self.config.training.grad_accum_steps

    def _fetch_batches(self, step: int) -> list[torch.Tensor]:
        """This process's micro-batches of optimizer step `step`, on their way to the device."""
        training = self.config.training
        batches = []
        for micro_step in range(training.grad_accum_steps):
            blocks = data.train_batch(
                self.train_tokens, block_size=self.config.model.block_size, batch_size=training.batch_size,
                seed=training.seed, step=step,
                slot=self.accelerator.process_index * training.grad_accum_steps + micro_step,
            )
            if self.accelerator.device.type == "cuda":
                # From page-locked memory the copy is asynchronous: it overlaps the running step.
                blocks = blocks.pin_memory().to(self.accelerator.device, non_blocking=True)
            batches.append(blocks)
        return batches

    def _take_batches(self, step: int) -> list[torch.Tensor]:
        """The batches fetched ahead for `step` by the previous step, or fetched now."""
        prefetched_step, batches = self._prefetched
        self._prefetched = (None, [])
        return batches if prefetched_step == step else self._fetch_batches(step)

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

    def _check_finite_steps(self, report: Report) -> None:
        """Stop when MAX_NONFINITE_STEPS optimizer steps in a row were skipped (read every log_interval)."""
        self.state.nonfinite_steps = report.skipped_run
        if report.longest_skipped_run >= MAX_NONFINITE_STEPS:
            raise UserError(
                f"training diverged: {report.longest_skipped_run} optimizer steps in a row had inf/nan gradients "
                f"(by iter {self.state.iter}); lower training.learning_rate, or use precision = \"bf16\"/\"fp32\". "
                f"The last good checkpoint in {self.out_dir} was kept"
            )

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
        improved = val_loss < state.best_val_loss and state.best_val_loss - val_loss >= training.early_stopping_min_delta
        if improved:
            state.best_val_loss, state.best_iter, state.evals_without_improvement = val_loss, step, 0
        else:
            state.evals_without_improvement += 1
        record = {
            "iter": step,
            "train_loss": losses["train"],
            "val_loss": val_loss,
            "train_ppl": math.exp(min(losses["train"], 50.0)),
            "val_ppl": math.exp(min(val_loss, 50.0)),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_seen": step * self.tokens_per_step,
            "elapsed_s": round(state.elapsed_s, 3),
            "tokens_per_s": round(progress.tokens_per_s, 1),
        }
        state.records.append(record)
        progress.write(
            f"eval iter {step}: train loss {record['train_loss']:.4f} (ppl {record['train_ppl']:.2f}) | "
            f"val loss {val_loss:.4f} (ppl {record['val_ppl']:.2f})" + (" | best" if improved else "")
        )
        self._log({"train/eval_loss": record["train_loss"], "train/eval_ppl": record["train_ppl"],
                   "val/loss": val_loss, "val/ppl": record["val_ppl"]}, step)
        self._save([LAST_NAME, BEST_NAME] if improved and training.save_best else [LAST_NAME], val_loss)
        stop = training.early_stopping and state.evals_without_improvement >= training.early_stopping_patience
        if stop:
            progress.write(
                f"early stopping at iter {step}: val loss has not improved by at least "
                f"{training.early_stopping_min_delta} for {state.evals_without_improvement} evaluations "
                f"(best {state.best_val_loss:.4f} at iter {state.best_iter})"
            )
        return stop

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
        """The checkpoint's contents (see checkpoint.py for the layout)."""
        model = self.accelerator.unwrap_model(self.model)
        scaler = self.accelerator.scaler
        return {
            "model": {k: v.detach().to("cpu") for k, v in weights.items()},
            "model_config": model.config.to_dict(),
            "tokenizer": {"kind": self.data.tokenizer_kind, "path": str(self.data.tokenizer_path),
                          "json": tok.to_json(self.tokenizer)},
            "config": self.config.to_dict(),
            "meta": self.data.meta,
            "base_model": self.base_model,
            "iter": self.state.iter,
            "best_val_loss": self.state.best_val_loss,
            "val_loss": val_loss,
            "train_state": {
                "optimizer": self.optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states,
                "world_size": self.accelerator.num_processes,
                "cpu_matmul": self.cpu_matmul.backend,
                "run": dataclasses.asdict(self.state),
            },
        }

    def _stop_together(self, failure: UserError | None) -> None:
        """Raise on every process the first failure any process had (one gather); nothing if none had."""
        messages = gather_object([str(failure) if failure else None])
        first = next((message for message in messages if message), None)
        if first is not None:
            raise UserError(first)

    # ------------------------------------------------------------------ resume

    def _check_before_training(self, resume: Loaded | None, overwrite: bool) -> None:
        """Refuse, before any work, what would lose a run or fail later: an out_dir in use by another
        process, one that holds another run, an unwritable one, a seed too large. The main process
        takes out_dir's lock (held until the run ends) and clears what a dead writer left there."""
        out_dir, training = self.out_dir, self.config.training
        failure = None
        try:
            if out_dir.exists() and not out_dir.is_dir():
                raise UserError(f"training.out_dir {out_dir} is a file, not a folder; choose another --out-dir")
            try:  # on every process, so that all of them stop here together
                out_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryFile(dir=out_dir):
                    pass
            except OSError as exc:
                raise UserError(f"cannot write to training.out_dir {out_dir}: {exc.strerror or exc}; "
                                "choose a writable --out-dir") from None
            if self.is_main:
                self._lock.acquire()
                stale = locks.remove_stale(out_dir, STALE_PATTERNS)
                if stale:
                    self.print(f"removed {len(stale)} unfinished file(s) a stopped run left in {out_dir}: "
                               + ", ".join(path.name for path in stale))
            self._holds_other_run = self._other_run(resume)
            if self._holds_other_run and not overwrite:
                resume_hint = command_line("tinylm", "train", "--resume", out_dir / LAST_NAME)
                raise UserError(
                    f"{out_dir} already holds a training run ({', '.join(self._holds_other_run)}); continue it with "
                    f"`{resume_hint}`, train into another --out-dir, or pass --overwrite to replace it"
                )
            last_seed = training.seed + self.accelerator.num_processes - 1  # each process seeds with seed + rank
            if last_seed > MAX_SEED:
                raise UserError(f"training.seed {training.seed} is too large for {self.accelerator.num_processes} "
                                f"processes (each uses seed + rank, at most {MAX_SEED}); choose a smaller --seed")
        except UserError as exc:
            failure = exc
        try:
            self._stop_together(failure)
        except UserError:
            self._lock.release()
            raise

    def _other_run(self, resume: Loaded | None) -> list[str]:
        """The run files in out_dir that belong to another run than the one resumed (all of them for a new run)."""
        if resume is not None and resume.path.parent.resolve() == self.out_dir.resolve():
            return []
        return [name for name in RUN_FILES if (self.out_dir / name).exists()]

    def _clear_replaced_run(self) -> None:
        """--overwrite: remove the replaced run's files before this run writes its first, so that none of
        them (an old ckpt_best.pt, its export) can be taken for this run's."""
        if not (self._holds_other_run and self.is_main):
            return
        replaced = [name for name in (*RUN_FILES, EXPORT_NAME, TRACKER_PROJECT) if (self.out_dir / name).exists()]
        for name in replaced:
            path = self.out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.print(f"--overwrite: removed the previous run's {', '.join(replaced)} from {self.out_dir}")

    def _choose_cpu_matmul(self, resumed: dict | None) -> CpuMatmul:
        """The CPU matmul backend; a resumed "auto" run keeps the one it started with, so its
        losses stay bit-identical to an uninterrupted run's (the choice involves a timing)."""
        training = self.config.training
        if self.hardware.device != "cpu":
            return CpuMatmul("blas")
        started_with = ((resumed or {}).get("train_state") or {}).get("cpu_matmul")
        if training.cpu_matmul == "auto" and started_with in ("blas", "onednn"):
            return CpuMatmul(started_with, f"{started_with} matmuls, as the run being resumed")
        return choose_cpu_matmul(training.cpu_matmul, self.config.model.n_embd,
                                 training.batch_size * self.config.model.block_size)

    def _check_same_origin(self, payload: dict) -> None:
        """Refuse a resume whose data or starting model is not the checkpoint's: say what changed."""
        saved_model, model = payload["config"]["model"], self.config.model
        for key in ("init_from", "init_revision"):
            if saved_model.get(key, "") != getattr(model, key):
                raise UserError(f"cannot resume: model.{key} {saved_model.get(key)!r} -> {getattr(model, key)!r}; "
                                "a run keeps the model it started from. Start a new run (another --out-dir) to "
                                "train from another")
        saved_meta, meta = payload.get("meta") or {}, self.data.meta
        if payload["tokenizer"]["json"] != tok.to_json(self.tokenizer):
            changes = [f"{key} {saved_meta.get(key)!r} -> {meta.get(key)!r}"
                       for key in ("tokenizer_kind", "vocab_size", "source", "created")
                       if saved_meta.get(key) != meta.get(key)]
            raise UserError(
                f"cannot resume: the data in {self.data.meta_path} was prepared with another tokenizer than the "
                f"checkpoint's ({', '.join(changes) or 'same size, other tokens'}): it was prepared again, or "
                "data.processed_dir points elsewhere. Resume on the data the run was trained on (prepare it "
                "again from the same text, or pass --processed-dir), or start a new run in another --out-dir"
            )

    def _check_resumable(self, payload: dict, model_config) -> None:
        saved = payload["model_config"]
        changed = [f"{key} {saved.get(key)} -> {getattr(model_config, key)}" for key in WEIGHT_SHAPE_KEYS
                   if saved.get(key) != getattr(model_config, key)]
        if changed:
            raise UserError(
                f"cannot resume: the config changes the model shape ({', '.join(changed)}); "
                "resume with the config the checkpoint was trained with, or start a new run in another out_dir"
            )
        if payload["iter"] >= self.config.training.max_iters:
            raise UserError(
                f"nothing to train: the checkpoint is at iter {payload['iter']} and training.max_iters is "
                f"{self.config.training.max_iters}; pass a larger --max-iters to train longer"
            )

    def _restore(self, payload: dict) -> None:
        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise UserError("cannot resume under FSDP: the checkpoint holds only the main process's optimizer shard; "
                            "resume with DDP (configs/accelerate/multi-gpu.yaml) or start a new run")
        train_state = payload.get("train_state") or {}
        if "optimizer" not in train_state:
            raise UserError("cannot resume: the checkpoint has no optimizer state (was it written by tinylm export?)")
        self.optimizer.load_state_dict(train_state["optimizer"])
        self._apply_optimizer_settings()
        if self.accelerator.scaler is not None and train_state.get("scaler"):
            self.accelerator.scaler.load_state_dict(train_state["scaler"])
        run = dict(train_state["run"])
        self.state = RunState(**run)
        states = train_state["rng"]
        if len(states) == self.accelerator.num_processes:
            rng.restore(states[self.accelerator.process_index])
        else:
            self.print(f"warning: checkpoint was written by {len(states)} processes, now {self.accelerator.num_processes}: "
                       "random state (dropout) is reseeded, so the run will not match an uninterrupted one exactly")
        self.print(f"resumed from iter {self.state.iter} (best val loss {self.state.best_val_loss:.4f})")

    def _apply_optimizer_settings(self) -> None:
        """Put this run's betas and weight decay into the restored optimizer.

        load_state_dict brings back the saved run's hyperparameters with its moments: a resume
        that changes them must train with the new ones, as its start-up diff says. (The learning
        rate is the schedule's, set for this config when the scheduler is built.)
        """
        training = self.config.training
        fresh = optimizer_groups(self.accelerator.unwrap_model(self.model), training.weight_decay)
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(weight_decay=settings["weight_decay"], betas=(training.beta1, training.beta2))

    # ------------------------------------------------------------------ helpers

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step across all processes."""
        return self.global_batch_size * self.config.model.block_size

    @property
    def global_batch_size(self) -> int:
        return self.config.effective_batch_size * self.accelerator.num_processes

    def _eval_loader(self, tokens) -> DataLoader:
        training = self.config.training
        blocks = data.eval_dataset(tokens, block_size=self.config.model.block_size,
                                   num_blocks=training.eval_iters * training.batch_size)
        return DataLoader(blocks, batch_size=training.batch_size, shuffle=False)

    def _describe(self) -> None:
        training, shape = self.config.training, self.config.model
        model = self.accelerator.unwrap_model(self.model)
        speed = (["torch.compile"] if self.compiled else []) + ([self.cpu_matmul.note] if self.cpu_matmul.note else [])
        self.print("\n".join([
            f"model: {count_parameters(model) / 1e6:.2f}M parameters ({shape.n_layer} layers, {shape.n_head} heads, "
            f"{shape.n_embd} wide, block {shape.block_size}, vocab {self.data.vocab_size} {self.data.tokenizer_kind})"
            + ("" if shape.init_from == SCRATCH else f", fine-tuned from {pretrained.describe(shape.init_from, shape.init_revision)}"),
            f"data: {self.train_tokens.num_tokens:,} train / {self.val_tokens.num_tokens:,} val tokens "
            f"from {self.data.meta_path}",
            f"      source: {formats.describe_source(self.data.meta)}",
            " | ".join([f"device: {self.accelerator.device}", f"precision: {self.hardware.precision}",
                        f"processes (world size): {self.accelerator.num_processes}", *speed]),
            f"effective_batch_size = batch_size * grad_accum_steps = {training.batch_size} * "
            f"{training.grad_accum_steps} = {self.config.effective_batch_size} | "
            f"global batch = {self.global_batch_size} | tokens per optimizer step = {self.tokens_per_step:,}",
        ]))

    def _summary(self, stop_reason: str) -> dict:
        state = self.state
        last = state.records[-1] if state.records else {}
        return {
            "stop_reason": stop_reason,
            "iters": state.iter,
            "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
            "best_iter": state.best_iter,
            "final_train_loss": last.get("train_loss"),
            "final_val_loss": last.get("val_loss"),
            "tokens_seen": state.iter * self.tokens_per_step,
            "elapsed_s": round(state.elapsed_s, 3),
            "world_size": self.accelerator.num_processes,
        }

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


def _flat(config: dict) -> dict:
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def final_checkpoint(out_dir: Path) -> Path:
    """The checkpoint a finished run hands on: ckpt_best.pt, or ckpt_last.pt when there is none."""
    best = out_dir / BEST_NAME
    return best if best.is_file() else out_dir / LAST_NAME


def train(config: Config, resume: str | Path | Loaded | None = None, *, overwrite: bool) -> dict:
    """Run training end to end; return the summary also written to train_log.json."""
    return Trainer(config, resume, overwrite=overwrite).fit()
