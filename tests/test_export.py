"""`tinylm export`: the folder loads with plain transformers and behaves exactly like the checkpoint."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_checkpoint import BLOCK_SIZE, TEXT, assert_one_line_error, save_checkpoint, train_tiny_model
from huggingface_hub import ModelCard, constants
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from training_helpers import cli_here
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from tinylm import checkpoint, export, model as tinymodel, sampler, tokenizer as tok
from tinylm.config import Config, ModelConfig
from tinylm.errors import UserError

GPT2_DEFAULT_SPECIAL_ID = 50256
META = {
    "source": "fox.txt",
    "tokenizer_kind": "char",
    "splits": {"train": {"num_tokens": 1620, "num_chars": 1620}, "val": {"num_tokens": 180, "num_chars": 180}},
}
# Evaluation records as tinylm train writes them; the checkpoint below is the one saved at iter 60.
RECORDS = [
    {"iter": i, "train_loss": loss + 0.05, "val_loss": loss, "lr": 1e-3, "tokens_seen": i * 192,
     "elapsed_s": i / 10, "tokens_per_s": 1920.0}
    for i, loss in ((0, 3.4012), (30, 1.9876), (60, 1.2345), (90, 1.3010))
]
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def trained():
    """(model, config, tokenizer) of the tiny char model."""
    return train_tiny_model()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, trained):
    """checkpoints/ckpt_best.pt at iter 60 with data meta, and the run's train_log.json beside it."""
    model, config, tokenizer = trained
    folder = tmp_path_factory.mktemp("checkpoints")
    path = save_checkpoint(folder / "ckpt_best.pt", model, config, tokenizer, iteration=60)
    payload = checkpoint.load(path)
    checkpoint.save(path, {**payload, "meta": META, "val_loss": 1.2345, "best_val_loss": 1.2345})
    (folder / "train_log.json").write_text(json.dumps({"config": {}, "records": RECORDS, "summary": {}}))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ckpt) -> Path:
    return export.export(ckpt, tmp_path_factory.mktemp("exported") / "tiny-char")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def run_export(*args) -> subprocess.CompletedProcess:
    """`python -m tinylm.export ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "tinylm.export", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def export_here(capsys, *args) -> subprocess.CompletedProcess:
    """`tinylm export ARGS` in this process (`cli_here`): the tests below are not about the process."""
    return cli_here(export.main, list(args), capsys)


def sample_ids(tokenizer) -> torch.Tensor:
    """A batch: the training sentence's first block, and one block of random ids."""
    sentence = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :BLOCK_SIZE]
    random_ids = torch.randint(0, len(tokenizer), (1, BLOCK_SIZE), generator=torch.Generator().manual_seed(0))
    return torch.cat([sentence, random_ids])


# --- what is in the folder --------------------------------------------------------------------------

def test_folder_holds_the_files_transformers_expects(exported):
    names = {path.name for path in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= names
    assert not [name for name in names if name.startswith(".")]
    assert "model.onnx" not in names  # only with --onnx (tests/test_onnx.py)
    # transformers writes model.safetensors owner-only (0600); every file gets the umask-based mode.
    usual = oct(0o666 & ~current_umask())
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in exported.iterdir()} == {n: usual for n in names}
    with safe_open(exported / "model.safetensors", framework="pt") as weights:
        keys = set(weights.keys())
    # The output projection is the input embedding: stored once, tied again on load.
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys


@pytest.mark.parametrize("size, shown", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (12_345, "12.3 kB"),
                                         (4_500_000, "4.5 MB"), (1_234_567_890, "1.2 GB"), (2 * 10**12, "2000.0 GB")])
def test_file_sizes_are_shown_in_decimal_units(size, shown):
    assert export.format_size(size) == shown


def test_exported_logits_equal_the_checkpoint_models(exported, ckpt):
    payload = checkpoint.load(ckpt)
    original = checkpoint.model_from(payload)
    loaded = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    ids = sample_ids(checkpoint.tokenizer_from(payload))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, original(input_ids=ids).logits)


def test_tied_embeddings_stay_tied_after_load(exported):
    loaded = AutoModelForCausalLM.from_pretrained(exported, local_files_only=True)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        loaded.transformer.wte.weight[3].fill_(7.0)
    assert torch.all(loaded.lm_head.weight[3] == 7.0)


def test_tokenizer_round_trips_after_export(exported, ckpt):
    original = checkpoint.tokenizer_from(checkpoint.load(ckpt))
    loaded = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    text = TEXT[:200]
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert ids == original(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert loaded("é", add_special_tokens=False)["input_ids"] == [loaded.unk_token_id]


def test_special_tokens_are_ours_and_decoding_keeps_spaces(exported):
    config = json.loads((exported / "config.json").read_text())
    generation = GenerationConfig.from_pretrained(exported, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(exported, local_files_only=True)
    eos = tokenizer.convert_tokens_to_ids(tok.EOS_TOKEN)
    assert eos != GPT2_DEFAULT_SPECIAL_ID
    for ids in (config, generation.to_dict()):
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (eos, eos, eos)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (eos, eos, eos)
    # transformers v4 defaulted this to True, which turns "dog ." into "dog." on decode.
    assert json.loads((exported / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is False
    assert tokenizer.clean_up_tokenization_spaces is False
    assert tokenizer.decode(tokenizer("the dog .", add_special_tokens=False)["input_ids"]) == "the dog ."
    assert tokenizer.model_max_length == config["n_positions"] == BLOCK_SIZE


def test_generation_config_samples_like_tinylm_generate_within_the_context(exported):
    generation = GenerationConfig.from_pretrained(exported, local_files_only=True)
    defaults = sampler.Sampling()
    assert generation.do_sample is True
    assert (generation.temperature, generation.top_k, generation.top_p) == (
        defaults.temperature, defaults.top_k, defaults.top_p)
    assert generation.max_length == BLOCK_SIZE


def test_pipeline_greedy_text_matches_the_checkpoint_model(exported, ckpt):
    payload = checkpoint.load(ckpt)
    model, tokenizer = checkpoint.model_from(payload), checkpoint.tokenizer_from(payload)
    prompt = "the quick "
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(6):  # argmax, one token at a time, straight from the checkpoint's model
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    generator = pipeline("text-generation", model=str(exported))
    assert generator(prompt, do_sample=False, max_new_tokens=6)[0]["generated_text"] == tokenizer.decode(ids)


def test_pipeline_defaults_and_long_prompts_stay_inside_the_context(exported):
    generator = pipeline("text-generation", model=str(exported))
    tokenizer = generator.tokenizer
    # No arguments: generation_config.json's max_length replaces pipeline's default of 256 new tokens.
    text = generator("the ")[0]["generated_text"]
    assert text.startswith("the ") and len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= BLOCK_SIZE
    # A prompt that nearly fills the context plus more new tokens than fit: "hole" keeps the prompt's end.
    prompt = TEXT[: BLOCK_SIZE - 2]
    text = generator(prompt, max_new_tokens=8, do_sample=False, handle_long_generation="hole")[0]["generated_text"]
    assert len(text) == len(prompt) + 8 and text.startswith(prompt)


def test_folder_loads_offline_without_any_tinylm_code(exported):
    script = f"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
folder = {str(exported)!r}
AutoModelForCausalLM.from_pretrained(folder)
AutoTokenizer.from_pretrained(folder)
text = pipeline("text-generation", model=folder)("the ", max_new_tokens=4)[0]["generated_text"]
print(json.dumps({{"text": text, "tinylm": sorted(m for m in sys.modules if m.startswith("tinylm"))}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                            cwd=exported.parent)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tinylm"] == [] and out["text"].startswith("the ")


# --- the model card ---------------------------------------------------------------------------------

def test_model_card_describes_model_data_training_and_use(exported, trained):
    card = (exported / "README.md").read_text()
    model, _, tokenizer = trained
    data = ModelCard.load(exported / "README.md").data
    assert (data.library_name, data.pipeline_tag) == ("transformers", "text-generation")
    assert data.tags == ["tinylm", "gpt2", "text-generation", "character-level"]
    # Trained from scratch on a local text, no license or language configured: none is claimed.
    assert (data.license, data.language, data.base_model, data.datasets) == (None, None, None, None)
    assert "| license | not stated by the author |" in card and "trained from scratch" in card
    assert data.model_name == "tiny-char"
    assert [(r.metric_type, r.metric_value, r.dataset_name, r.dataset_type) for r in data.eval_results] == [
        ("loss", 1.2345, "fox.txt", "local"), ("perplexity", round(math.exp(1.2345), 2), "fox.txt", "local")]
    assert f"{tinymodel.count_parameters(model):,}" in card
    assert "| layers / heads / width | 2 / 2 / 32 |" in card
    assert f"char (one token per character), {len(tokenizer):,} tokens" in card
    assert "`<|endoftext|>` (id 0) is the bos, eos and pad token." in card
    assert "fox.txt" in card and "1,620 tokens" in card and "180 tokens" in card
    assert "iterations: 60" in card
    # The iter-60 record (this checkpoint's evaluation), not the last one (iter 90).
    assert f"validation loss 1.2345 (perplexity {math.exp(1.2345):.2f}) at iteration 60" in card
    assert f"train loss 1.2845 (perplexity {math.exp(1.2845):.2f}) at iteration 60" in card
    assert "1.3010" not in card
    assert 'AutoModelForCausalLM.from_pretrained("tiny-char")' in card
    assert "## Intended use and limits" in card
    if importlib.util.find_spec("matplotlib"):
        assert (exported / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
        assert "![loss curve](loss_curve.png)" in card
    else:
        assert not (exported / "loss_curve.png").exists()
        assert "matplotlib is not installed" in card


def test_card_falls_back_to_checkpoint_numbers_without_train_log(tmp_path, trained):
    model, config, tokenizer = trained
    path = save_checkpoint(tmp_path / "ckpt_last.pt", model, config, tokenizer, iteration=40)
    checkpoint.save(path, {**checkpoint.load(path), "val_loss": 2.5})
    card = (export.export(path, tmp_path / "out") / "README.md").read_text()
    assert "iterations: 40" in card
    assert f"validation loss 2.5000 (perplexity {math.exp(2.5):.2f})" in card
    assert "No train_log.json was found" in card
    assert not (tmp_path / "out" / "loss_curve.png").exists()
    results = ModelCard.load(tmp_path / "out" / "README.md").data.eval_results
    assert [(r.metric_type, r.metric_value) for r in results] == [("loss", 2.5), ("perplexity", round(math.exp(2.5), 2))]


HUB_DATASET_SOURCE = {"dataset": "roneneldan/TinyStories", "config_name": None, "split": "train", "text_column": "text",
                      "val_split": "validation", "val_fraction": None, "streaming": False}


def checkpoint_with(path: Path, trained, *, model: dict | None = None, hub: dict | None = None, source=None,
                    val_loss: float | None = 2.0) -> Path:
    """The tiny checkpoint with its run config's [model] / [hub] keys and its data source replaced."""
    weights, config, tokenizer = trained
    save_checkpoint(path, weights, config, tokenizer, iteration=40)
    payload = checkpoint.load(path)
    run = payload["config"]
    run["model"] = {**run["model"], **(model or {})}
    run["hub"] = hub if hub is not None else run["hub"]
    meta = {**META, "source": source} if source is not None else META
    checkpoint.save(path, {**payload, "meta": meta, "val_loss": val_loss})
    return path


def hub_cache(root: Path, models: tuple[str, ...] = (), datasets: tuple[str, ...] = ()) -> Path:
    """A Hugging Face cache at `root` holding `models` and `datasets` as reading them by Hub id leaves them."""
    for repo_type, ids in (("models", models), ("datasets", datasets)):
        for repo_id in ids:
            snapshot = root / f"{repo_type}--{repo_id.replace('/', '--')}" / "snapshots" / ("a" * 40)
            snapshot.mkdir(parents=True)
            (snapshot / ("config.json" if repo_type == "models" else "README.md")).write_text("{}")
            (snapshot.parents[1] / "refs").mkdir()
            (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    return root


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch) -> Path:
    """This process's Hugging Face cache, empty: nothing was ever read from the Hub."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_card_metadata_names_license_language_base_model_and_hub_dataset(tmp_path, trained, empty_hub_cache):
    hub_cache(empty_hub_cache, models=("gpt2",), datasets=("roneneldan/TinyStories",))  # fine-tuning read them
    path = checkpoint_with(tmp_path / "ckpt.pt", trained, model={"init_from": "gpt2"},
                           hub={"repo_id": "", "private": False, "license": "apache-2.0", "language": ""},
                           source=HUB_DATASET_SOURCE, val_loss=2.0)
    folder = export.export(path, tmp_path / "out", language="en")  # the flag adds what the config left out
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert (data.license, data.language, data.base_model) == ("apache-2.0", "en", "gpt2")
    assert data.datasets == ["roneneldan/TinyStories"]
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("loss", 2.0), ("perplexity", round(math.exp(2.0), 2))]
    assert {(r.dataset_type, r.dataset_name, r.dataset_split) for r in data.eval_results} == {
        ("roneneldan/TinyStories", "roneneldan/TinyStories", "validation")}
    assert "fine-tuned from [`gpt2`](https://huggingface.co/gpt2)" in card.text
    assert "[`roneneldan/TinyStories`](https://huggingface.co/datasets/roneneldan/TinyStories)" in card.text
    assert "| license | `apache-2.0` |" in card.text


def test_local_data_and_models_are_never_named_as_hub_ids(tmp_path, trained, monkeypatch, empty_hub_cache):
    """`owner/name` that is a folder here is a local model or dataset, not a Hub id; a data file neither."""
    hub_cache(empty_hub_cache, models=("me/base-model",), datasets=("corpus/saved",))  # even if the Hub has some
    monkeypatch.chdir(tmp_path)
    (tmp_path / "me" / "base-model").mkdir(parents=True)
    (tmp_path / "corpus" / "saved").mkdir(parents=True)
    for init_from, dataset in (("me/base-model", "corpus/saved"), ("me/base-model", "gone/docs.jsonl")):
        path = checkpoint_with(tmp_path / "ckpt.pt", trained, model={"init_from": init_from},
                               source={**HUB_DATASET_SOURCE, "dataset": dataset})
        folder = export.export(path, tmp_path / "out", force=True)
        card = ModelCard.load(folder / "README.md")
        assert (card.data.base_model, card.data.datasets) == (None, None)
        assert "fine-tuned from the local model `base-model`" in card.text
        assert {r.dataset_type for r in card.data.eval_results} == {"local"}


def test_a_mix_of_datasets_is_named_with_its_weights_and_no_local_path(tmp_path, trained, empty_hub_cache):
    """Data prepared from a Hub dataset and a local file mixed 0.7/0.3: the card lists the Hub one in its
    metadata, names both with their weights in its text (the local one by its base name), and files the
    evaluation under no single dataset.

    Kills: a mix named by nothing (meta.json's `source.dataset` is absent for a mix)."""
    hub_cache(empty_hub_cache, datasets=("roneneldan/TinyStories",))
    mix = {**HUB_DATASET_SOURCE, "dataset": None, "val_split": None, "val_fraction": 0.1,
           "datasets": [{"dataset": "roneneldan/TinyStories", "weight": 0.7},
                        {"dataset": "/home/me/data/poems.jsonl", "weight": 0.3}]}
    path = checkpoint_with(tmp_path / "ckpt.pt", trained, source=mix, val_loss=2.0)
    folder = export.export(path, tmp_path / "out")
    card = ModelCard.load(folder / "README.md")
    assert card.data.datasets == ["roneneldan/TinyStories"]
    assert {(r.dataset_type, r.dataset_name) for r in card.data.eval_results} == {
        ("local", "roneneldan/TinyStories + poems.jsonl")}
    named = ("a mix of [`roneneldan/TinyStories`](https://huggingface.co/datasets/roneneldan/TinyStories) (70%) "
             "and `poems.jsonl` (30%)")
    assert f"with tinylm on {named}." in card.text and f"- source: {named}" in card.text
    assert "/home/me" not in (folder / "README.md").read_text()


LOCAL_SOURCE = {"input": "/home/me/corpus/book.txt", "bytes": 1800, "val_fraction": 0.1}


def test_the_card_publishes_no_local_path_wherever_export_runs(tmp_path, trained, monkeypatch, empty_hub_cache):
    """A run fine-tuned from the relative folder `tiny` on /home/me/corpus/book.txt: the card names both by their
    base names, links no Hub repo, and reads the same whether or not export runs where `tiny` is."""
    path = checkpoint_with(tmp_path / "ckpt.pt", trained, model={"init_from": "tiny"}, source=LOCAL_SOURCE)
    (tmp_path / "train-dir" / "tiny").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    cards = []
    for cwd in ("train-dir", "elsewhere"):
        monkeypatch.chdir(tmp_path / cwd)
        folder = export.export(path, tmp_path / "out", force=True)
        texts = {p.name: p.read_text() for p in folder.iterdir() if p.suffix in (".md", ".json")}
        assert not [name for name, text in texts.items() if "/home/me" in text or "corpus/" in text]
        card = ModelCard.load(folder / "README.md")
        assert (card.data.base_model, card.data.datasets) == (None, None)
        assert {(r.dataset_name, r.dataset_type) for r in card.data.eval_results} == {("book.txt", "local")}
        assert "fine-tuned from the local model `tiny` with tinylm on `book.txt`." in card.text
        assert "| fine-tuned from | the local model `tiny` |" in card.text and "- source: `book.txt`" in card.text
        assert "huggingface.co/tiny" not in card.text
        cards.append(str(card))
    assert cards[0] == cards[1]


def test_base_model_names_the_hub_model_of_a_local_folder(tmp_path, trained, empty_hub_cache, capsys):
    path = checkpoint_with(tmp_path / "ckpt.pt", trained, model={"init_from": "/home/me/models/tiny"},
                           source=LOCAL_SOURCE)
    result = export_here(capsys, "--checkpoint", path, "--out", tmp_path / "out", "--base-model",
                         "openai-community/gpt2")
    assert result.returncode == 0, result.stderr
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "openai-community/gpt2"
    link = "[`openai-community/gpt2`](https://huggingface.co/openai-community/gpt2)"
    assert f"fine-tuned from {link} with tinylm" in card.text and f"| fine-tuned from | {link} |" in card.text
    assert "/home/me" not in (tmp_path / "out" / "README.md").read_text()
    # Without the flag: no base model, and a note on how to name one.
    result = export_here(capsys, "--checkpoint", path, "--out", tmp_path / "plain")
    assert result.returncode == 0, result.stderr
    assert "not a Hub model in this machine's Hugging Face cache" in result.stderr and "--base-model" in result.stderr
    assert ModelCard.load(tmp_path / "plain" / "README.md").data.base_model is None


@pytest.mark.parametrize("base_model, needle", [
    ("./tiny", "is not a Hub model id"),
    ("gpt2", "was trained from scratch"),
], ids=["a-path", "from-scratch"])
def test_a_base_model_that_cannot_be_is_one_line(tmp_path, ckpt, base_model, needle, capsys):
    out = tmp_path / "out"
    assert_one_line_error(export_here(capsys, "--checkpoint", ckpt, "--out", out, "--base-model", base_model),
                          "--base-model", needle)
    assert not out.exists()


def test_a_checkpoint_from_before_the_card_settings_exports(tmp_path, trained):
    """Old checkpoints lack hub.license, hub.language and model.init_from; their source is a plain string."""
    path = checkpoint_with(tmp_path / "ckpt.pt", trained, hub={"repo_id": "", "private": False}, source="old.txt")
    payload = checkpoint.load(path)
    del payload["config"]["model"]["init_from"]
    checkpoint.save(path, payload)
    card = ModelCard.load(export.export(path, tmp_path / "out") / "README.md")
    assert (card.data.license, card.data.base_model, card.data.datasets) == (None, None, None)
    assert "trained from scratch with tinylm on `old.txt`" in card.text


# --- a BPE checkpoint -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe_export(tmp_path_factory):
    tokenizer = tok.wrap(tok.train_bpe([TEXT, "Ünïcödé ☃ and emoji 🦊."], vocab_size=300, show_progress=False))
    config = tinymodel.gpt2_config(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK_SIZE),
                                   vocab_size=len(tokenizer))
    torch.manual_seed(1)
    model = tinymodel.build_model(config).eval()
    path = tmp_path_factory.mktemp("bpe") / "ckpt_best.pt"
    checkpoint.save(path, {
        "model": model.state_dict(), "model_config": config.to_dict(),
        "tokenizer": {"kind": "bpe", "path": "", "json": tok.to_json(tokenizer)},
        "config": Config().to_dict(), "meta": {}, "iter": 0, "best_val_loss": float("inf"), "val_loss": None,
        "train_state": {},
    })
    folder = export.export(path, tmp_path_factory.mktemp("exported") / "tiny-bpe")
    return model, tokenizer, folder, AutoTokenizer.from_pretrained(folder, local_files_only=True)


def test_bpe_export_matches_logits_and_tokens(bpe_export):
    model, tokenizer, folder, loaded_tokenizer = bpe_export
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = sample_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    text = "the lazy dog 🦊 jumps"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert "byte-level BPE" in (folder / "README.md").read_text()


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_exported_bpe_tokenizer_round_trips_any_text(bpe_export, text):
    loaded_tokenizer = bpe_export[3]
    assert loaded_tokenizer.decode(loaded_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


# --- the tokenizer's whereabouts --------------------------------------------------------------------

def test_tokenizer_json_beside_a_checkpoint_without_one_inside_is_used(tmp_path, trained):
    model, config, tokenizer = trained
    path = save_checkpoint(tmp_path / "ckpt_best.pt", model, config, tokenizer)
    checkpoint.save(path, {**checkpoint.load(path), "tokenizer": {"kind": "char", "path": "", "json": ""}})
    tok.save(tokenizer.backend_tokenizer, tmp_path)  # tokenizer.json beside the checkpoint
    folder = export.export(path, tmp_path / "out")
    loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert loaded("the fox")["input_ids"] == tokenizer("the fox")["input_ids"]


def test_the_tokenizer_json_a_checkpoint_names_is_used(tmp_path, trained):
    """A checkpoint without a tokenizer inside, naming one in another folder (none beside it)."""
    model, config, tokenizer = trained
    path = save_checkpoint(tmp_path / "checkpoints" / "ckpt_best.pt", model, config, tokenizer)
    named = tok.save(tokenizer.backend_tokenizer, tmp_path / "data")
    checkpoint.save(path, {**checkpoint.load(path), "tokenizer": {"kind": "char", "path": str(named), "json": ""}})
    folder = export.export(path, tmp_path / "out")
    loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert loaded("the fox")["input_ids"] == tokenizer("the fox")["input_ids"]


# --- the command line: writing, replacing, refusing -------------------------------------------------

def test_a_language_the_hub_would_refuse_is_refused_before_any_work(tmp_path, ckpt):
    with pytest.raises(UserError, match="--language must be an ISO 639 language code"):
        export.export(ckpt, tmp_path / "out", language="English")
    assert not (tmp_path / "out").exists()


def test_a_plain_export_needs_no_onnx_packages(tmp_path, ckpt):
    """Without the onnx extra (its packages hidden from import), an export without --onnx works."""
    hide = ("import sys; from tinylm import onnx_export; "
            "sys.modules.update(dict.fromkeys(onnx_export.REQUIRED_PACKAGES)); "
            "from tinylm.export import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", hide, "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_export_replaces_a_folder_only_when_told_to(exported, ckpt, snapshot):
    before = snapshot(exported)
    with pytest.raises(UserError, match="is not empty; pass --force"):
        export.export(ckpt, exported)
    assert snapshot(exported) == before


def test_a_folder_transformers_cannot_load_is_named_with_its_reason(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(OSError) as raised:
        AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    with pytest.raises(UserError) as refused:
        export.check_loads(tmp_path)
    assert str(refused.value) == f"{tmp_path} does not load with transformers: {raised.value}"


def test_cli_refuses_a_non_empty_out_and_force_replaces_an_earlier_export(tmp_path, ckpt, snapshot, capsys):
    out = tmp_path / "exported" / "runs" / "model"  # two folders to create
    first = export_here(capsys, "--checkpoint", ckpt, "--out", out)
    assert first.returncode == 0, first.stderr
    assert "model.safetensors" in first.stdout and "Traceback" not in first.stderr
    before = snapshot(out)

    # The command as a user types it, in its own process: exit 2, one line, no traceback.
    refused = run_export("--checkpoint", ckpt, "--out", out)
    assert_one_line_error(refused, str(out), "--force")
    assert snapshot(out) == before

    replaced = export_here(capsys, "--checkpoint", ckpt, "--out", out, "--force")
    assert replaced.returncode == 0, replaced.stderr
    after = snapshot(out)
    assert after.keys() == before.keys()
    assert all(after[name][1] != before[name][1] for name in after)  # every file rewritten
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temp or retired folders left


def test_force_never_replaces_a_folder_that_is_not_an_export(tmp_path, ckpt, snapshot, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.txt").write_text("months of work")
    before = snapshot(out)
    assert_one_line_error(export_here(capsys, "--checkpoint", ckpt, "--out", out, "--force"), str(out),
                          "not an earlier export")
    assert snapshot(out) == before


def write_not_a_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "ckpt_best.pt"
    path.write_text("these are not weights")
    return path


def write_checkpoint_with_tokenizer(tmp_path: Path, stored: dict) -> Path:
    model, config, tokenizer = train_tiny_model(steps=0)
    path = save_checkpoint(tmp_path / "ckpt_best.pt", model, config, tokenizer)
    checkpoint.save(path, {**checkpoint.load(path), "tokenizer": stored})
    return path


@pytest.mark.parametrize("make_checkpoint, needle", [
    (lambda tmp: tmp / "missing.pt", "does not exist"),
    (lambda tmp: tmp, "is a folder"),
    (write_not_a_checkpoint, "is not a checkpoint"),
    (lambda tmp: write_checkpoint_with_tokenizer(tmp, {"kind": "char", "path": "", "json": ""}), "holds no tokenizer"),
    (lambda tmp: write_checkpoint_with_tokenizer(tmp, {"kind": "char", "path": "", "json": "{not json"}),
     "holds a tokenizer that does not parse"),
], ids=["missing", "folder", "not-a-checkpoint", "no-tokenizer", "tokenizer-does-not-parse"])
def test_bad_checkpoints_give_one_line_and_write_nothing(tmp_path, make_checkpoint, needle, capsys):
    path = make_checkpoint(tmp_path)
    out = tmp_path / "exported" / "model"
    result = export_here(capsys, "--checkpoint", path, "--out", out)
    assert_one_line_error(result, needle)
    assert not out.exists()
    assert not (out.parent.exists() and any(out.parent.iterdir()))


def test_a_license_the_hub_would_refuse_is_one_line(tmp_path, ckpt, capsys):
    out = tmp_path / "model"
    assert_one_line_error(export_here(capsys, "--checkpoint", ckpt, "--out", out, "--license", "MIT"),
                          "--license must be a Hub license id", "did you mean 'mit'?")
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tmp_path, ckpt, capsys):
    out = tmp_path / "model"
    out.write_text("keep me")
    assert_one_line_error(export_here(capsys, "--checkpoint", ckpt, "--out", out), "is a file")
    assert out.read_text() == "keep me"


def test_out_is_required(ckpt, capsys):
    with pytest.raises(SystemExit) as exited:  # argparse exits
        export_here(capsys, "--checkpoint", ckpt)
    assert exited.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def test_an_out_inside_a_file_is_one_line(tmp_path, ckpt, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert_one_line_error(export_here(capsys, "--checkpoint", ckpt, "--out", tmp_path / "notes.txt" / "model"),
                          f"cannot write into {tmp_path / 'notes.txt'}")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_a_failed_write_into_the_staging_folder_replaces_nothing(exported, snapshot):
    before = snapshot(exported)
    with pytest.raises(UserError, match=f"cannot write {exported}: .*nothing was replaced"):
        with export.staged_folder(exported, force=True) as staging:
            (staging / "missing" / "config.json").write_text("{}")  # a real OSError: no such folder
    assert snapshot(exported) == before
    assert sorted(p.name for p in exported.parent.iterdir()) == [exported.name]  # the staging folder is gone
