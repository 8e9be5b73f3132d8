"""training.tracker: every tracker accelerate ships is accepted, a missing package stops the run
before any work, and a real TensorBoard run logs the documented metrics at the documented steps."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from training_helpers import (
    assert_clean_error,
    make_trainer,
    read_log,
    train,
    write_config,
)

from tinylm import data
from tinylm.config import TRACKERS, apply_overrides, load_config
from tinylm.errors import UserError
from tinylm.metrics_log import EVAL_COLUMNS, STEP_COLUMNS
from tinylm.model import per_block_loss
from tinylm.schedule import lr_at
from tinylm.tracking import INSTALL

TRAIN_METRICS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"}
EVAL_METRICS = {"train/eval_loss", "train/eval_ppl", "val/loss", "val/ppl"}


def test_every_accelerate_tracker_is_a_valid_choice():
    from accelerate.utils import LoggerType

    shipped = {str(kind) for kind in LoggerType} - {"all"}
    assert set(TRACKERS) == shipped | {"none"} and set(INSTALL) == shipped
    for tracker in TRACKERS:
        assert apply_overrides(load_config(None), {"training.tracker": tracker}).training.tracker == tracker
    with pytest.raises(UserError, match='training.tracker must be one of "none", "tensorboard", "wandb"'):
        apply_overrides(load_config(None), {"training.tracker": "weights_and_biases"})


def test_a_missing_tracker_package_is_an_error_before_any_work(prepared, tmp_path):
    from accelerate.utils import is_wandb_available

    if is_wandb_available():
        pytest.skip("wandb is installed here: the test needs a tracker whose package is missing")
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={"tracker": "wandb"})
    result = train(config, check=False)
    assert_clean_error(result, 'training.tracker = "wandb"', "pip install wandb")
    assert "iter" not in result.stdout and not out_dir.exists(), "it must stop before training or writing"


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard holds in `log_dir`: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def step0_loss_and_grad_norm(trainer) -> tuple[float, float]:
    """By hand, on a copy of the untrained model: step 0's loss and pre-clip gradient norm."""
    model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
    training = trainer.config.training
    blocks = data.train_batch(trainer.train_tokens, block_size=trainer.config.model.block_size,
                              batch_size=training.batch_size, seed=training.seed, step=0, slot=0)
    loss = per_block_loss(model, blocks).mean()
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return loss.item(), norm.item()


def test_tensorboard_logs_train_metrics_every_log_interval_and_eval_metrics(
        prepared, tmp_path, fresh_accelerate_state, capsys):
    pytest.importorskip("tensorboard", reason="pip install -e '.[tracking]'")
    # Two runs of the same seed: every step reported (log_interval 1), and every 3 steps. grad_clip
    # 0.1 sits below the gradient norms, so a clipped norm logged in place of the pre-clip one shows.
    keys = {"tracker": "tensorboard", "max_iters": 7, "cpu_matmul": "blas", "grad_clip": 0.1}
    runs = {}
    for log_interval in (1, 3):
        (tmp_path / str(log_interval)).mkdir()
        trainer = make_trainer(prepared, tmp_path / str(log_interval), log_interval=log_interval, **keys)
        if log_interval == 1:
            step0 = step0_loss_and_grad_norm(trainer)
        capsys.readouterr()
        trainer.fit()
        # The run finishes its tracker: tensorboard's writer is closed (wandb would mark its run finished).
        assert trainer.accelerator.get_tracker("tensorboard").writer.all_writers is None
        runs[log_interval] = scalars(tmp_path / str(log_interval) / "ckpt" / "tinylm")
    every, logged = runs[1], runs[3]
    printed = capsys.readouterr().out

    assert set(logged) == TRAIN_METRICS | EVAL_METRICS
    for name in TRAIN_METRICS:  # every log_interval steps, and at the last
        assert [step for step, _ in logged[name]] == [3, 6, 7], name
    for name in EVAL_METRICS:  # at iteration 0, every eval_interval (4) steps, and at the last
        assert [step for step, _ in logged[name]] == [0, 4, 7], name

    # Step 1's numbers are step 0's loss and pre-clip gradient norm, worked out by hand.
    assert every["train/loss"][0] == (1, pytest.approx(step0[0], rel=1e-5))
    assert every["train/grad_norm"][0] == (1, pytest.approx(step0[1], rel=1e-5))
    assert step0[1] > keys["grad_clip"]
    # A report is the mean over the steps since the previous one.
    for name in ("train/loss", "train/grad_norm"):
        per_step = dict(every[name])
        windows = [(1, 2, 3), (4, 5, 6), (7,)]
        means = [sum(per_step[step] for step in window) / len(window) for window in windows]
        assert [value for _, value in logged[name]] == pytest.approx(means, rel=1e-5), name
    # The loss printed every log_interval is the one logged.
    printed_losses = [float(loss) for loss in re.findall(r"^iter \d+/7 \| loss ([\d.]+)", printed, re.MULTILINE)]
    assert printed_losses == pytest.approx([value for _, value in logged["train/loss"]], abs=1e-4)

    # metrics.jsonl holds the same numbers at the same steps, whatever the tracker, and pandas reads it.
    import pandas

    table = pandas.read_json(tmp_path / "3" / "ckpt" / "metrics.jsonl", lines=True)
    assert set(table.columns) == set(STEP_COLUMNS) | set(EVAL_COLUMNS)
    assert list(table["iter"]) == [0, 3, 4, 6, 7, 7]  # in the order they happen: an evaluation follows its step
    rows = table[table["train_loss"].notna()]
    assert list(rows["iter"]) == [3, 6, 7]
    for column, name in (("train_loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        assert list(rows[column]) == pytest.approx([value for _, value in logged[name]], rel=1e-6), column
    assert list(rows["tokens_seen"]) == [step * trainer.tokens_per_step for step in (3, 6, 7)]
    evaluations = table[table["val_loss"].notna()]
    assert list(evaluations["iter"]) == [0, 4, 7]
    for column, name in (("val_loss", "val/loss"), ("eval_train_loss", "train/eval_loss")):
        assert list(evaluations[column]) == pytest.approx([value for _, value in logged[name]], rel=1e-6), column

    training = load_config(tmp_path / "3" / "run.toml").training
    assert [value for _, value in logged["train/lr"]] == pytest.approx(
        [lr_at(step, training) for step, _ in logged["train/lr"]], rel=1e-6)
    assert all(value > 0 for _, value in logged["train/tokens_per_s"])

    records = read_log(tmp_path / "3" / "ckpt")["records"]
    for split, prefix in (("train", "train/eval_"), ("val", "val/")):
        assert [value for _, value in logged[f"{prefix}loss"]] == pytest.approx(
            [record[f"{split}_loss"] for record in records], rel=1e-6)
        assert [value for _, value in logged[f"{prefix}ppl"]] == pytest.approx(
            [math.exp(value) for _, value in logged[f"{prefix}loss"]], rel=1e-5)
    assert logged["val/loss"][-1][1] < logged["val/loss"][0][1], "the model did not learn"


def test_overwrite_clears_the_old_runs_tensorboard_logs_and_keeps_the_new_ones(prepared, tmp_path,
                                                                                fresh_accelerate_state):
    """--overwrite removes the replaced run's logs before the new run's tracker opens its own files."""
    pytest.importorskip("tensorboard", reason="pip install -e '.[tracking]'")
    from tinylm.trainer import Trainer

    keys = {"tracker": "tensorboard", "cpu_matmul": "blas", "log_interval": 1}
    make_trainer(prepared, tmp_path, max_iters=3, **keys).fit()
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={"max_iters": 5, **keys})
    Trainer(load_config(config), overwrite=True).fit()
    logged = scalars(tmp_path / "ckpt" / "tinylm")
    assert [step for step, _ in logged["train/loss"]] == [1, 2, 3, 4, 5]
    assert [step for step, _ in logged["val/loss"]] == [0, 4, 5]
