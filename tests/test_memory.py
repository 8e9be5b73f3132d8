"""The memory estimate (tinylm/memory.py) against what torch really holds, the check that stops a run
that will not fit, and `tinylm train --dry-run`.

Expectations come from outside the estimate: parameter counts of real transformers models (and the
published sizes of OpenAI's GPT-2s), the bytes of real gradients and AdamW state, accelerate's own
`estimate-memory` table, and the tensor bytes a real training step holds at its peak, counted op by
op (compat.TensorBytes: the CPU's torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys

import pytest
import torch
from accelerate.commands.estimate import estimate_training_usage
from torch.nn.attention import SDPBackend, sdpa_kernel
from training_helpers import REPO, cli_here, estimate_and_step_peak, make_trainer, run, train_here, write_config
from transformers import GPT2Config, GPT2LMHeadModel

from tinylm import memory
from tinylm.compat import TensorBytes, checkpoint_activations
from tinylm.config import ModelConfig, load_config
from tinylm.errors import UserError
from tinylm.model import count_parameters, gpt2_config, optimizer_groups, per_block_loss
from tinylm.pretrained import GPT2_SIZES
from tinylm.pretrained import gpt2_config as pretrained_config
from tinylm.trainer import Trainer

GIB = 2**30


@pytest.mark.parametrize("shape", [
    gpt2_config(ModelConfig(), vocab_size=65),
    gpt2_config(ModelConfig(n_layer=3, n_head=6, n_embd=48, block_size=40), vocab_size=1000),
    GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=24, vocab_size=300, n_inner=80),  # gelu_new, own MLP width
], ids=["base", "wide-vocab", "n_inner"])
def test_the_parameter_count_is_the_models(shape):
    """Kills: the tied output layer counted twice, the position table or a LayerNorm forgotten, n_inner ignored."""
    assert memory.parameter_count(shape) == count_parameters(GPT2LMHeadModel(shape))


def test_openai_gpt2_sizes_are_known_without_the_network(monkeypatch, tmp_path):
    """The published parameter counts of OpenAI's GPT-2s and DistilGPT2, from their shapes alone: no Hub, no
    cache (HF_HUB_OFFLINE with an empty cache would make any download fail)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    published = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                 "gpt2-xl": 1_557_611_200, "distilgpt2": 81_912_576, "openai-community/gpt2-medium": 354_823_168}
    assert {name: memory.parameter_count(pretrained_config(name)) for name in published} == published
    assert pretrained_config("gpt2").activation_function == "gelu_new"
    assert set(published) <= set(GPT2_SIZES)


def test_weights_gradients_and_adamw_state_are_the_bytes_torch_holds(prepared, tmp_path, fresh_accelerate_state,
                                                                    one_torch_thread):
    """A real Trainer's model and fused AdamW after a step; and accelerate's `estimate-memory` table (fp32:
    model, gradients, 2 x Adam) says the same. Kills: moments counted once, gradients for frozen parameters."""
    trainer = make_trainer(prepared, tmp_path, max_iters=2)
    trainer.close()
    model = trainer.accelerator.unwrap_model(trainer.model)
    found = memory.of_run(trainer.config, model.config, device="cpu", precision="fp32", cpu_matmul="blas")
    trainer.train_step(0)
    moments = sum(value.nbytes for state in trainer.optimizer.state.values()
                  for name, value in state.items() if name != "step")
    per_block_loss(trainer.model, trainer.batches.take(1)[0]).mean().backward()
    weights = sum(p.nbytes for p in model.parameters())
    assert (found.weights, found.gradients, found.optimizer) == (
        weights, sum(p.grad.nbytes for p in model.parameters()), moments)
    table = estimate_training_usage(weights, "float32")
    assert (found.weights, found.gradients, found.optimizer) == (table["model"], table["gradients"], table["optimizer"])
    lora_like = memory.estimate(model.config, dataclasses.replace(found.step, trainable=1000))
    assert (lora_like.weights, lora_like.gradients, lora_like.optimizer) == (weights, 4000, 8000)


def measured_peak(shape: GPT2Config, step: memory.Step, *, math_attention: bool = False) -> int:
    """The tensor bytes of a training step at its peak, tinylm's way (per_block_loss, fused AdamW on
    optimizer_groups, clipping): weights and AdamW state, plus the peak TensorBytes counts in the second
    step (the first makes the AdamW state)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(shape).train()
    if step.gradient_checkpointing:
        checkpoint_activations(model)
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.1), lr=1e-3, fused=True)
    attention = (lambda: sdpa_kernel([SDPBackend.MATH])) if math_attention else contextlib.nullcontext

    def train_step():
        for _ in range(step.grad_accum_steps):
            blocks = torch.randint(0, shape.vocab_size, (step.batch_size, step.block_size + 1))
            with attention():
                (per_block_loss(model, blocks).mean() / step.grad_accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()
    with TensorBytes() as counted:
        train_step()
    held = sum(p.nbytes for p in model.parameters()) + sum(
        value.nbytes for state in optimizer.state.values() for name, value in state.items() if name != "step")
    return held + counted.peak


def shape_of(vocab: int, *, dropout: float = 0.0, activation: str = "gelu") -> GPT2Config:
    return GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=48, vocab_size=vocab, activation_function=activation,
                      resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation="sdpa")


# Each case peaks somewhere else: the loss's backward (a large vocabulary), a block's backward (a small one),
# a block's recomputation (checkpointing), a later micro-batch beside every gradient (accumulation).
CASES = {
    "logits": (shape_of(2000), memory.Step(batch_size=6, block_size=48), False),
    "blocks, math attention": (shape_of(60), memory.Step(batch_size=6, block_size=48, fused_attention=False), True),
    "dropout, checkpointing": (shape_of(60, dropout=0.1), memory.Step(batch_size=6, block_size=48, dropout=0.1,
                                                                      gradient_checkpointing=True,
                                                                      fused_attention=False), False),
    "gelu_new, accumulation": (shape_of(500, activation="gelu_new"),
                               memory.Step(batch_size=4, block_size=48, grad_accum_steps=2), False),
    "gelu_new, checkpointing": (shape_of(500, activation="gelu_new"),
                                memory.Step(batch_size=4, block_size=48, gradient_checkpointing=True), False),
}


@pytest.mark.parametrize("case", CASES)
def test_the_estimate_is_the_tensor_bytes_a_real_step_holds_at_its_peak(case, one_torch_thread):
    """Within 2% (measured 0-1.5% here; CPU, fp32). Kills: the logits counted once, the checkpointed blocks
    counted whole, gelu_new's tensors counted as GELU's, accumulation's gradients left out, the math
    attention's block x block scores left out, the dropout masks left out."""
    shape, step, math_attention = CASES[case]
    found = memory.estimate(shape, step).peak
    assert found == pytest.approx(measured_peak(shape, step, math_attention=math_attention), rel=0.02)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_a_real_runs_estimate_is_its_step_peak(checkpointing, prepared, tmp_path, fresh_accelerate_state,
                                              one_torch_thread):
    """The Trainer's own step (accelerate, clipping, the next step's batches fetched), its config's estimate.
    Kills: training.gradient_checkpointing read but not applied to the model (the step keeps every block)."""
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", model={"n_layer": 3}, training={
        "max_iters": 2, "batch_size": 8, "grad_accum_steps": 2, "gradient_checkpointing": checkpointing})
    trainer = Trainer(load_config(config))  # 3 blocks: checkpointing lowers the peak by a third
    trainer.close()
    found, peak = estimate_and_step_peak(trainer)
    assert found.peak == pytest.approx(peak, rel=0.02)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_an_fsdp_processs_estimate_is_its_step_peak(accumulation, prepared, tmp_path):
    """Two FSDP processes (tests/fsdp_cpu_train.py): each holds half of the weights, gradients and AdamW state,
    and while it computes the whole weights of the root (the embeddings) and of two blocks; accumulating,
    every gradient whole until the last micro-batch. The banner's estimate is, per process, the bytes of its
    weights, its AdamW state and the step's tensors at the peak (by hand: 0.98-1.04 over five shapes, two
    and four processes), where the unsharded one is 1.25-1.96. Kills: the estimate made as for DDP (every
    process holding everything, and the buckets); the gathered weights left out; the accumulated gradients
    counted sharded."""
    from test_multiprocess import FSDP_ON_CPU, fsdp_launch

    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", training={
        "max_iters": 2, "eval_interval": 100, "batch_size": 1, "grad_accum_steps": accumulation, "cpu_matmul": "blas"},
        model={"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 32})  # mostly weights, AdamW state
    result = run(fsdp_launch(0, "--config", str(config)), check=True, env={**FSDP_ON_CPU, "MEASURE_STEP": "1"})
    measured = re.findall(r"^fsdp-memory: (\d) (\d+) (\d+)$", result.stderr, re.MULTILINE)
    assert sorted(rank for rank, *_ in measured) == ["0", "1"], result.stderr
    for _, estimate, peak in measured:
        assert int(estimate) == pytest.approx(int(peak), rel=0.05)
    assert "(estimate per process, 2 FSDP shards: weights " in result.stdout and "DDP buckets" not in result.stdout


@pytest.mark.parametrize(("text", "size"), [("8GB", 8 * GIB), ("7.5GiB", int(7.5 * GIB)), ("6000MB", 6000 * 2**20),
                                            ("12", 12 * GIB), ("0.5g", GIB // 2), (" 512 mib ", 512 * 2**20)])
def test_memory_sizes_read_as_gpu_makers_count(text, size):
    assert memory.parse_size(text) == size


@pytest.mark.parametrize("text", ["eight", "8TB", "0GB", "-1GB", ""])
def test_a_memory_size_that_is_not_one_is_refused(text):
    with pytest.raises(UserError, match="--memory must be a memory size such as 8GB"):
        memory.parse_size(text)


def test_a_run_that_does_not_fit_stops_before_its_first_step_and_loses_nothing(prepared, tmp_path, capsys,
                                                                              snapshot, fresh_accelerate_state):
    """`--memory` below the estimate, over an out_dir holding a run with --overwrite: one error line saying
    how much it needs (the peak the banner of a run that fits prints), by how much it is short and what
    fits, and the old run's files untouched. Kills: the check after --overwrite's clearing; the check
    skipped on the CPU when a limit is given; the shortfall computed the other way round."""
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "ckpt", model={"n_layer": 3},
                          training={"max_iters": 2})
    fits = train_here(config, "--memory", "1GB", capsys=capsys, check=False)
    assert fits.returncode == 0, fits.stderr
    peak_mib = float(re.search(r"^memory: about ([\d.]+) MiB at the peak", fits.stdout, re.M).group(1))
    before = snapshot(tmp_path / "ckpt")
    limit_mib = round(peak_mib * 0.9, 2)
    refused = train_here(config, "--memory", f"{limit_mib}MB", "--overwrite", capsys=capsys, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    (line,) = refused.stderr.splitlines()
    needs, short = (float(x) for x in re.search(
        r"^error: this run needs about ([\d.]+) MiB at its peak \(estimate\) but has the --memory limit of "
        rf"{limit_mib:.2f} MiB: ([\d.]+) MiB short\. What fits: --batch-size \d+ --grad-accum-steps \d+ \(",
        line).groups())
    assert needs == peak_mib and short == pytest.approx(needs - limit_mib, abs=0.011)
    assert "--gradient-checkpointing" in line
    assert snapshot(tmp_path / "ckpt") == before


def test_the_suggested_settings_fit_when_followed():
    """The refusal's 'what fits' is the estimate of each setting: following one gives a run that fits."""
    shape = pretrained_config("gpt2-medium")
    step = memory.Step(batch_size=8, block_size=1024, grad_accum_steps=4, precision="fp32", device="cuda")
    found = memory.estimate(shape, step)
    space = 8 * GIB
    error = memory.refusal(found, torch.device("cpu"), space)
    options = dict(memory.knobs(found, space))
    assert set(options) == {"--batch-size 1 --grad-accum-steps 32", "--gradient-checkpointing", "--precision bf16"}
    assert all(option in str(error) for option in options)
    assert all(peak > space for peak in options.values()), "no single setting is enough for GPT-2 medium in fp32"
    together = memory.estimate(shape, memory.combined(step))
    assert f"all of them together: {memory.human(together.peak)}" in str(error) and together.peak <= space
    assert memory.refusal(together, torch.device("cpu"), space) is None


def dry_run(*args, cwd, env=None):
    return run([sys.executable, str(REPO / "tinylm" / "train.py"), "--dry-run", *args], cwd=cwd,
               env={"PYTHONPATH": str(REPO), **(env or {})})


def test_dry_run_of_a_gpt2_medium_fine_tune_on_an_8gb_gpu_needs_no_gpu_network_or_data(tmp_path, snapshot):
    """The laptop question: the shape comes from the name alone (offline, empty cache), nothing is written
    (no out_dir, no file in the project or the cache), and the flags it suggests fit when followed."""
    (tmp_path / "run.toml").write_text('[model]\ninit_from = "gpt2-medium"\n[data]\ntokenizer = "pretrained"\n'
                                       '[training]\nprecision = "bf16"\nbatch_size = 4\ngrad_accum_steps = 8\n')
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    before = snapshot(tmp_path)
    result = dry_run("--config", "run.toml", "--device", "cuda", "--memory", "8GB", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "gpt2-medium: 24 layers, 16 heads, 1024 wide, vocab 50257" in out
    assert "354.82M parameters" in out and "on cuda in bf16" in out
    advice = re.search(r"does not fit in the --memory limit of 8\.00 GiB: [\d.]+ GiB short\. Not enough alone: "
                       r"(--batch-size 1 --grad-accum-steps 32) \([\d.]+ GiB\), (--gradient-checkpointing) "
                       r"\([\d.]+ GiB\); all of them together: ([\d.]+) GiB \(", out)
    assert advice, out
    followed = dry_run("--config", "run.toml", "--device", "cuda", "--memory", "8GB", *advice.group(1).split(),
                       advice.group(2), cwd=tmp_path, env=env)
    assert re.search(rf"^  peak +{advice.group(3)} GiB", followed.stdout, re.M), followed.stdout + followed.stderr
    assert "fits in the --memory limit of 8.00 GiB, with" in followed.stdout
    assert snapshot(tmp_path) == before and not (tmp_path / "checkpoints").exists()


def test_dry_run_of_an_fsdp_launch_gives_each_processs_share(tmp_path, capsys, monkeypatch):
    """`--dry-run --processes 8 --fsdp` plans a launch of configs/accelerate/fsdp.yaml on eight GPUs: the
    estimate of each process (the one the test above measures on two), not of one process; --processes
    alone is DDP's (the buckets). Outside --dry-run the two flags are refused: a run's processes are
    accelerate launch's. Kills: the flags read but not passed to the estimate."""
    from tinylm.train import main as train_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "run.toml").write_text('[model]\ninit_from = "gpt2"\n[data]\ntokenizer = "pretrained"\n'
                                       '[training]\nprecision = "bf16"\n')
    planned = {}
    for name, flags in (("one", []), ("ddp", ["--processes", "8"]), ("fsdp", ["--processes", "8", "--fsdp"])):
        result = cli_here(train_main, ["--dry-run", "--config", "run.toml", "--device", "cuda", *flags], capsys,
                          check=True, cwd=tmp_path)
        planned[name] = dict(re.findall(r"^  (weights|DDP buckets|gathered|peak) +([\d.]+ \w+)", result.stdout, re.M))
        assert ("one process" if name == "one" else f"each of 8 {name.upper()} processes") in result.stdout
    shape, config = memory.run_shape(load_config(tmp_path / "run.toml"), None)  # gpt2's, offline, as the dry run's
    for name, (processes, fsdp) in {"one": (1, False), "ddp": (8, False), "fsdp": (8, True)}.items():
        expected = memory.of_run(config, shape, device="cuda", precision="bf16", cpu_matmul="blas",
                                 world_size=processes, sharded=fsdp)
        assert planned[name]["peak"] == memory.human(expected.peak)
    assert planned["one"]["weights"] == planned["ddp"]["weights"] == "475 MiB" and planned["fsdp"]["weights"] == "59.3 MiB"
    assert "DDP buckets" in planned["ddp"] and "DDP buckets" not in planned["fsdp"] and "gathered" in planned["fsdp"]
    for flags, needle in ((["--fsdp"], "--fsdp describes a launch to --dry-run"),
                          (["--processes", "2"], "--processes describes a launch to --dry-run"),
                          (["--dry-run", "--fsdp"], "--fsdp shards the model across several processes"),
                          (["--dry-run", "--processes", "0"], "--processes must be 1 or more")):
        result = cli_here(train_main, ["--config", "run.toml", *flags], capsys, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith(f"error: {needle}"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_dry_run_of_a_scratch_run_reads_the_prepared_data_and_writes_nothing(prepared, tmp_path, snapshot):
    """The vocabulary comes from meta.json; without --memory on a CPU there is nothing to compare with."""
    config = write_config(tmp_path / "run.toml", prepared, tmp_path / "never", training={"cpu_matmul": "blas"})
    before, data_before = snapshot(tmp_path), snapshot(prepared)
    result = dry_run("--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    vocab = json.loads((prepared / "meta.json").read_text())["vocab_size"]
    assert f"1 layers, 2 heads, 32 wide, vocab {vocab}" in result.stdout
    assert "no memory size to compare with: pass --memory SIZE" in result.stdout
    assert snapshot(tmp_path) == before and snapshot(prepared) == data_before
    assert not (tmp_path / "never").exists()
