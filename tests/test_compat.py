"""tinylm/compat.py: each reliance on a library's internals, pinned to the behaviour tinylm (or its tests and
benchmarks/gpu_check.py --smoke) needs.

These run the real accelerate and torch on the CPU. When a release changes what compat relies on,
the failure is here, by name, rather than a training run that quietly does something else.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from huggingface_hub import scan_cache_dir

from tinylm import compat

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # accelerate's state is per process


@pytest.fixture
def accelerator():
    """An Accelerator as the Trainer makes one for a CPU fp16 run (accelerate leaves its scaler off there)."""
    made = Accelerator(cpu=True, mixed_precision="fp16")
    assert made.scaler is None, "accelerate now scales fp16 losses on the CPU itself: use_loss_scaler can go"
    return made


def linear_and_batch():
    """A one-layer model (a Linear inside, so a hook sees its output before accelerate casts it back to
    fp32) and a batch for it."""
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(3, 4, generator=generator))
        model[0].bias.zero_()
    return model, torch.randn(5, 4, generator=generator)


def test_use_loss_scaler_scales_the_backward_unscales_before_clipping_and_skips_overflow_steps(accelerator):
    model, batch = linear_and_batch()
    linear = model[0]
    expected = torch.autograd.grad((model(batch) ** 2).sum(), linear.weight)[0]  # the true gradient, fp32
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    compat.use_loss_scaler(accelerator, scaler)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    dtypes = []
    linear.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))

    accelerator.backward((model(batch) ** 2).sum())
    assert dtypes == [torch.float16], "the prepared forward no longer runs under fp16 autocast"
    assert torch.allclose(linear.weight.grad, 1024 * expected, rtol=1e-2), "backward() no longer scales the loss"
    accelerator.clip_grad_norm_(model.parameters(), max_norm=1e9)
    assert torch.allclose(linear.weight.grad, expected, rtol=1e-2), "clip_grad_norm_ no longer unscales first"
    optimizer.step()
    optimizer.zero_grad()

    weights = linear.weight.detach().clone()
    accelerator.backward(model(batch).sum() * float("inf"))
    accelerator.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    assert torch.equal(linear.weight, weights), "a step with inf gradients was applied"
    assert scaler.get_scale() == 512.0, "the scaler did not back off after the overflow"


def test_reset_accelerate_state_lets_the_next_accelerator_pick_another_precision():
    """benchmarks/gpu_check.py builds bf16 and fp16 Trainers in one process, one after the other."""
    Accelerator(cpu=True, mixed_precision="bf16")
    with pytest.raises(ValueError, match="already been initialized"):  # why the reset is needed at all
        Accelerator(cpu=True, mixed_precision="fp16")
    compat.reset_accelerate_state()
    assert Accelerator(cpu=True, mixed_precision="fp16").mixed_precision == "fp16"


@pytest.mark.parametrize("nonfinite, moves", [(True, False), (False, True)])
def test_skip_next_step_where_makes_fused_adamw_skip_on_the_device(nonfinite, moves):
    accelerator = Accelerator(cpu=True)
    model, batch = linear_and_batch()
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True))
    accelerator.backward(model(batch).sum())
    weight = model[0].weight
    before = weight.detach().clone()
    compat.skip_next_step_where(optimizer, torch.tensor(nonfinite))
    optimizer.step()
    assert (not torch.equal(weight, before)) == moves
    assert (optimizer.optimizer.state[weight]["exp_avg"].abs().sum().item() > 0) == moves, "moments updated"


@pytest.mark.parametrize("repo_type", ["model", "dataset"])
def test_hub_cache_folder_is_where_huggingface_hub_finds_the_repo(tmp_path, monkeypatch, repo_type):
    """huggingface_hub's own cache scanner reads a repo in the folder compat names for it (hub_names.in_hub_cache
    tells a Hub id from a local folder by it)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    folder = compat.hub_cache_folder("someone/tiny", repo_type)
    assert folder.parent == tmp_path
    commit = "a" * 40
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "snapshots" / commit / "config.json").write_text("{}")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    found = [(repo.repo_id, repo.repo_type) for repo in scan_cache_dir(tmp_path).repos]
    assert found == [("someone/tiny", repo_type)]


def test_dataset_over_table_copies_nothing():
    import numpy as np
    import pyarrow as pa

    tokens = np.arange(12, dtype=np.uint16)
    column = pa.Array.from_buffers(pa.uint16(), 12, [None, pa.py_buffer(tokens)])
    dataset = compat.dataset_over_table(pa.table({"x": column}), fingerprint_of=["sha", 4])
    served = dataset.data.column("x").chunk(0)
    assert served.buffers()[1].address == tokens.ctypes.data, "the dataset's column is the array itself"
    assert dataset["x"] == list(range(12))


def test_checkpoint_activations_checkpoints_every_block_with_the_installed_api_and_no_warning():
    """transformers 5.23 renamed gradient_checkpointing_enable (it warns from then on); compat uses the name
    the installed version has. The blocks' flag is transformers' own switch (GradientCheckpointingLayer)."""
    import warnings

    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=16, n_positions=8, vocab_size=20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.checkpoint_activations(model)
    assert [block.gradient_checkpointing for block in model.transformer.h] == [True, True, True]


def test_tensor_bytes_counts_each_new_storage_until_it_is_freed():
    """New tensors count from the op that makes them until they are freed, once per storage (views and
    in-place ops add nothing), backward ops included; tensors from before it started never count."""
    before = torch.ones(1000, requires_grad=True)  # 4000 bytes, not counted
    untouched = torch.zeros(500)
    with compat.TensorBytes() as counted:
        untouched.add_(1).view(5, 100)  # an in-place op and a view of a tensor from before: not counted
        assert counted.peak == 0
        first = before * 2  # +4000
        view = first.view(10, 100)
        view.add_(1)
        second = first * first  # +4000: 8000 (mul saves `first` for the backward: no copy)
        assert (counted.now, counted.peak) == (8000, 8000)
        del first, view
        assert counted.now == 8000  # `second`'s graph keeps `first` alive
        second.sum().backward()  # the sum (4 bytes), its gradient, `second`'s and `before`'s gradients...
        assert counted.peak > 8000
        del second
        assert counted.now == before.grad.nbytes  # ...of which only before.grad is left


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0))


def test_peft_wrapping_hides_peft_s_deprecation_warning_and_no_other():
    """peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps. When this
    fails because peft no longer warns, drop compat.peft_wrapping."""
    import warnings

    peft = pytest.importorskip("peft", reason="the lora extra is not installed: pip install -e '.[lora]'")
    from tinylm import lora
    from tinylm.config import LoraConfig

    config = lora.peft_config(LoraConfig(enabled=True, target_modules=["c_attn", "c_proj", "c_fc"]))
    with warnings.catch_warnings(record=True) as bare:
        warnings.simplefilter("always")
        peft.get_peft_model(tiny_gpt2(), config)
    assert [str(warning.message) for warning in bare if compat.PEFT_CHECKPOINTING_WARNING in str(warning.message)]
    with warnings.catch_warnings(record=True) as wrapped:
        warnings.simplefilter("always")
        with compat.peft_wrapping():
            peft.get_peft_model(tiny_gpt2(), config)
    assert not wrapped, [str(warning.message) for warning in wrapped]


def test_peft_base_weights_are_the_wrapped_models_own_under_its_names():
    """peft's names for a wrapped model's weights (`base_model.model.` + `base_layer.` in adapted layers), made
    back into the model's own: every weight of the GPT-2, the same tensors, and no adapter."""
    pytest.importorskip("peft", reason="the lora extra is not installed: pip install -e '.[lora]'")
    from tinylm import lora
    from tinylm.config import LoraConfig

    model = tiny_gpt2()
    expected = {name: weight.clone() for name, weight in model.state_dict().items()}
    wrapped = lora.adapt(model, LoraConfig(enabled=True, target_modules=["c_attn", "c_proj", "c_fc"]))
    base = compat.peft_base_weights(wrapped.state_dict())
    assert set(base) == set(expected)
    assert all(torch.equal(base[name], weight) for name, weight in expected.items())
