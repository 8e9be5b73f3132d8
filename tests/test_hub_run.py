"""The Hub as a run's home: `[hub] push_checkpoints` pushes at each evaluation in the background, and
`tinylm train --resume OWNER/NAME[@REVISION]` resumes from the Hub into a fresh folder.

Everything talks to `FakeHub` (tests/fake_hub.py) through huggingface_hub's real client: repos,
branches and commits kept in memory, downloads served from them. The pusher's own logic (one upload
at a time, the newest waiting, a failed upload's checkpoints handed on, the branch cleared of other
runs' files) is driven in process, with commits held or refused on cue; the runs are real subprocesses.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub, serve
from training_helpers import (
    REPO, SLOW_TRAIN, TRAIN_SCRIPT, assert_clean_error, load_checkpoint, losses, read_log, run, start_slow, train,
    write_config,
)

from tinylm import checkpoint, hub_run
from tinylm.config import Config, HubConfig, from_dict
from tinylm.errors import UserError

TOKEN = "hf_tinylmTestTokenNeverPrinted0123"
BRANCH = "checkpoints"
# Dropout on, so a resumed run must restore the random state too (as tests/test_resume.py).
RUN = {"model": {"dropout": 0.1}, "training": {"max_iters": 16, "eval_interval": 4}}


def hub(repo_id: str) -> dict:
    return {"repo_id": repo_id, "push_checkpoints": True, "license": "mit"}


def pushed_iters(repo_id: str) -> list[int]:
    """The iteration of each commit on the checkpoints branch, oldest first ([] before the first)."""
    if repo_id not in FakeHub.repos:
        return []
    return [int(summary.split()[2].rstrip(":")) for summary in FakeHub.summaries(repo_id, BRANCH)]


def pushed_checkpoint(repo_id: str, name: str = "ckpt_last.pt", revision: str = BRANCH) -> dict:
    repo = FakeHub.repos[repo_id]
    data = repo.resolve(revision).files[name]
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def wait_for(condition, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the training subprocess"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory):
    """The environment of a run that talks to a FakeHub (kept for the whole module) with a token."""
    with serve() as url:
        yield {"HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path_factory.mktemp("hf_home")),
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture
def hub_api(hub_env, monkeypatch):
    """huggingface_hub in this process pointed at the FakeHub, with the token."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_env["HF_ENDPOINT"])
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield
    FakeHub.refuse_commits, FakeHub.release = {}, None


# --- nothing pushed names a path of this machine ------------------------------------------------------

@pytest.mark.parametrize("value, public", [
    ("/home/me/data/processed", "processed"), ("~/runs/a", "a"), ("../corpus/book.txt", "book.txt"),
    ("C:\\Users\\me\\data", "data"), ("data/processed", "data/processed"), ("checkpoints", "checkpoints"),
    ("gpt2", "gpt2"), ("openai-community/gpt2", "openai-community/gpt2"),
])
def test_a_path_is_pushed_relative_as_it_is_or_by_its_base_name(value, public):
    assert hub_run.public_path(value) == public


def test_only_the_config_keys_that_hold_paths_are_changed():
    config = Config().to_dict()
    config["training"].update(out_dir="/home/me/runs/a", eval_sample_prompt="/* a C comment")
    config["data"]["processed_dir"] = "/home/me/data"
    public = hub_run.public_config(config)
    assert (public["training"]["out_dir"], public["data"]["processed_dir"]) == ("a", "data")
    assert public["training"]["eval_sample_prompt"] == "/* a C comment"  # a prompt, not a path
    assert config["training"]["out_dir"] == "/home/me/runs/a"  # the run's own config is not touched


def test_push_checkpoints_without_a_repo_is_one_line():
    with pytest.raises(UserError, match="hub.push_checkpoints needs hub.repo_id"):
        from_dict({"hub": {"push_checkpoints": True}})


# --- the pusher, in process: one upload at a time, never waiting ------------------------------------

def save(out_dir: Path, name: str, iteration: int) -> None:
    """A small checkpoint file as a run writes it (a new file each time), naming paths of this machine."""
    config = Config().to_dict()
    config["training"]["out_dir"] = str(out_dir)
    checkpoint.save(out_dir / name, {"model": {"w": torch.full((2,), float(iteration))}, "model_config": {},
                                     "tokenizer": {"kind": "char", "path": str(out_dir / "tokenizer.json"), "json": ""},
                                     "config": config, "meta": {"source": {"input": "/home/me/book.txt"}},
                                     "iter": iteration})


def train_log(out_dir: Path, iteration: int) -> dict:
    config = Config().to_dict()
    config["training"]["out_dir"] = str(out_dir)
    return {"config": config, "records": [{"iter": iteration}], "summary": None}


def test_the_newest_state_waits_behind_the_one_upload_and_a_failed_ones_checkpoints_go_with_it(hub_api, tmp_path):
    """iter 0 (ckpt_last + ckpt_best) uploads, held; iter 4 waits; iter 8 (ckpt_last only) takes iter 4's
    place; iter 0 is refused: its ckpt_best.pt, which iter 8 left out as being pushed, goes with iter 8.
    Kills: push waits for its upload (the loop blocks), a waiting state not replaced, a failed upload's
    checkpoints dropped (hand-on), a staged checkpoint pushed with this machine's paths."""
    FakeHub.release = threading.Event()
    FakeHub.refuse_commits = {"tinylm: iter 0": [403, 1]}
    pusher = hub_run.HubPusher(HubConfig(repo_id="someone/inproc", push_checkpoints=True), tmp_path)
    save(tmp_path, "ckpt_last.pt", 0)
    save(tmp_path, "ckpt_best.pt", 0)
    pusher.push(0, train_log(tmp_path, 0))  # returns while its commit is held
    wait_for(lambda: FakeHub.in_flight == 1, timeout=30)
    for step in (4, 8):
        save(tmp_path, "ckpt_last.pt", step)
        pusher.push(step, train_log(tmp_path, step))
    said: list[str] = []
    pusher.report(said.append)
    assert said == ["note: iter 4 is not pushed to someone/inproc (branch checkpoints): the upload before it was still "
                    "running, and iter 8 goes next in its place"]
    FakeHub.release.set()
    pusher.close(said.append)
    assert FakeHub.summaries("someone/inproc", BRANCH) == ["tinylm: iter 8"]
    assert FakeHub.most_in_flight == 1
    assert any(line.startswith("warning: pushing iter 0 to someone/inproc (branch checkpoints) failed (HTTP 403")
               and line.endswith("training goes on, and the next evaluation pushes again") for line in said), said
    assert any(line.startswith("pushed iter 8 to someone/inproc (branch checkpoints): commit ") for line in said)
    files = FakeHub.branch_files("someone/inproc", BRANCH)
    assert sorted(files) == [".gitattributes", "ckpt_best.pt", "ckpt_last.pt", "train_log.json"]
    best, last = (pushed_checkpoint("someone/inproc", name) for name in ("ckpt_best.pt", "ckpt_last.pt"))
    assert (best["iter"], last["iter"]) == (0, 8)
    assert (last["config"]["training"]["out_dir"], last["tokenizer"]["path"], last["meta"]["source"]["input"]) == (
        tmp_path.name, "tokenizer.json", "book.txt")
    assert json.loads(files["train_log.json"])["config"]["training"]["out_dir"] == tmp_path.name
    assert not (tmp_path / ".hub-uploads").exists()


def test_each_commit_leaves_the_branch_with_this_runs_files_only(hub_api, tmp_path):
    """A branch that holds another run's ckpt_best.pt (an --overwrite run with save_best = false): the
    first push deletes it, so a resume from the Hub never exports the other run's best model."""
    old = tmp_path / "old"
    old.mkdir()
    save(old, "ckpt_best.pt", 40)
    save(old, "ckpt_last.pt", 40)
    first = hub_run.HubPusher(HubConfig(repo_id="someone/reused", push_checkpoints=True), old)
    first.push(40, train_log(old, 40))
    first.close(print)
    new = tmp_path / "new"
    new.mkdir()
    save(new, "ckpt_last.pt", 0)
    second = hub_run.HubPusher(HubConfig(repo_id="someone/reused", push_checkpoints=True), new)
    second.push(0, train_log(new, 0))
    second.close(print)
    files = FakeHub.branch_files("someone/reused", BRANCH)
    assert sorted(files) == [".gitattributes", "ckpt_last.pt", "train_log.json"]
    assert pushed_checkpoint("someone/reused")["iter"] == 0


def shards_folder(out_dir: Path, step: int) -> str:
    """A folder of optimizer shards as an FSDP save leaves it (tinylm.shards), its files' bytes its own."""
    name = f"ckpt_shards-{step}-x{step}"
    (out_dir / name).mkdir()
    for part in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        (out_dir / name / part).write_bytes(f"{name}/{part}".encode())
    return name


def shards_on_branch(repo_id: str) -> dict[str, list[str]]:
    files = FakeHub.branch_files(repo_id, BRANCH)
    return {folder: sorted(name.split("/")[1] for name in files if name.startswith(f"{folder}/"))
            for folder in sorted({name.split("/")[0] for name in files if "/" in name})}


def test_an_fsdp_runs_shards_go_with_its_checkpoints_through_failed_uploads(hub_api, tmp_path):
    """The shards folders an upload that failed held go with the next upload when out_dir still holds them
    (ckpt_best.pt names them), and not when a later save removed them; the branch keeps only the
    folders out_dir holds. iter 4 and iter 12 are refused once (403), while iter 8 and 16 wait.
    Kills: a failed upload's folder handed on though no checkpoint names it any more; folders never deleted."""
    FakeHub.refuse_commits = {"tinylm: iter 4": [403, 1], "tinylm: iter 12": [403, 1]}
    pusher = hub_run.HubPusher(HubConfig(repo_id="someone/shards", push_checkpoints=True), tmp_path)

    def evaluation(step: int, *, best_too: bool, held: bool, keep: tuple[str, ...] = ()) -> None:
        """Save iter `step` as an FSDP run does: a new folder, the checkpoints naming it, then the folders
        no checkpoint names removed (`keep`: the one ckpt_best.pt still names). With `held`, the push is
        held at the fake Hub until `release` is set."""
        folder = shards_folder(tmp_path, step)
        for name in ("ckpt_last.pt", "ckpt_best.pt") if best_too else ("ckpt_last.pt",):
            save(tmp_path, name, step)
        for path in tmp_path.glob("ckpt_shards-*"):
            if path.name not in (folder, *keep):
                shutil.rmtree(path)
        if held:
            FakeHub.release = threading.Event()
        pusher.push(step, train_log(tmp_path, step))
        if held:
            wait_for(lambda: FakeHub.in_flight == 1, timeout=30)

    whole = [".metadata", "__0_0.distcp", "__1_0.distcp"]
    evaluation(4, best_too=True, held=True)  # refused once: its ckpt_best.pt and folder go with iter 8
    evaluation(8, best_too=False, held=False, keep=("ckpt_shards-4-x4",))
    FakeHub.release.set()
    wait_for(lambda: "tinylm: iter 8" in FakeHub.summaries("someone/shards", BRANCH), timeout=30)
    assert shards_on_branch("someone/shards") == {"ckpt_shards-4-x4": whole, "ckpt_shards-8-x8": whole}
    assert pushed_checkpoint("someone/shards", "ckpt_best.pt")["iter"] == 4

    evaluation(12, best_too=False, held=True, keep=("ckpt_shards-4-x4",))  # refused once
    evaluation(16, best_too=True, held=False)  # removes the folders of iter 4 and 12
    FakeHub.release.set()
    pusher.close(print)
    assert FakeHub.summaries("someone/shards", BRANCH) == ["tinylm: iter 8", "tinylm: iter 16"]
    assert shards_on_branch("someone/shards") == {"ckpt_shards-16-x16": whole}
    assert FakeHub.branch_files("someone/shards", BRANCH)["ckpt_shards-16-x16/.metadata"] == \
        b"ckpt_shards-16-x16/.metadata"


# --- real runs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(prepared, tmp_path_factory):
    """The uninterrupted run a run resumed from the Hub must reproduce."""
    root = tmp_path_factory.mktemp("straight")
    train(write_config(root / "run.toml", prepared, root / "ckpt", **RUN))
    return root / "ckpt"


@pytest.fixture(scope="module")
def preempted(prepared, hub_env, tmp_path_factory):
    """A pushing run killed (SIGKILL) once the Hub holds iter 8 or later, its folder then deleted:
    (the folder it trained in, the last iteration on the Hub)."""
    root = tmp_path_factory.mktemp("preempted")
    config = write_config(root / "run.toml", prepared, root / "ckpt", **RUN, hub=hub("someone/tiny"))
    process = start_slow(config, 0.3, env=hub_env)
    try:
        wait_for(lambda: any(step >= 8 for step in pushed_iters("someone/tiny")) or process.poll() is not None)
    finally:
        process.kill()
        output = process.communicate()
    pushed = pushed_iters("someone/tiny")[-1]
    assert 8 <= pushed < 16, output
    local = (root / "ckpt" / "ckpt_last.pt").read_bytes()
    assert str(root).encode() in local  # this machine's paths are in the local checkpoint...
    shutil.rmtree(root / "ckpt")  # ...which goes with the machine
    return root, pushed


def resume_from_hub(target: str, out_dir: Path, prepared: Path, env: dict, *flags: str) -> subprocess.CompletedProcess:
    """`tinylm train --resume TARGET` on "another machine": no config file, a new --out-dir, the data there."""
    return run([sys.executable, str(TRAIN_SCRIPT), "--resume", target, "--out-dir", str(out_dir),
                "--processed-dir", str(prepared), *flags], env=env)


def test_a_preempted_run_resumes_from_the_hub_with_the_uninterrupted_runs_losses(preempted, straight, prepared,
                                                                                 hub_env, tmp_path):
    root, pushed = preempted
    result = resume_from_hub("someone/tiny", tmp_path / "elsewhere", prepared, hub_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fetched someone/tiny@checkpoints (commit " in result.stdout
    assert f"resumed from iter {pushed}" in result.stdout
    resumed = tmp_path / "elsewhere"
    for (step, *mine), (_, *reference) in zip(losses(resumed), losses(straight)):
        print(f"iter {step:>2}  resumed from the Hub {mine}  uninterrupted {reference}")
    assert losses(resumed) == losses(straight)  # bit-identical floats, from iter 0 (the Hub kept the records)
    lines = [{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "tokens_per_s")}
             for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    reference = [{k: v for k, v in json.loads(line).items() if k not in ("elapsed_s", "tokens_per_s")}
                 for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert lines == reference  # the Hub's metrics.jsonl, trimmed to the resume, then continued
    weights = checkpoint.load(resumed / "ckpt_last.pt")["model"]
    expected = checkpoint.load(straight / "ckpt_last.pt")["model"]
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
    assert 16 in pushed_iters("someone/tiny")  # the resumed run pushes on to the same branch


def test_an_earlier_commit_resumes_from_its_evaluation_and_its_last_checkpoint(preempted, straight, prepared,
                                                                               hub_env, tmp_path):
    """A commit whose ckpt_best.pt (iter 0's) is not its ckpt_last.pt (iter 4's): the resume takes that
    commit (not the branch's head) and its ckpt_last.pt."""
    repo = FakeHub.repos["someone/tiny"]
    made = {commit.summary: commit for commit in repo.history(BRANCH)}
    files = {**made["tinylm: iter 4"].files, "ckpt_best.pt": made["tinylm: iter 0"].files["ckpt_best.pt"]}
    assert files["ckpt_best.pt"] != made["tinylm: iter 4"].files["ckpt_best.pt"]
    crafted = repo.add_commit("crafted", "iter 4, with iter 0's best", files)
    result = resume_from_hub(f"someone/tiny@{crafted.oid}", tmp_path / "at4", prepared, hub_env, "--max-iters", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"fetched someone/tiny@{crafted.oid} (commit {crafted.oid[:7]})" in result.stdout
    assert "resumed from iter 4" in result.stdout
    assert losses(tmp_path / "at4") == [record for record in losses(straight) if record[0] <= 8]


def test_two_processes_resume_from_the_hub(preempted, prepared, hub_env, tmp_path):
    """Under `accelerate launch` each process fetches before any process group exists: the run keeps its two
    processes (a state set up before the Accelerator left each one alone), and only the main one copies the
    files into out_dir (a second copy would find the first and refuse)."""
    from test_multiprocess import launch

    repo = FakeHub.repos["someone/tiny"]
    at_4 = next(commit.oid for commit in repo.history(BRANCH) if commit.summary == "tinylm: iter 4")
    result = run(launch(TRAIN_SCRIPT, "--resume", f"someone/tiny@{at_4}", "--out-dir", str(tmp_path / "two"),
                        "--processed-dir", str(prepared), "--max-iters", "8"), env=hub_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "processes (world size): 2" in result.stdout
    assert result.stdout.count("fetched someone/tiny@") == 1 and "resumed from iter 4" in result.stdout
    assert [record["iter"] for record in read_log(tmp_path / "two")["records"]] == [0, 4, 8]


def test_nothing_pushed_names_a_path_of_this_machine(preempted, tmp_path_factory):
    root, _ = preempted
    pushed = {(oid, name): data for oid, commit in FakeHub.repos["someone/tiny"].commits.items()
              for name, data in commit.files.items()}
    assert any(name == "ckpt_last.pt" for _, name in pushed)
    temp_root = str(tmp_path_factory.getbasetemp()).encode()  # every test folder, the data's too
    assert [key for key, data in pushed.items() if temp_root in data] == []
    log = json.loads(FakeHub.repos["someone/tiny"].history(BRANCH)[0].files["train_log.json"])
    assert (log["config"]["training"]["out_dir"], log["config"]["data"]["processed_dir"]) == ("ckpt", "data")


@pytest.mark.parametrize("repo_id, revision, message", [
    ("someone/nothing", BRANCH, "no Hub repo someone/nothing this token can read"),
    ("someone/tiny", "nope", "someone/tiny has no revision 'nope'; a run with [hub] push_checkpoints = true pushes "
                             "to branch checkpoints"),
    ("someone/tiny", "main", "that revision holds no ckpt_last.pt or train_log.json"),
])
def test_a_revision_that_holds_no_run_is_refused_before_any_download(preempted, hub_api, repo_id, revision, message):
    with pytest.raises(UserError, match=re.escape(message)):
        hub_run.download(repo_id, revision)


def test_a_folder_holding_a_run_is_not_overwritten_by_the_hubs(preempted, prepared, hub_env, tmp_path, snapshot):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "train_log.json").write_text("{}")
    before = snapshot(taken)
    assert_clean_error(resume_from_hub("someone/tiny", taken, prepared, hub_env),
                       "already holds a training run (train_log.json)", "--overwrite")
    assert snapshot(taken) == before


def test_training_never_waits_for_an_upload(prepared, hub_env, tmp_path):
    """Every commit is held until the run has trained its 12 steps and written its summary: a loop that
    waited for its first push would never get there. Then the newest state goes, one upload at a time."""
    FakeHub.release = threading.Event()
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, hub=hub("someone/held"))
    process = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), "--config", str(config)], cwd=REPO, text=True,
                               env={**os.environ, **hub_env}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        wait_for(lambda: out_dir.joinpath("train_log.json").is_file() and read_log(out_dir)["summary"], timeout=60)
        assert pushed_iters("someone/held") == [] and FakeHub.in_flight == 1
    finally:
        FakeHub.release.set()
        stdout, stderr = process.communicate(timeout=120)
    FakeHub.release = None
    assert process.returncode == 0, stdout + stderr
    assert FakeHub.summaries("someone/held", BRANCH) == ["tinylm: iter 0", "tinylm: iter 12: the run ended (max_iters)"]
    assert FakeHub.most_in_flight == 1
    for skipped, instead in ((4, 8), (8, 12)):
        assert (f"note: iter {skipped} is not pushed to someone/held (branch checkpoints): the upload before it was "
                f"still running, and iter {instead} goes next in its place") in stdout
    assert "waiting for the upload of iter 12 to someone/held (branch checkpoints)..." in stdout
    files = FakeHub.branch_files("someone/held", BRANCH)
    assert pushed_checkpoint("someone/held")["iter"] == 12
    assert json.loads(files["train_log.json"])["records"] == read_log(out_dir)["records"]
    assert files["metrics.jsonl"] == (out_dir / "metrics.jsonl").read_bytes()
    assert "the run's files are on someone/held (branch checkpoints); resume it on any machine with " \
           "`tinylm train --resume someone/held`" in stdout


# Training with a pause before each step (tests/slow_train.py), so the background retries of one evaluation end
# before the next, and 0.2 s between the tries of an upload instead of minutes.
QUICK_RETRIES = ("import runpy, sys, tinylm.hub_run; tinylm.hub_run.RETRY_DELAYS_S = (0.2, 0.2); "
                 f"runpy.run_path({str(SLOW_TRAIN)!r}, run_name='__main__')")


def test_failed_uploads_are_retried_reported_and_training_goes_on(prepared, hub_env, tmp_path):
    """iter 0 refused for good (403: no retry), iter 4 refused three times (503: retried, then a warning),
    iter 8 refused once (retried, pushed). The run trains to the end and the Hub ends with its last state."""
    FakeHub.refuse_commits = {"tinylm: iter 0": [403, 9], "tinylm: iter 4": [503, 3], "tinylm: iter 8": [503, 1]}
    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, hub=hub("someone/flaky"))
    result = run([sys.executable, "-c", QUICK_RETRIES, "0.3", "0", "--config", str(config)], env=hub_env)
    FakeHub.refuse_commits = {}
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_log(out_dir)["summary"]["iters"] == 12
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: pushing")]
    assert len(warnings) == 2, result.stdout
    assert warnings[0].startswith("warning: pushing iter 0 to someone/flaky (branch checkpoints) failed (HTTP 403")
    assert warnings[1].startswith("warning: pushing iter 4 to someone/flaky (branch checkpoints) failed after "
                                  "3 tries (HTTP 503")
    assert all(line.endswith("training goes on, and the next evaluation pushes again") for line in warnings)
    assert "Traceback" not in result.stdout + result.stderr
    # iter 12 twice, unless its evaluation's upload was still waiting when the end of the run replaced it.
    assert pushed_iters("someone/flaky") in ([8, 12, 12], [8, 12])
    assert FakeHub.summaries("someone/flaky", BRANCH)[-1] == "tinylm: iter 12: the run ended (max_iters)"
    assert pushed_checkpoint("someone/flaky")["iter"] == 12
    local_best = checkpoint.load(out_dir / "ckpt_best.pt")["iter"]
    assert pushed_checkpoint("someone/flaky", "ckpt_best.pt")["iter"] == local_best


def test_an_fsdp_runs_checkpoints_go_with_their_optimizer_shards_and_resume_from_the_hub_exactly(
        prepared, hub_env, tmp_path):
    """Two FSDP processes (tests/fsdp_cpu_train.py) push each evaluation: every commit holds the shards
    folders its checkpoints name, and no other. The run's folder deleted, an evaluation's commit resumes on
    two new FSDP processes and logs, step for step, the numbers the pushing run logged after it.

    Kills: the shards not staged; a replaced shards folder left on the branch; the shards not downloaded,
    or copied where the checkpoint does not look."""
    from test_multiprocess import FSDP_ON_CPU, fsdp_launch, logged

    out_dir = tmp_path / "ckpt"
    config = write_config(tmp_path / "run.toml", prepared, out_dir, model={"dropout": 0.1}, hub=hub("someone/fsdp"))
    pushing = run(fsdp_launch(0, "--config", str(config)), env={**hub_env, **FSDP_ON_CPU, "STEP_DELAY_S": "0.3"})
    assert pushing.returncode == 0 and "DTensor" in pushing.stderr, pushing.stdout + pushing.stderr
    commits = {}
    for commit in FakeHub.repos["someone/fsdp"].history(BRANCH):
        named = {torch.load(io.BytesIO(commit.files[name]), weights_only=True)["train_state"]["optimizer_shards"]
                 for name in ("ckpt_last.pt", "ckpt_best.pt") if name in commit.files}
        folders = {name.split("/")[0] for name in commit.files if "/" in name}
        assert folders == named - {None}, commit.summary  # iter 0's checkpoints name none: no step taken yet
        assert all(f"{folder}/.metadata" in commit.files for folder in folders)
        commits[int(commit.summary.split()[2].rstrip(":"))] = commit
    assert any(0 < step < 12 for step in commits), FakeHub.summaries("someone/fsdp", BRANCH)
    middle = min(step for step in commits if 0 < step < 12)  # 4, unless its upload had to give way to 8's
    reference = logged(out_dir)
    expected = load_checkpoint(out_dir / "ckpt_last.pt")["model"]
    shutil.rmtree(out_dir)

    elsewhere = tmp_path / "elsewhere"
    resumed = run(fsdp_launch(0, "--resume", f"someone/fsdp@{commits[middle].oid}", "--out-dir", str(elsewhere),
                              "--processed-dir", str(prepared)), env={**hub_env, **FSDP_ON_CPU})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from iter {middle}" in resumed.stdout and "reseeded" not in resumed.stdout + resumed.stderr
    fetched = re.search(rf"^fetched someone/fsdp@\w+ \(commit \w+\) into {re.escape(str(elsewhere))}: "
                        r"ckpt_best.pt, ckpt_last.pt, train_log.json, metrics.jsonl, (.+)$", resumed.stdout, re.M)
    assert fetched and f"ckpt_shards-{middle}-" in fetched.group(1), resumed.stdout  # the folders, as folders
    for mine, theirs in zip(logged(elsewhere), reference):
        print("resumed from the Hub", dict(mine), "\npushing run         ", dict(theirs))
    assert logged(elsewhere) == reference
    weights = load_checkpoint(elsewhere / "ckpt_last.pt")["model"]
    assert all(torch.equal(weights[name], expected[name]) for name in expected)
