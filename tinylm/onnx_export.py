"""`tinylm export --onnx`: the model as one ONNX graph with past key values, checked in onnxruntime.

The inputs and outputs carry the names Hugging Face Optimum uses for decoder models:

    inputs   input_ids       int64 (batch, sequence)
             attention_mask  int64 (batch, past_sequence + sequence), 1 = real token, 0 = padding
             position_ids    int64 (batch, sequence)
             past_key_values.{i}.key / .value   float32 (batch, n_head, past_sequence, head_dim)
    outputs  logits          float32 (batch, sequence, vocab)
             present.{i}.key / .value           float32 (batch, n_head, past_sequence + sequence, head_dim)

The first step passes past tensors with `past_sequence = 0`; each later step feeds
the new token(s) with the previous step's `present.*` as `past_key_values.*`.
GPT-2's positions are learned and absolute, so `past_sequence + sequence` must
stay within `n_positions`, as in PyTorch.

Needs the `onnx` extra (`pip install 'tinylm[onnx]'`): onnx and onnxscript for
torch's exporter, onnxruntime to check the graph.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, GPT2LMHeadModel

from .errors import UserError
from .sampler import cache_keyword

ONNX_NAME = "model.onnx"
REQUIRED_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'tinylm[onnx]' (or: pip install onnx onnxscript onnxruntime)"
# The largest |difference| between onnxruntime's and PyTorch's fp32 logits that export accepts.
# Seen: 1e-7 to 3e-6 (up to 6 layers x 384 wide), where the kernels only sum in another order.
LOGITS_TOLERANCE = 1e-4
# Example sizes for tracing: all different and > 1, so torch.export keeps every axis dynamic
# (it specialises an axis whose example size is 0 or 1).
TRACE_BATCH, TRACE_SEQUENCE, TRACE_PAST = 2, 3, 4
MIN_POSITIONS = TRACE_SEQUENCE + TRACE_PAST
ONNX_OPSET = 20  # standard ops only (no contrib ops): any runtime with opset 20 runs it
SINGLE_FILE_LIMIT = 1 << 30  # protobuf caps one file at 2 GiB; larger weights go to model.onnx.data


def require_onnx() -> None:
    """Raise `UserError` with the install command when an ONNX package is missing."""
    missing = [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--onnx needs packages that are not installed ({', '.join(missing)}): {INSTALL_HINT}")


def past_names(n_layer: int, prefix: str) -> list[str]:
    """`prefix.0.key, prefix.0.value, prefix.1.key, ...`: one key and one value per layer."""
    return [f"{prefix}.{layer}.{part}" for layer in range(n_layer) for part in ("key", "value")]


class DecoderWithPast(torch.nn.Module):
    """GPT2LMHeadModel with its cache as plain tensors in and out, the shape an ONNX graph needs."""

    def __init__(self, model: GPT2LMHeadModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values: tuple[torch.Tensor, ...]):
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.model.config.n_layer):
            cache.update(past_key_values[2 * layer], past_key_values[2 * layer + 1], layer)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{cache_keyword(type(self.model)): cache},
        )
        # The forward extends `cache` in place (and returns it, as `out.cache` in current transformers).
        presents = [tensor for layer in cache.layers for tensor in (layer.keys, layer.values)]
        return (out.logits, *presents)


def example_inputs(config, batch: int, sequence: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random but valid graph inputs: token ids, a full attention mask, positions after `past`."""
    generator = np.random.default_rng(seed)
    head_dim = config.n_embd // config.n_head
    inputs = {
        "input_ids": generator.integers(0, config.vocab_size, (batch, sequence), dtype=np.int64),
        "attention_mask": np.ones((batch, past + sequence), dtype=np.int64),
        "position_ids": np.tile(np.arange(past, past + sequence, dtype=np.int64), (batch, 1)),
    }
    for name in past_names(config.n_layer, "past_key_values"):
        inputs[name] = generator.standard_normal((batch, config.n_head, past, head_dim)).astype(np.float32)
    return inputs


def export_onnx(model: GPT2LMHeadModel, path: str | Path) -> Path:
    """Write `model` as an ONNX graph with past key values at `path`, then check it in onnxruntime."""
    require_onnx()
    config = model.config
    if config.n_positions < MIN_POSITIONS:
        raise UserError(
            f"--onnx needs a context (block_size) of at least {MIN_POSITIONS} tokens to trace the graph; "
            f"this model has {config.n_positions}"
        )
    path = Path(path)
    wrapper = DecoderWithPast(model.eval())
    sample = example_inputs(config, TRACE_BATCH, TRACE_SEQUENCE, TRACE_PAST)
    names = list(sample)
    args = tuple(torch.from_numpy(sample[name]) for name in names[:3])
    past = tuple(torch.from_numpy(sample[name]) for name in names[3:])

    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=config.n_positions)
    past_sequence = torch.export.Dim("past_sequence", max=config.n_positions)
    total = torch.export.Dim("total_sequence", max=config.n_positions)
    dynamic_shapes = (
        {0: batch, 1: sequence},
        {0: batch, 1: total},
        {0: batch, 1: sequence},
        tuple({0: batch, 2: past_sequence} for _ in past),
    )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(
            wrapper,
            (*args, past),
            path,
            input_names=names,
            output_names=["logits", *past_names(config.n_layer, "present")],
            dynamic_shapes=dynamic_shapes,
            external_data=weight_bytes > SINGLE_FILE_LIMIT,
            opset_version=ONNX_OPSET,
            dynamo=True,
            verbose=False,
        )
    check_onnx(path, model)
    return path


def check_onnx(path: str | Path, model: GPT2LMHeadModel) -> float:
    """Run the graph in onnxruntime on a prompt and on a cached step; return the largest difference from PyTorch.

    Raises RuntimeError (a bug, not a user mistake) past `LOGITS_TOLERANCE`.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    config = model.config
    wrapper = DecoderWithPast(model.eval())
    worst = 0.0
    # A prompt with no past (the first step), then one token with a past (every later step).
    for sequence, past in ((MIN_POSITIONS, 0), (1, MIN_POSITIONS - 1)):
        inputs = example_inputs(config, batch=1, sequence=sequence, past=past, seed=sequence)
        expected = _run_torch(wrapper, inputs)
        got = session.run(None, inputs)
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(got, expected)))
    if not worst <= LOGITS_TOLERANCE:
        raise RuntimeError(
            f"{path}: onnxruntime and PyTorch disagree by {worst:.3g} (tolerance {LOGITS_TOLERANCE}); "
            "the ONNX export is wrong, please report it"
        )
    return worst


def _run_torch(wrapper: DecoderWithPast, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    tensors = [torch.from_numpy(array) for array in inputs.values()]
    with torch.no_grad():
        outputs = wrapper(*tensors[:3], tuple(tensors[3:]))
    return [output.numpy() for output in outputs]


@contextlib.contextmanager
def _quiet_exporter():
    """Silence torch.onnx's known-harmless chatter (torchvision ops not registered, pytree deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
