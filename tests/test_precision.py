"""The GPU-only branches of the training loop, driven on CPU with the real torch components.

fp16: accelerate makes its GradScaler (and fp16 autocast) only on GPUs, so these tests train with a
Trainer that gives accelerate a real `torch.amp.GradScaler("cpu")` (training_helpers.cpu_trainer);
accelerate then runs its whole fp16 path
(autocast, scaled backward, unscale before clipping, scaler.step/update). Overflows are injected
as inf gradients from a hook on one weight, at chosen iterations of the real `fit()` loop.
bf16: accelerate autocasts to bf16 on CPU by itself once the Trainer is told to use it.
"""

from __future__ import annotations

import math

import pytest
import torch
import training_helpers
from training_helpers import cpu_trainer

from tinylm.compat import reset_accelerate_state
from tinylm.config import load_config
from tinylm.errors import UserError
from tinylm.metrics_log import read_lines
from tinylm.paths import METRICS_NAME
from tinylm.trainer import Trainer

INIT_SCALE = 2.0**10


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def make_trainer(prepared, tmp_path, precision: str, grad_scaler=None, **training) -> Trainer:
    return training_helpers.make_trainer(prepared, tmp_path, trainer_class=cpu_trainer(precision, grad_scaler),
                                         **training)


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


def divergence_by_hand(first_skipped: int, log_interval: int, limit: int = 10) -> tuple[int, int]:
    """docs/training.md: ten skipped steps in a row stop the run, checked every log_interval steps.
    With every step from `first_skipped` on skipped: (steps in a row, iter) at the check that stops it."""
    check = log_interval
    while check - first_skipped < limit:
        check += log_interval
    return check - first_skipped, check


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("first_skipped", [0, 2, 3])
def test_the_divergence_guard_counts_skipped_steps_with_and_without_a_scaler(prepared, tmp_path, precision,
                                                                            first_skipped):
    """Every step from `first_skipped` on has inf gradients: the run stops at the first check (every
    log_interval = 4 steps) that sees ten or more in a row, and says how many and by which iter.

    Kills (step_stats): MAX_NONFINITE_STEPS 10 -> 9 / 11; the skipped-run count starting at 1, or
    counting 2 per step.
    """
    scaler = cpu_scaler() if precision == "fp16" else None
    trainer = make_trainer(prepared, tmp_path, precision, scaler, max_iters=40, eval_interval=100)
    overflow_at(trainer, set(range(first_skipped, 40)))
    in_a_row, at_iter = divergence_by_hand(first_skipped, trainer.config.training.log_interval)
    with pytest.raises(UserError, match=rf"training diverged: {in_a_row} optimizer steps in a row had inf/nan "
                                        rf"gradients \(by iter {at_iter}\)"):
        trainer.fit()
    assert steps_taken(trainer) == first_skipped


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


def test_the_logged_grad_norm_is_the_mean_pre_clip_norm_of_the_applied_steps(prepared, tmp_path):
    """The grad_norm logged every log_interval (to the tracker and metrics.jsonl) is the mean of the pre-clip gradient
    norms (as accelerate's clip_grad_norm_ returns them) of the steps applied since the last report:
    a skipped (non-finite) step counts neither in the sum nor in the number of steps, and a report
    with no applied step says nan.

    Kills (trainer): a skipped step's norm counted as 1.0 / -1.0 instead of left out; the skipped
    steps counted instead of the applied ones; the sum multiplied by the count.
    """
    trainer = make_trainer(prepared, tmp_path, "fp32", max_iters=12, log_interval=4, eval_interval=100)
    overflow_at(trainer, {1, 2, 3, 8, 9, 10, 11})
    norms = []
    clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = lambda *args, **kwargs: norms.append(clip(*args, **kwargs)) or norms[-1]
    trainer.fit()

    grad_norms = {line["iter"]: line["grad_norm"] for line in read_lines(trainer.out_dir / METRICS_NAME)
                  if "grad_norm" in line}
    assert sorted(grad_norms) == [4, 8, 12] and len(norms) == 12
    applied = [float(norms[step]) for step in (0, 4, 5, 6, 7)]
    assert all(math.isfinite(norm) and norm > 0 for norm in applied)
    assert not any(math.isfinite(norms[step]) for step in (1, 2, 3, 8, 9, 10, 11))
    assert grad_norms[4] == pytest.approx(applied[0], rel=1e-6)  # step 0 alone: 1, 2 and 3 were skipped
    assert grad_norms[8] == pytest.approx(sum(applied[1:]) / 4, rel=1e-6)  # steps 4-7, all applied
    assert math.isnan(grad_norms[12])  # steps 8-11 all skipped


def test_an_fp16_resume_continues_with_the_loss_scale_it_had(prepared, tmp_path):
    """The loss scale an fp16 run backed off to (halved once per overflow) is in its checkpoint, and a
    resumed run starts from it, not from a fresh scaler's initial scale.

    Kills (checkpoint): the scaler state not restored (`scaler is not None` -> `is None` in restore_training); a
    scaler state restored into no scaler (`and` -> `or`) when an fp16 run is resumed in fp32.
    """
    trainer = make_trainer(prepared, tmp_path, "fp16", cpu_scaler(), max_iters=4, eval_interval=100)
    overflow_at(trainer, {1, 2})
    trainer.fit()
    assert trainer.accelerator.scaler.get_scale() == INIT_SCALE / 4
    reset_accelerate_state()  # the resumed run builds its own Accelerator

    config = load_config(tmp_path / "run.toml", {"training.max_iters": 6})
    resumed = cpu_trainer("fp16", cpu_scaler())(config, resume=tmp_path / "ckpt" / "ckpt_last.pt")
    assert resumed.accelerator.scaler.get_scale() == INIT_SCALE / 4
    resumed.close()
    reset_accelerate_state()
    # Resumed in fp32 instead: no scaler, and the saved scale is simply not used.
    in_fp32 = cpu_trainer("fp32")(config, resume=tmp_path / "ckpt" / "ckpt_last.pt")
    in_fp32.close()
    assert in_fp32.accelerator.scaler is None
