"""Where tinylm relies on a library's internals or works around its bugs: each in one place, with
its reason, and pinned by tests/test_compat.py to the behaviour it relies on, so a new release that
changes it fails there, by name, rather than somewhere in a training run.

Two more stay where they are used, each pinned by its own tests:
- `sampler.GPT2Decoder` runs a GPT-2's submodules by hand (`ln_1`, `attn.c_attn` and its
  `split_size` and `scaling`, `attn.c_proj`, `mlp`) on a preallocated cache: one step costs about
  40% less than a call through transformers' forward with its `DynamicCache`.
  tests/test_generate.py::test_lean_gpt2_decoder_gives_the_full_models_logits pins it to the
  full model's logits.
- `sampler.cache_keyword` asks `forward`'s signature whether transformers calls the cache `cache`
  or `past_key_values` (renamed during v5);
  tests/test_generate.py::test_cached_decoding_uses_the_installed_transformers_api_and_still_matches_recompute.
Two more are for the tests and benchmarks/gpu_check.py's --smoke, never a training run:
`use_loss_scaler` runs accelerate's fp16 path on the CPU, and `reset_accelerate_state` lets one
process build Trainers of different precisions one after the other.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import warnings
import weakref
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def close_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, once what uses it is freed.

    Two gloo bugs meet at the end of a multi-process run (torch 2.13): a rank that exits with
    its group alive can abort in C++ ("terminate called without an active exception",
    pytorch#190489), and a DDP reducer freed after the group was destroyed holds the group's last
    reference and deadlocks in its destructor (it joins a gloo worker that waits for the GIL).
    So at exit: collect the reducer first, then destroy the group. Registering twice is harmless.
    """
    atexit.unregister(_close_process_group)
    atexit.register(_close_process_group)


def _close_process_group() -> None:
    if torch.distributed.is_initialized():
        gc.collect()  # frees the DDP reducer (it sits in reference cycles) while the group still lives
        PartialState().destroy_process_group()


def skip_next_step_where(optimizer, nonfinite: torch.Tensor) -> None:
    """Make a fused torch optimizer (as accelerate wraps it) skip its next step where `nonfinite` is true.

    Fused AdamW reads `found_inf`, the tensor GradScaler sets for fused optimizers, and leaves
    weights and moments alone where it is 1: the skip is decided on the device, with no host sync.
    """
    optimizer.optimizer.found_inf = nonfinite.float()


def hub_cache_folder(repo_id: str, repo_type: str) -> Path:
    """The folder of the Hugging Face cache that holds Hub repo `repo_id` ("model" or "dataset") once read.

    huggingface_hub documents the layout (`models--owner--name` under HF_HUB_CACHE) but exports
    the function that names the folder only from its `file_download` module.
    """
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)


def dataset_over_table(table, fingerprint_of: list):
    """A `datasets.Dataset` over the pyarrow `table` as it is (no copy, nothing written to the cache).

    `datasets.Dataset(table)` is the constructor datasets itself uses; wrapping the table in its
    `InMemoryTable` says so rather than leaning on the constructor's backward-compatible
    acceptance of a bare pyarrow table. The fingerprint is made from `fingerprint_of` (e.g. the
    files' checksums): left to itself, datasets would hash the whole table to make one.
    """
    import datasets  # here, not at the top: only load_blocks needs it, and it is slow to import

    fingerprint = datasets.fingerprint.Hasher.hash(fingerprint_of)
    return datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=fingerprint)


def use_loss_scaler(accelerator, scaler) -> None:
    """Run accelerate's fp16 path with `scaler` on any device, the CPU included: the GPU-only branch
    of the training loop (scaled backward, unscale before clipping, overflow steps skipped by the
    scaler), driven on the CPU with the real torch and accelerate components.

    accelerate turns that path on only for GPUs; these are its own switches (accelerate 1.x):
    `scaler` makes prepare() hand the optimizer the scaler and backward() scale the loss,
    `native_amp` makes autocast() and clip_grad_norm_ (which unscales first) take the fp16 path.
    Call before prepare().
    """
    accelerator.scaler, accelerator.native_amp = scaler, True


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (device, mixed precision), so the next Accelerator may
    pick its own: accelerate refuses a second one with another precision in the same process.
    accelerate's own tests reset it this way between Accelerators."""
    AcceleratorState._reset_state(reset_partial_state=True)


def checkpoint_activations(model) -> None:
    """Turn on transformers' activation (gradient) checkpointing of every transformer block of `model`.

    transformers 5.23 renamed `gradient_checkpointing_enable` to `activation_checkpointing_enable`
    (the old name now warns that it goes in v6); our floor, 5.15, has only the old name. Both hand
    these arguments to `torch.utils.checkpoint.checkpoint`: the non-reentrant implementation, which
    works under torch.compile, DDP and gradient accumulation; and the RNG state saved with each
    block's input, so that its recomputation draws the dropout masks its forward drew.
    """
    arguments = {"use_reentrant": False, "preserve_rng_state": True}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=arguments)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=arguments)


class TensorBytes(TorchDispatchMode):
    """While active, the bytes of the CPU tensors that ops create and that are still alive (`now`), and
    their largest value (`peak`): on the CPU what torch.cuda.max_memory_allocated() counts on a GPU (less
    its rounding), above the tensors alive when it started. It measures the estimates of tinylm.memory.

    Every tensor an ATen op returns, forward or backward, is counted once per storage, from the op until
    its storage is freed; a view or an in-place op returns a storage it was given, already counted or not
    ours. A DTensor (FSDP2's sharded weights, their gradients and moments) counts as its local shard, the
    only memory it has on this process. Buffers a kernel allocates and frees inside itself are not seen.
    It relies on torch's Python dispatch mode (`torch.utils._python_dispatch`, a private module, the one
    `__torch_dispatch__` modes subclass) seeing each op on the calling thread, where CPU autograd runs
    the backward too.
    """

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        given = {tensor.untyped_storage().data_ptr() for tensor in _local_tensors((args, kwargs))}
        out = func(*args, **(kwargs or {}))
        for tensor in _local_tensors(out):
            if tensor.device.type == "cpu":
                self._count(tensor.untyped_storage(), given)
        return out

    def _count(self, storage, given: set[int]) -> None:
        address, size = storage.data_ptr(), storage.nbytes()
        if not size or address in given or address in self._alive:
            return
        self._alive.add(address)
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._freed, address, size)

    def _freed(self, address: int, size: int) -> None:
        self._alive.discard(address)
        self.now -= size


def _local_tensors(tree) -> list[torch.Tensor]:
    """The tensors in `tree`, a DTensor as its local shard (its own wrapper has no storage)."""
    from torch.distributed.tensor import DTensor

    return [item.to_local() if isinstance(item, DTensor) else item
            for item in tree_flatten(tree)[0] if isinstance(item, torch.Tensor)]


# peft 0.21 asks every model it wraps for `is_gradient_checkpointing`, which transformers 5 deprecated in
# favour of `is_activation_checkpointing` with a FutureWarning: noise in every LoRA run that its user cannot act on.
PEFT_CHECKPOINTING_WARNING = r"`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def peft_wrapping():
    """Around peft's `get_peft_model` and `PeftModel.from_pretrained`: without the deprecation warning peft's own
    call to transformers causes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_CHECKPOINTING_WARNING, category=FutureWarning)
        yield


def peft_base_weights(weights: dict) -> dict:
    """The wrapped model's own weights in a peft model's state dict, under the wrapped model's names.

    peft keeps the wrapped model under `base_model.model.`, each adapted layer's weights under a
    `base_layer.` of it, and the adapters as its `lora_*` submodules; peft exports the adapters'
    state dict (`get_peft_model_state_dict`) but no function for the rest.
    """
    prefix = "base_model.model."
    return {name.removeprefix(prefix).replace(".base_layer.", "."): tensor for name, tensor in weights.items()
            if not any(part.startswith("lora_") for part in name.split("."))}


def causal_lm_from_pretrained(source: str, **kwargs):
    """`AutoModelForCausalLM.from_pretrained(source, **kwargs)`, with `local_files_only` passed to its adapter lookup too.

    Where peft is installed, transformers' Auto classes (5.24) first look for a PEFT adapter_config.json of
    `source`, and give that lookup the revision and the token but not `local_files_only`: a Hub id read from
    the cache because the Hub cannot be reached waited through huggingface_hub's retries (1+2+4+8+8 s) before
    it loaded. (`GPT2LMHeadModel.from_pretrained` passes it on itself.) Pinned by tests/test_finetune.py's
    unreachable-Hub tests, which fail without it when peft is installed.
    """
    from transformers import AutoModelForCausalLM

    adapter_kwargs = {"local_files_only": kwargs.get("local_files_only", False)}
    return AutoModelForCausalLM.from_pretrained(source, adapter_kwargs=adapter_kwargs, **kwargs)
