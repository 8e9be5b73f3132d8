"""Pick the device and precision a run actually gets, with the training page's fallbacks.

- `device = "cuda"` without a CUDA GPU: warn ("CUDA not detected") and train on CPU.
- Mixed precision only when on CUDA and `precision != "fp32"`; on CPU a non-fp32
  precision falls back to fp32 with a warning (accelerate would silently ignore it).
- bf16 on a GPU without bf16 support: warn and use fp16 with loss scaling.

And the speed settings that go with the device: torch.compile, TF32 on CUDA, the CPU's
matmul backend, and the GPU's peak FLOP/s for the utilisation figure.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import CUDA_NOT_DETECTED, troubleshooting_link

MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


@dataclass
class Hardware:
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32", "fp16" or "bf16": what the run really uses
    warnings: list[str] = field(default_factory=list)

    @property
    def mixed_precision(self) -> str:
        """The value accelerate's `mixed_precision` expects."""
        return MIXED_PRECISION[self.precision]


def choose_hardware(device: str, precision: str) -> Hardware:
    """Resolve `training.device` ("auto", "cpu", "cuda") and `training.precision` for this machine."""
    warnings = []
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        warnings.append(
            "CUDA not detected (torch.cuda.is_available() is False): training on CPU instead; "
            f"see {troubleshooting_link(CUDA_NOT_DETECTED)}"
        )
    if device == "auto" or (device == "cuda" and not has_cuda):
        device = "cuda" if has_cuda else "cpu"
    if device == "cpu" and precision != "fp32":
        warnings.append(f'precision "{precision}" needs a CUDA GPU: training on CPU in fp32 instead')
        precision = "fp32"
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        warnings.append('this GPU does not support bf16: using "fp16" with loss scaling instead')
        precision = "fp16"
    return Hardware(device, precision, warnings)


def use_compile(setting: str, device: str) -> bool:
    """Resolve `training.compile` ("auto", "on", "off"): "auto" compiles on CUDA only.

    On CPU the training step is bound by matrix multiplies that inductor cannot make faster:
    compiling bought 1-3% per step for 17-28 s of compile time on the shapes we measured.
    """
    return setting == "on" or (setting == "auto" and device == "cuda")


def configure_backends(device: str) -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores on CUDA (GPT-2 training doesn't need full fp32)."""
    if device == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"


# Dense tensor-core peaks in FLOP/s from the vendors' spec sheets: (fp16/bf16 with fp32 accumulate,
# fp32 matmuls, which run as TF32 where the GPU has it). The first name found as whole words in the
# device name wins ("A10" is not "A100" or "A10G", "L4" not "L40S"), so more specific names come
# first. GPUs without bf16 (T4, V100) run "bf16" runs as fp16 (choose_hardware).
PEAK_FLOPS = {
    "H200": (989e12, 495e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 495e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "A10": (125e12, 62.5e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
    "RTX 4090": (165.2e12, 82.6e12),
    "RTX 4060": (30.2e12, 15.1e12),
    "RTX 3090": (71e12, 35.6e12),
}


def device_peak_flops(device: torch.device, precision: str, processes: int = 1) -> float | None:
    """`peak_flops` of `processes` devices like `device`: known for some GPUs, None on CPUs."""
    return peak_flops(torch.cuda.get_device_name(device), precision, processes) if device.type == "cuda" else None


def peak_flops(device_name: str, precision: str, processes: int = 1) -> float | None:
    """The peak FLOP/s for `precision` ("fp32", "fp16", "bf16") of `processes` GPUs of this name (tokens/s
    counts every process's tokens), or None when it is not in PEAK_FLOPS."""
    for name, (half, single) in PEAK_FLOPS.items():
        if re.search(rf"\b{re.escape(name)}\b", device_name):
            return (single if precision == "fp32" else half) * processes
    return None


@dataclass
class CpuMatmul:
    """How fp32 matrix multiplies run in a CPU training step (`training.cpu_matmul`)."""

    backend: str  # "blas" (PyTorch's default: MKL on x86) or "onednn"
    note: str = ""

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run the enclosed forward/backward passes on the chosen backend; restores the defaults after."""
        if self.backend != "onednn":
            yield
            return
        previous = torch.backends.mkldnn.matmul.fp32_precision
        # This setting routes fp32 matmuls to oneDNN. It *allows* bf16 arithmetic, which oneDNN uses
        # only on CPUs with AMX; choose_cpu_matmul checks the results stay fp32-exact first.
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            # PyTorch's CPU flash-attention kernel slows down 3-5x under that setting; the plain
            # (math) attention's matmuls go through oneDNN like the rest.
            with sdpa_kernel([SDPBackend.MATH]):
                yield
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = previous


# "auto" trains on oneDNN when the model's own forward+backward is at least this much faster with it, in
# the median of alternating rounds, and faster in every round: where the two are within noise of each
# other, the default BLAS, every time.
ONEDNN_MIN_SPEEDUP = 1.15
PROBE_BUDGET_S = 4.0  # the most "auto" spends timing the two backends at start
PROBE_ROUNDS = (3, 7)  # fewer than 3 rounds fit the budget: not measured, the default BLAS
PROBE_STEP_S = 0.25  # a timed step: the run's micro-batch, or as many of its blocks as run in about this long


def cpu_matmul_for_run(setting: str, device: str, started_with: str | None,
                       forward_backward: Callable[[int], object], rows: int) -> CpuMatmul:
    """The CPU matmul backend of a run; a resumed "auto" run keeps the one it `started_with`, so its
    losses stay bit-identical to an uninterrupted run's (the choice involves a timing).
    `forward_backward(n)` runs the first `n` of the `rows` blocks of the run's first micro-batch through the
    model and back (see `choose_cpu_matmul`)."""
    if device != "cpu":
        return CpuMatmul("blas")
    if setting == "auto" and started_with in ("blas", "onednn"):
        return CpuMatmul(started_with, f"{started_with} matmuls, as the run being resumed")
    return choose_cpu_matmul(setting, forward_backward, rows)


def choose_cpu_matmul(setting: str, forward_backward: Callable[[int], object], rows: int) -> CpuMatmul:
    """Resolve `training.cpu_matmul` ("auto", "blas", "onednn") on this CPU, saying which and why.

    MKL, PyTorch's BLAS on x86, runs a slow generic code path on some AMD processors, where oneDNN
    trained 1.3-1.8x faster; on others the two are within noise. "auto" uses oneDNN where its fp32
    results are exact (no bf16 shortcut) and the run's own `forward_backward` is faster with it
    (`ONEDNN_MIN_SPEEDUP`). The timing leaves the random generators as they were, so the run trains
    exactly as one that named its backend; the caller clears the gradients it leaves.
    """
    if setting == "blas":
        return CpuMatmul("blas", "default BLAS matmuls (training.cpu_matmul)")
    if not torch.backends.mkldnn.is_available():
        return CpuMatmul("blas", "default BLAS matmuls (this PyTorch has no oneDNN)")
    onednn = CpuMatmul("onednn")
    if not onednn_is_exact():
        if setting == "onednn":
            return CpuMatmul("onednn", "oneDNN matmuls, in bf16 on this CPU (AMX): not fp32-exact")
        return CpuMatmul("blas", "oneDNN would round fp32 matmuls to bf16 on this CPU; using the default BLAS")
    if setting == "onednn":
        return CpuMatmul("onednn", "oneDNN matmuls (training.cpu_matmul)")
    with torch.random.fork_rng(devices=[]):  # dropout draws: the run's generators must not move
        speedups = _step_speedups(onednn, forward_backward, rows)
    if speedups is None:
        return CpuMatmul("blas", "default BLAS matmuls (a step is too slow to time both; training.cpu_matmul = "
                                 "\"onednn\" may be faster on AMD CPUs)")
    median, slowest = statistics.median(speedups), min(speedups)
    if reliably_faster(speedups):
        return CpuMatmul("onednn", f"oneDNN matmuls ({median:.2f}x the default BLAS on this model's step)")
    return CpuMatmul("blas", f"default BLAS matmuls (oneDNN {median:.2f}x on this model's step, "
                             f"{slowest:.2f}x at worst: not reliably faster)")


def reliably_faster(speedups: list[float]) -> bool:
    """Whether rounds of (default time / oneDNN time) say oneDNN pays: by ONEDNN_MIN_SPEEDUP in the median,
    and in every round."""
    return statistics.median(speedups) >= ONEDNN_MIN_SPEEDUP and min(speedups) > 1.0


def onednn_is_exact() -> bool:
    """Whether oneDNN keeps fp32 matmuls exact on this CPU (it rounds them to bf16 where it has AMX)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 512, generator=generator), torch.randn(512, 64, generator=generator)
    with CpuMatmul("onednn").active():
        product = a @ b
    # fp32 rounding gives errors ~1e-5 here, bf16 inputs ~1e-1.
    return (product.double() - a.double() @ b.double()).abs().max().item() < 1e-3


def _step_speedups(onednn: CpuMatmul, forward_backward: Callable[[int], object], rows: int) -> list[float] | None:
    """(default BLAS time / oneDNN time) of `forward_backward` on as many of the `rows` blocks as take
    about PROBE_STEP_S (the matmuls keep the run's widths), per round, alternating; None when fewer
    than PROBE_ROUNDS[0] rounds fit in PROBE_BUDGET_S."""
    def seconds(context, repeats: int, blocks: int) -> float:
        with context():
            started = time.perf_counter()
            for _ in range(repeats):
                forward_backward(blocks)
            return time.perf_counter() - started

    contexts = (contextlib.nullcontext, onednn.active)
    # A backend's first call is also its warm-up (autograd's first backward, oneDNN building its kernels), which
    # can take several times a block: the default's second call says how long a block takes.
    one_block = min(seconds(context, 1, 1) for context in (*contexts, contexts[0]))
    if 2 * PROBE_ROUNDS[0] * one_block > PROBE_BUDGET_S:
        return None
    blocks = max(1, min(rows, int(PROBE_STEP_S / one_block)))
    one_step = min(seconds(context, 1, blocks) for context in contexts)
    repeats = max(1, round(0.05 / one_step))  # rounds of 50 ms at least, so a timer tick is no ratio
    rounds = min(PROBE_ROUNDS[1], int(PROBE_BUDGET_S / (2 * repeats * one_step)))
    if rounds < PROBE_ROUNDS[0]:
        return None
    return [seconds(contexts[0], repeats, blocks) / seconds(contexts[1], repeats, blocks) for _ in range(rounds)]
