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
from collections.abc import Iterator
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


def cpu_matmul_for_run(setting: str, device: str, width: int, rows: int, started_with: str | None) -> CpuMatmul:
    """The CPU matmul backend of a run; a resumed "auto" run keeps the one it `started_with`, so its
    losses stay bit-identical to an uninterrupted run's (the choice involves a timing)."""
    if device != "cpu":
        return CpuMatmul("blas")
    if setting == "auto" and started_with in ("blas", "onednn"):
        return CpuMatmul(started_with, f"{started_with} matmuls, as the run being resumed")
    return choose_cpu_matmul(setting, width, rows)


def choose_cpu_matmul(setting: str, width: int, rows: int) -> CpuMatmul:
    """Resolve `training.cpu_matmul` ("auto", "blas", "onednn") by measuring this CPU.

    MKL, PyTorch's BLAS on x86, runs a slow generic code path on AMD processors: on an AMD EPYC
    oneDNN multiplied the model's matrices 2.2x faster, and trained 1.3-1.8x faster end to end.
    "auto" uses oneDNN where its fp32 results are exact (no bf16 shortcut) and a probe of the
    model's MLP matmul (`rows` x `width` @ `width` x 4*`width`) is at least 1.25x faster.
    """
    if setting == "blas" or not torch.backends.mkldnn.is_available():
        return CpuMatmul("blas")
    onednn = CpuMatmul("onednn")
    if not onednn_is_exact():
        if setting == "onednn":
            return CpuMatmul("onednn", "oneDNN matmuls, in bf16 on this CPU (AMX): not fp32-exact")
        return CpuMatmul("blas", "oneDNN would round fp32 matmuls to bf16 on this CPU; using the default BLAS")
    if setting == "onednn":
        return onednn
    speedup = _matmul_speedup(onednn, width, rows)
    if speedup >= 1.25:
        return CpuMatmul("onednn", f"oneDNN matmuls ({speedup:.1f}x the default BLAS on this CPU)")
    return CpuMatmul("blas")


def onednn_is_exact() -> bool:
    """Whether oneDNN keeps fp32 matmuls exact on this CPU (it rounds them to bf16 where it has AMX)."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 512, generator=generator), torch.randn(512, 64, generator=generator)
    with CpuMatmul("onednn").active():
        product = a @ b
    # fp32 rounding gives errors ~1e-5 here, bf16 inputs ~1e-1.
    return (product.double() - a.double() @ b.double()).abs().max().item() < 1e-3


def _matmul_speedup(onednn: CpuMatmul, width: int, rows: int, rounds: int = 5) -> float:
    """Median over alternating rounds of (default time / oneDNN time) for one MLP-sized matmul."""
    a, b = torch.randn(min(rows, 4096), width), torch.randn(width, 4 * width)
    ratios = []
    for _ in range(rounds):
        times = []
        for context in (contextlib.nullcontext, onednn.active):
            with context():
                a @ b  # warm up (oneDNN builds its kernel on first use)
                started = time.perf_counter()
                for _ in range(3):
                    a @ b
                times.append(time.perf_counter() - started)
        ratios.append(times[0] / times[1])
    return statistics.median(ratios)
