"""Pick the device and precision a run actually gets, with the training page's fallbacks.

- `device = "cuda"` without a CUDA GPU: warn ("CUDA not detected") and train on CPU.
- Mixed precision only when on CUDA and `precision != "fp32"`; on CPU a non-fp32
  precision falls back to fp32 with a warning (accelerate would silently ignore it).
- bf16 on a GPU without bf16 support: warn and use fp16 with loss scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .paths import TROUBLESHOOTING

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
            f"see {TROUBLESHOOTING}#cuda-not-detected"
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
