"""The peak memory of a training run, estimated before its first step, and the check that stops a run
that will not fit on its GPU (`tinylm train` prints the estimate; `tinylm train --dry-run` only that).

Weights, gradients and AdamW's two moments are 4 bytes per parameter each (fp32, also under mixed
precision), as in accelerate's `estimate-memory`; gradients and moments only for the parameters
that train. Activations are what autograd keeps for the backward of one micro-batch of tinylm's
GPT2LMHeadModel (per_block_loss, PyTorch's fused attention), counted tensor by tensor:

- each block keeps its two LayerNorms' inputs (fp32: the residual stream stays fp32 under autocast),
  the inputs of its four matmuls, q, k and v, the attention's output, and its activation function's
  tensors (exact GELU: input and output; GPT-2's own tanh `gelu_new`, five); PyTorch's math attention
  (the CPU with dropout or oneDNN matmuls) also keeps the batch x heads x block x block scores; each
  dropout keeps its mask (bool on CUDA, a float tensor on the CPU);
- with gradient checkpointing a block keeps only its input, and its other tensors exist only while
  its backward recomputes them;
- the loss keeps its fp32 log-softmax over the vocabulary; its backward adds two more tensors of
  that size. For small models these logits are most of the activations.

The peak is the largest of three moments: the loss's backward starts (everything kept, the logits
three times), a block's backward (the blocks not yet reached, this one's tensors and the gradients
made so far), and the end of the step (every gradient). Gradients fill in as activations are freed,
so with one micro-batch a step peaks below weights + gradients + moments + activations; with
gradient accumulation the later micro-batches start with every gradient allocated. Under fp16/bf16,
autocast's half-precision copies of the matmul weights live until their backward. Several processes
(DDP) each hold one more copy of the gradients, in its buckets. Under FSDP (`sharded`) each process
holds 1/world_size of the weights, gradients and moments, no buckets, and whole weights while it
computes: the root's (the embeddings, which lm_head shares) for the whole step and two blocks' (the one
computing and the next, prefetched); the output layer's gradient stays whole until the backward ends,
and with accumulation every gradient until the last micro-batch.
Not counted: the CUDA context and the caching allocator's slack (leave ~10%), torch.compile's changes
(usually less memory), FSDP's mixed-precision copies (measured in fp32 only).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from transformers import GPT2Config

from . import data, lora, pretrained
from .checkpoint import started_cpu_matmul
from .config import SCRATCH, Config
from .errors import UserError
from .model import fitted_config, gpt2_config

GIB, MIB = 2**30, 2**20
# Activation functions PyTorch computes in one kernel that keeps its input (transformers' "gelu" is
# torch's exact GELU, "gelu_pytorch_tanh" its tanh form); the others, GPT-2's "gelu_new" first, are
# counted as transformers' Python "gelu_new", five tensors of the MLP's width.
ONE_KERNEL_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh")
SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(g|gb|gib|m|mb|mib)?", re.IGNORECASE)


@dataclass(frozen=True)
class Step:
    """What a training step's memory depends on besides the model's shape."""

    batch_size: int
    block_size: int
    grad_accum_steps: int = 1
    precision: str = "fp32"  # what the run computes in: "fp32", or "fp16"/"bf16" under autocast
    device: str = "cpu"  # "cpu" or "cuda"
    dropout: float = 0.0
    gradient_checkpointing: bool = False
    fused_attention: bool = True  # a fused attention kernel (flash, memory-efficient) rather than PyTorch's math one
    world_size: int = 1
    sharded: bool = False  # FSDP: each of the world_size processes holds a shard of the weights, gradients, moments
    trainable: int | None = None  # parameters that train (and have gradients and moments); None: all of them


@dataclass(frozen=True)
class Estimate:
    """The bytes of each part of a step, and of the step at its peak."""

    shape: GPT2Config
    step: Step
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int  # one micro-batch's, at their largest
    logits: int  # of which the loss's fp32 log-softmax over the vocabulary, three times over in its backward
    half_weights: int  # autocast's fp16/bf16 copies of the matmul weights, at their largest
    buckets: int  # DDP's gradient buckets (several processes)
    gathered: int  # FSDP: the whole weights gathered at once (the root's, two blocks')
    peak: int

    def summary(self) -> str:
        """The banner's line: the peak and its parts."""
        extras = [f"{name} {human(size)}" for name, size in (("fp16/bf16 weight copies", self.half_weights),
                                                           ("DDP buckets", self.buckets),
                                                           ("whole weights gathered", self.gathered)) if size]
        sharded = f" per process, {self.step.world_size} FSDP shards" if self.step.sharded else ""
        return (f"about {human(self.peak)} at the peak (estimate{sharded}: weights {human(self.weights)}, gradients "
                f"{human(self.gradients)}, AdamW state {human(self.optimizer)}, activations {human(self.activations)} "
                f"for a micro-batch of {self.step.batch_size} x {self.step.block_size} tokens, "
                f"{human(self.logits)} of them logits{''.join(', ' + extra for extra in extras)}); gradient "
                f"checkpointing {'on' if self.step.gradient_checkpointing else 'off'}")

    def table(self) -> list[str]:
        """The parts one per line, for `tinylm train --dry-run`."""
        shard = f", this process's 1/{self.step.world_size} (FSDP)" if self.step.sharded else ""
        rows = [("weights", self.weights, f"{self.parameters / 1e6:.2f}M parameters, fp32{shard}"),
                ("gradients", self.gradients, f"{self.trainable / 1e6:.2f}M trainable parameters, fp32{shard}"),
                ("AdamW state", self.optimizer, f"two fp32 moments per trainable parameter{shard}"),
                ("activations", self.activations,
                 f"one micro-batch of {self.step.batch_size} x {self.step.block_size} tokens at its largest, "
                 f"{human(self.logits)} of them the loss's logits")]
        if self.half_weights:
            rows.append(("weight copies", self.half_weights,
                         f"the {self.step.precision} copies autocast makes for the matmuls"))
        if self.buckets:
            rows.append(("DDP buckets", self.buckets, "a second copy of the gradients per process"))
        if self.gathered:
            rows.append(("gathered", self.gathered, "FSDP: the root's and two blocks' whole weights, at once"))
        lines = [f"  {name:<14}{human(size):>10}  {note}" for name, size, note in rows]
        when = ("a later micro-batch's activations beside every gradient" if self.step.grad_accum_steps > 1
                else "less than the sum: gradients fill in as activations are freed")
        return lines + [f"  {'peak':<14}{human(self.peak):>10}  {when}"]


def human(size: int) -> str:
    """`size` bytes in GiB, or MiB below 1 GiB."""
    if size >= GIB:
        return f"{size / GIB:.2f} GiB"
    digits = 0 if size >= 100 * MIB else 1 if size >= 10 * MIB else 2
    return f"{size / MIB:.{digits}f} MiB"


def parameter_count(shape: GPT2Config) -> int:
    """A GPT2LMHeadModel's parameters, the output layer tied to the token embedding."""
    width, inner = shape.n_embd, shape.n_inner or 4 * shape.n_embd
    return (shape.vocab_size + shape.n_positions + 2) * width + shape.n_layer * block_parameters(width, inner)


def block_parameters(width: int, inner: int) -> int:
    """One transformer block: attention's qkv and output projections, the MLP's two, two LayerNorms."""
    return 4 * width * width + 2 * width * inner + 9 * width + inner


def activation_bytes(activation: str, half: bool) -> int:
    """Bytes kept per element of the MLP's hidden layer by the activation function and the matmul after it."""
    if activation in ONE_KERNEL_ACTIVATIONS:
        return 4 if half else 8  # its input and its output
    # gelu_new: the input (an fp32 copy under autocast, for pow), tanh's output, 0.5 * x, 1 + tanh, the result
    return 12 + 2 * 2 if half else 5 * 4


def dtype_bytes(step: Step) -> tuple[int, int, int]:
    """Bytes per element of (the matmuls' inputs and outputs, the residual stream and LayerNorms, a dropout
    mask): under autocast the matmuls run in half precision while the residual stream stays fp32; CUDA's
    dropout keeps a bool mask, the CPU's a float tensor."""
    act = 2 if step.precision != "fp32" else 4
    return act, 4, 1 if step.device == "cuda" else act


def mask_bytes(step: Step) -> int:
    """One dropout's mask over the micro-batch's hidden states (0 without dropout)."""
    return dtype_bytes(step)[2] * step.batch_size * step.block_size if step.dropout > 0 else 0


def block_bytes(shape: GPT2Config, step: Step) -> int:
    """What one transformer block keeps for its backward when it is not checkpointed."""
    width, heads, inner = shape.n_embd, shape.n_head, shape.n_inner or 4 * shape.n_embd
    batch, block = step.batch_size, step.block_size
    tokens = batch * block
    act, resid, mask = dtype_bytes(step)
    if step.fused_attention:
        scores = 4 * batch * heads * block  # the log-sum-exp of each row
    else:  # the softmax's output, and with dropout its mask and the dropped-out probabilities
        scores = batch * heads * block * block * (act + (mask + act if step.dropout > 0 else 0))
    return (2 * resid * tokens * width + 16 * tokens  # LayerNorm inputs and their mean and 1/std
            + 2 * act * tokens * width  # the inputs of c_attn and c_fc
            + 4 * act * tokens * width + scores  # q, k, v and the attention's output (c_proj's input)
            + activation_bytes(shape.activation_function, step.precision != "fp32") * tokens * inner
            + 2 * mask_bytes(step) * width)  # after the attention and after the MLP


def estimate(shape: GPT2Config, step: Step) -> Estimate:
    """The memory of a training step of a GPT2LMHeadModel of `shape` (see the module's docstring)."""
    width, layers, vocab = shape.n_embd, shape.n_layer, shape.vocab_size
    inner = shape.n_inner or 4 * width
    tokens = step.batch_size * step.block_size
    act, resid, _ = dtype_bytes(step)
    block_kept = block_bytes(shape, step)
    kept = resid * tokens * width if step.gradient_checkpointing else block_kept
    inputs = 16 * tokens + mask_bytes(step) * width  # input ids and targets (int64); the embedding's dropout mask
    head = resid * tokens * width + 8 * tokens + act * tokens * width  # ln_f's input, lm_head's input
    logits = 4 * tokens * vocab
    # A block's backward: its tensors, the gradient arriving, and the MLP hidden layer's gradient (two of
    # them through the Python gelu_new's product); with accumulation, a weight's new gradient before it is added.
    one_kernel = shape.activation_function in ONE_KERNEL_ACTIVATIONS
    block_live = (block_kept + resid * tokens * width + (1 if one_kernel else 2) * act * tokens * inner
                  + (4 * width * inner if step.grad_accum_steps > 1 and step.trainable is None else 0))

    parameters = parameter_count(shape)
    trainable = parameters if step.trainable is None else step.trainable
    full = step.trainable is None
    shards = step.world_size if step.sharded else 1
    gradients = 4 * trainable // shards
    per_block = block_parameters(width, inner)
    matmul_weights = 4 * width * width + 2 * width * inner  # per block; lm_head's is the embedding's
    copies = 2 if step.precision != "fp32" else 0
    # Under FSDP the root's weights (wte = lm_head, wpe, ln_f) are gathered whole for the whole step, each
    # block's while it computes, with the next block's already on the way (prefetched).
    root = 4 * (vocab + shape.n_positions + 2) * width if step.sharded else 0
    gathered_blocks = 4 * per_block * min(layers, 2) if step.sharded else 0
    # What a later micro-batch of an accumulating step starts with: every gradient, whole under FSDP too
    # (accelerate's `accumulate` skips FSDP's reduce-scatter, which shards them, until the last micro-batch).
    accumulated = 4 * trainable if step.grad_accum_steps > 1 else 0

    def gradients_done(blocks: int) -> int:
        """The gradients made when the backward reaches a block: the output layer's (whole until the backward
        ends, under FSDP too) and a c_proj's, and `blocks` blocks' (sharded under FSDP)."""
        if step.grad_accum_steps > 1:
            return accumulated
        done = (vocab + 2) * width + width * inner + blocks * per_block // shards
        return 4 * trainable * done // parameters

    loss = (layers * kept + inputs + head + 3 * logits + root + accumulated
            + copies * (vocab * width + (0 if step.gradient_checkpointing else layers * matmul_weights)))
    # The end: the embedding's gradient (and under FSDP the root's whole gradients, before they are sharded).
    end = gradients + root + ((4 * vocab * width + root) if full else 0)
    moments = [loss, end]
    for index in (layers - 1, 0):  # linear in the block's index: its ends bound it
        blocks_copied = 1 if step.gradient_checkpointing else index + 1
        moments.append(inputs + index * kept + block_live + gradients_done(layers - 1 - index)
                       + copies * blocks_copied * matmul_weights + root + gathered_blocks)
    activations = max(layers * kept + inputs + head + 3 * logits, inputs + (layers - 1) * kept + block_live)
    weights, optimizer = 4 * parameters // shards, 8 * trainable // shards
    buckets = gradients if step.world_size > 1 and not step.sharded else 0
    half_weights = copies * (vocab * width + (1 if step.gradient_checkpointing else layers) * matmul_weights)
    return Estimate(shape=shape, step=step, parameters=parameters, trainable=trainable, weights=weights,
                    gradients=gradients, optimizer=optimizer, activations=activations, logits=3 * logits,
                    half_weights=half_weights, buckets=buckets, gathered=root + gathered_blocks,
                    peak=weights + optimizer + buckets + max(moments))


def step_for(config: Config, *, device: str, precision: str, cpu_matmul: str, world_size: int = 1,
             sharded: bool = False, trainable: int | None = None) -> Step:
    """The `Step` of `config` as it runs on `device` at `precision`, with `cpu_matmul` ("blas", "onednn").

    Attention is fused on CUDA, and on the CPU unless dropout is on (PyTorch's CPU flash attention
    has none) or the matmuls run on oneDNN (which runs the math attention: see hardware.CpuMatmul).
    """
    training = config.training
    fused = device == "cuda" or (config.model.dropout == 0 and cpu_matmul != "onednn")
    return Step(batch_size=training.batch_size, block_size=config.model.block_size,
                grad_accum_steps=training.grad_accum_steps, precision=precision, device=device,
                dropout=config.model.dropout, gradient_checkpointing=training.gradient_checkpointing,
                fused_attention=fused, world_size=world_size, sharded=sharded, trainable=trainable)


def of_run(config: Config, shape: GPT2Config, *, device: str, precision: str, cpu_matmul: str,
           world_size: int = 1, sharded: bool = False) -> Estimate:
    """The estimate for one process of a run of `config` on a model of `shape` (see `step_for`; `sharded`:
    under FSDP); a LoRA run keeps gradients and moments for its adapters only."""
    trainable = lora.trainable_parameters(config.lora, shape.n_layer, shape.n_embd) if config.lora.enabled else None
    return estimate(shape, step_for(config, device=device, precision=precision, cpu_matmul=cpu_matmul,
                                    world_size=world_size, sharded=sharded, trainable=trainable))


def parse_size(text: str, flag: str = "--memory") -> int:
    """`8GB`, `8GiB`, `8G`, `7.5` (GiB) or `6000MB` in bytes: GB and MB are 2**30 and 2**20, as GPU makers count."""
    found = SIZE.fullmatch(text.strip())
    if not found or float(found.group(1)) <= 0:
        raise UserError(f"{flag} must be a memory size such as 8GB, 7.5GiB or 6000MB, got {text!r}")
    unit = (found.group(2) or "g").lower()
    return int(float(found.group(1)) * (GIB if unit.startswith("g") else MIB))


def available(device: torch.device, limit: int | None) -> tuple[int, str] | None:
    """The memory a run on `device` may use and where it is, in words: `limit` when given, else on a GPU what
    is free plus what this process holds already; None without a limit on a CPU, or a GPU not here."""
    if limit is not None:
        return limit, f"the --memory limit of {human(limit)}"
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_allocated(device)
    return free + held, f"{human(free + held)} on {device} ({human(free)} free + {human(held)} this run holds)"


def refusal(found: Estimate, device: torch.device, limit: int | None) -> UserError | None:
    """The one-line error for a run whose estimate exceeds what `available` says it has, with the settings
    that would fit; None when it fits or there is nothing to check."""
    space = available(device, limit)
    if space is None or found.peak <= space[0]:
        return None
    return UserError(f"this run needs about {human(found.peak)} at its peak (estimate) but has {space[1]}: "
                     f"{human(found.peak - space[0])} short. {what_fits(found, space[0])}")


def verdict(found: Estimate, space: int, where: str) -> str:
    """Whether the estimate fits in `space` (`where` says what that is), for the dry run."""
    if found.peak <= space:
        tight = ("; tight on a GPU, where the CUDA context and the allocator's slack take a few hundred MiB more "
                 "(keep ~10% spare)" if found.step.device == "cuda" and space - found.peak < space // 10 else "")
        return f"fits in {where}, with {human(space - found.peak)} to spare{tight}"
    return f"does not fit in {where}: {human(found.peak - space)} short. {what_fits(found, space)}"


def what_fits(found: Estimate, space: int) -> str:
    """Each setting that lowers the peak, with its estimate: those that fit in `space` first; when none does,
    all of them together (which are then the flags named)."""
    options = knobs(found, space)
    if not options:
        return "No setting of this run lowers it further: use a smaller model or a GPU with more memory"
    fits = [f"{flags} ({human(peak)})" for flags, peak in options if peak <= space]
    not_alone = [f"{flags} ({human(peak)})" for flags, peak in options if peak > space]
    if fits:
        text = f"What fits: {', '.join(fits)}" + (f"; not enough alone: {', '.join(not_alone)}" if not_alone else "")
    else:
        together = estimate(found.shape, combined(found.step)).peak
        text = (f"Not enough alone: {', '.join(not_alone)}; all of them together: {human(together)}"
                + ("" if together <= space else ", still too much: a smaller model or block_size"))
    return f"{text} (see docs/small-gpu.md)"


def knobs(found: Estimate, space: int) -> list[tuple[str, int]]:
    """(the flags that change one setting, the estimated peak with it) for each setting that lowers it."""
    step = found.step
    options = []
    if step.batch_size > 1:
        smaller = smaller_batch(found.shape, step, space)
        options.append((f"--batch-size {smaller.batch_size} --grad-accum-steps {smaller.grad_accum_steps}", smaller))
    if not step.gradient_checkpointing:
        options.append(("--gradient-checkpointing", dataclasses.replace(step, gradient_checkpointing=True)))
    if half_precision_helps(step):
        options.append(("--precision bf16", dataclasses.replace(step, precision="bf16")))
    peaks = [(flags, estimate(found.shape, changed).peak) for flags, changed in options]
    # bf16 can cost more than it saves: autocast's weight copies against a small micro-batch's activations.
    return [(flags, peak) for flags, peak in peaks if peak < found.peak]


def half_precision_helps(step: Step) -> bool:
    """Whether bf16 would lower the step's memory: an fp32 run on a GPU (the CPU trains in fp32)."""
    return step.device == "cuda" and step.precision == "fp32"


def smaller_batch(shape: GPT2Config, step: Step, space: int) -> Step:
    """The same effective batch in smaller micro-batches (a divisor of batch_size, more accumulation): the
    largest that fits in `space`, else micro-batches of 1."""
    sizes = [size for size in range(step.batch_size - 1, 0, -1) if step.batch_size % size == 0]
    options = [dataclasses.replace(step, batch_size=size,
                                   grad_accum_steps=step.grad_accum_steps * step.batch_size // size) for size in sizes]
    return next((option for option in options if estimate(shape, option).peak <= space), options[-1])


def combined(step: Step) -> Step:
    """Every setting of `knobs` at once, with micro-batches of 1."""
    return dataclasses.replace(step, batch_size=1, grad_accum_steps=step.grad_accum_steps * step.batch_size,
                               gradient_checkpointing=True,
                               precision="bf16" if half_precision_helps(step) else step.precision)


# ------------------------------------------------------------------ the dry run

def run_shape(config: Config, model_config: dict | None = None) -> tuple[GPT2Config, Config]:
    """The shape of the model a run of `config` trains, read without building it, and the config fitted to it
    (a fine-tune's shape is the pretrained model's). `model_config`: a resumed run's, from its checkpoint.

    From scratch, the vocabulary is the prepared data's; a fine-tuned model's shape is its config's
    (`pretrained.gpt2_config`: OpenAI's sizes without the network), its context cropped to block_size.
    """
    if model_config is not None:
        return GPT2Config.from_dict(model_config), config
    init_from = config.model.init_from
    if init_from == SCRATCH:
        prepared = data.resolve(config.data.processed_dir, config.training.data_format, config.data.tokenizer)
        return gpt2_config(config.model, prepared.vocab_size), config
    shape = pretrained.gpt2_config(init_from, config.model.init_revision)
    fitted = fitted_config(config, shape)
    return GPT2Config.from_dict({**shape.to_dict(), "n_positions": fitted.model.block_size}), fitted


def dry_run(config: Config, *, device: str, limit: int | None, resumed: dict | None = None, processes: int = 1,
            fsdp: bool = False) -> str:
    """What `tinylm train --dry-run` prints: the estimate of a run of `config` (resuming the checkpoint
    `resumed`) on `device` ("auto", "cpu" or "cuda": a GPU need not be here), for each of `processes`
    (sharding the model when `fsdp`), and whether it fits in `limit` bytes (else, on a GPU here, its free
    memory)."""
    shape, config = run_shape(config, resumed["model_config"] if resumed else None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = config.training.precision if device == "cuda" else "fp32"
    # "auto" times the step at the start of a run: unknown here, so oneDNN's (math attention), the larger peak.
    setting = config.training.cpu_matmul
    cpu_matmul = (setting if setting != "auto" else started_cpu_matmul(resumed) or "onednn") if device == "cpu" else "blas"
    found = of_run(config, shape, device=device, precision=precision, cpu_matmul=cpu_matmul, world_size=processes,
                   sharded=fsdp)
    step = found.step
    launch = ("one process" if processes == 1 else f"each of {processes} FSDP processes" if fsdp
              else f"each of {processes} DDP processes")
    model = ("" if config.model.init_from == SCRATCH else
             f"{pretrained.describe(config.model.init_from, config.model.init_revision)}: ")
    lines = [f"memory estimate (dry run: nothing is trained or written) of {model}{shape.n_layer} layers, "
             f"{shape.n_head} heads, {shape.n_embd} wide, vocab {shape.vocab_size}",
             f"  on {device} in {precision}: batch_size {step.batch_size} x grad_accum_steps {step.grad_accum_steps} "
             f"x block {step.block_size}, gradient checkpointing {'on' if step.gradient_checkpointing else 'off'}, "
             f"{'fused' if step.fused_attention else 'math'} attention, {launch}",
             *found.table()]
    space = available(torch.device(device), limit)
    if space is None:
        lines.append("no memory size to compare with: pass --memory SIZE (e.g. --memory 8GB)")
    else:
        lines.append(verdict(found, *space))
    return "\n".join(lines)
