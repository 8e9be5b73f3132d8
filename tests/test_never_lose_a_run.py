"""Ordinary moves that used to lose work, and errors that used to mislead.

Every test here failed on the code before the fix: resuming took the config file's out_dir and
max_iters instead of the run's; a fresh run replaced a trained model without a word; an
unwritable out_dir failed only at the first save; bad seeds and files ended in tracebacks or in
advice about the wrong problem.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from training_helpers import (
    ONE_THREAD, REPO, assert_clean_error, cli_here, load_checkpoint, read_log, start_slow, train_here, write_config,
)

from tinylm import generate, plot
from tinylm import train as train_command
from tinylm.config import MAX_SEED

# Runs that are not about their process train in this one; the run stopped with Ctrl-C is a process of its own.
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def train_without_config(*flags: str, capsys) -> subprocess.CompletedProcess:
    """`tinylm train FLAGS` run from the repo, where configs/base.toml is the default config."""
    return cli_here(train_command.main, flags, capsys, check=True, cwd=REPO)


def files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def test_resume_continues_the_run_saved_in_the_checkpoint_not_the_config_files(prepared, tmp_path, capsys):
    # The config file says one out_dir and max_iters; the run was started with others on the command line.
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "config_out", training={"max_iters": 40})
    run_dir = tmp_path / "runs" / "a"
    train_here(config, "--out-dir", run_dir, "--max-iters", "4", capsys=capsys)

    result = train_without_config("--resume", str(run_dir / "ckpt_last.pt"), "--max-iters", "8", capsys=capsys)

    assert "with changes: training.max_iters 4 -> 8" in result.stdout
    assert [r["iter"] for r in read_log(run_dir)["records"]] == [0, 4, 8]
    assert load_checkpoint(run_dir / "ckpt_last.pt")["iter"] == 8
    assert not (tmp_path / "config_out").exists() and not (REPO / "checkpoints" / "ckpt_last.pt").exists()


def test_the_command_printed_after_ctrl_c_resumes_the_same_run(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "config_out",
                          training={"max_iters": 200, "eval_interval": 4})
    run_dir = tmp_path / "run"
    process = start_slow(config, 0.1, 0, "--out-dir", str(run_dir), "--max-iters", "16", env=ONE_THREAD)
    while not (run_dir / "train_log.json").exists():
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    printed = stdout.split("Resume with: ")[1].splitlines()[0]
    assert printed == f"tinylm train --resume {run_dir / 'ckpt_last.pt'}"

    cli_here(train_command.main, printed.split()[2:], capsys, check=True)  # what `tinylm train` gets

    summary = read_log(run_dir)["summary"]
    assert summary["iters"] == 16 and summary["stop_reason"] == "max_iters"
    assert not (tmp_path / "config_out").exists()


def test_a_new_run_refuses_an_out_dir_that_holds_a_run_unless_told_to_overwrite(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={"max_iters": 4})
    train_here(config, capsys=capsys)
    before = files(tmp_path / "ckpt")

    result = train_here(config, capsys=capsys, check=False)

    assert_clean_error(result, "already holds a training run", "--resume", "--overwrite", str(tmp_path / "ckpt"))
    assert files(tmp_path / "ckpt") == before
    assert "eval iter" not in result.stdout
    train_here(config, "--overwrite", "--seed", "3", capsys=capsys)
    assert files(tmp_path / "ckpt")["ckpt_best.pt"] != before["ckpt_best.pt"]


def test_resume_into_an_unwritable_out_dir_fails_before_the_first_step(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={"max_iters": 4})
    train_here(config, capsys=capsys)
    result = train_here(config, "--resume", tmp_path / "ckpt" / "ckpt_last.pt", "--max-iters", "8",
                        "--out-dir", "/sys/kernel", capsys=capsys, check=False)
    assert_clean_error(result, "cannot write to training.out_dir /sys/kernel")
    assert "eval iter" not in result.stdout and "resumed from" not in result.stdout


@pytest.mark.parametrize("max_iters", ["4", "2"])
def test_resume_with_nothing_left_to_train_says_so(prepared, tmp_path, capsys, max_iters):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={"max_iters": 4})
    train_here(config, capsys=capsys)
    result = train_here(config, "--resume", "--max-iters", max_iters, capsys=capsys, check=False)
    assert_clean_error(result, "nothing to train", "iter 4", "--max-iters")


def test_an_out_dir_that_is_a_file_is_named_as_such(prepared, tmp_path, capsys):
    (tmp_path / "ckpt").write_text("not a folder")
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt")
    assert_clean_error(train_here(config, capsys=capsys, check=False), "is a file, not a folder", "--out-dir")


def test_a_finished_run_says_where_its_checkpoints_are_and_how_to_sample(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={"max_iters": 4})
    result = train_here(config, capsys=capsys)
    assert f"are in {tmp_path / 'ckpt'}" in result.stdout
    assert f"tinylm generate --checkpoint {tmp_path / 'ckpt' / 'ckpt_best.pt'}" in result.stdout


def test_seeds_beyond_what_numpy_takes_are_config_errors(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt")
    assert_clean_error(train_here(config, "--seed", MAX_SEED + 1, capsys=capsys, check=False), "training.seed",
                       str(MAX_SEED))
    result = cli_here(generate.main, ["--seed", 2**64, "--checkpoint", "x.pt"], capsys)
    assert_clean_error(result, "--seed")


def test_not_a_checkpoint_is_not_called_dangerous(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={"max_iters": 4})
    train_here(config, capsys=capsys)
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    for path in (noise, tmp_path / "ckpt" / "train_log.json"):
        result = train_here(config, "--resume", str(path), capsys=capsys, check=False)
        assert_clean_error(result, str(path), "is not a checkpoint", "--resume")
        assert "could run code" not in result.stderr
    truncated = tmp_path / "truncated.pt"
    whole = (tmp_path / "ckpt" / "ckpt_last.pt").read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    assert_clean_error(train_here(config, "--resume", str(truncated), capsys=capsys, check=False),
                       "truncated or damaged")
    missing = train_here(config, "--resume", str(tmp_path / "nope.pt"), capsys=capsys, check=False)
    assert_clean_error(missing, "does not exist", "--resume")
    assert "--checkpoint" not in missing.stderr


def test_plot_of_a_log_without_val_loss_is_one_line(tmp_path, capsys):
    log = tmp_path / "train_log.json"
    log.write_text(json.dumps({"records": [{"iter": 0, "train_loss": 4.0}]}))
    result = cli_here(plot.main, [log], capsys)
    assert_clean_error(result, str(log), "val_loss")
