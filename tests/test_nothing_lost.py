"""Ordinary moves that used to lose a run without a word, and faults that used to end badly (issue 18).

Each test failed on the code before its fix: a resume wrote into the config file's default
out_dir over another run; two runs shared one out_dir and both claimed it; --overwrite kept the
old run's ckpt_best.pt; a learning rate changed on resume was printed but not used; a disk full
during a checkpoint ended in torch's traceback, and on two processes left the other rank waiting.
"""

from __future__ import annotations

import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_finetune import world, write_run  # noqa: F401 (world: a fixture, a small pretrained GPT-2 and its data)
from test_multiprocess import launch
from training_helpers import (
    ONE_THREAD, REPO, TINY, TRAIN_SCRIPT, assert_clean_error, cli_here, load_checkpoint, make_corpus, prepare_here,
    read_log, start_slow, train_here, write_config, write_toml,
)

from tinylm import train as train_command
from tinylm.locks import OWNER_NAME

# Runs that are not about their process train in this one (train_here); a real process stays where the
# test is about one: a run killed or holding the folder's lock, a file-size limit, two launched processes.
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


def wait_for(condition, process=None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_resume_with_a_config_that_names_no_out_dir_stays_in_the_runs_folder(prepared, tmp_path, capsys):
    """The config file's default out_dir (checkpoints/) holds another run: the resume must not touch it."""
    sections = {name: dict(values) for name, values in TINY.items()}
    sections["data"]["processed_dir"] = str(prepared)
    no_out_dir = write_toml(tmp_path / "no_out_dir.toml", sections)
    train_here(no_out_dir, "--max-iters", "4", capsys=capsys, cwd=tmp_path)
    other_run = files(tmp_path / "checkpoints")
    train_here(no_out_dir, "--out-dir", "ref", "--max-iters", "4", "--grad-accum-steps", "2", capsys=capsys,
               cwd=tmp_path)

    result = train_here(no_out_dir, "--resume", "ref/ckpt_last.pt", "--max-iters", "8", capsys=capsys, cwd=tmp_path)

    assert "out_dir" not in result.stdout.split("\n")[0], result.stdout  # nothing to announce: it did not change
    assert files(tmp_path / "checkpoints") == other_run
    assert [r["iter"] for r in read_log(tmp_path / "ref")["records"]] == [0, 4, 8]
    # A key the file does not name keeps the run's value, not the default.
    assert read_log(tmp_path / "ref")["config"]["training"]["grad_accum_steps"] == 2


def test_a_resume_into_a_folder_holding_another_run_is_refused(prepared, tmp_path, capsys):
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "a", training={"max_iters": 4})
    train_here(config, capsys=capsys)
    train_here(config, "--out-dir", tmp_path / "b", "--seed", "3", capsys=capsys)
    before = files(tmp_path / "b")

    result = train_here(config, "--resume", tmp_path / "a" / "ckpt_last.pt", "--out-dir", tmp_path / "b",
                        "--max-iters", "8", capsys=capsys, check=False)

    assert_clean_error(result, str(tmp_path / "b"), "already holds a training run", "--overwrite")
    assert files(tmp_path / "b") == before


def test_a_second_run_on_an_out_dir_in_use_is_refused_and_a_killed_run_leaves_no_lock(prepared, tmp_path, capsys):
    """The first run is a process of its own (it holds the lock, then is killed); the others run here."""
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={"max_iters": 400, "eval_interval": 4})
    first = start_slow(config, 0.05, env=ONE_THREAD)
    wait_for(lambda: (out_dir / "train_log.json").exists(), first)

    for flags in (["--overwrite"], ["--resume"], ["--out-dir", str(out_dir), "--overwrite", "--seed", "2"]):
        second = train_here(config, *flags, "--max-iters", "12", capsys=capsys, check=False)  # short, were it let in
        assert_clean_error(second, str(out_dir), "in use by another training run", f"pid {first.pid}")
    assert first.poll() is None, "the first run goes on"

    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = train_here(config, "--resume", "--max-iters", str(load_checkpoint(out_dir / "ckpt_last.pt")["iter"] + 4),
                         capsys=capsys)
    assert "resumed from iter" in resumed.stdout
    assert not (out_dir / OWNER_NAME).exists()


def test_sigkill_during_a_checkpoint_write_leaves_nothing_after_the_next_run(prepared, tmp_path, capsys):
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={"max_iters": 16})
    process = start_slow(config, 0.0, 3, env=ONE_THREAD)  # the 3rd write (a checkpoint at iter 4) hangs half-way
    wait_for(lambda: out_dir.exists() and any(p.name.endswith(".half-written") for p in out_dir.iterdir()), process)
    process.kill()
    process.wait()
    stale = [p.name for p in out_dir.iterdir() if p.name.endswith(".tmp")]
    assert stale, "the kill left the unfinished temp file this test is about"

    result = train_here(config, "--resume", capsys=capsys)

    assert f"removed 1 unfinished file(s) a stopped run left in {out_dir}: {stale[0]}" in result.stdout
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]


def test_overwrite_removes_the_previous_runs_files_before_the_new_run_writes(prepared, tmp_path, capsys):
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={"max_iters": 4})
    train_here(config, capsys=capsys)
    (out_dir / "exported").mkdir()
    (out_dir / "exported" / "model.safetensors").write_bytes(b"the old run's export")
    old_last = (out_dir / "ckpt_last.pt").read_bytes()
    no_best = write_config(tmp_path / "no_best.toml", prepared, out_dir, training={"max_iters": 4, "save_best": False})

    result = train_here(no_best, "--overwrite", "--seed", "3", capsys=capsys)

    assert f"--overwrite: removed the previous run's ckpt_best.pt, ckpt_last.pt, train_log.json, metrics.jsonl, exported from " \
           f"{out_dir}" in result.stdout
    assert not (out_dir / "ckpt_best.pt").exists() and not (out_dir / "exported").exists()
    assert (out_dir / "ckpt_last.pt").read_bytes() != old_last
    assert f"tinylm generate --checkpoint {out_dir / 'ckpt_last.pt'}" in result.stdout  # the new run's model
    assert read_log(out_dir)["config"]["training"]["seed"] == 3


def expected_lr(step: int, peak: float, min_lr: float, warmup: int, decay: int) -> float:
    """nanoGPT's schedule, written out here: linear warmup, cosine to min_lr."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if step >= decay:
        return min_lr
    return min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (decay - warmup))) * (peak - min_lr)


def test_optimizer_settings_changed_on_resume_are_the_ones_used(prepared, tmp_path, capsys):
    out_dir = tmp_path / "ckpt"
    schedule = {"max_iters": 4, "warmup_iters": 2, "lr_decay_iters": 40, "learning_rate": 1e-2, "min_lr": 1e-3}
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training=schedule)
    train_here(config, capsys=capsys)
    changed = write_config(tmp_path / "changed.toml", prepared, out_dir, training={
        **schedule, "learning_rate": 5e-3, "min_lr": 5e-4, "warmup_iters": 1, "lr_decay_iters": 30,
        "weight_decay": 0.5, "beta1": 0.8, "beta2": 0.95})

    result = train_here(changed, "--resume", "--max-iters", "8", capsys=capsys)

    assert "training.learning_rate 0.01 -> 0.005" in result.stdout
    saved = load_checkpoint(out_dir / "ckpt_last.pt")
    groups = saved["train_state"]["optimizer"]["param_groups"]
    # The lr the optimizer holds after the last step: the schedule's for step 8, with the new settings.
    assert [group["lr"] for group in groups] == pytest.approx([expected_lr(8, 5e-3, 5e-4, 1, 30)] * 2, rel=1e-12)
    assert [group["betas"] for group in groups] == [(0.8, 0.95)] * 2
    assert [group["weight_decay"] for group in groups] == [0.5, 0.0]
    assert read_log(out_dir)["records"][-1]["lr"] == pytest.approx(expected_lr(8, 5e-3, 5e-4, 1, 30), rel=1e-12)


def test_resume_after_the_data_was_prepared_again_says_the_data_changed(tmp_path, capsys):
    data = tmp_path / "data"
    prepare_here(make_corpus(tmp_path / "corpus.txt"), data, capsys=capsys)
    config = write_config(tmp_path / "run.toml", data, tmp_path / "ckpt", training={"max_iters": 4})
    train_here(config, capsys=capsys)
    # Prepared again from another text, with more characters: another vocabulary.
    other = tmp_path / "other.txt"
    other.write_text(make_corpus(tmp_path / "base.txt").read_text() + "0123456789XYZ")
    for path in data.iterdir():
        path.unlink()
    prepare_here(other, data, capsys=capsys)

    result = train_here(config, "--resume", "--max-iters", "8", capsys=capsys, check=False)

    assert_clean_error(result, "cannot resume", f"the data in {data / 'meta.json'}", "prepared with another tokenizer",
                       "vocab_size")
    assert "the config changes the model shape" not in result.stderr


def test_printed_commands_paste_into_a_shell_when_paths_have_spaces(prepared, tmp_path, capsys):
    out_dir = tmp_path / "my runs" / "first try"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={"max_iters": 4})
    result = train_here(config, capsys=capsys)
    generate = next(line for line in result.stdout.splitlines() if line.startswith("sample from it: "))
    longer = next(line for line in result.stdout.splitlines() if line.startswith("train longer: "))
    assert shlex.split(generate.split(": ", 1)[1]) == ["tinylm", "generate", "--checkpoint",
                                                       str(out_dir / "ckpt_best.pt")]
    command = shlex.split(longer.split(": ", 1)[1].replace(" N", " 8"))
    assert command[:3] == ["tinylm", "train", "--resume"] and command[3] == str(out_dir / "ckpt_last.pt")
    cli_here(train_command.main, command[2:], capsys, check=True)  # the shell's words, as `tinylm train` gets them
    assert load_checkpoint(out_dir / "ckpt_last.pt")["iter"] == 8


def limit_file_size(max_bytes: int):
    """A preexec_fn: files of this process and its children stop at `max_bytes`, as on a full disk.
    SIGXFSZ is ignored (it survives exec), so a write past the limit fails with EFBIG instead of killing."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return apply


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(prepared, tmp_path, capsys):
    """The full disk is a file-size limit on the resumed run's process (so not on this one's files)."""
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={"max_iters": 4})
    train_here(config, capsys=capsys)
    before = files(out_dir)

    result = run_limited([sys.executable, str(TRAIN_SCRIPT), "--config", str(config), "--resume", "--max-iters", "8"],
                         max_bytes=(out_dir / "train_log.json").stat().st_size * 4)

    assert_clean_error(result, f"cannot write {out_dir / 'ckpt_last.pt'}", "the previous file (if any) is unchanged")
    after = files(out_dir)
    assert after["ckpt_last.pt"] == before["ckpt_last.pt"] and after["ckpt_best.pt"] == before["ckpt_best.pt"]
    assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp")]


def run_limited(command: list[str], max_bytes: int, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
                          preexec_fn=limit_file_size(max_bytes))


def test_when_the_main_process_cannot_save_every_process_stops_with_its_message(prepared, tmp_path, capsys):
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={"max_iters": 4})
    train_here(config, capsys=capsys)
    started = time.monotonic()

    # Without the fix, rank 1 waits in the next collective for the 30-minute distributed timeout: the
    # subprocess timeout turns that into a failure.
    result = run_limited(launch(TRAIN_SCRIPT, "--config", str(config), "--resume", "--max-iters", "12"),
                         max_bytes=(out_dir / "train_log.json").stat().st_size * 4, timeout=180)

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert output.count(f"error: cannot write {out_dir / 'ckpt_last.pt'}") == 2, output  # each rank says it
    assert "Traceback" not in result.stdout, output
    assert time.monotonic() - started < 170


def test_the_flag_an_error_suggests_is_applied_before_the_check(world, tmp_path, capsys):
    """A fine-tune config with the wrong data.tokenizer: the message names --tokenizer pretrained, and it works."""
    config = write_run(tmp_path / "run.toml", world, tmp_path / "ckpt", max_iters=4)
    config.write_text(config.read_text().replace('tokenizer = "pretrained"', 'tokenizer = "char"'))
    refused = train_here(config, capsys=capsys, check=False)
    assert_clean_error(refused, "model.init_from", "(--tokenizer pretrained)")

    train_here(config, "--tokenizer", "pretrained", capsys=capsys)

    assert read_log(tmp_path / "ckpt")["summary"]["iters"] == 4


def test_a_fine_tuned_run_resumes_with_its_new_dropout_and_refuses_another_base_model(world, tmp_path, capsys):
    out_dir = tmp_path / "ckpt"
    train_here(write_run(tmp_path / "run.toml", world, out_dir, max_iters=4), capsys=capsys)
    resumed = write_run(tmp_path / "resumed.toml", world, out_dir, model={"dropout": 0.25}, max_iters=8)

    result = train_here(resumed, "--resume", capsys=capsys)

    assert "model.dropout 0.0 -> 0.25" in result.stdout
    model_config = load_checkpoint(out_dir / "ckpt_last.pt")["model_config"]
    assert (model_config["resid_pdrop"], model_config["embd_pdrop"], model_config["attn_pdrop"]) == (0.25,) * 3
    other_base = write_run(tmp_path / "other.toml", world, out_dir, model={"init_from": "gpt2"}, max_iters=12)
    assert_clean_error(train_here(other_base, "--resume", capsys=capsys, check=False), "cannot resume",
                       "model.init_from")
