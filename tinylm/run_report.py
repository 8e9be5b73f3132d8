"""What a training run tells its user: the banner before the first step, and at the end the
summary (also the `summary` of train_log.json) and where the outputs are, with the commands that use them."""

from __future__ import annotations

import math
import os
from pathlib import Path

from accelerate.utils import DistributedType

from . import formats, lora, pretrained, schedule
from .checkpoint import RunState
from .config import SCRATCH, Config
from .errors import command_line
from .model import count_parameters
from .paths import LAST_NAME, TRAIN_LOG_NAME
from .run_folder import final_checkpoint


def banner(config: Config, model, data, train_tokens: int, val_tokens: int, *, device: str, precision: str,
           world_size: int, speed: list[str], memory: str) -> str:
    """The model, the data, the hardware, the memory estimate and the batch arithmetic of a run about to
    start, and a warning when the schedule never reaches its peak learning rate."""
    training, shape = config.training, config.model
    global_batch = config.effective_batch_size * world_size
    return "\n".join([
        f"model: {count_parameters(model) / 1e6:.2f}M parameters ({shape.n_layer} layers, {shape.n_head} heads, "
        f"{shape.n_embd} wide, block {shape.block_size}, vocab {data.vocab_size} {data.tokenizer_kind})"
        + ("" if shape.init_from == SCRATCH else f", fine-tuned from {pretrained.describe(shape.init_from, shape.init_revision)}"),
        *([adapters_line(config, model)] if config.lora.enabled else []),
        f"data: {train_tokens:,} train / {val_tokens:,} val tokens from {data.meta_path}",
        f"      source: {formats.describe_source(data.meta)}",
        " | ".join([f"device: {device}", f"precision: {precision}", f"processes (world size): {world_size}", *speed]),
        f"memory: {memory}",
        f"effective_batch_size = batch_size * grad_accum_steps = {training.batch_size} * "
        f"{training.grad_accum_steps} = {config.effective_batch_size} | "
        f"global batch = {global_batch} | tokens per optimizer step = {global_batch * shape.block_size:,}",
        f"schedule: {schedule.describe(training)}",
        *([f"warning: {short}"] if (short := schedule.warning(training)) else []),
    ])


def adapters_line(config: Config, model) -> str:
    """How many of the model's parameters a LoRA run trains, and what they are."""
    trained, total = count_parameters(model, trainable=True), count_parameters(model)
    return (f"lora: {trained:,} of the {total:,} parameters train ({trained / total:.2%}): adapters of "
            f"{lora.describe(config.lora)}; the pretrained weights stay frozen")


def eval_record(step: int, losses: dict[str, float], *, lr: float, tokens_seen: int, elapsed_s: float,
                tokens_per_s: float) -> dict:
    """One evaluation as train_log.json records it (the clamp keeps exp() finite for a diverged loss)."""
    return {
        "iter": step,
        "train_loss": losses["train"],
        "val_loss": losses["val"],
        "train_ppl": math.exp(min(losses["train"], 50.0)),
        "val_ppl": math.exp(min(losses["val"], 50.0)),
        "lr": lr,
        "tokens_seen": tokens_seen,
        "elapsed_s": round(elapsed_s, 3),
        "tokens_per_s": round(tokens_per_s, 1),
    }


def eval_line(record: dict, improved: bool) -> str:
    return (f"eval iter {record['iter']}: train loss {record['train_loss']:.4f} (ppl {record['train_ppl']:.2f}) | "
            f"val loss {record['val_loss']:.4f} (ppl {record['val_ppl']:.2f})" + (" | best" if improved else ""))


def early_stopping_line(step: int, state: RunState, min_delta: float) -> str:
    return (f"early stopping at iter {step}: val loss has not improved by at least {min_delta} for "
            f"{state.evals_without_improvement} evaluations (best {state.best_val_loss:.4f} at iter {state.best_iter})")


def device_name(device) -> str:
    """`cpu` on every process count (accelerate names it `cpu:0` on several); `cuda:0` and the like as they are."""
    return device.type if device.type == "cpu" else str(device)


def resume_command(checkpoint: Path, world_size: int, distributed_type: DistributedType, processes_here: int) -> str:
    """The command that continues a run from `checkpoint` on as many processes as it had, which
    continues it exactly (another count reseeds the dropout masks). `processes_here`: this machine's
    share of them (fewer when the run spans several machines)."""
    if world_size == 1:
        return command_line("tinylm", "train", "--resume", checkpoint)
    if processes_here < world_size:
        return (f"on each machine, this run's accelerate launch command with tinylm/train.py "
                f"{command_line('--resume', checkpoint)}")
    if distributed_type == DistributedType.FSDP:  # --multi_gpu would resume it under DDP, unsharded
        return command_line("accelerate", "launch", "--config_file", "configs/accelerate/fsdp.yaml", "--num_processes",
                            world_size, "tinylm/train.py", "--resume", checkpoint)
    # One machine, N processes: the launch docs/multi-gpu.md gives (CPU mode for gloo on a CPU).
    launch = command_line("accelerate", "launch", "--multi_gpu", "--num_processes", world_size, "tinylm/train.py",
                          "--resume", checkpoint)
    return f"ACCELERATE_USE_CPU=1 {launch}" if distributed_type == DistributedType.MULTI_CPU else launch


def samples_here(sample_tokens: int, is_main: bool, distributed_type: DistributedType) -> bool:
    """Whether this process draws the evaluations' samples: the main one, asked to, and not under FSDP
    (where no process holds the whole model)."""
    return bool(sample_tokens) and is_main and distributed_type != DistributedType.FSDP


def summary(state: RunState, stop_reason: str, *, tokens_per_step: int, world_size: int) -> dict:
    last = state.records[-1] if state.records else {}
    return {
        "stop_reason": stop_reason,
        "iters": state.iter,
        "best_val_loss": state.best_val_loss if math.isfinite(state.best_val_loss) else None,
        "best_iter": state.best_iter,
        "final_train_loss": last.get("train_loss"),
        "final_val_loss": last.get("val_loss"),
        "tokens_seen": state.iter * tokens_per_step,
        "elapsed_s": round(state.elapsed_s, 3),
        "world_size": world_size,
    }


def speed(summary: dict, flops_per_token: float, peak_flops: float | None) -> str:
    """How long the whole run took (resumed parts included) and its mean speed: tokens/s, and MFU on a known GPU."""
    seconds = summary["elapsed_s"]
    if not seconds:
        return ""
    tokens_per_s = summary["tokens_seen"] / seconds
    mfu = f", MFU {tokens_per_s * flops_per_token / peak_flops:.1%}" if peak_flops else ""
    return f" in {seconds:.1f} s ({tokens_per_s:,.0f} tokens/s{mfu})"


def ending(summary: dict, out_dir: Path, *, world_size: int, distributed_type: DistributedType, speed_text: str) -> str:
    """The run's last line(s): where an interrupted run was saved, or `outputs`; each with its resume command."""
    resume = resume_command(out_dir / LAST_NAME, world_size, distributed_type,
                            # set by the launcher (torchrun, accelerate launch) on each machine
                            int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    if summary["stop_reason"] == "interrupted":
        return f"interrupted at iter {summary['iters']}: saved {out_dir / LAST_NAME}. Resume with: {resume}"
    return outputs(summary, out_dir, resume, speed_text)


def outputs(summary: dict, out_dir: Path, resume: str, speed_text: str = "") -> str:
    """Where a finished run's files are, and how to use them (`resume`: the `resume_command` of its last checkpoint)."""
    model = final_checkpoint(out_dir)
    best_text = (f", best val loss {summary['best_val_loss']:.4f} at iter {summary['best_iter']}"
                 if summary["best_val_loss"] is not None else "")
    return (f"done: {summary['iters']} iters ({summary['stop_reason']}){speed_text}{best_text}. Checkpoints and "
            f"{TRAIN_LOG_NAME} are in {out_dir}\n"
            f"sample from it: {command_line('tinylm', 'generate', '--checkpoint', model)}\n"
            f"train longer:   {resume} --max-iters N")
