"""The learning-rate schedule as a run states it: one banner line, a warning for a run that stops
before its warmup ends, an error for settings that cannot make the documented schedule, and the
flags for the keys users change most. Expectations are computed by hand from docs/training.md's
formula (linear warmup to the peak, cosine to min_lr at lr_decay_iters)."""

from __future__ import annotations

import math

import pytest

from tinylm import paths, schedule
from tinylm.config import from_dict, load_config
from tinylm.errors import UserError
from tinylm.train import OVERRIDES, build_parser


def training(**keys):
    return from_dict({"training": keys}).training


def test_the_readme_run_stops_at_59_percent_of_the_peak():
    base = load_config(paths.CONFIG_EXAMPLE, {"training.max_iters": 1000}).training
    last = 1e-4 + 0.5 * (1 + math.cos(math.pi * (999 - 100) / (2000 - 100))) * (1e-3 - 1e-4)
    assert f"{last:.2e}" == "5.88e-04" and round(last / 1e-3, 2) == 0.59
    assert schedule.describe(base) == ("warmup to 1e-3 over 100 steps, cosine to min_lr 1e-4 at step 2000; this run "
                                       "stops at step 1000, its last step at lr 5.88e-4 (59% of the peak)")
    assert schedule.warning(base) is None


def test_no_warmup_and_a_run_past_the_decay():
    past = training(learning_rate=6e-4, min_lr=6e-5, warmup_iters=0, lr_decay_iters=10, max_iters=30)
    assert schedule.describe(past) == ("6e-4, cosine to min_lr 6e-5 at step 10; this run stops at step 30, "
                                       "its last step at lr 6e-5 (10% of the peak)")


@pytest.mark.parametrize("max_iters, warned", [(99, True), (100, True), (101, False)])
def test_a_run_that_stops_before_its_warmup_ends_is_warned(max_iters, warned):
    """With warmup_iters = 100, steps 0..99 warm up and step 100 is the first at the peak."""
    short = training(warmup_iters=100, lr_decay_iters=2000, max_iters=max_iters)
    if warned:
        assert schedule.warning(short) == (
            f"this run stops at step {max_iters}, before its warmup ends at step 100: the learning rate never "
            "reaches training.learning_rate; pass a larger --max-iters or a shorter --warmup-iters")
    else:
        assert schedule.warning(short) is None


def test_a_warmup_longer_than_the_decay_is_refused_naming_both_keys():
    assert training(warmup_iters=50, lr_decay_iters=50).warmup_iters == 50
    with pytest.raises(UserError) as refused:
        training(warmup_iters=100, lr_decay_iters=50)
    message = str(refused.value)
    assert message.startswith("config: training.warmup_iters (100) is longer than training.lr_decay_iters (50)")
    assert "--warmup-iters" in message and "--lr-decay-iters" in message and "\n" not in message


def test_the_schedule_flags_set_their_keys():
    args = build_parser().parse_args(["--warmup-iters", "5", "--lr-decay-iters", "50", "--min-lr", "1e-5"])
    overrides = {key: getattr(args, flag) for flag, key in OVERRIDES.items()}
    chosen = load_config(paths.CONFIG_EXAMPLE, overrides).training
    assert (chosen.warmup_iters, chosen.lr_decay_iters, chosen.min_lr) == (5, 50, 1e-5)
