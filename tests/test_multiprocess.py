"""Two real gloo processes through `accelerate launch` (configs/accelerate/cpu-2proc.yaml)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_helpers import REPO, TRAIN_SCRIPT, load_checkpoint, losses, read_log, run, train, write_config

from tinylm.locks import LOCK_NAME

CPU_2PROC = REPO / "configs" / "accelerate" / "cpu-2proc.yaml"
FSDP = REPO / "configs" / "accelerate" / "fsdp.yaml"
SPY_TRAIN = Path(__file__).with_name("spy_train.py")
SLOW_TRAIN = Path(__file__).with_name("slow_train.py")
FSDP_CPU_TRAIN = Path(__file__).with_name("fsdp_cpu_train.py")


def launch(script: Path, *args: str) -> list[str]:
    """`accelerate launch` of two processes on a port nothing else holds (test runs may overlap)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
            "--main_process_port", str(free_port()), str(script), *args]


def fsdp_launch(kill_at: int, *args: str) -> list[str]:
    """Two CPU processes under FSDP with the repo's own FSDP launch file (run it with `FSDP_ON_CPU` as env):
    tests/fsdp_cpu_train.py, killed at the save of iter `kill_at` (0: never)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP), "--num_processes", "2",
            "--main_process_port", str(free_port()), str(FSDP_CPU_TRAIN), str(kill_at), *args]


# What `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu` is for DDP: the launcher starts the processes
# (`--cpu` would start one), each in CPU mode over gloo.
FSDP_ON_CPU = {"ACCELERATE_USE_CPU": "1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_train_stop_together_and_resume(prepared, tmp_path):
    out_dir, writes = tmp_path / "ckpt", tmp_path / "writes.log"
    # min_delta 100 with patience 1: both ranks must agree to stop at the evaluation after iter 0
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={
        "max_iters": 12, "early_stopping": True, "early_stopping_patience": 1, "early_stopping_min_delta": 100.0})
    first = run(launch(SPY_TRAIN, str(writes), "--config", str(config)), check=True)
    assert "device: cpu | precision: fp32 | processes (world size): 2" in first.stdout  # not "cpu:0"
    assert "global batch = 8" in first.stdout  # batch 4 x accumulation 1 x 2 processes
    assert first.stdout.count("eval iter 0:") == 1, "only the main process prints"
    summary = read_log(out_dir)["summary"]
    assert summary["stop_reason"] == "early_stopping" and summary["iters"] == 4 and summary["world_size"] == 2
    rank_states = load_checkpoint(out_dir / "ckpt_last.pt")["train_state"]["rng"]
    assert len(rank_states) == 2  # every rank's RNG
    # Each process seeds with seed + rank (dropout masks must differ between ranks as their batches do).
    assert not torch.equal(rank_states[0]["torch"], rank_states[1]["torch"])

    # On resume the file's keys are laid over the run's config: early stopping is turned off by naming it.
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={"max_iters": 12, "early_stopping": False})
    second = run(launch(SPY_TRAIN, str(writes), "--config", str(config), "--resume"), check=True)
    assert "resumed from iter 4" in second.stdout
    assert [record["iter"] for record in read_log(out_dir)["records"]] == [0, 4, 8, 12]
    assert "process-group-left-open" not in writes.read_text(), "a rank may abort at exit (pytorch#190489)"
    ranks = {line.split()[0] for line in writes.read_text().splitlines()}
    assert ranks == {"0"}, "only the main process may write files"
    hidden = [p.name for p in out_dir.iterdir() if p.name.startswith(".")]
    assert hidden == [LOCK_NAME], "no temporary files left behind, only the (empty) lock file"


def test_two_processes_match_one_process_with_twice_the_batch(prepared, tmp_path):
    """2 processes x batch 2 draw the same blocks as 1 process x batch 4: same losses up to float noise,
    with gradient checkpointing on the two (DDP's gradient hooks fire in the recomputing backward too).

    The train loss printed every log_interval steps (and logged to the tracker) is the mean over
    the processes: the one process's mean over the same 4 blocks, not rank 0's 2."""
    one = write_config(tmp_path / "one.toml", prepared, tmp_path / "one", training={"batch_size": 4, "eval_iters": 2})
    two = write_config(tmp_path / "two.toml", prepared, tmp_path / "two",
                       training={"batch_size": 2, "eval_iters": 4, "gradient_checkpointing": True})
    single_run = train(one)
    double_run = run(launch(SPY_TRAIN, str(tmp_path / "writes.log"), "--config", str(two)), check=True)
    assert "gradient checkpointing on" in double_run.stdout
    single, double = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [r[0] for r in single] == [r[0] for r in double] == [0, 4, 8, 12]
    for a, b in zip(single, double):
        assert b[1] == pytest.approx(a[1], abs=1e-4) and b[2] == pytest.approx(a[2], abs=1e-4)
    printed = [[float(loss) for loss in re.findall(r"^iter \d+/12 \| loss ([\d.]+)", result.stdout, re.MULTILINE)]
               for result in (single_run, double_run)]
    assert len(printed[0]) == 3 and printed[1] == pytest.approx(printed[0], abs=2e-4)


@pytest.mark.parametrize("name", ["accelerate_config.yaml", "configs/accelerate/cpu-2proc.yaml",
                                  "configs/accelerate/multi-gpu.yaml", "configs/accelerate/multi-node.yaml",
                                  "configs/accelerate/fsdp.yaml"])
def test_launch_files_are_complete_accelerate_configs(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / name))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"
    if name.endswith("cpu-2proc.yaml"):
        assert config.use_cpu and config.num_processes == 2


def test_ctrl_c_stops_every_rank_without_hanging(prepared, tmp_path):
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={"max_iters": 400})
    process = subprocess.Popen(launch(SLOW_TRAIN, "0.05", "0", "--config", str(config)),
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while not (out_dir / "train_log.json").exists():
        assert time.monotonic() < deadline and process.poll() is None, "training did not start"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    output, _ = process.communicate(timeout=120)  # a hang fails here
    # Not 130: torch's elastic agent (what accelerate launch runs) gets the Ctrl-C too, waits for the
    # ranks, then exits 1 with its own SignalException. The ranks themselves stop cleanly, once:
    assert process.returncode == 1 and "SignalException: Process" in output, output
    assert output.count("interrupted at iter") == 1
    assert "tinylm/trainer.py" not in output and "KeyboardInterrupt" not in output, "a rank died mid-save"
    stopped_at = load_checkpoint(out_dir / "ckpt_last.pt")["iter"]
    assert 0 < stopped_at < 400

    # The printed command resumes on two processes again (a port of its own added, and a shorter run).
    printed = re.search(r"Resume with: (.*)", output).group(1)
    assert printed == ("ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tinylm/train.py "
                       f"--resume {out_dir / 'ckpt_last.pt'}")
    command = printed.replace("launch ", f"launch --main_process_port {free_port()} ", 1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    resumed = subprocess.run(["bash", "-c", f"{command} --max-iters {stopped_at + 2}"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from iter {stopped_at}" in resumed.stdout and "processes (world size): 2" in resumed.stdout
    assert "reseeded" not in resumed.stdout + resumed.stderr, "the same process count continues exactly"


def test_a_seed_too_large_for_the_process_count_is_refused_before_any_work(prepared, tmp_path):
    """Each process seeds with seed + rank: on 2 processes the largest seed config allows (MAX_SEED)
    would make rank 1's seed MAX_SEED + 1, so the run is refused, by name, before training.

    Kills (trainer): `seed + num_processes - 1` -> `seed - num_processes - 1` (rank 1's seed unchecked).
    """
    from tinylm.config import MAX_SEED

    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={"seed": MAX_SEED})
    result = run(launch(Path(REPO / "tinylm" / "train.py"), "--config", str(config)))
    output = result.stdout + result.stderr
    # (accelerate's launcher prints its own traceback on stderr when a rank exits non-zero)
    assert result.returncode != 0 and "Traceback" not in result.stdout, output
    assert f"error: training.seed {MAX_SEED} is too large for 2 processes" in result.stderr, output
    assert not (tmp_path / "ckpt" / "ckpt_last.pt").exists()


def test_a_folder_in_use_stops_every_rank_at_once(prepared, tmp_path):
    """Only the main process takes out_dir's lock; when another writer holds it, rank 0 is refused and
    every rank stops with its message, at once, rather than waiting in the next collective (until the
    distributed timeout, or until a launcher kills them; the subprocess timeout turns a hang into a
    failure).

    Kills (trainer): a refusal raised before the ranks agree to stop (`except UserError` bypassed).
    """
    from tinylm.locks import FolderLock

    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, training={"max_iters": 2})
    writes = tmp_path / "writes.log"
    with FolderLock(out_dir, "training run"):
        result = run(launch(SPY_TRAIN, str(writes), "--config", str(config)), timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stdout, result.stdout + result.stderr
    # Both ranks stop on the refusal (each says it), not rank 0 alone with the other killed by the launcher.
    assert result.stderr.count(f"error: {out_dir} is in use by another training run (pid {os.getpid()}") == 2
    assert not (out_dir / "ckpt_last.pt").exists()
    assert not writes.exists(), "no rank writes a file, and none leaves its process group open"


def logged(out_dir: Path) -> list[tuple]:
    """Every logged step and evaluation in metrics.jsonl, without the clock's fields."""
    clock = {"tokens_per_s", "elapsed_s"}
    return [tuple((key, value) for key, value in json.loads(line).items() if key not in clock)
            for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_an_fsdp_run_killed_mid_save_resumes_from_its_optimizer_shards_exactly(prepared, tmp_path):
    """Two processes under FSDP (for real: each holds half of every weight and of its moments), with
    dropout, so each process's random state matters. One run is SIGKILLed at its iter-8 save, after
    the optimizer shards are written and before the checkpoint that would name them: resumed, it
    trains from iter 4 and logs, step for step, the very numbers of an uninterrupted run, and ends
    with the same weights in ckpt_last.pt.

    Kills: the optimizer shards not loaded on resume; the random state not restored; the folder
    written before the checkpoint named it trusted by the resume (one folder name for every save);
    the folders no checkpoint names kept; FSDP's DTensor gradient norm; a resume command without FSDP.
    """
    def config(name: str) -> Path:
        return write_config(tmp_path / f"{name}.toml", prepared, tmp_path / name, model={"dropout": 0.1})

    full = run(fsdp_launch(0, "--config", str(config("full"))), check=True, env=FSDP_ON_CPU)
    shards = sorted(re.findall(r"^fsdp-cpu: (\d) (\w+) (\w+) (\d+)/(\d+)$", full.stderr, re.MULTILINE))
    assert [shard[1:3] for shard in shards] == [("MULTI_CPU", "DTensor")] * 2, full.stderr
    assert sum(int(shard[3]) for shard in shards) == int(shards[0][4]), "the two processes hold half of wte each"
    # The command it prints to train longer resumes under FSDP again (--multi_gpu would resume under DDP).
    assert ("accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tinylm/train.py "
            f"--resume {tmp_path / 'full' / 'ckpt_last.pt'} --max-iters N") in full.stdout

    out_dir = tmp_path / "killed"
    killed = run(fsdp_launch(8, "--config", str(config("killed"))), env=FSDP_ON_CPU)
    assert killed.returncode != 0 and "eval iter 8:" in killed.stdout, killed.stdout + killed.stderr
    saved = load_checkpoint(out_dir / "ckpt_last.pt")
    named = saved["train_state"]["optimizer_shards"]
    assert saved["iter"] == 4 and saved["train_state"]["optimizer"] is None
    unnamed = [folder.name for folder in out_dir.glob("ckpt_shards-*") if folder.name != named]

    # The checkpoint and the folder it names, copied elsewhere, resume on one process: DCP reshards the moments.
    # Not exactly (the dropout masks are reseeded): 0.003 from the uninterrupted run's last val loss, where
    # fresh moments end 0.107 away.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(out_dir / "ckpt_last.pt", moved)
    shutil.copytree(out_dir / named, moved / named)
    one = run([sys.executable, str(TRAIN_SCRIPT), "--resume", str(moved / "ckpt_last.pt"), "--batch-size", "8",
               "--eval-iters", "1"], check=True)
    assert "resumed from iter 4" in one.stdout and "written by 2 processes, now 1" in one.stdout
    assert losses(moved)[-1][2] == pytest.approx(losses(tmp_path / "full")[-1][2], abs=0.03)

    resumed = run(fsdp_launch(0, "--resume", str(out_dir / "ckpt_last.pt")), check=True, env=FSDP_ON_CPU)
    assert "resumed from iter 4" in resumed.stdout and "reseeded" not in resumed.stdout + resumed.stderr
    for mine, theirs in zip(logged(out_dir), logged(tmp_path / "full")):
        print("killed and resumed", dict(mine), "\nuninterrupted     ", dict(theirs))
    assert logged(out_dir) == logged(tmp_path / "full")
    assert len(logged(out_dir)) == 7  # the evaluations at 0, 4, 8, 12 and the steps logged at 4, 8, 12
    # The kill left iter 4's folder, named, and iter 8's, written but named by nothing: removed at the resume.
    assert named.startswith("ckpt_shards-4-") and len(unnamed) == 1 and unnamed[0].startswith("ckpt_shards-8-")
    assert f"left in {out_dir}: {unnamed[0]}" in resumed.stdout
    weights = [load_checkpoint(folder / "ckpt_last.pt")["model"] for folder in (tmp_path / "full", out_dir)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert len(weights[0]["transformer.wte.weight"]) == int(shards[0][4]), "ckpt_last.pt holds the whole weights"
    last, best = (load_checkpoint(out_dir / name)["train_state"]["optimizer_shards"]
                  for name in ("ckpt_last.pt", "ckpt_best.pt"))
    assert last == best and [folder.name for folder in out_dir.glob("ckpt_shards-*")] == [last]


def test_an_fsdp_run_whose_processes_do_not_share_out_dir_is_refused_before_any_work(prepared, tmp_path):
    """Under FSDP every process writes its shard of each checkpoint into out_dir. A process that sees another
    folder there (tests/fsdp_cpu_train.py's OUT_DIR_ELSEWHERE: a second machine's own disk) stops every process
    before the first step, not at the first save with optimizer state, an eval_interval into the run.

    Kills: the check left to that save."""
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir)
    result = run(fsdp_launch(0, "--config", str(config), "--out-dir", str(out_dir)),
                 env={**FSDP_ON_CPU, "OUT_DIR_ELSEWHERE": "1"})
    assert result.returncode != 0
    refusal = ("error: process 1 does not see {}, which the main process made in training.out_dir; under FSDP "
               "every process writes its part of each checkpoint there, so put out_dir on a filesystem every machine "
               "shares")
    for folder in (out_dir, tmp_path / "ckpt-elsewhere"):  # each process names out_dir as it was given it
        assert result.stderr.count(refusal.format(folder / ".tinylm.lock.json")) == 1, result.stdout + result.stderr
    # (The launcher prints its own traceback when a process exits with an error: none goes through tinylm.)
    assert f'File "{REPO / "tinylm"}' not in result.stderr and "eval iter" not in result.stdout
    assert sorted(path.name for path in out_dir.iterdir()) == [".tinylm.lock"]  # nothing written, the lock let go

