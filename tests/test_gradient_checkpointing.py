"""training.gradient_checkpointing: the same gradients for less kept activation memory, dropout
included, and a run that trains, saves and resumes as one without it.

Expectations come from the same model without checkpointing (plain transformers and torch), and
from what autograd itself keeps for the backward (torch.autograd.graph.saved_tensors_hooks).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from training_helpers import load_checkpoint, losses, write_config

from tinylm.compat import checkpoint_activations, reset_accelerate_state
from tinylm.config import ModelConfig, load_config
from tinylm.trainer import Trainer
from tinylm.model import build_model, gpt2_config, per_block_loss


def tiny_pair(dropout: float):
    """Two copies of one tiny GPT-2, the second with activation checkpointing."""
    torch.manual_seed(0)
    plain = build_model(gpt2_config(ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, dropout=dropout),
                                    vocab_size=50))
    checkpointed = copy.deepcopy(plain)
    checkpoint_activations(checkpointed)
    return plain.train(), checkpointed.train()


def step(model, blocks: torch.Tensor, seed: int) -> tuple[dict, int, torch.Tensor]:
    """One forward and backward from the RNG state `seed`: the gradients, the bytes autograd kept for the
    backward (outside the model's own weights), and the RNG state after the step."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = per_block_loss(model, blocks).mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}, sum(kept.values()), torch.get_rng_state()


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointed_gradients_equal_the_plain_ones_for_a_fraction_of_the_kept_activations(dropout):
    """With dropout, the recomputed forward must draw the masks the first forward drew (torch's
    checkpoint restores the RNG state it saved with the block's input), and the training RNG stream
    goes on as without checkpointing. Kills: the RNG state not preserved (other masks in the
    recompute: other gradients); checkpointing never turned on (as many bytes kept)."""
    plain, checkpointed = tiny_pair(dropout)
    blocks = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(1))
    expected, kept_plain, rng_plain = step(plain, blocks, seed=5)
    grads, kept, rng = step(checkpointed, blocks, seed=5)
    assert expected.keys() == grads.keys()
    for name in expected:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert torch.equal(rng, rng_plain)
    # 3 blocks keep only their inputs: 1 of the 16 (no dropout) or 21 (dropout) tensors of a block's width each.
    assert kept < kept_plain / 3, (kept, kept_plain)
    if dropout:  # the masks differ from step to step: the equality above is not the masks of a dropout-free model
        other, _, _ = step(plain, blocks, seed=6)
        assert not torch.allclose(other["transformer.h.0.mlp.c_fc.weight"], expected["transformer.h.0.mlp.c_fc.weight"])


def run_config(prepared, folder, **training):
    """TINY with dropout, 2 micro-batches a step, 8 steps (plus `training`), in folder/ckpt."""
    folder.mkdir(exist_ok=True)
    return load_config(write_config(folder / "run.toml", prepared, folder / "ckpt", model={"dropout": 0.1},
                                    training={"max_iters": 8, "eval_interval": 4, "grad_accum_steps": 2, **training}))


def fit(config, resume=None) -> None:
    Trainer(config, resume=resume).fit()
    reset_accelerate_state()


@pytest.mark.usefixtures("fresh_accelerate_state", "one_torch_thread")
def test_a_checkpointed_run_trains_like_a_plain_one_and_resumes_exactly(prepared, tmp_path):
    """Every evaluation's losses equal the plain run's to float tolerance; the checkpoint holds the same
    weights' names (nothing of checkpointing in them); and a checkpointed run stopped at iter 4 and
    resumed ends bit-identical to the one that was not stopped. Kills: the key read but never applied
    (the run keeps as much as a plain one: the bytes test above), the key not saved with the run."""
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    fit(run_config(prepared, plain))
    fit(run_config(prepared, checkpointed, gradient_checkpointing=True))
    pairs = list(zip(losses(checkpointed / "ckpt"), losses(plain / "ckpt"), strict=True))
    assert [a[0] for a, _ in pairs] == [0, 4, 8]
    for (_, train, val), (_, train_plain, val_plain) in pairs:
        assert (train, val) == (pytest.approx(train_plain, rel=1e-5), pytest.approx(val_plain, rel=1e-5))
    saved, saved_plain = (load_checkpoint(folder / "ckpt" / "ckpt_last.pt") for folder in (checkpointed, plain))
    assert saved["model"].keys() == saved_plain["model"].keys()
    assert saved["config"]["training"]["gradient_checkpointing"] is True

    stopped = tmp_path / "stopped"
    config = run_config(prepared, stopped, gradient_checkpointing=True)
    fit(dataclasses.replace(config, training=dataclasses.replace(config.training, max_iters=4)))
    fit(config, resume=stopped / "ckpt" / "ckpt_last.pt")
    assert losses(stopped / "ckpt") == losses(checkpointed / "ckpt")
    resumed, straight = (load_checkpoint(folder / "ckpt" / "ckpt_last.pt")["model"]
                         for folder in (stopped, checkpointed))
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
