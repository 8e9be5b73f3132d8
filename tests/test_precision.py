"""The GPU-only branches of the training loop, driven on CPU with the real torch components.

fp16: accelerate makes its GradScaler (and fp16 autocast) only on GPUs, so these tests hand the
Trainer a real `torch.amp.GradScaler("cpu")`; accelerate then runs its whole fp16 path
(autocast, scaled backward, unscale before clipping, scaler.step/update). Overflows are injected
as inf gradients from a hook on one weight, at chosen iterations of the real `fit()` loop.
bf16: accelerate autocasts to bf16 on CPU by itself once the Trainer is told to use it.
"""

from __future__ import annotations

import math

import pytest
import torch
import training_helpers

from tinylm.errors import UserError
from tinylm.hardware import Hardware
from tinylm.trainer import MAX_NONFINITE_STEPS, Trainer

INIT_SCALE = 2.0**10


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def make_trainer(prepared, tmp_path, precision: str, grad_scaler=None, **training) -> Trainer:
    return training_helpers.make_trainer(prepared, tmp_path, hardware=Hardware("cpu", precision),
                                         grad_scaler=grad_scaler, **training)


def cpu_scaler() -> torch.amp.GradScaler:
    # growth_interval far beyond the run: the scale only moves when an overflow backs it off.
    return torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=10_000)


def overflow_at(trainer: Trainer, iters: set[int]) -> None:
    """Make every gradient of one weight inf during the optimizer steps of `iters`."""
    weight = trainer.accelerator.unwrap_model(trainer.model).transformer.h[0].mlp.c_fc.weight
    weight.register_hook(lambda grad: torch.full_like(grad, math.inf) if trainer.state.iter in iters else grad)


def steps_taken(trainer: Trainer) -> int:
    """How many updates AdamW really applied (its step count, which a skipped step leaves alone)."""
    state = trainer.optimizer.state_dict()["state"]
    return int(next(iter(state.values()))["step"])


def logits_dtype(trainer: Trainer) -> list[torch.dtype]:
    """Record the dtype of the model's logits at every forward."""
    seen = []
    lm_head = trainer.accelerator.unwrap_model(trainer.model).lm_head
    lm_head.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    return seen


def test_fp16_overflow_steps_are_skipped_by_the_scaler_which_backs_off_and_training_goes_on(prepared, tmp_path):
    scaler = cpu_scaler()
    trainer = make_trainer(prepared, tmp_path, "fp16", scaler, max_iters=16)
    overflows = {3, 4, 5, 6, 9}
    overflow_at(trainer, overflows)
    dtypes = logits_dtype(trainer)

    summary = trainer.fit()

    assert summary["stop_reason"] == "max_iters" and summary["iters"] == 16
    assert scaler.get_scale() == INIT_SCALE / 2 ** len(overflows)  # halved once per overflow
    assert steps_taken(trainer) == 16 - len(overflows)
    assert torch.float16 in dtypes, "the forward did not run under fp16 autocast"
    records = trainer.state.records
    assert all(math.isfinite(r["val_loss"]) for r in records)
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.3, "training did not go on after the overflows"
    assert trainer.state.nonfinite_steps == 0


def test_fp16_skipped_steps_leave_the_weights_alone(prepared, tmp_path):
    trainer = make_trainer(prepared, tmp_path, "fp16", cpu_scaler())
    overflow_at(trainer, {1})
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.train_step(0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.state.iter = 1
    trainer.train_step(1)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    trainer.state.iter = 2
    trainer.train_step(2)
    assert not all(torch.equal(before[name], p) for name, p in model.named_parameters())


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_the_divergence_guard_counts_skipped_steps_with_and_without_a_scaler(prepared, tmp_path, precision):
    scaler = cpu_scaler() if precision == "fp16" else None
    trainer = make_trainer(prepared, tmp_path, precision, scaler, max_iters=40, eval_interval=100)
    overflow_at(trainer, set(range(2, 40)))
    with pytest.raises(UserError, match=r"training diverged: \d+ optimizer steps in a row had inf/nan gradients"):
        trainer.fit()
    assert steps_taken(trainer) == 2
    assert trainer.state.iter < 2 + MAX_NONFINITE_STEPS + trainer.config.training.log_interval


def test_fp32_nonfinite_steps_are_skipped_without_a_scaler(prepared, tmp_path):
    trainer = make_trainer(prepared, tmp_path, "fp32", max_iters=12)
    overflow_at(trainer, {2, 3, 7})
    summary = trainer.fit()
    assert summary["iters"] == 12 and trainer.accelerator.scaler is None
    assert steps_taken(trainer) == 12 - 3
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.state.records[-1]["val_loss"] < trainer.state.records[0]["val_loss"] - 0.3


def test_bf16_autocasts_on_cpu_and_scores_the_loss_in_fp32(prepared, tmp_path):
    trainer = make_trainer(prepared, tmp_path, "bf16", max_iters=12)
    assert trainer.accelerator.scaler is None  # bf16 needs no loss scaling
    dtypes = logits_dtype(trainer)
    summary = trainer.fit()
    assert summary["iters"] == 12 and set(dtypes) == {torch.bfloat16}  # training and evaluation forwards
    assert trainer.state.records[-1]["val_loss"] < trainer.state.records[0]["val_loss"] - 0.3
    assert trainer.train_step(12).dtype == torch.float32


def test_a_grad_scaler_needs_fp16(prepared, tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        make_trainer(prepared, tmp_path, "bf16", cpu_scaler())
