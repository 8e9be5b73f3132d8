"""The speed settings: CPU matmul backend, torch.compile, batch prefetching, MFU arithmetic.

Speed itself is measured by benchmarks/, never asserted here; these tests check that each
setting computes the same thing as the plain path and is chosen as documented.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
from training_helpers import REPO, benchmark_script, load_checkpoint, make_trainer, read_log, train, write_config

from tinylm import checkpoint, data
from tinylm.compat import reset_accelerate_state
from tinylm.config import ModelConfig
from tinylm import hardware
from tinylm.hardware import CpuMatmul, choose_cpu_matmul, onednn_is_exact, peak_flops, reliably_faster, use_compile
from tinylm.model import build_model, count_parameters, flops_per_token, gpt2_config
from tinylm.config import load_config
from tinylm.progress import Progress
from tinylm.trainer import Trainer


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_each_step_trains_on_its_own_batches_though_they_are_fetched_a_step_ahead(prepared, tmp_path):
    trainer = make_trainer(prepared, tmp_path, grad_accum_steps=2)
    seen = []
    wte = trainer.accelerator.unwrap_model(trainer.model).transformer.wte
    wte.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    for step in range(3):
        trainer.train_step(step)
    stream = trainer.train_tokens
    expected = [data.train_batch(stream, block_size=16, batch_size=4, seed=7, step=step, slot=slot)[:, :-1]
                for step in range(3) for slot in range(2)]
    assert len(seen) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_the_onednn_matmul_path_trains_like_the_default_one(prepared, tmp_path):
    if not onednn_is_exact():  # a CPU with AMX: oneDNN would round to bf16, so "auto" must not pick it
        assert choose_cpu_matmul("auto", mlp_step(128, 768), 768).backend == "blas"
        return
    losses = {}
    for backend in ("blas", "onednn"):
        (tmp_path / backend).mkdir()
        trainer = make_trainer(prepared, tmp_path / backend, cpu_matmul=backend)
        assert trainer.cpu_matmul.backend == backend
        losses[backend] = torch.stack([trainer.train_step(step) for step in range(8)])
        reset_accelerate_state()
    # The same arithmetic in another order: equal to fp32 rounding, not bitwise.
    assert torch.allclose(losses["blas"], losses["onednn"], rtol=0, atol=1e-4)
    assert losses["blas"][-1] < losses["blas"][0] - 0.3


def test_the_matmul_setting_is_scoped_to_training_steps():
    torch.backends.mkldnn.matmul.fp32_precision = before = "none"  # PyTorch's default
    with CpuMatmul("onednn").active():
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    with CpuMatmul("blas").active():
        assert torch.backends.mkldnn.matmul.fp32_precision == before
    assert choose_cpu_matmul("blas", mlp_step(128, 768), 768).backend == "blas"


def mlp_step(width: int, rows: int):
    """A forward+backward of one MLP-sized matmul over the first n of `rows` rows, as `choose_cpu_matmul`
    times a model's over the first n blocks of a batch."""
    weight = torch.randn(width, 4 * width, requires_grad=True)
    inputs = torch.randn(rows, width)
    return lambda n: (inputs[:n] @ weight).sum().backward()


@pytest.mark.parametrize("speedups, onednn", [
    ([1.3, 1.2, 1.25], True),
    ([1.15, 1.15, 1.15], True),  # the bound itself
    ([1.14, 1.14, 1.2], False),  # the median just short of it
    ([1.5, 0.95, 1.5, 1.5, 1.5], False),  # one round slower: not reliably faster
    ([1.5, 1.0, 1.5], False),  # one round no faster
    ([1.05, 0.97, 1.02, 0.99, 1.01], False),  # within noise: the default BLAS, every time
])
def test_onednn_is_chosen_only_when_every_round_says_it_is_faster(speedups, onednn):
    assert reliably_faster(speedups) is onednn


def test_the_backend_probe_leaves_the_random_generators_where_they_were():
    """The timing runs the model with dropout: the draws it makes must not shift the run's.

    Kills: the probe outside torch.random.fork_rng.
    """
    dropout = torch.nn.Dropout(0.5)
    weight = torch.randn(64, 256, requires_grad=True)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    choose_cpu_matmul("auto", lambda rows: dropout(torch.ones(rows, 64) @ weight).sum().backward(), 128)
    assert torch.equal(torch.rand(4), expected)


def test_a_step_too_slow_to_time_within_the_budget_keeps_the_default_blas(monkeypatch):
    """Fewer than three rounds fit in the probe's budget: not measured, the default BLAS, and the line says so."""
    monkeypatch.setattr(hardware, "PROBE_BUDGET_S", 0.5)  # warm-up steps of 0.1 s: 3 rounds of two need 0.6 s
    calls = []
    chosen = choose_cpu_matmul("auto", lambda rows: calls.append(time.sleep(0.1)), 8)
    if not onednn_is_exact():  # a CPU with AMX: nothing is timed, oneDNN would round to bf16
        assert chosen.backend == "blas" and not calls
        return
    assert chosen.backend == "blas" and "too slow to time" in chosen.note and len(calls) == 3


def test_a_slow_first_call_is_taken_for_warm_up_not_for_the_steps_time(monkeypatch):
    """Each backend's first forward+backward is slow (warm-up), the later ones fast: the probe times the steps
    instead of giving up as too slow, as it did here for configs/base.toml's model on a quiet machine.

    Kills: the block's time taken from the first (cold) calls only.
    """
    monkeypatch.setattr(hardware, "PROBE_BUDGET_S", 0.5)  # cold calls of 0.1 s: 3 rounds of two would need 0.6 s
    warm = set()

    def step(rows):
        backend = torch.backends.mkldnn.matmul.fp32_precision  # which one CpuMatmul made active
        time.sleep(0.001 if backend in warm else 0.1)
        warm.add(backend)

    chosen = choose_cpu_matmul("auto", step, 8)
    if onednn_is_exact():  # (with AMX, nothing is timed)
        assert "too slow to time" not in chosen.note and "x on this model's step" in chosen.note, chosen.note


def test_an_auto_run_trains_exactly_as_a_run_naming_the_backend_it_chose(prepared, tmp_path):
    """"auto" times the model's forward and backward (with dropout) before the first step: the run then
    trains bit for bit as one that named the chosen backend, so timing leaves no gradient and no draw behind.

    Kills: the probe's gradients left in the model; the probe outside torch.random.fork_rng.
    """
    losses, backends = {}, {}
    for name in ("auto", "named"):
        setting = "auto" if name == "auto" else backends["auto"]
        config = load_config(write_config(tmp_path / f"{name}.toml", prepared, tmp_path / name,
                                          model={"dropout": 0.2}, training={"cpu_matmul": setting}))
        trainer = Trainer(config)
        backends[name] = trainer.cpu_matmul.backend
        losses[name] = torch.stack([trainer.train_step(step) for step in range(4)])
        trainer.close()
        reset_accelerate_state()
    assert backends["auto"] == backends["named"]
    assert torch.equal(losses["auto"], losses["named"])


def test_compile_is_on_by_default_on_cuda_only():
    assert use_compile("auto", "cuda") and not use_compile("auto", "cpu")
    assert use_compile("on", "cpu") and not use_compile("off", "cuda")


def test_a_compiled_run_trains_and_saves_plain_transformers_weights(prepared, tmp_path):
    """With activation checkpointing too, which docs/small-gpu.md says works with torch.compile."""
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt",
                          training={"compile": "on", "max_iters": 4, "eval_interval": 4,
                                    "gradient_checkpointing": True})
    result = train(config)
    assert "torch.compile" in result.stdout and "gradient checkpointing on" in result.stdout
    records = read_log(tmp_path / "ckpt")["records"]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    payload = load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")
    assert not any("_orig_mod" in key for key in payload["model"])  # no torch.compile wrapper in the names
    checkpoint.model_from(checkpoint.load(tmp_path / "ckpt" / "ckpt_last.pt"))


def test_flops_per_token_is_six_n_plus_attention():
    model = build_model(gpt2_config(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16), 50))
    weights = count_parameters(model) - 16 * 32  # without the position table
    assert flops_per_token(model) == 6 * weights + 12 * 2 * 32 * 16


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "fp16", 756e12),
    ("NVIDIA A100-SXM4-40GB", "fp32", 156e12),
    ("NVIDIA GeForce RTX 4060 Laptop GPU", "fp16", 30.2e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A10", "bf16", 125e12),
    ("NVIDIA A10G", "bf16", None),  # not an A10: unknown rather than wrong
    ("NVIDIA L40S", "bf16", None),
    ("Some Future GPU", "bf16", None),
])
def test_peak_flops_come_from_the_device_name_and_precision(name, precision, peak):
    assert peak_flops(name, precision) == peak
    assert peak_flops(name, precision, 4) == (None if peak is None else 4 * peak)  # four GPUs, four peaks


def test_a_resumed_auto_run_keeps_the_matmul_backend_it_started_with(prepared, tmp_path):
    # The first run's backend is forced the other way from what "auto" would pick on a fresh start,
    # so a resume that re-measured instead of keeping it would say so.
    fresh = choose_cpu_matmul("auto", mlp_step(32, 64), 64).backend
    started_with = "blas" if fresh == "onednn" else "onednn"
    first = write_config(tmp_path / "first.toml", prepared, tmp_path / "ckpt",
                         training={"cpu_matmul": started_with, "max_iters": 4})
    train(first)
    resumed = write_config(tmp_path / "resumed.toml", prepared, tmp_path / "ckpt",
                           training={"max_iters": 8, "cpu_matmul": "auto"})
    result = train(resumed, "--resume")
    assert f"{started_with} matmuls, as the run being resumed" in result.stdout
    assert load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["train_state"]["cpu_matmul"] == started_with


def test_the_reported_mfu_is_the_reported_throughput_over_the_peak(capsys):
    progress = Progress(total=8, start=0, tokens_per_step=1000, enabled=True, flops_per_token=2e6, peak_flops=1e12)
    for _ in range(2):
        for _ in range(4):
            progress.step()
        time.sleep(0.05)
        progress.log(loss=1.0, lr=1e-3)
    for line in capsys.readouterr().out.splitlines():  # not a terminal here: plain lines
        tokens_per_s = float(re.search(r"([\d,.]+) tok/s", line).group(1).replace(",", ""))
        mfu = float(re.search(r"mfu ([\d.]+)%", line).group(1)) / 100
        assert tokens_per_s > 0 and mfu == pytest.approx(tokens_per_s * 2e6 / 1e12, abs=1e-3)


# nanoGPT's sampling script runs when it is loaded (benchmarks/generate.py starts it as a process).
SCRIPTS = sorted(path.name for path in (REPO / "benchmarks").glob("*.py") if path.name != "nanogpt_sample.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_imports_against_this_tinylm(script):
    """A benchmark that names what tinylm no longer has fails here, not the day someone runs it.

    Kills: benchmarks/train_step.py importing the removed model.next_token_loss."""
    with benchmark_script(script) as names:
        assert names["__file__"].endswith(script)
