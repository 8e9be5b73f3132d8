"""Real training runs on tiny data: files, best checkpoint, early stopping, gradient accumulation,
precision fallback, the page's errors. They train in this process (`train_here`); `accelerate launch`,
the console command and the push (the Hub's address, read at import) run as processes of their own."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from training_helpers import (
    REPO, TRAIN_SCRIPT, assert_clean_error, load_checkpoint, losses, read_log, run, train, train_here, write_config,
)

from tinylm import checkpoint, data
from tinylm.model import per_block_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def baseline(prepared, tmp_path_factory, one_torch_thread_per_module):
    """One ordinary 12-iteration run, shared by the tests that only read its outputs."""
    root = tmp_path_factory.mktemp("baseline")
    config = write_config(root / "run.toml", prepared, root / "ckpt")
    result = train_here(config)
    return root / "ckpt", result


def test_run_writes_the_documented_files(baseline):
    out_dir, result = baseline
    assert {p.name for p in out_dir.iterdir()} >= {"ckpt_last.pt", "ckpt_best.pt", "train_log.json"}
    log = read_log(out_dir)
    assert [r["iter"] for r in log["records"]] == [0, 4, 8, 12]
    for record in log["records"]:
        assert set(record) >= {"iter", "train_loss", "val_loss", "lr", "tokens_seen", "elapsed_s", "tokens_per_s"}
        assert record["val_ppl"] == pytest.approx(math.exp(record["val_loss"]))
    assert log["records"][-1]["tokens_seen"] == 12 * 4 * 16
    assert log["records"][-1]["val_loss"] < log["records"][0]["val_loss"] - 0.3, "the model did not learn"
    assert log["config"]["training"]["max_iters"] == 12
    assert log["summary"]["stop_reason"] == "max_iters" and log["summary"]["iters"] == 12
    assert "effective_batch_size = batch_size * grad_accum_steps = 4 * 1 = 4" in result.stdout
    assert "parameters" in result.stdout and "precision: fp32" in result.stdout


def test_logged_learning_rate_follows_the_documented_schedule(baseline):
    """Linear warmup over warmup_iters, cosine decay to min_lr at lr_decay_iters (nanoGPT's get_lr)."""
    out_dir, _ = baseline
    lr, min_lr, warmup, decay = 1e-2, 1e-3, 2, 12  # TINY's training section

    def documented(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / (warmup + 1)
        if step >= decay:
            return min_lr
        return min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup))) * (lr - min_lr)

    records = read_log(out_dir)["records"]
    assert [r["lr"] for r in records] == pytest.approx([documented(r["iter"]) for r in records], rel=1e-9)


def test_checkpoint_loads_safely_and_reproduces_logged_val_loss(baseline, prepared):
    out_dir, _ = baseline
    payload = load_checkpoint(out_dir / "ckpt_last.pt")  # weights_only=True
    assert payload["iter"] == 12 and payload["tokenizer"]["kind"] == "char"
    model = checkpoint.model_from(checkpoint.load(out_dir / "ckpt_last.pt"))
    val = data.resolve(str(prepared), "bin", "char").split("val")
    blocks = data.eval_dataset(val, block_size=16, num_blocks=2 * 4)
    with torch.no_grad():
        loss = torch.cat([per_block_loss(model, blocks[i : i + 4]["input_ids"]) for i in (0, 4)]).mean().item()
    assert loss == pytest.approx(read_log(out_dir)["records"][-1]["val_loss"], abs=1e-5)


def test_save_best_respects_min_delta(prepared, tmp_path, capsys):
    # No later evaluation can improve on iteration 0 by 100 nats, so the best stays at 0.
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt",
                          training={"early_stopping_min_delta": 100.0})
    train_here(config, capsys=capsys)
    assert load_checkpoint(tmp_path / "ckpt" / "ckpt_best.pt")["iter"] == 0
    assert load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["iter"] == 12


def best_iter_by_the_documented_rule(records: list[tuple], min_delta: float) -> int:
    """docs/training.md: an improvement is val_loss < best and best - val_loss >= min_delta."""
    best, best_iter = math.inf, None
    for step, _, val_loss in records:
        if val_loss < best and best - val_loss >= min_delta:
            best, best_iter = val_loss, step
    return best_iter


def test_save_best_with_a_min_delta_between_the_improvements(prepared, tmp_path, capsys):
    # Same seed, same losses whatever min_delta is: learn them, then pick a min_delta that some
    # improvements clear and some don't, so a wrong comparison picks another checkpoint.
    plain = write_config(tmp_path / "plain.toml", prepared, tmp_path / "plain", training={"max_iters": 24})
    train_here(plain, capsys=capsys)
    records = losses(tmp_path / "plain")
    candidates = sorted({abs(a[2] - b[2]) for a in records for b in records if a != b})
    midpoints = [(low + high) / 2 for low, high in zip(candidates, candidates[1:])]
    min_delta = next(d for d in midpoints if best_iter_by_the_documented_rule(records, d) not in (0, 24))
    expected = best_iter_by_the_documented_rule(records, min_delta)
    assert expected != best_iter_by_the_documented_rule(records, 0.0)

    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt",
                          training={"max_iters": 24, "early_stopping_min_delta": min_delta})
    train_here(config, capsys=capsys)
    assert losses(tmp_path / "ckpt") == records
    assert load_checkpoint(tmp_path / "ckpt" / "ckpt_best.pt")["iter"] == expected


def test_early_stopping_stops_at_the_right_evaluation(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={
        "early_stopping": True, "early_stopping_patience": 2, "early_stopping_min_delta": 100.0, "max_iters": 40})
    result = train_here(config, capsys=capsys)
    summary = read_log(tmp_path / "ckpt")["summary"]
    # evaluations at 0 (best), 4 (1 without improvement), 8 (2: patience reached)
    assert summary["stop_reason"] == "early_stopping" and summary["iters"] == 8
    assert "early stopping at iter 8" in result.stdout


def test_grad_accumulation_matches_a_big_batch(prepared, tmp_path, capsys):
    """4 micro-batches of 2 see the same blocks as 1 batch of 8, so the losses agree closely."""
    runs = {}
    # eval_iters * batch_size = 8 evaluation blocks in both runs
    for name, batch, accum, eval_iters in (("big", 8, 1, 1), ("accum", 2, 4, 4)):
        config = write_config(tmp_path / f"{name}.toml", prepared, tmp_path / name,
                              training={"batch_size": batch, "grad_accum_steps": accum, "eval_iters": eval_iters})
        train_here(config, "--max-iters", "8", "--eval-interval", "4", capsys=capsys)
        runs[name] = losses(tmp_path / name)
    assert [r[0] for r in runs["big"]] == [r[0] for r in runs["accum"]] == [0, 4, 8]
    for big, accum in zip(runs["big"], runs["accum"]):
        assert accum[2] == pytest.approx(big[2], abs=2e-4)


def test_fp16_on_cpu_falls_back_with_one_warning(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt")
    result = train_here(config, "--precision", "fp16", "--max-iters", "2", capsys=capsys)
    assert result.stdout.count('warning: precision "fp16" needs a CUDA GPU') == 1
    assert "precision: fp32" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_cuda_requested_without_cuda_warns_and_uses_cpu(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt")
    result = train_here(config, "--device", "cuda", "--max-iters", "2", capsys=capsys)
    assert "warning: CUDA not detected" in result.stdout
    assert "docs/troubleshooting.md#cuda-not-detected" in result.stdout
    assert "device: cpu" in result.stdout


def test_config_that_is_not_toml(tmp_path, capsys):
    config = tmp_path / "broken.toml"
    config.write_text("[training]\nbatch_size = = 3\n")
    assert_clean_error(train_here(config, capsys=capsys, check=False), "broken.toml", "is not valid TOML")


def test_unknown_key_in_config_suggests_the_right_one(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={"eval_intervall": 5})
    assert_clean_error(train_here(config, capsys=capsys, check=False), "unknown key training.eval_intervall",
                       "'eval_interval'")


def test_unwritable_checkpoint_dir(prepared, tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("keep me")
    config = write_config(tmp_path / "run.toml", prepared, blocker, training={"max_iters": 2})
    assert_clean_error(train_here(config, capsys=capsys, check=False), str(blocker))
    assert blocker.read_text() == "keep me"


def test_accelerate_launch_and_console_command(prepared, tmp_path):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={"max_iters": 2})
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "accelerate_config.yaml"), str(TRAIN_SCRIPT), "--config", str(config)]
    result = run(accelerate, check=True)
    assert "processes (world size): 1" in result.stdout
    console = run([sys.executable, "-m", "tinylm.cli", "train", "--config", str(config), "--max-iters", "4",
                   "--out-dir", str(tmp_path / "ckpt-console")], check=True)
    assert read_log(tmp_path / "ckpt-console")["summary"]["iters"] == 4, console.stdout


def test_hub_repo_id_is_checked_before_training(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt")
    config.write_text(config.read_text() + '[hub]\nrepo_id = "no-namespace"\n')
    assert_clean_error(train_here(config, capsys=capsys, check=False), "hub.repo_id 'no-namespace' needs a namespace")
    assert not (tmp_path / "ckpt").exists(), "nothing trained, nothing written"


def test_push_at_the_end_of_training_fails_cleanly_and_keeps_the_run(prepared, tmp_path):
    """The Hub is unreachable here (HF_ENDPOINT points at a closed local port): the push fails
    with one line after training, and the checkpoints and the export folder are all there. A resumed
    run replaces that export folder with its own (trainer: export(..., force=True))."""
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={"max_iters": 4})
    config.write_text(config.read_text() + '[hub]\nrepo_id = "someone/tiny"\n')
    env = {"HF_TOKEN": "hf_test_token_never_printed", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    result = train(config, check=False, env=env)
    assert_clean_error(result, "cannot reach the Hub")
    assert "hf_test_token_never_printed" not in result.stdout + result.stderr
    assert {"ckpt_last.pt", "ckpt_best.pt", "train_log.json", "exported"} <= {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert (tmp_path / "ckpt" / "exported" / "model.safetensors").is_file()
    # Resumed, the run exports again over its own earlier export (then fails to reach the Hub again).
    exported = (tmp_path / "ckpt" / "exported" / "model.safetensors").stat().st_mtime_ns
    assert_clean_error(train(config, "--resume", "--max-iters", "6", check=False, env=env), "cannot reach the Hub")
    assert (tmp_path / "ckpt" / "exported" / "model.safetensors").stat().st_mtime_ns != exported
