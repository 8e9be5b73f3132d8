"""The GPU proof in one command: tinylm's GPU path on one NVIDIA GPU, in under 8 minutes, as one report.

    python benchmarks/gpu_check.py [--parts a,b,c,d] [--budget a=150,c=180] [--out report.json] [--smoke]

(a) Speed: GPT-2 124M (configs/gpt2-124m.toml at one micro-batch of 12 x 1024 per step, nanoGPT's
    bench.py shape), bf16, compiled as `tinylm train` compiles on a GPU: tokens/s and MFU (against the
    GPU's peak in tinylm.hardware.PEAK_FLOPS) of `Trainer.train_step` and of nanoGPT's model and step
    (benchmarks/reference_gpt.py) under the same autocast and compile, in alternating timed blocks in
    this process; the ratio is the median of the rounds' (nanoGPT time / tinylm time).
(b) fp16 loss scaling: a real `Trainer.fit()` in fp16 (accelerate's GradScaler) with every gradient
    of one weight made inf on chosen steps: those steps must be skipped (AdamW's step count stays,
    no weight moves), the scale must halve at each, and training must go on to a lower val loss.
(c) nanoGPT's Shakespeare-char GPU run (config/train_shakespeare_char.py: 6 layers x 384, block 256,
    batch 64, dropout 0.2, lr 1e-3, 5000 iterations, bf16, compiled) on tinylm's built-in corpus, stopped
    at its time budget if it has not finished: val loss and wall time against nanoGPT's published 1.4697.
(d) Peak GPU memory (torch.cuda.max_memory_allocated) of tinylm's runs of (a)'s and (c)'s shapes,
    against tinylm's memory estimate where this version has one.

Parts run in order, each in this process; a part that fails is reported and the others still run.
The exit status is 1 when a part failed or (b) found a check false. `--smoke` runs the same code on
the CPU at tiny shapes in seconds (tests/test_gpu_check.py runs it): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from data import synthetic_data
from reference_gpt import NanoGPTStep
from train_throughput import time_block
from tinylm import memory
from tinylm.atomic import write_json
from tinylm.compat import reset_accelerate_state, use_loss_scaler
from tinylm.config import Config, apply_overrides, load_config
from tinylm.errors import UserError, run_cli
from tinylm.hardware import Hardware, peak_flops
from tinylm.model import flops_per_token
from tinylm.prepare import main as prepare_main
from tinylm.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
PARTS = {"a": "speed: GPT-2 124M, bf16, compiled, against nanoGPT's model",
         "b": "fp16 loss scaling with injected overflows",
         "c": "nanoGPT's Shakespeare-char run in a time budget",
         "d": "peak GPU memory against tinylm's estimate"}
BUDGETS = {"a": 150.0, "c": 180.0}  # seconds; the other parts are a fixed few steps
SMOKE_BUDGETS = {"a": 5.0, "c": 3.0}
TOTAL_TARGET_S = 8 * 60

GPT2_VOCAB = 50304  # GPT-2's 50,257 tokens padded to a multiple of 64, as nanoGPT trains it
GPT2_TOKENS = 5_000_000
# (a): configs/gpt2-124m.toml, one micro-batch per step, no evaluation; random tokens of GPT-2's vocabulary
# (the step's arithmetic does not depend on the text).
GPT2 = {"training.grad_accum_steps": 1, "training.eval_iters": 1, "data.tokenizer": "char"}
WARMUP_STEPS = 5  # the first compiles
STEPS_PER_BLOCK = 10
MIN_ROUNDS, MAX_ROUNDS = 3, 9

# (c): nanoGPT's config/train_shakespeare_char.py, with its train.py defaults for the rest (weight decay
# 0.1, beta1 0.9, clip 1.0, bf16, compile); nanoGPT never samples while training.
SHAKESPEARE_CHAR = {
    "model.n_layer": 6, "model.n_head": 6, "model.n_embd": 384, "model.block_size": 256, "model.dropout": 0.2,
    "data.tokenizer": "char", "training.precision": "bf16", "training.batch_size": 64,
    "training.grad_accum_steps": 1, "training.learning_rate": 1e-3, "training.min_lr": 1e-4,
    "training.max_iters": 5000, "training.lr_decay_iters": 5000, "training.warmup_iters": 100,
    "training.weight_decay": 0.1, "training.beta1": 0.9, "training.beta2": 0.99, "training.grad_clip": 1.0,
    "training.eval_interval": 250, "training.eval_iters": 200, "training.log_interval": 10,
    "training.eval_sample_tokens": 0,
}
NANOGPT_SHAKESPEARE = {"val_loss": 1.4697, "iters": 5000,
                       "where": "nanoGPT's README: best val loss on Tiny Shakespeare, about 3 minutes on one A100"}

# (b): the Shakespeare-char model, uncompiled (the injecting gradient hook runs in eager autograd).
FP16_RUN = {**{key: SHAKESPEARE_CHAR[key] for key in ("model.n_layer", "model.n_head", "model.n_embd",
                                                       "model.block_size", "data.tokenizer")},
            "training.precision": "fp16", "training.compile": "off", "training.batch_size": 12,
            "training.max_iters": 60, "training.lr_decay_iters": 60, "training.warmup_iters": 10,
            "training.eval_interval": 60, "training.eval_iters": 20, "training.eval_sample_tokens": 0}
OVERFLOWS = (10, 11, 30)

# --smoke: over every part's settings, tiny shapes and a few steps.
TINY = {"model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "training.batch_size": 4, "training.cpu_matmul": "blas"}
SMOKE = {
    "a": {},
    "b": {"training.max_iters": 24, "training.lr_decay_iters": 24, "training.warmup_iters": 2,
          "training.eval_interval": 24, "training.eval_iters": 2, "training.learning_rate": 1e-2},
    "c": {"training.eval_iters": 2, "training.log_interval": 5},  # 5000 iterations: stopped by the budget
}
SMOKE_GPT2_VOCAB, SMOKE_GPT2_TOKENS = 99, 20_000
SMOKE_OVERFLOWS = (3, 4, 9)
SMOKE_STEPS = {"warmup": 2, "block": 2}


def memory_estimate(config: Config) -> int:
    """tinylm's estimate (`tinylm.memory`) of the peak GPU memory of a run of `config`, in bytes."""
    shape, fitted = memory.run_shape(config)
    return memory.of_run(fitted, shape, device="cuda", precision=config.training.precision, cpu_matmul="blas").peak


class PeakMemory:
    """The CUDA allocator's peak from now on, above what was allocated now, in bytes; None on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.base = 0
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> int | None:
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - self.base


@dataclass
class Check:
    """What the parts share: the mode, a scratch folder, the budgets, and the peaks measured so far."""

    smoke: bool
    workdir: Path
    budgets: dict[str, float]
    peaks: dict[str, int | None] = field(default_factory=dict)  # shape -> tinylm's peak memory there
    runs: int = 0

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    @cached_property
    def char_data(self) -> Path:
        """tinylm's built-in corpus, prepared as `tinylm prepare` does with no input: char tokenizer, bin."""
        folder = self.workdir / "shakespeare-char"
        prepare_main(["--out", str(folder)])
        return folder

    @cached_property
    def gpt2_data(self) -> Path:
        vocab, tokens = (SMOKE_GPT2_VOCAB, SMOKE_GPT2_TOKENS) if self.smoke else (GPT2_VOCAB, GPT2_TOKENS)
        return synthetic_data(self.workdir / f"random-{vocab}", tokens, vocab_size=vocab)

    def config(self, part: str, preset: Path | None, data: Path, overrides: dict) -> Config:
        """A run's config: the preset, then `overrides`, on `data`, in a fresh out_dir (tiny with --smoke)."""
        self.runs += 1
        return apply_overrides(load_config(preset), {
            **overrides, "data.processed_dir": str(data), "training.device": self.device,
            "training.out_dir": str(self.workdir / f"run-{self.runs}-{part}"),
            **({**TINY, **SMOKE[part]} if self.smoke else {})})

    def trainer(self, config: Config) -> Trainer:
        """`Trainer(config)` on the GPU; with --smoke, one that keeps the config's precision on the CPU."""
        if not self.smoke:
            return Trainer(config)
        precision = config.training.precision
        # accelerate makes the fp16 loss scaler on GPUs only: a CPU one in its place, with the same defaults.
        scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None

        class CpuStandIn(Trainer):
            def choose_hardware(self) -> Hardware:
                return Hardware("cpu", precision)  # the CPU would fall back to fp32

            def make_accelerator(self):
                accelerator = super().make_accelerator()
                if scaler is not None:
                    use_loss_scaler(accelerator, scaler)
                return accelerator

        return CpuStandIn(config)

    def steps(self, kind: str) -> int:
        return SMOKE_STEPS[kind] if self.smoke else {"warmup": WARMUP_STEPS, "block": STEPS_PER_BLOCK}[kind]

    def gpt2_config(self) -> Config:
        return self.config("a", REPO / "configs" / "gpt2-124m.toml", self.gpt2_data, GPT2)

    def char_config(self) -> Config:
        return self.config("c", None, self.char_data, SHAKESPEARE_CHAR)


def step_function(trainer: Trainer):
    """`trainer.train_step` of the next step at each call, as `tinylm train` runs it."""
    counter = iter(range(10**9))
    return lambda: trainer.train_step(next(counter))


def device_peak(device: str, precision: str) -> tuple[float | None, str]:
    """The device's peak FLOP/s at `precision` (None when unknown) and a line that names where it comes from."""
    if device != "cuda":
        return None, "the CPU (--smoke): no peak, no MFU"
    name = torch.cuda.get_device_name(0)
    peak = peak_flops(name, precision)
    if peak is None:
        return None, f"{name}: not in tinylm.hardware.PEAK_FLOPS, so no MFU (add its dense {precision} peak there)"
    return peak, f"{name}: {peak / 1e12:g} TFLOP/s dense {precision} (tinylm.hardware.PEAK_FLOPS)"


def measured(check: Check, shape: str, ours, memory: PeakMemory) -> None:
    """Run the warm-up steps of `ours` (the first compiles) and keep tinylm's peak memory of `shape` for (d)."""
    time_block(ours, check.steps("warmup"))
    check.peaks[shape] = memory.read()


def alternate(reference, ours, steps: int, deadline: float) -> tuple[list[float], list[float]]:
    """Seconds per step of timed blocks of `steps` steps, the reference's then ours, for MIN_ROUNDS rounds,
    then while another round fits before `deadline` (MAX_ROUNDS at most)."""
    reference_times, our_times = [], []
    while len(our_times) < MAX_ROUNDS:
        started = time.perf_counter()
        reference_times.append(time_block(reference, steps))
        our_times.append(time_block(ours, steps))
        round_s = time.perf_counter() - started
        if len(our_times) >= MIN_ROUNDS and time.perf_counter() + round_s > deadline:
            break
    return reference_times, our_times


def nanogpt_step(trainer: Trainer) -> NanoGPTStep:
    """nanoGPT's model and step on the trainer's data, shape, settings, precision and compile choice."""
    model, training = trainer.config.model, trainer.config.training
    reference = NanoGPTStep(
        str(trainer.train_tokens.files[0]), trainer.data.dtype, trainer.data.vocab_size,
        n_layer=model.n_layer, n_head=model.n_head, n_embd=model.n_embd, block_size=model.block_size,
        batch_size=training.batch_size, learning_rate=training.learning_rate, weight_decay=training.weight_decay,
        betas=(training.beta1, training.beta2), grad_clip=training.grad_clip, device=str(trainer.accelerator.device),
        precision=trainer.hardware.precision)
    if trainer.compiled:
        reference.model = torch.compile(reference.model)
    return reference


def part_a(check: Check) -> dict:
    """(a): tinylm's training step and nanoGPT's, alternating; tokens/s, MFU and their ratio."""
    started = time.perf_counter()
    config = check.gpt2_config()
    memory = PeakMemory(check.device)
    trainer = check.trainer(config)
    try:
        ours = step_function(trainer)
        measured(check, "gpt2-124m", ours, memory)  # before the reference exists: tinylm's memory alone
        reference = nanogpt_step(trainer)
        time_block(reference, check.steps("warmup"))
        reference_times, our_times = alternate(reference, ours, check.steps("block"),
                                               deadline=started + check.budgets["a"])
        model = trainer.accelerator.unwrap_model(trainer.model)
        flops, tokens = flops_per_token(model), trainer.tokens_per_step
        peak, peak_note = device_peak(check.device, trainer.hardware.precision)

        def side(times: list[float]) -> dict:
            seconds = statistics.median(times)
            return {"ms_per_step": seconds * 1e3, "tokens_per_s": tokens / seconds,
                    "mfu": tokens / seconds * flops / peak if peak else None}

        ratios = [r / o for r, o in zip(reference_times, our_times)]
        return {
            "shape": {key: getattr(config.model, key) for key in ("n_layer", "n_head", "n_embd", "block_size")},
            "vocab_size": trainer.data.vocab_size, "parameters": sum(p.numel() for p in model.parameters()),
            "batch_size": config.training.batch_size, "tokens_per_step": tokens, "flops_per_token": flops,
            "precision": trainer.hardware.precision, "compiled": trainer.compiled,
            "peak_flops": peak, "peak_note": peak_note,
            "tinylm": side(our_times), "nanogpt": side(reference_times),
            "ratio": statistics.median(ratios), "ratios": ratios, "steps_per_block": check.steps("block"),
        }
    finally:
        trainer.close()


class StepWatch:
    """What each optimizer step of a real `fit()` did, seen from a gradient hook on one weight, which runs
    in every step's backward: after the previous step's update, before this one's. It records the loss
    scale before the step, whether AdamW counted it (a skipped step leaves its step count alone) and
    whether any weight moved; on the steps of `overflow_at` it makes that weight's whole gradient inf.
    One backward per step: grad_accum_steps must be 1.
    """

    def __init__(self, trainer: Trainer, overflow_at: tuple[int, ...]):
        self.trainer, self.overflow_at = trainer, set(overflow_at)
        self.model = trainer.accelerator.unwrap_model(trainer.model)
        self.weight = self.model.transformer.h[0].mlp.c_fc.weight
        self.steps: list[dict] = []
        self._before: tuple[list[torch.Tensor], int] | None = None
        self.weight.register_hook(self._look)

    def _look(self, grad: torch.Tensor) -> torch.Tensor:
        self._close_last()
        step = self.trainer.state.iter
        self.steps.append({"iter": step, "injected": step in self.overflow_at, "scale_before": self._scale()})
        self._before = [p.detach().clone() for p in self.model.parameters()], self._adam_steps()
        return torch.full_like(grad, math.inf) if step in self.overflow_at else grad

    def _close_last(self) -> None:
        """The last step's outcome, now that its update is done."""
        if not self.steps:
            return
        weights, adam_steps = self._before
        self.steps[-1].update(
            scale_after=self._scale(), applied=self._adam_steps() > adam_steps,
            weights_moved=any(not torch.equal(a, b) for a, b in zip(weights, self.model.parameters())))

    def _scale(self) -> float | None:
        scaler = self.trainer.accelerator.scaler
        return scaler.get_scale() if scaler is not None else None

    def _adam_steps(self) -> int:
        state = self.trainer.optimizer.state.get(self.weight, {})
        return int(state["step"]) if "step" in state else 0

    def finish(self) -> list[dict]:
        self._close_last()
        return self.steps


def fp16_checks(steps: list[dict], overflows: tuple[int, ...], records: list[dict], summary: dict) -> dict[str, bool]:
    injected = [s for s in steps if s["injected"]]
    skipped = [s for s in steps if not s["applied"]]
    return {
        "every overflow injected": [s["iter"] for s in injected] == list(overflows),
        "every injected step skipped": all(not s["applied"] for s in injected),
        "the scale halved at each injected step": all(s["scale_after"] == s["scale_before"] / 2 for s in injected),
        "no weight moved on a skipped step": all(not s["weights_moved"] for s in skipped),
        "weights moved on every applied step": all(s["weights_moved"] for s in steps if s["applied"]),
        "training went on to the last step": summary["stop_reason"] == "max_iters" and len(steps) == summary["iters"],
        "the val loss fell": len(records) >= 2 and records[-1]["val_loss"] < records[0]["val_loss"],
    }


def part_b(check: Check) -> dict:
    """(b): a real fp16 fit() with overflows injected; what each step did, and the checks on it."""
    config = check.config("b", None, check.char_data, FP16_RUN)
    assert config.training.grad_accum_steps == 1, "StepWatch sees one backward per step"
    trainer = check.trainer(config)
    overflows = SMOKE_OVERFLOWS if check.smoke else OVERFLOWS
    watch = StepWatch(trainer, overflows)
    summary = trainer.fit()
    steps, records = watch.finish(), trainer.state.records
    return {
        "shape": {key: getattr(config.model, key) for key in ("n_layer", "n_head", "n_embd", "block_size")},
        "precision": trainer.hardware.precision, "compiled": trainer.compiled, "iters": summary["iters"],
        "scaler": type(trainer.accelerator.scaler).__name__ if trainer.accelerator.scaler else None,
        "injected": list(overflows), "skipped": [s["iter"] for s in steps if not s["applied"]],
        "scale_start": steps[0]["scale_before"] if steps else None,
        "scale_end": steps[-1]["scale_after"] if steps else None,
        "val_loss": [records[0]["val_loss"], records[-1]["val_loss"]] if records else None,
        "steps": steps, "checks": fp16_checks(steps, overflows, records, summary),
    }


def part_c(check: Check) -> dict:
    """(c): nanoGPT's Shakespeare-char run until it ends or the budget does; val loss and wall time."""
    started = time.perf_counter()
    config = check.char_config()
    memory = PeakMemory(check.device)
    trainer = check.trainer(config)
    # At the end of the part's budget the run stops as at Ctrl-C: at its next log_interval, saving ckpt_last.pt.
    left = started + check.budgets["c"] - time.perf_counter()
    stop = threading.Timer(max(left, 0.0), trainer.accelerator.set_trigger)
    stop.start()
    try:
        summary = trainer.fit()
    finally:
        stop.cancel()
    check.peaks["shakespeare-char"] = memory.read()
    finished = summary["stop_reason"] == "max_iters"
    meta = trainer.data.meta
    return {
        "iters": summary["iters"], "max_iters": config.training.max_iters, "finished": finished,
        "stop_reason": summary["stop_reason"], "wall_s": summary["elapsed_s"],
        # The last evaluation is at the last step when the run finished; else evaluate where it stopped.
        "val_loss": summary["final_val_loss"] if finished else trainer.evaluate()["val"],
        "best_val_loss": summary["best_val_loss"], "best_iter": summary["best_iter"],
        "precision": trainer.hardware.precision, "compiled": trainer.compiled,
        "data": {"vocab_size": trainer.data.vocab_size,
                 **{f"{split}_tokens": meta["splits"][split]["num_tokens"] for split in ("train", "val")}},
        "nanogpt": NANOGPT_SHAKESPEARE,
    }


def peak_of(check: Check, shape: str, config: Config) -> int | None:
    """tinylm's peak memory of `shape`: as (a) or (c) measured it, or from a few steps of a new run."""
    if shape not in check.peaks:
        memory = PeakMemory(check.device)
        trainer = check.trainer(config)
        try:
            measured(check, shape, step_function(trainer), memory)
        finally:
            trainer.close()
            release()
    return check.peaks[shape]


def part_d(check: Check) -> dict:
    """(d): tinylm's peak memory of (a)'s and (c)'s shapes against its estimate."""
    rows = {}
    for shape, config in (("gpt2-124m", check.gpt2_config()), ("shakespeare-char", check.char_config())):
        peak = peak_of(check, shape, config)
        estimate = memory_estimate(config)
        rows[shape] = {"peak_bytes": peak, "estimate_bytes": estimate, "ratio": peak / estimate if peak else None}
    return {"shapes": rows}


PART_FUNCTIONS = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}


def release() -> None:
    """Free what a part left (its Trainer, models, compiled graphs) and let the next pick its own precision.

    The compile caches go too: the next part's GPT-2 of another shape runs the same code, which dynamo
    would otherwise recompile for dynamic shapes, unlike a `tinylm train` of that shape in a fresh process.
    """
    torch.compiler.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reset_accelerate_state()


def run_part(check: Check, name: str) -> dict:
    print(f"\n== ({name}) {PARTS[name]}", flush=True)
    started = time.perf_counter()
    try:
        result = PART_FUNCTIONS[name](check)
    except Exception as exc:  # noqa: BLE001  (one part's failure must not cost the others' results)
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        release()
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def failed(results: dict) -> list[str]:
    """The parts that raised, or whose checks are not all true."""
    return [name for name, result in results.items()
            if "error" in result or not all(result.get("checks", {}).values())]


# ------------------------------------------------------------------------------------------- the report

def gib(size: int | None) -> str:
    return "not measured (no CUDA)" if size is None else f"{size / 2**30:.2f} GiB"


def text_a(r: dict) -> list[str]:
    shape = r["shape"]
    lines = [f"model: {shape['n_layer']} layers, {shape['n_head']} heads, {shape['n_embd']} wide, block "
             f"{shape['block_size']}, vocab {r['vocab_size']:,} ({r['parameters'] / 1e6:.1f}M parameters), "
             f"batch {r['batch_size']} ({r['tokens_per_step']:,} tokens per step), {r['precision']}, "
             + ("compiled" if r["compiled"] else "not compiled (tinylm.hardware.use_compile: not on this device)"),
             f"peak: {r['peak_note']}"]
    for who in ("tinylm", "nanogpt"):
        side = r[who]
        mfu = f"MFU {side['mfu']:.1%}" if side["mfu"] is not None else "MFU unknown"
        lines.append(f"{'nanoGPT' if who == 'nanogpt' else who:<8} {side['ms_per_step']:9.2f} ms/step "
                     f"{side['tokens_per_s']:>12,.0f} tokens/s  {mfu}")
    lines.append(f"ratio (nanoGPT time / tinylm time; above 1: tinylm faster): {r['ratio']:.3f}, median of "
                 f"{len(r['ratios'])} alternating rounds of {r['steps_per_block']} steps: "
                 + ", ".join(f"{x:.3f}" for x in r["ratios"]))
    return lines


def text_b(r: dict) -> list[str]:
    natural = [step for step in r["skipped"] if step not in r["injected"]]
    lines = [f"{r['iters']} steps of a {r['shape']['n_layer']}x{r['shape']['n_embd']} model in {r['precision']} "
             f"({r['scaler'] or 'no loss scaler'}), {'compiled' if r['compiled'] else 'not compiled'}; every gradient "
             f"of one weight made inf at steps {', '.join(map(str, r['injected']))}",
             f"loss scale {r['scale_start']:g} -> {r['scale_end']:g}; skipped steps (AdamW's count did not move): "
             f"{', '.join(map(str, r['skipped'])) or 'none'}"
             + (f" ({', '.join(map(str, natural))}: the scaler's own overflows)" if natural else "")]
    for step in r["steps"]:
        if step["injected"]:
            lines.append(f"  step {step['iter']}: scale {step['scale_before']:g} -> {step['scale_after']:g}, "
                         f"{'applied' if step['applied'] else 'skipped'}, "
                         f"weights {'moved' if step['weights_moved'] else 'unchanged'}")
    if r["val_loss"]:
        lines.append(f"val loss {r['val_loss'][0]:.4f} at the start -> {r['val_loss'][1]:.4f} at the end")
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" for name, ok in r["checks"].items()]
    return lines


def text_c(r: dict) -> list[str]:
    nanogpt, data = r["nanogpt"], r["data"]
    done = (f"all {r['max_iters']} iterations" if r["finished"] else
            f"{r['iters']} of nanoGPT's {r['max_iters']} iterations (stopped by the time budget: fewer iterations "
            f"than nanoGPT's, on a schedule made for {r['max_iters']})")
    return [f"{done} in {r['wall_s']:.1f} s ({r['precision']}, {'compiled' if r['compiled'] else 'not compiled'})",
            f"val loss {r['val_loss']:.4f} at iter {r['iters']} (best {r['best_val_loss']:.4f} at iter "
            f"{r['best_iter']}); nanoGPT: {nanogpt['val_loss']} after {nanogpt['iters']} ({nanogpt['where']})",
            f"data: tinylm's built-in corpus (38 plays), char tokenizer, vocab {data['vocab_size']}, "
            f"{data['train_tokens']:,} train / {data['val_tokens']:,} val tokens; Tiny Shakespeare is 1.1M "
            "characters of a vocab of 65, so the two val losses are close kin, not the same measure"]


def text_d(r: dict) -> list[str]:
    lines = []
    for shape, row in r["shapes"].items():
        ratio = f" (measured / estimate {row['ratio']:.2f})" if row["ratio"] is not None else ""
        against = f"estimate {gib(row['estimate_bytes'])}{ratio}"
        lines.append(f"{shape}: peak allocated {gib(row['peak_bytes'])}; {against}")
    return lines


TEXT = {"a": text_a, "b": text_b, "c": text_c, "d": text_d}


def report_text(report: dict) -> str:
    lines = ["", "=" * 100, f"gpu_check: {report['device']}, torch {report['torch']}"
             + (f", CUDA {report['cuda']}" if report["cuda"] else "")]
    if report["smoke"]:
        lines.append("--smoke: the CPU at tiny shapes, a few steps each; the numbers say nothing about a GPU")
    for name, result in report["parts"].items():
        budget = f", budget {report['budgets'][name]:g} s" if name in report["budgets"] else ""
        lines.append(f"({name}) {PARTS[name]} [{result['seconds']:.0f} s{budget}]")
        body = [f"FAILED: {result['error']}"] if "error" in result else TEXT[name](result)
        lines += [f"    {line}" for line in body]
    total = report["total_s"]
    lines.append(f"total {total // 60:.0f}m{total % 60:02.0f}s (target: under {TOTAL_TARGET_S // 60} minutes); "
                 + (f"FAILED: {', '.join(report['failed'])}" if report["failed"] else "every part ran, every check held"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- the command

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (default: all, in that order)")
    parser.add_argument("--budget", default="",
                        help="seconds per part, e.g. a=150,c=180 (the defaults; the other parts take a fixed few "
                             "steps): (a) times rounds while they fit, (c) stops training at its budget")
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="the same code on the CPU at tiny shapes, in seconds: proves the script runs, not the GPU")
    args = parser.parse_args(argv)
    args.parts = parse_parts(args.parts)
    args.budget = parse_budget(args.budget, SMOKE_BUDGETS if args.smoke else BUDGETS)
    if args.out and not args.out.parent.is_dir():  # found now, not after minutes of GPU work
        raise UserError(f"--out {args.out}: the folder {args.out.parent} does not exist; create it or choose another")
    return args


def parse_parts(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise UserError(f"--parts {text!r}: expected a comma-separated list of {', '.join(PARTS)}, e.g. --parts a,c")
    return [part for part in PARTS if part in parts]


def parse_budget(text: str, defaults: dict[str, float]) -> dict[str, float]:
    budgets = dict(defaults)
    for item in filter(None, (item.strip() for item in text.split(","))):
        name, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = math.nan
        if name not in budgets or not value > 0:
            raise UserError(f"--budget {text!r}: expected PART=SECONDS for parts {', '.join(budgets)} with "
                            f"positive seconds, e.g. --budget a=150,c=180")
        budgets[name] = value
    return budgets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise UserError("no CUDA GPU here (torch.cuda.is_available() is False): gpu_check needs one NVIDIA GPU; "
                        "--smoke runs the same code on the CPU at tiny shapes")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tinylm-gpu-check-") as workdir:
        check = Check(smoke=args.smoke, workdir=Path(workdir), budgets=args.budget)
        results = {name: run_part(check, name) for name in args.parts}
    report = {
        "device": torch.cuda.get_device_name(0) if not args.smoke else "CPU",
        "torch": torch.__version__, "cuda": None if args.smoke else torch.version.cuda, "smoke": args.smoke,
        "budgets": {name: seconds for name, seconds in args.budget.items() if name in results},
        "parts": results, "failed": failed(results), "total_s": round(time.perf_counter() - started, 1),
    }
    print(report_text(report), flush=True)
    if args.out:
        write_json(args.out, report)
        print(f"report written to {args.out}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
