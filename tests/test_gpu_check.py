"""benchmarks/gpu_check.py, the GPU proof, run with --smoke: the same code on the CPU at tiny shapes, so the
script cannot rot while no GPU runs it.

Times and speed ratios are never checked (tests do not assert wall-clock numbers). The report's structure
is, and the facts of part (b): a real fp16 `fit()` through accelerate's loss-scaling path (driven on the CPU
with a real torch GradScaler, as tests/test_precision.py does) with overflows injected on chosen steps.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from training_helpers import REPO, benchmark_script, run

from tinylm.errors import run_cli

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def test_smoke_runs_every_part_and_the_fp16_run_skips_the_overflow_steps_and_halves_the_scale(tmp_path):
    out = tmp_path / "report.json"
    result = run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)])
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] and report["failed"] == [] and list(report["parts"]) == ["a", "b", "c", "d"]
    assert "every part ran, every check held" in result.stdout

    a = report["parts"]["a"]
    assert a["precision"] == "bf16" and a["compiled"] is False  # use_compile("auto", "cpu"): off, for both models
    for side in ("tinylm", "nanogpt"):
        assert a[side]["tokens_per_s"] > 0 and a[side]["mfu"] is None  # a CPU has no peak in PEAK_FLOPS
    assert len(a["ratios"]) >= 3 and a["tokens_per_step"] == a["batch_size"] * a["shape"]["block_size"]

    b = report["parts"]["b"]
    steps = {step["iter"]: step for step in b["steps"]}
    assert sorted(steps) == list(range(b["iters"])) and b["precision"] == "fp16" and b["scaler"] == "GradScaler"
    injected = [steps[i] for i in b["injected"]]
    assert len(injected) == 3 and all(step["injected"] for step in injected)
    for step in injected:
        assert not step["applied"] and not step["weights_moved"]
        assert step["scale_after"] == step["scale_before"] / 2
    applied = [step for step in steps.values() if step["applied"]]
    assert len(applied) == b["iters"] - len(b["skipped"]) and all(step["weights_moved"] for step in applied)
    assert b["scale_end"] == b["scale_start"] / 2 ** len(b["skipped"])
    assert b["val_loss"][1] < b["val_loss"][0] - 0.3
    assert all(b["checks"].values()) and len(b["checks"]) == 7

    c = report["parts"]["c"]
    # 5000 iterations cannot fit in the smoke's few seconds: the budget stops the run, which then evaluates.
    assert c["stop_reason"] == "interrupted" and not c["finished"] and 0 < c["iters"] < c["max_iters"] == 5000
    assert math.isfinite(c["val_loss"]) and c["nanogpt"]["val_loss"] == 1.4697

    d = report["parts"]["d"]["shapes"]
    assert set(d) == {"gpt2-124m", "shakespeare-char"}
    # No GPU peak on the CPU; the estimate is tinylm.memory's for the run on a GPU, GPT-2 124M's the larger.
    assert all(row["peak_bytes"] is None and row["estimate_bytes"] > 0 and row["ratio"] is None for row in d.values())
    assert d["gpt2-124m"]["estimate_bytes"] > d["shakespeare-char"]["estimate_bytes"]


@pytest.fixture
def gpu_check():
    """The script's globals (main, fp16_checks, ...)."""
    with benchmark_script(SCRIPT.name) as script:
        yield script


@pytest.mark.parametrize("argv, message", [
    (["--smoke", "--parts", "a,x"], "--parts 'a,x': expected a comma-separated list of a, b, c, d"),
    (["--smoke", "--budget", "b=10"], "--budget 'b=10': expected PART=SECONDS for parts a, c"),
    (["--smoke", "--budget", "c=-5"], "--budget 'c=-5': expected PART=SECONDS"),
    (["--smoke", "--out", "no/such/folder/report.json"], "--out no/such/folder/report.json: the folder no/such/folder"),
    ([], "no CUDA GPU here (torch.cuda.is_available() is False)"),
])
def test_bad_flags_and_a_machine_without_a_gpu_are_one_line_errors(gpu_check, capsys, argv, message):
    if not argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: gpu_check would run")
    assert run_cli(gpu_check["main"], argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def steps_of_a_good_fp16_run() -> list[dict]:
    """Five steps with an overflow injected at step 2: skipped, nothing moved, the scale halved."""
    steps = [{"iter": i, "injected": i == 2, "scale_before": 1024.0, "scale_after": 1024.0, "applied": True,
              "weights_moved": True} for i in range(5)]
    steps[2].update(scale_after=512.0, applied=False, weights_moved=False)
    for step in steps[3:]:
        step.update(scale_before=512.0, scale_after=512.0)
    return steps


BROKEN = {  # what a broken loss-scaling path would show -> the check that must say so
    "the injected step applied": ({2: {"applied": True, "weights_moved": True}}, "every injected step skipped"),
    "the scale kept": ({2: {"scale_after": 1024.0}}, "the scale halved at each injected step"),
    "the scale quartered": ({2: {"scale_after": 256.0}}, "the scale halved at each injected step"),
    "weights moved on a skipped step": ({2: {"weights_moved": True}}, "no weight moved on a skipped step"),
    "an applied step moved nothing": ({4: {"weights_moved": False}}, "weights moved on every applied step"),
    "an overflow not injected": ({2: {"injected": False}}, "every overflow injected"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_each_fp16_check_fails_on_what_it_is_for(gpu_check, broken):
    """On a GPU nobody watches the steps: the report's checks must turn false on a broken run."""
    records = [{"val_loss": 4.0}, {"val_loss": 3.0}]
    summary = {"stop_reason": "max_iters", "iters": 5}
    good = gpu_check["fp16_checks"](steps_of_a_good_fp16_run(), (2,), records, summary)
    assert all(good.values()) and len(good) == 7
    edits, check = BROKEN[broken]
    steps = steps_of_a_good_fp16_run()
    for index, edit in edits.items():
        steps[index].update(edit)
    result = gpu_check["fp16_checks"](steps, (2,), records, summary)
    assert [name for name, ok in result.items() if not ok] == [check]


def test_the_fp16_checks_fail_when_training_did_not_go_on(gpu_check):
    steps, check = steps_of_a_good_fp16_run(), gpu_check["fp16_checks"]
    records = [{"val_loss": 4.0}, {"val_loss": 3.0}]
    stopped = check(steps, (2,), records, {"stop_reason": "interrupted", "iters": 5})
    assert [name for name, ok in stopped.items() if not ok] == ["training went on to the last step"]
    rose = check(steps, (2,), records[::-1], {"stop_reason": "max_iters", "iters": 5})
    assert [name for name, ok in rose.items() if not ok] == ["the val loss fell"]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                              ("fp32", torch.float32)])
def test_the_reference_step_runs_its_forward_under_autocast_and_scales_fp16_as_nanogpt_does(tmp_path, precision,
                                                                                          dtype):
    """Part (a) compares tinylm with nanoGPT's step at the same precision: a reference left in fp32 would
    make tinylm's bf16 step look several times faster."""
    tokens = tmp_path / "train.bin"
    np.random.default_rng(0).integers(0, 50, 5000, dtype=np.uint16).tofile(tokens)
    with benchmark_script("reference_gpt.py") as reference_gpt:
        step = reference_gpt["NanoGPTStep"](
            str(tokens), np.uint16, 50, n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2,
            learning_rate=1e-2, weight_decay=0.1, betas=(0.9, 0.99), grad_clip=1.0, precision=precision)
    seen = []
    step.model.lm_head.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    before = step.model.lm_head.weight.detach().clone()
    assert torch.isfinite(step())
    assert seen == [dtype] and step.scaler.is_enabled() == (precision == "fp16")
    assert not torch.equal(before, step.model.lm_head.weight)
