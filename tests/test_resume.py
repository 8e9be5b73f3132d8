"""Exact resume after a real SIGKILL or Ctrl-C, crash-safe checkpoint writes, refusing unsafe input."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from training_helpers import (
    ONE_THREAD, assert_clean_error, load_checkpoint, losses, make_corpus, prepare_here, read_log, start_slow,
    train_here, write_config,
)

from tinylm import checkpoint
from tinylm.errors import UserError

# Dropout on, so resuming must restore the random state too, not just the weights.
RUN = {"model": {"dropout": 0.1}, "training": {"max_iters": 16, "eval_interval": 4}}

# The runs that are interrupted are processes of their own (SIGKILL, SIGINT); the rest, and every resume,
# train in this one. All on one thread (ONE_THREAD), so the pieces add up to the uninterrupted run bit for bit.
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory, one_torch_thread_per_module):
    """The uninterrupted run every interrupted one must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    train_here(write_config(root / "run.toml", prepared, root / "ckpt", **RUN))
    return root / "ckpt"


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the training subprocess"
        time.sleep(0.05)


def logged_iters(out_dir: Path) -> list[int]:
    try:
        return [record["iter"] for record in read_log(out_dir)["records"]]
    except (FileNotFoundError, ValueError):
        return []


def logged_steps(out_dir: Path) -> list[dict]:
    """metrics.jsonl's lines without their wall-clock columns."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "tokens_per_s")} for line in lines]


def assert_same_run(out_dir: Path, reference: Path) -> None:
    assert losses(out_dir) == losses(reference)  # bit-identical floats
    assert logged_steps(out_dir) == logged_steps(reference)
    weights, expected = (load_checkpoint(d / "ckpt_last.pt")["model"] for d in (out_dir, reference))
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(prepared, straight, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", **RUN)
    process = start_slow(config, 0.1, env=ONE_THREAD)
    wait_for(lambda: any(i >= 8 for i in logged_iters(tmp_path / "ckpt")))
    process.kill()  # SIGKILL: no handler runs, whatever was being written stays as it was
    process.wait()
    killed_at = load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["iter"]
    assert 8 <= killed_at < 16
    # What a run killed after logging past its last checkpoint leaves: a whole line, then one cut short.
    with (tmp_path / "ckpt" / "metrics.jsonl").open("a") as metrics:
        metrics.write(json.dumps({"iter": killed_at + 4, "train_loss": 9.0, "lr": 0.0, "grad_norm": 1.0,
                                  "tokens_seen": 0, "tokens_per_s": 1.0, "elapsed_s": 1.0}) + '\n{"iter": ')
    result = train_here(config, "--resume", capsys=capsys)
    assert f"resumed from iter {killed_at}" in result.stdout
    assert_same_run(tmp_path / "ckpt", straight)


def test_ctrl_c_saves_then_resume_reproduces_the_run(prepared, straight, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", **RUN)
    process = start_slow(config, 0.1, env=ONE_THREAD)
    wait_for(lambda: 4 in logged_iters(tmp_path / "ckpt"))
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stdout + stderr
    assert "Resume with: tinylm train" in stdout
    stopped_at = load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["iter"]
    assert 4 < stopped_at < 16
    assert read_log(tmp_path / "ckpt")["summary"]["stop_reason"] == "interrupted"
    train_here(config, "--resume", tmp_path / "ckpt" / "ckpt_last.pt", capsys=capsys)
    assert_same_run(tmp_path / "ckpt", straight)


# Each evaluation writes ckpt_last.pt, ckpt_best.pt (it improves here), then train_log.json:
# writes 1-3 belong to iter 0, 4-6 to iter 4.
@pytest.mark.parametrize(("write", "last_at", "best_at"), [(4, 0, 0), (5, 4, 0), (6, 4, 4)],
                         ids=["ckpt_last", "ckpt_best", "train_log"])
def test_sigkill_while_writing_leaves_every_file_whole(prepared, tmp_path, capsys, write, last_at, best_at):
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, **RUN)
    process = start_slow(config, 0.0, write, env=ONE_THREAD)
    wait_for(lambda: any(p.name.endswith(".half-written") for p in out_dir.iterdir()) if out_dir.exists() else False)
    process.kill()
    process.wait()
    assert checkpoint.load(out_dir / "ckpt_last.pt")["iter"] == last_at
    assert checkpoint.load(out_dir / "ckpt_best.pt")["iter"] == best_at
    assert logged_iters(out_dir) == [0]  # whole, and the write that was cut left the old one
    train_here(config, "--resume", capsys=capsys)
    assert logged_iters(out_dir) == [0, 4, 8, 12, 16]


def test_resume_refuses_another_model_shape(prepared, straight, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", model={"n_embd": 64})
    result = train_here(config, "--resume", straight / "ckpt_last.pt", capsys=capsys, check=False)
    assert_clean_error(result, "cannot resume", "n_embd 32 -> 64")


def test_resume_refuses_another_tokenizer(straight, tmp_path, capsys):
    other = tmp_path / "other"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(tmp_path / "base.txt").read_text().upper())
    prepare_here(corpus, other, capsys=capsys)
    config = write_config(tmp_path / "run.toml", other, tmp_path / "ckpt", **RUN)
    assert_clean_error(train_here(config, "--resume", straight / "ckpt_last.pt", capsys=capsys, check=False),
                       "cannot resume")


def test_resume_from_a_missing_checkpoint(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt")
    assert_clean_error(train_here(config, "--resume", capsys=capsys, check=False), "ckpt_last.pt", "does not exist")


class RunsCode:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused(prepared, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "model": RunsCode(marker)}, evil)
    with pytest.raises(UserError, match="could run code"):
        checkpoint.load(evil)
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt")
    assert_clean_error(train_here(config, "--resume", evil, capsys=capsys, check=False), str(evil), "could run code")
    # With torch's default turned off, only tinylm's own weights_only=True stands between the file and a shell.
    # (torch.load reads this variable at each call, so setting it here reaches the run.)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert_clean_error(train_here(config, "--resume", evil, capsys=capsys, check=False), "could run code")
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", None])
def test_broken_checkpoints_get_one_clear_line(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content is None:
        torch.save({"just": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as error:
        checkpoint.load(path)
    assert str(path) in str(error.value)


def test_truncated_checkpoint(straight, tmp_path):
    path = tmp_path / "truncated.pt"
    whole = (straight / "ckpt_last.pt").read_bytes()
    path.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(UserError, match="cannot load checkpoint"):
        checkpoint.load(path)
