"""What an in-process Trainer checks and says before, around and after the loop: the folder it
trains into, the data and settings a resume brings, the lines it prints.

Expectations come from the files on disk (meta.json, the out_dir's contents) and from the
documented rules, not from the trainer's own state. Each test names the mutants of
tests/mutation (module trainer) it kills. Runs are a few steps of tests/training_helpers.TINY.
"""

from __future__ import annotations

import json
import math
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from training_helpers import WORDS, load_checkpoint, make_trainer, train_here, write_config

from tinylm import prepare
from tinylm.config import MAX_SEED, load_config
from tinylm.errors import UserError
from tinylm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state", "one_torch_thread")


def prepared_text(folder: Path, text: str, *extra: str) -> Path:
    corpus = folder.parent / f"{folder.name}.txt"
    corpus.write_text(text)
    assert not prepare.main(["--input", str(corpus), "--tokenizer", "char", "--out", str(folder), *extra])
    return folder


def play(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(chars // 4))[:chars]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_text(tmp_path_factory.mktemp("trainer-checks") / "data", play(12_000))


def test_a_new_run_uses_the_cpu_matmul_backend_its_config_names(data, tmp_path):
    """training.cpu_matmul = "blas" on a new run: the steps run on blas, with no note about a resumed
    run, and the checkpoint records blas (what a resumed "auto" run would keep).

    Kills: the "keep the resumed run's backend" condition negated, which hands a new run the backend of
    a checkpoint it does not have.
    """
    trainer = make_trainer(data, tmp_path, cpu_matmul="blas", max_iters=2, eval_interval=100)
    assert (trainer.cpu_matmul.backend, trainer.cpu_matmul.note) == ("blas", "default BLAS matmuls (training.cpu_matmul)")
    trainer.fit()
    assert load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["train_state"]["cpu_matmul"] == "blas"


def test_a_resume_keeps_the_started_backend_only_when_told_auto(data, tmp_path):
    """A run started on oneDNN and resumed with cpu_matmul = "blas" named explicitly uses blas: only
    "auto" keeps the backend the checkpoint records (docs/training.md).

    Kills: `not` added to the "auto and recorded" condition (`not auto and recorded` would hand the
    checkpoint's backend to a run that named another).
    """
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN: every run is on blas")
    make_trainer(data, tmp_path, cpu_matmul="onednn", max_iters=1, eval_interval=100).fit()
    assert load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["train_state"]["cpu_matmul"] == "onednn"
    from tinylm.compat import reset_accelerate_state

    reset_accelerate_state()
    config = load_config(tmp_path / "run.toml", {"training.max_iters": 2, "training.cpu_matmul": "blas"})
    trainer = Trainer(config, resume=tmp_path / "ckpt" / "ckpt_last.pt")
    trainer.close()
    assert trainer.cpu_matmul.backend == "blas"


def test_a_run_from_scratch_names_no_base_model(data, tmp_path):
    """checkpoint.py's layout: base_model is None for a run from scratch (the model card then names none).

    Kills: `init_from == SCRATCH` -> `!=` where the base model is decided (it would record "scratch").
    """
    make_trainer(data, tmp_path, max_iters=1, eval_interval=100).fit()
    assert load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["base_model"] is None


def test_each_batch_is_read_once_though_it_is_fetched_a_step_ahead(data, tmp_path, monkeypatch):
    """Each step's micro-batches are read from the token files once: the previous step fetched them
    ahead, and the step uses those (one extra fetch, for the step after the last, is the price).

    Kills: the prefetched batches tagged with the wrong step (every step would read its batches twice).
    """
    from tinylm import data as data_module

    calls = []
    read = data_module.train_batch
    monkeypatch.setattr(data_module, "train_batch", lambda *args, **kwargs: calls.append(kwargs["step"]) or
                        read(*args, **kwargs))
    make_trainer(data, tmp_path, max_iters=5, grad_accum_steps=2, eval_interval=100).fit()
    assert calls == [step for step in range(6) for _ in range(2)]


def test_what_a_dead_writer_left_is_removed_and_named_and_nothing_else(data, tmp_path, capsys):
    """Temp files of the run's atomic writes (".<file>.<random>.tmp") in out_dir are litter of a
    stopped run: a new run removes them and names them in one line; other files stay, and a clean
    folder gets no such line.

    Kills: `if stale:` negated (the line printed for a clean folder, not for a littered one).
    """
    out = tmp_path / "ckpt"
    out.mkdir()
    litter = [out / ".ckpt_last.pt.k2j4x.tmp", out / ".train_log.json.a9b8.tmp"]
    for path in [*litter, out / "notes.tmp", out / ".ckpt_last.pt.keep"]:
        path.write_text("x")
    make_trainer(data, tmp_path, max_iters=2).close()
    said = capsys.readouterr().out
    assert f"removed 2 unfinished file(s) a stopped run left in {out}: " in said
    assert all(path.name in said and not path.exists() for path in litter)
    assert (out / "notes.tmp").exists() and (out / ".ckpt_last.pt.keep").exists()

    clean = tmp_path / "clean"
    clean.mkdir()
    make_trainer(data, clean, max_iters=2).close()
    assert "unfinished" not in capsys.readouterr().out


def test_a_resume_on_data_prepared_again_names_what_changed(tmp_path):
    """Data prepared again from another text (another vocabulary) under the run: the resume is refused,
    and the message gives each meta.json field that changed, old -> new, as the two meta.json files say.

    Kills: the changed-field filter `!=` -> `==` (it would list the fields that did not change).
    """
    folder = prepared_text(tmp_path / "data", play(12_000))
    before = json.loads((folder / "meta.json").read_text())
    make_trainer(folder, tmp_path, max_iters=2, eval_interval=100).fit()
    prepared_text(folder, play(12_000) + " XYZ 0123", "--overwrite")
    after = json.loads((folder / "meta.json").read_text())
    assert before["vocab_size"] != after["vocab_size"] and before["tokenizer_kind"] == after["tokenizer_kind"]

    with pytest.raises(UserError) as caught:
        Trainer(load_config(tmp_path / "run.toml"), resume=tmp_path / "ckpt" / "ckpt_last.pt")
    message = str(caught.value)
    assert "prepared with another tokenizer than the checkpoint's" in message
    assert f"vocab_size {before['vocab_size']!r} -> {after['vocab_size']!r}" in message
    assert "tokenizer_kind" not in message  # the same before and after


def test_an_out_dir_that_cannot_be_made_says_why_in_the_systems_words(data, tmp_path):
    """An out_dir inside a file cannot be created: one line with the OS's reason (its strerror).

    Kills: `exc.strerror or exc` -> `and` (the message would carry the exception's repr-like text).
    """
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    out = blocker / "ckpt"
    config = load_config(write_config(tmp_path / "run.toml", data, out))
    with pytest.raises(UserError) as caught:
        Trainer(config)
    assert str(caught.value) == (f"cannot write to training.out_dir {out}: Not a directory; "
                                 "choose a writable --out-dir")
    assert blocker.read_text() == "keep me"


def test_an_improvement_of_exactly_min_delta_counts(data, tmp_path):
    """docs/training.md: an evaluation improves when val loss drops by *at least*
    early_stopping_min_delta. A first run measures the drop between its first two evaluations; a second,
    identical run with min_delta set to exactly that drop counts it as an improvement, and one with a
    min_delta a hair larger does not.

    Kills: the improvement test `>= min_delta` -> `> min_delta`.
    """
    def evaluations(folder: Path, min_delta: float) -> list[dict]:
        folder.mkdir()
        make_trainer(data, folder, max_iters=2, eval_interval=2, early_stopping_min_delta=min_delta).fit()
        return json.loads((folder / "ckpt" / "train_log.json").read_text())["records"]

    first, second = evaluations(tmp_path / "measure", 0.0)
    drop = first["val_loss"] - second["val_loss"]
    assert drop > 0
    exact = evaluations(tmp_path / "exact", drop)
    assert [r["val_loss"] for r in exact] == [first["val_loss"], second["val_loss"]]  # the same run
    assert (tmp_path / "exact" / "ckpt" / "ckpt_best.pt").is_file()
    best = load_checkpoint(tmp_path / "exact" / "ckpt" / "ckpt_best.pt")
    assert best["iter"] == 2 and best["best_val_loss"] == second["val_loss"]
    evaluations(tmp_path / "larger", math.nextafter(drop, math.inf))
    assert load_checkpoint(tmp_path / "larger" / "ckpt" / "ckpt_best.pt")["iter"] == 0


def test_an_out_dir_whose_parents_do_not_exist_yet_is_made(data, tmp_path):
    """Kills: `out_dir.mkdir(parents=True, ...)` -> `parents=False`."""
    out = tmp_path / "runs" / "2026" / "first"
    config = load_config(write_config(tmp_path / "run.toml", data, out, training={"max_iters": 1}))
    Trainer(config).close()
    assert out.is_dir()


def test_an_out_dir_that_is_a_file_is_refused_and_kept(data, tmp_path):
    """Kills: the is-a-file check negated or dropped (mkdir would then fail with a traceback)."""
    blocker = tmp_path / "ckpt"
    blocker.write_text("keep me")
    with pytest.raises(UserError, match=rf"training.out_dir {blocker} is a file, not a folder"):
        make_trainer(data, tmp_path)
    assert blocker.read_text() == "keep me"


def test_a_folder_holding_another_run_is_refused_unless_overwrite_which_clears_it(data, tmp_path, capsys):
    """A new run into a folder holding a run's files is refused and names them; with overwrite, the
    old run's files (and its export and tracker folders) are gone before the new run's first write.

    Kills: the other-run refusal dropped or inverted (run_folder.claim); `clear_replaced_run` skipping its work or
    joining paths wrongly.
    """
    out = tmp_path / "ckpt"
    make_trainer(data, tmp_path, max_iters=2, eval_interval=100).fit()
    (out / "exported").mkdir()
    (out / "exported" / "model.safetensors").write_text("old")
    old_log = (out / "train_log.json").read_text()
    with pytest.raises(UserError, match=rf"{out} already holds a training run \(ckpt_best.pt, ckpt_last.pt, train_log.json, metrics.jsonl\)"):
        make_trainer(data, tmp_path, max_iters=2)

    capsys.readouterr()
    Trainer(load_config(tmp_path / "run.toml"), overwrite=True).fit()
    assert f"--overwrite: removed the previous run's ckpt_best.pt, ckpt_last.pt, train_log.json, metrics.jsonl, exported from {out}" \
        in capsys.readouterr().out
    assert not (out / "exported").exists() and (out / "train_log.json").read_text() != old_log


def test_the_largest_seed_is_accepted_for_one_process(data, tmp_path):
    """training.seed = MAX_SEED on one process: seed + rank is MAX_SEED, which is allowed.

    Kills: the seed bound `>` -> `>=`.
    """
    trainer = make_trainer(data, tmp_path, seed=MAX_SEED, max_iters=1)
    trainer.close()
    assert trainer.config.training.seed == MAX_SEED


def test_the_closing_lines_point_at_the_best_checkpoint_or_else_the_last(data, tmp_path, capsys):
    """The end-of-run lines: iterations and stop reason, the best val loss and its iter as train_log.json
    records them, and a generate command on ckpt_best.pt; without a ckpt_best.pt (save_best off), on
    ckpt_last.pt.

    The banner states the schedule and where the run stops on it; the closing line, how long the run
    took and its mean tokens/s.

    Kills: mutants of `run_report.outputs` (the best/last choice, the best-loss text); the summary's
    final losses taken from another record than the last; the other-format warning printed when there
    is no other data (`newer is not None` -> `is None`); the summary's and the records' tokens_seen, the
    summary's elapsed_s and the banner's parameter count computed wrongly; an empty speed note in the banner; " | best" on the
    wrong evaluation lines.
    """
    trainer = make_trainer(data, tmp_path, max_iters=4, eval_interval=2)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started
    # Ctrl-C / SIGTERM are the loop's only while it runs: after it, what they did before.
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers
    out = tmp_path / "ckpt"
    log = json.loads((out / "train_log.json").read_text())
    summary, last = log["summary"], log["records"][-1]
    assert (summary["final_train_loss"], summary["final_val_loss"]) == (last["train_loss"], last["val_loss"])
    assert last["iter"] == 4 and len(log["records"]) == 3  # evaluations at 0, 2 and 4
    assert summary["tokens_seen"] == 4 * 4 * 16  # iters * batch_size * block_size (TINY, one process)
    assert [record["tokens_seen"] for record in log["records"]] == [0, 2 * 4 * 16, 4 * 4 * 16]
    assert 0 < summary["elapsed_s"] <= wall  # measured inside fit()
    times = [record["elapsed_s"] for record in log["records"]]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= summary["elapsed_s"]
    said = capsys.readouterr().out
    model = trainer.accelerator.unwrap_model(trainer.model)
    parameters = sum(p.numel() for p in model.parameters())  # the tied embedding once
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    assert (f"model: {parameters / 1e6:.2f}M parameters (1 layers, 2 heads, 32 wide, block 16, vocab {vocab} "
            "char)") in said.splitlines()  # the whole line: no "fine-tuned from" for a run from scratch
    assert "warning" not in said  # nothing is wrong with this run (nor is there data of the other format)
    assert ("device: cpu | precision: fp32 | processes (world size): 1 | default BLAS matmuls (training.cpu_matmul)"
            in said.splitlines())  # which matmuls and why, and no empty speed note
    marked = [int(it) for it, best in re.findall(r"^eval iter (\d+): .*?( \| best)?$", said, re.M) if best]
    improving, best = [], math.inf
    for record in log["records"]:  # docs/training.md: an evaluation is "best" when it lowers the best val loss
        if record["val_loss"] < best:
            improving.append(record["iter"])
            best = record["val_loss"]
    assert marked == improving and marked
    # TINY's schedule by hand: the last step (3) is 1/10 into the cosine from 1e-2 to 1e-3 over steps 2..12.
    last_lr = 1e-3 + 0.5 * (1 + math.cos(math.pi * 0.1)) * (1e-2 - 1e-3)
    assert f"{last_lr:.2e}" == "9.78e-03"
    assert ("schedule: warmup to 1e-2 over 2 steps, cosine to min_lr 1e-3 at step 12; this run stops at step 4, "
            "its last step at lr 9.78e-3 (98% of the peak)") in said.splitlines()
    done = re.search(r"^done: 4 iters \(max_iters\) in ([\d.]+) s \(([\d,]+) tokens/s\), best val loss (\S+) at iter "
                     rf"(\d+)\. Checkpoints and train_log.json are in {re.escape(str(out))}$", said, re.M)
    assert done, said
    assert float(done[1]) == round(summary["elapsed_s"], 1)
    assert int(done[2].replace(",", "")) == round(summary["tokens_seen"] / summary["elapsed_s"])
    assert (done[3], int(done[4])) == (f"{summary['best_val_loss']:.4f}", summary["best_iter"])
    assert f"sample from it: tinylm generate --checkpoint {out / 'ckpt_best.pt'}" in said

    (tmp_path / "last").mkdir()
    make_trainer(data, tmp_path / "last", max_iters=2, eval_interval=2, save_best=False).fit()
    assert f"sample from it: tinylm generate --checkpoint {tmp_path / 'last' / 'ckpt' / 'ckpt_last.pt'}" \
        in capsys.readouterr().out


def test_a_run_that_pushes_without_a_license_is_warned_at_the_start(data, tmp_path, capsys, monkeypatch):
    """[hub] repo_id without [hub] license: `tinylm train` warns, before anything else, that the card
    will state no license; with a license, it does not. (Each run then stops before training: its
    out_dir holds another run. Nothing is pushed: that happens only after training.)

    Kills: `if not config.hub.license` negated; the warning not printed.
    """
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # the start-up check only needs one to exist
    for license, warned in ((None, True), ("mit", False)):
        folder = tmp_path / str(license)
        (folder / "ckpt").mkdir(parents=True)
        (folder / "ckpt" / "train_log.json").write_text("{}")
        hub = {"repo_id": "someone/tiny"} | ({"license": license} if license else {})
        result = train_here(write_config(folder / "run.toml", data, folder / "ckpt", hub=hub), capsys=capsys,
                            check=False)
        assert result.returncode == 2 and "already holds a training run" in result.stderr
        assert ("warning: hub.license is not set, so the model card pushed to someone/tiny" in result.stdout) is warned


def test_a_resumed_run_goes_on_counting_its_training_time(data, tmp_path, capsys):
    """elapsed_s is the run's training time across interruptions: a resumed run starts from the time its
    checkpoint recorded, so its summary reports at least that, and so does each line of metrics.jsonl,
    in order. A resume on as many processes as the run had warns of nothing.

    Kills: the clock restarted the wrong way on resume (`perf_counter() - elapsed_s` -> `+`); a logged
    step's elapsed_s as `perf_counter() + started`; `if warning` negated in _restore ("warning: None").
    """
    make_trainer(data, tmp_path, max_iters=2, eval_interval=100).fit()
    saved = load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["train_state"]["run"]["elapsed_s"]
    assert saved > 0
    from tinylm.compat import reset_accelerate_state

    reset_accelerate_state()
    config = load_config(tmp_path / "run.toml", {"training.max_iters": 4})
    capsys.readouterr()
    summary = Trainer(config, resume=tmp_path / "ckpt" / "ckpt_last.pt").fit()
    assert summary["elapsed_s"] >= saved
    assert "resumed from iter 2" in (said := capsys.readouterr().out) and "warning" not in said
    times = [json.loads(line)["elapsed_s"] for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert times == sorted(times) and 0 <= times[0] and times[-1] <= summary["elapsed_s"]


def test_early_stopping_says_why_it_stopped_and_a_run_that_goes_on_says_nothing(data, tmp_path, capsys):
    """With early_stopping_min_delta 100 no evaluation after the first improves: with patience 1 the run
    stops at the second evaluation, and says so with the numbers train_log.json records.

    Kills: `if stop:` negated (the line printed at every evaluation but the one that stops).
    """
    make_trainer(data, tmp_path, max_iters=8, eval_interval=2, early_stopping=True, early_stopping_patience=1,
                 early_stopping_min_delta=100.0).fit()
    log = json.loads((tmp_path / "ckpt" / "train_log.json").read_text())
    assert log["summary"]["stop_reason"] == "early_stopping" and log["summary"]["iters"] == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "early stopping" in line]
    first = log["records"][0]
    assert lines == [f"early stopping at iter 2: val loss has not improved by at least 100.0 for 1 evaluations "
                     f"(best {first['val_loss']:.4f} at iter 0)"]


def test_each_hardware_warning_is_printed(data, tmp_path, capsys):
    """precision fp16 asked of a CPU: training falls back to fp32, and the run says so (docs/training.md).

    Kills: the loop over the hardware warnings run zero times.
    """
    trainer = make_trainer(data, tmp_path, precision="fp16", max_iters=1)
    trainer.close()
    assert trainer.hardware.precision == "fp32"
    assert 'warning: precision "fp16" needs a CUDA GPU: training on CPU in fp32 instead' in capsys.readouterr().out


def test_a_resume_refused_while_setting_up_leaves_the_folder_unlocked(data, tmp_path):
    """A resume that fails after the folder was locked (here: nothing to train, found while setting up)
    releases the lock at once, even while the failed Trainer is still referenced (as in a notebook).

    Kills: the lock release on a failed set-up bypassed (`except BaseException` -> another exception).
    """
    from tinylm.locks import FolderLock

    make_trainer(data, tmp_path, max_iters=2, eval_interval=100).fit()
    config = load_config(tmp_path / "run.toml", {"training.max_iters": 2})
    with pytest.raises(UserError, match=r"nothing to train: the checkpoint is at iter 2 and training.max_iters is 2")\
            as refused:
        Trainer(config, resume=tmp_path / "ckpt" / "ckpt_last.pt")
    assert refused.traceback  # the failed Trainer's frames are still alive
    with FolderLock(tmp_path / "ckpt", "test"):
        pass


def test_a_resume_trains_with_the_optimizer_settings_it_is_given(data, tmp_path):
    """betas and weight_decay changed on resume: the restored optimizer uses the new ones (matrices
    decay, biases and LayerNorm gains do not), not the checkpoint's.

    Kills: this run's settings not applied in `checkpoint.restore_training` (its loop run zero times).
    """
    make_trainer(data, tmp_path, max_iters=1, eval_interval=100).fit()
    config = load_config(tmp_path / "run.toml", {"training.max_iters": 2, "training.beta2": 0.95,
                                                 "training.weight_decay": 0.2})
    trainer = Trainer(config, resume=tmp_path / "ckpt" / "ckpt_last.pt")
    trainer.close()
    groups = trainer.optimizer.param_groups
    assert [group["betas"] for group in groups] == [(0.9, 0.95)] * 2
    assert sorted(group["weight_decay"] for group in groups) == [0.0, 0.2]


def test_evaluation_builds_no_autograd_graph(data, tmp_path):
    """Every forward of an evaluation runs with autograd off (no graph kept: the memory of a training
    step for nothing).

    Kills: @torch.no_grad() removed from `run_eval.Evaluation.losses`.
    """
    trainer = make_trainer(data, tmp_path, max_iters=1)
    trainer.close()
    grad_enabled = []
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.register_forward_pre_hook(lambda module, args: grad_enabled.append(torch.is_grad_enabled()))
    losses = trainer.evaluate()
    assert set(losses) == {"train", "val"} and grad_enabled and not any(grad_enabled)


def test_an_auto_cpu_matmul_run_picks_a_backend_and_records_it(data, tmp_path):
    """cpu_matmul = "auto" on a new run: one of the two backends is measured and chosen, and the
    checkpoint records which, for a resume to keep.

    Kills: the probe's shape computed wrongly (`batch_size * block_size` -> `/`).
    """
    trainer = make_trainer(data, tmp_path, cpu_matmul="auto", max_iters=1, eval_interval=100)
    assert trainer.cpu_matmul.backend in ("blas", "onednn")
    trainer.fit()
    saved = load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["train_state"]["cpu_matmul"]
    assert saved == trainer.cpu_matmul.backend


def test_an_evaluation_that_only_equals_the_best_is_no_improvement(data, tmp_path):
    """Every step's gradients are made inf, so every step is skipped and every evaluation gives the very
    same val loss: with min_delta 0, an equal loss is not an improvement, so patience 1 stops the run
    at the second evaluation.

    Kills: `val_loss < best_val_loss` -> `<=` (equal losses would count as improvements forever).
    """
    trainer = make_trainer(data, tmp_path, max_iters=8, eval_interval=2, log_interval=8, early_stopping=True,
                           early_stopping_patience=1)
    weight = trainer.accelerator.unwrap_model(trainer.model).transformer.h[0].mlp.c_fc.weight
    weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    summary = trainer.fit()
    records = json.loads((tmp_path / "ckpt" / "train_log.json").read_text())["records"]
    assert [r["val_loss"] for r in records] == [records[0]["val_loss"]] * 2  # nothing trained: equal losses
    assert (summary["stop_reason"], summary["iters"]) == ("early_stopping", 2)


def test_each_evaluation_shows_a_seeded_sample_of_the_model_it_evaluated(data, tmp_path, capsys):
    """The sample under the last evaluation line is what `tinylm generate` draws from the checkpoint saved
    at that evaluation, with the run's seed; it is kept in train_log.json; and sampling leaves training
    alone (with dropout on, so a disturbed random state or a model left in eval mode would show): a run
    without samples has the same losses, bit for bit."""
    from tinylm import checkpoint, sampler
    from tinylm.config import Sampling

    def fit(folder: Path, **training) -> Trainer:
        config = write_config(folder / "run.toml", data, folder / "ckpt", model={"dropout": 0.1},
                              training={"max_iters": 4, "eval_interval": 2, **training})
        trainer = Trainer(load_config(config))
        trainer.fit()
        return trainer

    (tmp_path / "sampled").mkdir()
    fit(tmp_path / "sampled", eval_sample_tokens=24, eval_sample_prompt="the king")
    said = capsys.readouterr().out
    out = tmp_path / "sampled" / "ckpt"
    records = json.loads((out / "train_log.json").read_text())["records"]
    payload = checkpoint.load(out / "ckpt_last.pt")  # saved at the last evaluation, iter 4
    expected = "the king" + sampler.complete(checkpoint.model_from(payload), checkpoint.tokenizer_from(payload),
                                             "the king", Sampling(max_new_tokens=24), seed=7)
    assert len(expected) == len("the king") + 24
    assert [record["iter"] for record in records] == [0, 2, 4]
    assert records[-1]["sample"] == expected
    assert records[0]["sample"] != expected  # the untrained model at iter 0 writes something else
    shown = "\n".join(f"  > {line}" for line in expected.split("\n"))
    assert re.search(r"^eval iter 4: .*\n" + re.escape(shown) + "$", said, re.M), said

    (tmp_path / "plain").mkdir()
    plain = fit(tmp_path / "plain")
    assert "sample" not in plain.state.records[-1] and "  > " not in capsys.readouterr().out
    assert [(r["train_loss"], r["val_loss"]) for r in plain.state.records] == \
        [(r["train_loss"], r["val_loss"]) for r in records]


def test_the_banner_counts_every_process_in_the_global_batch(data):
    """Kills: the global batch divided by the processes instead of multiplied (one process cannot tell)."""
    from tinylm import run_report
    from tinylm.data import resolve
    from tinylm.model import build_model, gpt2_config

    config = load_config(write_config(data / "run.toml", data, data / "unused"))
    prepared = resolve(str(data), "bin", "char")
    model = build_model(gpt2_config(config.model, prepared.vocab_size))
    text = run_report.banner(config, model, prepared, 1000, 100, device="cpu", precision="fp32", world_size=2,
                             speed=[], memory="about 1 GiB")
    # TINY: batch_size 4, no accumulation, block 16; two processes.
    assert "effective_batch_size = batch_size * grad_accum_steps = 4 * 1 = 4 | global batch = 8 | " \
           "tokens per optimizer step = 128" in text.splitlines()
    assert "processes (world size): 2" in text


def test_the_closing_speed_is_tokens_over_seconds_and_mfu_over_the_peak():
    from tinylm import run_report

    summary = {"elapsed_s": 2.0, "tokens_seen": 1000}
    assert run_report.speed(summary, 1e6, None) == " in 2.0 s (500 tokens/s)"
    assert run_report.speed(summary, 1e6, 2e9) == " in 2.0 s (500 tokens/s, MFU 25.0%)"  # 5e8 of 2e9 FLOP/s
    assert run_report.speed({"elapsed_s": 0.0, "tokens_seen": 0}, 1e6, None) == ""


@pytest.mark.parametrize("tokens, is_main, engine, wanted", [
    (100, True, "NO", True), (100, True, "MULTI_CPU", True), (100, False, "MULTI_CPU", False),
    (0, True, "NO", False), (100, True, "FSDP", False),
])
def test_samples_are_drawn_by_the_main_process_only_and_never_under_fsdp(tokens, is_main, engine, wanted):
    from accelerate.utils import DistributedType

    from tinylm import run_report

    assert run_report.samples_here(tokens, is_main, DistributedType[engine]) is wanted


def test_the_resume_command_launches_as_many_processes_as_the_run_had():
    """One process: tinylm train; several on one machine: accelerate launch (in CPU mode for gloo);
    several machines: the run's own launch command on each. The device is "cpu" on any count.

    Kills: the process-count and CPU-mode conditions inverted; the device shown as accelerate names it."""
    from accelerate.utils import DistributedType

    from tinylm.run_report import device_name, resume_command

    ckpt = Path("my runs") / "ckpt_last.pt"
    assert resume_command(ckpt, 1, DistributedType.NO, 1) == "tinylm train --resume 'my runs/ckpt_last.pt'"
    assert resume_command(ckpt, 2, DistributedType.MULTI_CPU, 2) == (
        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tinylm/train.py "
        "--resume 'my runs/ckpt_last.pt'")
    assert resume_command(ckpt, 8, DistributedType.MULTI_GPU, 8) == (
        "accelerate launch --multi_gpu --num_processes 8 tinylm/train.py --resume 'my runs/ckpt_last.pt'")
    assert resume_command(ckpt, 8, DistributedType.MULTI_GPU, 4).startswith(
        "on each machine, this run's accelerate launch command with tinylm/train.py --resume")
    assert (device_name(torch.device("cpu", 0)), device_name(torch.device("cuda", 1))) == ("cpu", "cuda:1")


def test_a_validation_loss_that_is_not_finite_stops_the_run_and_saves_nothing_over_the_last_checkpoint(data, tmp_path):
    """The second evaluation's forwards return nan logits: the run stops with one line naming the step,
    and ckpt_last.pt and train_log.json still hold the first evaluation's run.

    Kills: the finite check skipped (the nan evaluation saved over the good checkpoint).
    """
    trainer = make_trainer(data, tmp_path, max_iters=4, eval_interval=2, log_interval=2)
    model = trainer.accelerator.unwrap_model(trainer.model)
    evaluations = []
    model.register_forward_pre_hook(lambda module, args: evaluations.append(module.training))
    model.register_forward_hook(
        lambda module, args, output: output.__class__(logits=torch.full_like(output.logits, math.nan))
        if not module.training and evaluations.count(False) > 2 * trainer.config.training.eval_iters else None)
    with pytest.raises(UserError, match=r"^validation loss is nan at iter 2; nothing was saved over the last good "
                                        r"checkpoint in .*ckpt\. Lower training.learning_rate"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["iter"] == 0
    assert [record["iter"] for record in json.loads((tmp_path / "ckpt" / "train_log.json").read_text())["records"]] == [0]
