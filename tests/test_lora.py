"""LoRA fine-tuning (`[lora]`, through peft): only the adapters train, the base stays bit for bit, a resume is
bit-exact, the merged export loads without peft and gives the adapted model's logits, the adapter export loads
with peft on the base, and generate/eval/demo read LoRA checkpoints.

The base is a tiny GPT-2 trained here with plain torch on one text (`pretrain`), fine-tuned on another: the
same words in a fixed cyclic order, something the base has not learned. Real peft, real transformers.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import BLOCK, pretrain
from test_loop_guards import assert_same_files, fit
from training_helpers import (
    TRAIN_SCRIPT, WORDS, estimate_and_step_peak, load_checkpoint, losses, make_corpus, run, train_here, write_toml,
)
from transformers import GPT2LMHeadModel

from tinylm import checkpoint, compat, evaluate, export, lora, paths, prepare, sampler
from tinylm.config import LoraConfig, Sampling, load_config
from tinylm.errors import UserError, run_cli
from tinylm.model import flops_per_token
from tinylm.trainer import Trainer

peft = pytest.importorskip("peft", reason="the lora extra is not installed: pip install -e '.[lora]'")



# One intra-op thread for the module's fixtures too: on a busy 2-core machine, pretraining the base took 30 s
# with two.
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")

ADAPTERS = {"enabled": True, "r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["c_attn", "c_proj", "c_fc"]}
STEPS = 24
LORA_LR, FULL_LR = 1e-2, 1e-3  # LoRA's adapters start at zero and take a larger rate, as usual


def cyclic_text(path: Path, chars: int = 20_000, seed: int = 1) -> Path:
    """Speeches whose words follow WORDS' order, each from a random start: a rule the base never saw."""
    rng, lines = random.Random(seed), []
    while sum(map(len, lines)) < chars:
        start, count = rng.randrange(len(WORDS)), rng.randint(4, 14)
        speech = " ".join(WORDS[(start + i) % len(WORDS)] for i in range(count))
        lines.append(f"{rng.choice(['HAMLET', 'HORATIO', 'OPHELIA', 'KING'])}:\n{speech.capitalize()}.\n\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A pretrained base (folder `base`) and the cyclic text prepared with its tokenizer (folder `data`)."""
    root = tmp_path_factory.mktemp("lora")
    pretrain(root / "base", make_corpus(root / "corpus.txt"), vocab_size=300, seed=0, steps=100)
    assert prepare.main(["--input", str(cyclic_text(root / "cyclic.txt")), "--tokenizer", "pretrained",
                         "--from", str(root / "base"), "--out", str(root / "data")]) == 0
    return root


def write_run(folder: Path, world: Path, *, adapters: dict | None = ADAPTERS, **training) -> Path:
    """A fine-tuning config of the base on the cyclic text, with LoRA `adapters` (None: a full fine-tune)."""
    folder.mkdir(parents=True, exist_ok=True)
    sections = {
        "model": {"init_from": str(world / "base"), "block_size": BLOCK},
        "data": {"processed_dir": str(world / "data"), "tokenizer": "pretrained"},
        "training": {"device": "cpu", "batch_size": 4, "max_iters": STEPS, "eval_interval": 8, "eval_iters": 2,
                     "log_interval": 4, "learning_rate": LORA_LR, "min_lr": LORA_LR / 10, "warmup_iters": 2,
                     "lr_decay_iters": STEPS, "seed": 7, "eval_sample_tokens": 0, "cpu_matmul": "blas",
                     "out_dir": str(folder / "ckpt"), **training},
        **({"lora": adapters} if adapters else {}),
    }
    return write_toml(folder / "run.toml", sections)


def fit_quietly(config: Path) -> tuple[Trainer, str]:
    """An in-process run of `config`, and what it printed (the warnings it raised too)."""
    from tinylm.compat import reset_accelerate_state

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        trainer = Trainer(load_config(config))
        trainer.fit()
    reset_accelerate_state()
    return trainer, printed.getvalue() + "".join(f"warning: {warning.message}\n" for warning in raised)


@pytest.fixture(scope="module")
def lora_run(world, tmp_path_factory):
    """(trainer, printed output, checkpoint folder) of a LoRA fine-tune, samples at each evaluation."""
    folder = tmp_path_factory.mktemp("lora-run")
    trainer, printed = fit_quietly(write_run(folder, world, eval_sample_tokens=8))
    return trainer, printed, folder / "ckpt"


def base_weights(world: Path) -> dict[str, torch.Tensor]:
    """The pretrained model's weights as its folder holds them, the position table cropped to the run's BLOCK."""
    weights = GPT2LMHeadModel.from_pretrained(world / "base").state_dict()
    return {**weights, "transformer.wpe.weight": weights["transformer.wpe.weight"][:BLOCK]}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def val_ids(world: Path) -> torch.Tensor:
    """Two blocks of the cyclic text's val split, read from val.bin."""
    tokens = np.fromfile(world / "data" / "val.bin", dtype="<u2").astype(np.int64)
    return torch.from_numpy(tokens[: 2 * BLOCK]).view(2, BLOCK)


# --- only the adapters train ------------------------------------------------------------------------------


def test_only_the_adapters_train_and_the_base_stays_bit_identical(world, lora_run):
    """The optimizer holds the adapters' A and B matrices and nothing else; the base weights, in the trained
    model and in the checkpoint, are the pretrained folder's to the bit; the adapters did train.

    Kills: "lora: base weights in the optimizer", "lora: base weights not frozen".
    """
    trainer, _, ckpt = lora_run
    model = trainer.accelerator.unwrap_model(trainer.model)
    named = dict(model.named_parameters())
    adapters = {name for name in named if ".lora_A." in name or ".lora_B." in name}
    assert len(adapters) == 2 * 2 * 4  # A and B, two layers, four layers adapted each (c_proj twice)
    in_optimizer = {id(param) for group in trainer.optimizer.param_groups for param in group["params"]}
    assert in_optimizer == {id(named[name]) for name in adapters}
    assert {name for name, param in named.items() if param.requires_grad} == adapters
    assert all(param.grad is None for name, param in named.items() if name not in adapters)

    expected = base_weights(world)
    live = lora.gpt2_of(model).state_dict()  # peft keeps an adapted layer's own weights in its base_layer
    for name, weight in expected.items():
        assert torch.equal(live[re.sub(r"\.(c_attn|c_proj|c_fc)\.", r".\1.base_layer.", name)], weight), name
    saved = load_checkpoint(ckpt / paths.LAST_NAME)
    assert set(saved["model"]) == set(expected)
    assert all(torch.equal(saved["model"][name], weight) for name, weight in expected.items())
    trained_b = [weight for name, weight in saved["adapter"].items() if ".lora_B." in name]
    assert len(trained_b) == 8 and all(weight.abs().max() > 1e-3 for weight in trained_b)  # B starts at zero


def test_the_banner_says_how_many_parameters_train_of_how_many(world, lora_run):
    """Counted here: the base's parameters (the tied embedding once, the position table cropped), and r x (in +
    out) per adapted layer: c_attn 32 -> 96, attention's c_proj 32 -> 32, c_fc 32 -> 128, the MLP's c_proj 128 -> 32.
    `lora.trainable_parameters`, the count a memory estimate takes before any model exists, agrees."""
    _, printed, _ = lora_run
    base = sum(weight.numel() for name, weight in base_weights(world).items() if name != "lm_head.weight")
    adapters = 2 * 8 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert adapters == lora.trainable_parameters(LoraConfig(**ADAPTERS), n_layer=2, n_embd=32)
    line = next(line for line in printed.splitlines() if line.startswith("lora:"))
    assert line == (f"lora: {adapters:,} of the {base + adapters:,} parameters train "
                    f"({adapters / (base + adapters):.2%}): adapters of rank 8 (lora_alpha 16) on c_attn, c_proj, "
                    "c_fc; the pretrained weights stay frozen")
    assert "warn" not in printed.lower()  # peft's and transformers' deprecations (evaluation samples included)


def test_the_evaluations_samples_run_the_adapters(world, lora_run):
    """The sample under each evaluation is the adapted model's (the lean decoder runs the adapted layers)."""
    trainer, _, ckpt = lora_run
    adapted = checkpoint.trained_model(load_checkpoint(ckpt / paths.LAST_NAME))
    greedy = sampler.complete(lora.gpt2_of(adapted), trainer.tokenizer, "", Sampling(max_new_tokens=8), seed=7)
    assert trainer.state.records[-1]["sample"] == greedy


def test_flops_per_token_counts_no_weight_gradients_for_frozen_weights(lora_run):
    """6 FLOPs per token per trained weight, 4 per frozen one (forward and the backward through it), and
    attention's 12 x layers x width x context; the position table is looked up, not multiplied."""
    trainer, _, _ = lora_run
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapters = lora.trainable_parameters(LoraConfig(**ADAPTERS), n_layer=2, n_embd=32)
    frozen = sum(param.numel() for param in model.parameters()) - adapters - BLOCK * 32
    assert flops_per_token(model) == 6 * adapters + 4 * frozen + 12 * 2 * 32 * BLOCK


# --- LoRA against full fine-tuning ----------------------------------------------------------------------


def test_lora_comes_near_full_fine_tuning_on_the_same_steps(world, lora_run, tmp_path):
    """On the same 24 steps of the same batches, LoRA (about 8% of the weights train) lowers the val loss by at
    least half as much as a full fine-tune does, from the same start."""
    trainer, _, _ = lora_run
    full, _ = fit_quietly(write_run(tmp_path, world, adapters=None, learning_rate=FULL_LR, min_lr=FULL_LR / 10))
    start, lora_loss = trainer.state.records[0]["val_loss"], trainer.state.records[-1]["val_loss"]
    assert full.state.records[0]["val_loss"] == start
    full_loss = full.state.records[-1]["val_loss"]
    print(f"val loss after {STEPS} steps from {start:.4f}: full fine-tuning {full_loss:.4f}, LoRA {lora_loss:.4f}")
    assert full_loss < start - 0.05
    assert start - lora_loss > 0.5 * (start - full_loss)


def test_a_lora_runs_memory_estimate_is_its_step_peak(world, tmp_path, fresh_accelerate_state):
    """The run's estimate (the banner's, the dry run's) keeps gradients and AdamW moments for the adapters
    only: within 2% of the tensor bytes a real LoRA step holds at its peak, adapters on every layer kind and
    no adapter dropout (docs/small-gpu.md gives the cases it is further from).

    Kills: "memory: a LoRA run estimated as a full fine-tune" (12-30% over in the shapes of docs/small-gpu.md).
    """
    trainer = Trainer(load_config(write_run(tmp_path, world, adapters={**ADAPTERS, "lora_dropout": 0.0},
                                            grad_accum_steps=2)))
    trainer.close()
    found, peak = estimate_and_step_peak(trainer)
    assert found.trainable == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert found.peak == pytest.approx(peak, rel=0.02)


def test_two_processes_train_lora_as_one_process_with_twice_the_batch_under_ddp_and_fsdp(world, tmp_path):
    """LoRA under DDP, two real gloo processes through `accelerate launch`: the same evaluations, to float
    noise, as one process with twice the batch (each rank's adapters start as rank 0's and their gradients
    are all-reduced; the frozen base has none). Under FSDP (tests/fsdp_cpu_train.py: each process holds
    half of every weight, frozen or not, and of the adapters' moments), killed at its last save and
    resumed from iter 4's checkpoint and optimizer shards: DDP's numbers.

    Kills (planted by hand): the gradients never all-reduced (`accumulate` -> `no_sync` in train_step); the
    optimizer shards not loaded on resume.
    """
    from test_multiprocess import FSDP_ON_CPU, fsdp_launch, launch

    adapters = {**ADAPTERS, "lora_dropout": 0.0}  # dropout draws differ by rank
    one = write_run(tmp_path / "one", world, adapters=adapters, max_iters=8, eval_interval=4, batch_size=4,
                    eval_iters=2)
    two = write_run(tmp_path / "two", world, adapters=adapters, max_iters=8, eval_interval=4, batch_size=2,
                    eval_iters=4)
    train_here(one)
    launched = run(launch(TRAIN_SCRIPT, "--config", str(two)), check=True)
    assert "processes (world size): 2" in launched.stdout and "lora: " in launched.stdout
    single, double = losses(tmp_path / "one" / "ckpt"), losses(tmp_path / "two" / "ckpt")
    assert [r[0] for r in single] == [r[0] for r in double] == [0, 4, 8]
    assert single[-1][2] < single[0][2] - 0.01  # the adapters learned something, so unsynced ones would show
    for a, b in zip(single, double):
        assert b[1:] == pytest.approx(a[1:], abs=1e-4)

    fsdp = write_run(tmp_path / "fsdp", world, adapters=adapters, max_iters=8, eval_interval=4, batch_size=2,
                     eval_iters=4)
    killed = run(fsdp_launch(8, "--config", str(fsdp)), env=FSDP_ON_CPU)
    assert killed.returncode != 0 and "DTensor" in killed.stderr, killed.stdout + killed.stderr
    resumed = run(fsdp_launch(0, "--resume", str(tmp_path / "fsdp" / "ckpt" / "ckpt_last.pt")), check=True,
                  env=FSDP_ON_CPU)
    assert "resumed from iter 4" in resumed.stdout and "lora: " in resumed.stdout
    # The same sums as DDP's in another order (sharded norms, reduce-scatter): equal to float rounding.
    for a, b in zip(double, losses(tmp_path / "fsdp" / "ckpt"), strict=True):
        assert b == pytest.approx(a, abs=1e-5)


def test_gradient_checkpointing_with_lora_trains_as_without(world, tmp_path):
    """transformers' activation checkpointing on the peft model: every block checkpointed (the adapters' dropout
    masks drawn again alike), and the same losses to float rounding as the run without it."""
    runs = {}
    for checkpointing in (False, True):
        trainer, _ = fit_quietly(write_run(tmp_path / str(checkpointing), world, max_iters=8, lr_decay_iters=8,
                                           eval_interval=4, gradient_checkpointing=checkpointing))
        blocks = lora.gpt2_of(trainer.accelerator.unwrap_model(trainer.model)).transformer.h
        assert all(block.gradient_checkpointing == checkpointing for block in blocks)
        runs[checkpointing] = [record[split] for record in trainer.state.records for split in ("train_loss", "val_loss")]
    assert runs[True] == pytest.approx(runs[False], abs=1e-5)
    assert runs[False][-1] < runs[False][1] - 0.01  # it trained: the last val loss against the first


# --- checkpoints, resume ----------------------------------------------------------------------------------


def test_a_lora_run_resumes_bit_exactly(world, tmp_path):
    """Interrupted and resumed, a LoRA run (with adapter dropout, so the random state matters) writes the same
    checkpoints, train_log.json and metrics.jsonl as the run that never stopped.

    Kills: "lora: adapters not restored on resume", "lora: adapter optimizer state not restored on resume".
    """
    config = write_run(tmp_path, world, max_iters=12, lr_decay_iters=12, eval_interval=4, log_interval=2)
    fit(config)
    (tmp_path / "ckpt").rename(tmp_path / "reference")
    fit(config, interrupt_at=6)
    assert load_checkpoint(tmp_path / "ckpt" / paths.LAST_NAME)["iter"] == 6
    fit(config, resume=tmp_path / "ckpt" / paths.LAST_NAME)
    assert_same_files(tmp_path / "ckpt", tmp_path / "reference")


@pytest.mark.parametrize("change, message", [
    ({"r": 4}, "lora.r 8 -> 4"),
    ({"target_modules": ["c_attn"]}, "lora.target_modules ['c_attn', 'c_proj', 'c_fc'] -> ['c_attn']"),
    ({"enabled": False, "r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn"]},
     "lora.enabled True -> False"),
])
def test_a_resume_that_changes_the_adapters_is_refused(world, lora_run, tmp_path, change, message,
                                                       fresh_accelerate_state):
    _, _, ckpt = lora_run
    config = load_config(write_run(tmp_path, world, adapters={**ADAPTERS, **change}, max_iters=STEPS + 4,
                                   out_dir=str(ckpt)))
    with pytest.raises(UserError, match=re.escape(f"cannot resume: the config changes the LoRA adapters ({message}")):
        Trainer(config, resume=ckpt / paths.LAST_NAME)


# --- export ---------------------------------------------------------------------------------------------

# Loads the folder with transformers while `import peft` fails, and saves the logits of the ids given.
PLAIN_TRANSFORMERS = """
import sys
sys.modules["peft"] = None  # as if peft were not installed
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[2], weights_only=True)).logits, sys.argv[3])
print(type(model).__name__, sorted(name for name, module in sys.modules.items()
                                   if module is not None and name.split(".")[0] in ("peft", "tinylm")))
"""


def test_the_merged_export_loads_without_peft_and_gives_the_adapted_models_logits(world, lora_run, tmp_path):
    """The default export is a plain GPT-2 folder: in a process where peft cannot be imported, transformers loads
    it and its logits are the adapted model's (the adapters run unmerged, in peft), to float rounding; they are
    far from the base model's, so an export that left the adapters out would fail.

    Kills: "lora: export not merged".
    """
    _, _, ckpt = lora_run
    folder = export.export(ckpt / paths.LAST_NAME, tmp_path / "merged")
    assert not list(folder.glob("adapter_*"))
    ids = val_ids(world)
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, folder, tmp_path / "ids.pt",
                             tmp_path / "logits.pt"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "GPT2LMHeadModel []"
    exported = torch.load(tmp_path / "logits.pt", weights_only=True)
    adapted = logits(checkpoint.trained_model(load_checkpoint(ckpt / paths.LAST_NAME)), ids)
    torch.testing.assert_close(exported, adapted, rtol=0, atol=1e-5)
    base = logits(GPT2LMHeadModel.from_pretrained(world / "base"), ids)
    assert (exported - base).abs().max() > 0.1


def test_merging_leaves_the_loaded_checkpoint_as_it_was(world, lora_run):
    """The merged model shares no tensor the merge changes with the loaded payload: export builds it and then,
    for --adapter, the adapted model from the same payload, which must still hold the base the adapters were
    trained on (else the adapters would be added twice).

    Kills: "checkpoint: a LoRA run's adapters merged into the loaded payload's own tensors".
    """
    _, _, ckpt = lora_run
    payload = load_checkpoint(ckpt / paths.LAST_NAME)
    ids = val_ids(world)
    merged = logits(checkpoint.model_from(payload), ids)
    torch.testing.assert_close(logits(checkpoint.trained_model(payload), ids), merged, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings(f"ignore:{compat.PEFT_CHECKPOINTING_WARNING}:FutureWarning")  # the test's own peft call
def test_the_adapter_export_loads_with_peft_on_the_base(world, lora_run, tmp_path, capsys):
    """`--adapter` writes peft's adapter folder: `PeftModel.from_pretrained` on the pretrained folder gives the
    checkpoint's adapted model's logits; the folder holds no model of its own and no local path."""
    _, _, ckpt = lora_run
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # peft's and transformers' warnings would be printed to the user
        assert run_cli(export.main, ["--checkpoint", str(ckpt / paths.LAST_NAME), "--out", str(tmp_path / "adapter"),
                                     "--adapter"]) == 0
    assert "load it with PeftModel.from_pretrained(base_model, " in capsys.readouterr().out
    folder = tmp_path / "adapter"
    assert {path.name for path in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                        "tokenizer.json", "tokenizer_config.json", "README.md"}
    assert not (folder / "config.json").exists() and not (folder / "model.safetensors").exists()
    settings = json.loads((folder / "adapter_config.json").read_text())
    assert (settings["r"], settings["lora_alpha"], sorted(settings["target_modules"])) == (8, 16, ["c_attn", "c_fc",
                                                                                                  "c_proj"])
    assert settings["base_model_name_or_path"] is None  # a local folder is never named
    assert not [path.name for path in folder.iterdir() if str(world) in path.read_text(errors="replace")]
    loaded = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(world / "base"), folder).eval()
    ids = val_ids(world)
    adapted = logits(checkpoint.trained_model(load_checkpoint(ckpt / paths.LAST_NAME)), ids)
    torch.testing.assert_close(logits(loaded, ids), adapted, rtol=0, atol=1e-6)
    card = (folder / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained(base" in card


@pytest.mark.parametrize("flags, message", [
    (["--adapter"], "--adapter: {full} is not a LoRA run's checkpoint (its config has no [lora] enabled), so it "
                    "has no adapters; export it without --adapter"),
    (["--adapter", "--onnx"], "--onnx writes a whole model and --adapter only the LoRA adapters: drop one (without "
                              "--adapter, the model is exported with its adapters merged)"),
])
def test_adapter_export_refusals_are_one_line(lora_run, tmp_path, capsys, flags, message):
    """--adapter of a full fine-tune's checkpoint (here the LoRA run's, merged and saved as a full run's would be),
    and --adapter with --onnx."""
    _, _, ckpt = lora_run
    payload = load_checkpoint(ckpt / paths.LAST_NAME)
    full = {key: value for key, value in payload.items() if key not in ("format", "version", "adapter")}
    checkpoint.save(tmp_path / "full.pt", {**full, "model": checkpoint.model_from(payload).state_dict(),
                                           "config": {**payload["config"], "lora": {}}})
    argv = ["--checkpoint", str(tmp_path / "full.pt"), "--out", str(tmp_path / "out"), *flags]
    assert run_cli(export.main, argv) == 2
    assert capsys.readouterr().err == f"error: {message.format(full=tmp_path / 'full.pt')}\n"
    assert not (tmp_path / "out").exists()


# --- generate, eval, demo -------------------------------------------------------------------------------


def test_eval_of_a_lora_checkpoint_gives_the_runs_own_val_loss(world, lora_run, capsys):
    """`tinylm eval --blocks training` scores the run's val blocks with the merged model: the val loss the run
    logged with its adapters unmerged, to float rounding."""
    trainer, _, ckpt = lora_run
    assert evaluate.main(["--checkpoint", str(ckpt / paths.LAST_NAME), "--data", str(world / "data"),
                          "--blocks", "training", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["loss"] == pytest.approx(trainer.state.records[-1]["val_loss"], abs=1e-5)


def test_generate_and_the_demo_read_a_lora_checkpoint(world, lora_run, capsys):
    """`tinylm generate --checkpoint` samples from the adapted model (greedy: the adapted model's text), and the
    demo loads the same plain GPT-2."""
    from tinylm import demo, generate

    _, _, ckpt = lora_run
    adapted = checkpoint.trained_model(load_checkpoint(ckpt / paths.LAST_NAME))
    tokenizer = checkpoint.tokenizer_from(load_checkpoint(ckpt / paths.LAST_NAME))
    prompt = "KING:\nThe king"
    expected = sampler.complete(lora.gpt2_of(adapted), tokenizer, prompt, Sampling(max_new_tokens=20, temperature=0))
    base, _ = sampler.load_model(str(world / "base"))
    assert expected != sampler.complete(base, tokenizer, prompt, Sampling(max_new_tokens=20, temperature=0))
    assert generate.main(["--checkpoint", str(ckpt / paths.LAST_NAME), "--prompt", prompt, "--max-new-tokens", "20",
                          "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + expected + "\n"
    model, _ = generate.load_chosen_model(demo.parse_args(["--checkpoint", str(ckpt / paths.LAST_NAME)]), "cpu")
    assert type(model) is GPT2LMHeadModel
    torch.testing.assert_close(logits(model, val_ids(world)), logits(adapted, val_ids(world)), rtol=0, atol=1e-5)


# --- without peft ---------------------------------------------------------------------------------------


def test_without_peft_a_lora_run_and_a_lora_checkpoint_say_how_to_install_it(world, lora_run, tmp_path,
                                                                            monkeypatch):
    """A LoRA run stops before any work, and a LoRA checkpoint's model cannot be built: one line each, naming
    the extra to install. A plain fine-tune's checkpoint needs no peft."""
    _, _, ckpt = lora_run
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(UserError, match=re.escape("LoRA fine-tuning (lora.enabled) needs the peft package, which "
                                                  "is not installed: pip install 'tinylm[lora]'")):
        Trainer(load_config(write_run(tmp_path / "run", world)))
    assert not (tmp_path / "run" / "ckpt").exists()
    with pytest.raises(UserError, match=re.escape("a checkpoint of a LoRA run needs the peft package")):
        checkpoint.model_from(load_checkpoint(ckpt / paths.LAST_NAME))
