"""Fine-tuning a pretrained GPT-2 (`model.init_from`), its tokenizer (`prepare --tokenizer pretrained`),
and models read by Hub id (`generate --model`) from a local Hugging Face cache standing in for the Hub."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import make_corpus, write_toml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from tinylm import data, export, formats, paths, prepare
from tinylm import tokenizer as tok
from tinylm.config import load_config
from tinylm.errors import UserError
from tinylm.trainer import Trainer

CONTEXT = 64  # the pretrained model's n_positions
BLOCK = 32  # the fine-tune's block_size: the position table is cropped to it


def pretrain(folder: Path, corpus: Path, *, vocab_size: int, seed: int, steps: int) -> Path:
    """A small GPT-2 trained with plain torch on `corpus` and saved with save_pretrained, tokenizer included:
    the stand-in for `gpt2`, with a loss well below a fresh model's."""
    text = corpus.read_text()
    tokenizer = tok.train_bpe([text], vocab_size, show_progress=False)
    ids = torch.tensor(tokenizer.encode(text).ids)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)  # GPT-2's own activation, gelu_new
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - CONTEXT - 1, (8,))
        blocks = torch.stack([ids[s : s + CONTEXT + 1] for s in starts])
        loss = model(input_ids=blocks[:, :-1], labels=blocks[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    tok.wrap(tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A corpus, a pretrained model folder, and the corpus prepared with that model's tokenizer."""
    root = tmp_path_factory.mktemp("finetune")
    corpus = make_corpus(root / "corpus.txt")
    base = pretrain(root / "base", corpus, vocab_size=300, seed=0, steps=60)
    assert prepare.main(["--input", str(corpus), "--tokenizer", "pretrained", "--from", str(base),
                         "--out", str(root / "data")]) == 0
    return root


def write_run(path: Path, world: Path, out_dir: Path, *, model: dict | None = None, **training) -> Path:
    """A fine-tuning config: no shape keys (the model's own), block_size BLOCK unless `model` says otherwise."""
    sections = {
        "model": {"init_from": str(world / "base"), "block_size": BLOCK, **(model or {})},
        "data": {"processed_dir": str(world / "data"), "tokenizer": "pretrained"},
        "training": {"device": "cpu", "batch_size": 4, "max_iters": 12, "eval_interval": 4, "eval_iters": 2,
                     "log_interval": 4, "learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": 2,
                     "lr_decay_iters": 12, "seed": 7, "out_dir": str(out_dir), **training},
    }
    return write_toml(path, sections)


def fine_tune(world: Path, folder: Path, **options) -> tuple[Trainer, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(load_config(write_run(folder / "run.toml", world, folder / "ckpt", **options)))
    return trainer, trainer.fit()


def val_loss_of(model: torch.nn.Module, world: Path, blocks: int) -> float:
    """The mean next-token loss of `model` on the first evaluation's val blocks, computed here with plain torch."""
    stream = data.resolve(str(world / "data"), "bin", "pretrained").split("val")
    rows = torch.stack([item["input_ids"] for item in data.eval_dataset(stream, block_size=BLOCK, num_blocks=blocks)])
    with torch.no_grad():
        logits = model(input_ids=rows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten()).item()


def test_prepare_with_the_model_tokenizer_records_where_it_came_from(world):
    meta = formats.load_meta(world / "data" / paths.META_NAME)
    assert meta["tokenizer_kind"] == "pretrained"
    assert meta["tokenizer_from"] == {"source": str(world / "base"), "revision": None}
    assert json.loads((world / "data" / paths.TOKENIZER_NAME).read_text())["model"]["vocab"] == \
        json.loads((world / "base" / "tokenizer.json").read_text())["model"]["vocab"]


def test_fine_tuning_starts_from_the_pretrained_weights_and_improves(world, tmp_path, fresh_accelerate_state):
    pretrained = GPT2LMHeadModel.from_pretrained(world / "base")
    expected = val_loss_of(pretrained, world, blocks=2 * 4)  # eval_iters * batch_size
    fresh = math.log(pretrained.config.vocab_size)
    assert expected < fresh - 1.0  # the stand-in really is pretrained
    trainer, summary = fine_tune(world, tmp_path)
    records = [r for r in trainer.state.records if "val_loss" in r]
    assert records[0]["iter"] == 0 and records[0]["val_loss"] == pytest.approx(expected, abs=1e-4)
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.config.n_positions == BLOCK and model.transformer.wpe.weight.shape[0] == BLOCK
    assert model.config.activation_function == "gelu_new"  # the pretrained model's, not tinylm's default
    shape = trainer.config.model
    assert (shape.n_layer, shape.n_head, shape.n_embd, shape.block_size) == (2, 2, 32, BLOCK)


def test_a_fine_tuned_run_resumes_and_exports(world, tmp_path, fresh_accelerate_state):
    _, straight = fine_tune(world, tmp_path / "straight")
    first, _ = fine_tune(world, tmp_path / "split", max_iters=8)
    from tinylm.compat import reset_accelerate_state

    reset_accelerate_state()
    config = load_config(write_run(tmp_path / "split" / "run.toml", world, tmp_path / "split" / "ckpt"))
    resumed = Trainer(config, resume=tmp_path / "split" / "ckpt" / paths.LAST_NAME).fit()
    assert resumed["best_val_loss"] == pytest.approx(straight["best_val_loss"], abs=1e-6)
    folder = export.export(tmp_path / "split" / "ckpt" / paths.LAST_NAME, tmp_path / "exported")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    saved = torch.load(tmp_path / "split" / "ckpt" / paths.LAST_NAME, weights_only=True)["model"]
    assert reloaded.config.n_positions == BLOCK
    assert all(torch.equal(reloaded.state_dict()[name], weight) for name, weight in saved.items())
    # config.json, generation_config.json and the tokenizer agree: the pretrained config had no pad token.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos = tokenizer.convert_tokens_to_ids(tok.EOS_TOKEN)
    for ids in (json.loads((folder / name).read_text()) for name in ("config.json", "generation_config.json")):
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (eos, eos, eos)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (eos, eos, eos)


def test_a_resume_that_names_another_starting_model_is_refused(world, tmp_path, fresh_accelerate_state):
    """A run keeps the model it started from: resuming a fine-tuned run with model.init_from set to
    another folder (a copy of the same model, so only the name differs) is refused, naming both.

    Kills (trainer): the init_from/init_revision check skipped (its loop run zero times).
    """
    from tinylm.compat import reset_accelerate_state

    fine_tune(world, tmp_path, max_iters=2)
    reset_accelerate_state()
    other = tmp_path / "other-base"
    shutil.copytree(world / "base", other)
    config = load_config(write_run(tmp_path / "resume.toml", world, tmp_path / "ckpt", model={"init_from": str(other)}))
    with pytest.raises(UserError, match=rf"cannot resume: model.init_from '{re.escape(str(world / 'base'))}' -> "
                                        rf"'{re.escape(str(other))}'; a run keeps the model it started from"):
        Trainer(config, resume=tmp_path / "ckpt" / "ckpt_last.pt")



@pytest.mark.parametrize("model, message", [
    ({"n_layer": 1}, r"model\.n_layer = 1 but .*base has 2: a fine-tuned model keeps its shape"),
    ({"n_embd": 64, "n_head": 2}, r"model\.n_embd = 64 but .*base has 32"),
    ({"block_size": CONTEXT * 2}, r"model\.block_size = 128 is longer than the context of .*base \(n_positions = 64\)"),
])
def test_a_config_that_contradicts_the_pretrained_model_is_refused(model, message, world, tmp_path,
                                                                   fresh_accelerate_state):
    with pytest.raises(UserError, match=message):
        fine_tune(world, tmp_path, model=model)


def test_data_prepared_with_another_tokenizer_is_refused(world, tmp_path, fresh_accelerate_state):
    other = pretrain(tmp_path / "other", make_corpus(tmp_path / "c.txt", seed=5), vocab_size=280, seed=1, steps=1)
    other_data = tmp_path / "other-data"
    assert prepare.main(["--input", str(world / "corpus.txt"), "--tokenizer", "pretrained", "--from", str(other),
                         "--out", str(other_data)]) == 0
    shutil.copytree(world, tmp_path / "world", ignore=shutil.ignore_patterns("data"))
    shutil.copytree(other_data, tmp_path / "world" / "data")
    with pytest.raises(UserError, match=r"was prepared with another tokenizer than .*base's: run `tinylm prepare "
                                        r"--tokenizer pretrained --from .*base --out .*data --overwrite`") as refused:
        fine_tune(tmp_path / "world", tmp_path / "run")
    # The command it suggests (given the input) fixes it.
    suggested = shlex.split(re.search(r"run `([^`]*)`", str(refused.value)).group(1))
    assert prepare.main([*suggested[2:], "--input", str(world / "corpus.txt")]) == 0
    assert fine_tune(tmp_path / "world", tmp_path / "run")[1]["iters"] == 12


def test_only_gpt2_models_are_fine_tuned(world, tmp_path, fresh_accelerate_state):
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    llama.save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match=r"is a llama model; tinylm fine-tunes GPT-2 models"):
        fine_tune(world, tmp_path / "run", model={"init_from": str(tmp_path / "llama")})


# --- Hub ids, from a local Hugging Face cache standing in for the Hub (HF_HUB_OFFLINE=1) ----------------


def cache_as_hub(hub_cache: Path, repo_id: str, folder: Path, revisions: dict[str, str]) -> None:
    """Lay `folder` out as huggingface_hub's cache of model `repo_id`: snapshots/<commit>/ and refs/<branch>."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    for branch, commit in revisions.items():
        shutil.copytree(folder, repo / "snapshots" / commit, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)


@pytest.fixture(scope="module")
def hub(world, tmp_path_factory):
    """Environment for subprocesses whose Hub is a cache holding tinylm-test/base (branches main and v1)."""
    home = tmp_path_factory.mktemp("hf-home")
    cache_as_hub(home / "hub", "tinylm-test/base", world / "base", {"main": "a" * 40, "v1": "b" * 40})

    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def cli(module: str, cwd: Path, env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"tinylm.{module}", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_generate_and_prepare_read_a_model_by_hub_id(world, hub, tmp_path):
    from tinylm import sampler

    prompt = "HAMLET:\nThe king"
    by_id = cli("generate", tmp_path, hub, "--model", "tinylm-test/base", "--revision", "v1", "--prompt", prompt,
                "--max-new-tokens", 30, "--temperature", 0)
    assert by_id.returncode == 0, by_id.stderr
    model, tokenizer = sampler.load_model(str(world / "base"))
    greedy = sampler.Sampling(max_new_tokens=30, temperature=0.0)
    expected = prompt + sampler.complete(model, tokenizer, prompt, greedy) + "\n"
    assert by_id.stdout == expected and len(expected) > len(prompt) + 10
    prepared = cli("prepare", tmp_path, hub, "--input", world / "corpus.txt", "--tokenizer", "pretrained",
                   "--from", "tinylm-test/base", "--out", "data")
    assert prepared.returncode == 0, prepared.stderr
    assert np.array_equal(np.fromfile(tmp_path / "data" / "train.bin", dtype="<u2"),
                          np.fromfile(world / "data" / "train.bin", dtype="<u2"))


@pytest.mark.parametrize("args, message", [
    (["--model", "tinylm-test/base", "--revision", "nope"],
     r"cannot load the model tinylm-test/base@nope: there is no local folder of that name.*HF_HUB_OFFLINE is set"),
    (["--model", "tinylm-test/missing"], r"cannot load the model tinylm-test/missing: .*hf download tinylm-test/missing"),
    (["--checkpoint", "x.pt", "--revision", "v1"], r"--revision applies to --model"),
])
def test_a_model_that_cannot_be_had_is_one_line(args, message, hub, tmp_path):
    result = cli("generate", tmp_path, hub, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_the_demo_takes_the_same_model_arguments(world):
    from tinylm import demo, generate

    args = demo.parse_args(["--model", str(world / "base"), "--port", "7861"])
    model, tokenizer = generate.load_chosen_model(args, "cpu")
    assert isinstance(model, GPT2LMHeadModel) and len(tokenizer) == model.config.vocab_size
    with pytest.raises(UserError, match=r"--revision applies to a Hub id; .*base is a local folder"):
        generate.load_chosen_model(demo.parse_args(["--model", str(world / "base"), "--revision", "v1"]), "cpu")


# --- Hub ids with no network: one quick answer, never huggingface_hub's minute of retries ----------------


@pytest.fixture
def silent_hub():
    """A Hub endpoint that accepts connections and never answers, as a network that drops replies does.

    A name that fails DNS at once is what this sandbox does for huggingface.co; it cost 27-32 s of
    retries (1+2+4+8+8 s). A connection that hangs costs more (the retries wait 60 s each), so the
    tests use this one: nothing here calls accept(), the kernel's backlog completes the handshakes.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def refused_hub() -> str:
    """An endpoint whose connections are refused at once (a closed port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def online_env(home: Path, endpoint: str) -> dict:
    """Environment for a subprocess that may use the network (no HF_HUB_OFFLINE), whose Hub is `endpoint`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    return {**env, "HF_HOME": str(home), "HF_ENDPOINT": endpoint, "NO_PROXY": "127.0.0.1"}


NO_ANSWER_BOUND_S = 45  # generous: startup is 4-8 s here, the reachability check at most 5 s


def timed_cli(module: str, cwd: Path, env: dict, *args) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", f"tinylm.{module}", *map(str, args)], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=2 * NO_ANSWER_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tinylm {module} {' '.join(map(str, args))} still waiting for the Hub after "
                    f"{2 * NO_ANSWER_BOUND_S} s")
    return result, time.monotonic() - started


GENERATE_MISSING = ["--model", "tinylm-test/missing", "--max-new-tokens", 5]
PREPARE_MISSING = ["--input", "corpus.txt", "--tokenizer", "pretrained", "--from", "tinylm-test/missing"]


@pytest.mark.parametrize("module, args, hub_kind", [
    ("generate", GENERATE_MISSING, "silent"),
    ("generate", GENERATE_MISSING, "refused"),
    ("prepare", PREPARE_MISSING, "silent"),  # fine-tuning's init_from reads through the same pretrained.load
], ids=["generate-silent", "generate-refused", "prepare-silent"])
def test_an_unreachable_hub_is_one_quick_line_without_retries(module, args, hub_kind, silent_hub, tmp_path):
    make_corpus(tmp_path / "corpus.txt")
    endpoint = silent_hub if hub_kind == "silent" else refused_hub()
    env = online_env(tmp_path / "hf-home", endpoint)
    if module == "prepare":  # the same wait as generate-silent's, through the variable that shortens it
        env["HF_HUB_ETAG_TIMEOUT"] = "1"
    result, seconds = timed_cli(module, tmp_path, env, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr  # no "Retrying in 1s" lines, no traceback
    assert re.search(r"^error: cannot load the (model|tokenizer) tinylm-test/missing: .*not in the Hugging Face "
                     rf"cache, and the Hub at {re.escape(endpoint)} cannot be reached .*pass a local folder",
                     lines[0]), lines[0]
    assert seconds < NO_ANSWER_BOUND_S
    assert not (tmp_path / "data").exists()


def test_a_cached_model_is_used_at_once_when_the_hub_is_unreachable(world, silent_hub, tmp_path):
    """Each file's metadata request used to wait HF_HUB_ETAG_TIMEOUT (10 s) before the cache was used."""
    from tinylm import sampler

    cache_as_hub(tmp_path / "hf-home" / "hub", "tinylm-test/base", world / "base", {"main": "c" * 40})
    result, seconds = timed_cli("generate", tmp_path, online_env(tmp_path / "hf-home", silent_hub),
                                "--model", "tinylm-test/base", "--prompt", "HAMLET:", "--max-new-tokens", 20,
                                "--temperature", 0)
    assert result.returncode == 0, result.stderr
    model, tokenizer = sampler.load_model(str(world / "base"))
    greedy = sampler.Sampling(max_new_tokens=20, temperature=0.0)
    assert result.stdout == "HAMLET:" + sampler.complete(model, tokenizer, "HAMLET:", greedy) + "\n"
    # One note (transformers' "Loading weights" bars aside), no retry lines.
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith(f"note: the Hugging Face Hub at {silent_hub} cannot be reached")
    assert "tinylm-test/base comes from the local cache; set HF_HUB_OFFLINE=1" in lines[0]
    assert seconds < NO_ANSWER_BOUND_S


def test_the_hub_model_a_run_started_from_is_named_by_export_on_any_machine(world, hub, tmp_path):
    """Training records init_from's Hub id in the checkpoint: export names the base model even where the
    Hugging Face cache that held it is gone (another machine), and a local folder is never named."""
    run_toml = write_run(tmp_path / "run.toml", world, tmp_path / "ckpt", model={"init_from": "tinylm-test/base"},
                         max_iters=4)
    trained = cli("train", tmp_path, hub, "--config", run_toml)
    assert trained.returncode == 0, trained.stderr
    elsewhere = {**hub, "HF_HOME": str(tmp_path / "empty-hf-home")}
    exported = cli("export", tmp_path, elsewhere, "--checkpoint", tmp_path / "ckpt" / paths.BEST_NAME,
                   "--out", tmp_path / "exported")
    assert exported.returncode == 0, exported.stderr
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "base_model: tinylm-test/base" in card and "note:" not in exported.stderr
