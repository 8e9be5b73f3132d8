"""`tinylm eval`: real models, real files, real processes; the numbers checked against plain torch and training."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers_checkpoint import assert_one_line_error, save_checkpoint, train_tiny_model
from training_helpers import load_checkpoint, prepare_here, read_log, train_here, write_config

from tinylm import evaluate, export, model as tinymodel, tokenizer as tok
from tinylm.errors import run_cli
from tinylm.config import ModelConfig

# Two-byte and three-byte characters: a count of characters is not a count of bytes.
ACCENTED = "le café naïve — über die straße. " * 40
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    """A real 12-iteration run (tests' TINY config) on the session's prepared char data, in this process: its
    checkpoints folder."""
    root = tmp_path_factory.mktemp("run")
    train_here(write_config(root / "run.toml", prepared, root / "ckpt"))
    return root / "ckpt"


@pytest.fixture(scope="module")
def as_txt(prepared, tmp_path_factory):
    """The run's corpus prepared again as txt: the same tokens, and val.txt/train.txt to score as text."""
    out = tmp_path_factory.mktemp("txt") / "processed"
    prepare_here(prepared.parent / "corpus.txt", out, fmt="txt")
    return out


@pytest.fixture(scope="module")
def accented(tmp_path_factory):
    """(checkpoint, model, tokenizer) of a char model that knows ACCENTED's multi-byte characters."""
    model, config, tokenizer = train_tiny_model(text=ACCENTED, steps=30)
    path = save_checkpoint(tmp_path_factory.mktemp("accented") / "ckpt.pt", model, config, tokenizer)
    return path, model, tokenizer


def eval_json(capsys, *args) -> dict:
    """`tinylm eval ARGS --json` in this process (through the command's own error handling)."""
    code = run_cli(evaluate.main, [*map(str, args), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def run_eval(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinylm.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


# --- the same numbers as training ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ckpt_best.pt", "ckpt_last.pt"])
def test_training_blocks_give_the_losses_the_run_recorded(run, prepared, capsys, name):
    """Kills (tests/mutants.py) "eval: --split ignored for prepared data" and "eval: --blocks training
    scores eval_iters blocks, not eval_iters * batch_size"."""
    payload = load_checkpoint(run / name)
    record = next(r for r in read_log(run)["records"] if r["iter"] == payload["iter"])
    common = ["--checkpoint", run / name, "--data", prepared, "--blocks", "training"]
    val, train_split = eval_json(capsys, *common), eval_json(capsys, *common, "--split", "train")
    assert val["loss"] == pytest.approx(payload["val_loss"], abs=1e-6)
    assert val["loss"] == pytest.approx(record["val_loss"], abs=1e-6)
    assert train_split["loss"] == pytest.approx(record["train_loss"], abs=1e-6)
    # eval_iters 2 x batch_size 4 blocks of block_size 16 targets (TINY), each token a char of one byte.
    assert (val["windows"], val["tokens"], val["bytes"], val["context"]) == (8, 128, 128, 16)
    assert val["perplexity"] == pytest.approx(record["val_ppl"], rel=1e-5)


# --- what is scored, counted by hand -----------------------------------------------------------------------------
def hand_nll(model, ids: list[int], context: int, stride: int) -> float:
    """Each target p from the tokens of the first window that reaches it, window k starting at k * stride."""
    nll = 0.0
    with torch.no_grad():
        for p in range(1, len(ids)):
            start = max(0, math.ceil((p - context) / stride)) * stride
            logits = model(input_ids=torch.tensor([ids[start:p]])).logits[0, -1].double()
            nll -= torch.log_softmax(logits, dim=-1)[ids[p]].item()
    return nll


@pytest.mark.parametrize("stride", [None, 5, 1])
def test_bits_per_byte_is_the_nll_in_bits_over_the_texts_utf8_bytes(accented, tmp_path, capsys, stride):
    """Plain torch, target by target. Kills "eval: bytes counted as characters", "eval: the text's first
    token not scored (no bos before it)" and "eval: overlapping windows score their shared targets twice"."""
    path, model, tokenizer = accented
    text = ACCENTED[:70]
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    nll = hand_nll(model, ids, 16, stride or 16)

    result = eval_json(capsys, "--checkpoint", path, "--input", tmp_path / "text.txt",
                       *(["--stride", stride] if stride else []))
    assert result["tokens"] == len(text)  # every character scored, the first from <|endoftext|>
    assert result["bytes"] == len(text.encode("utf-8")) > len(text)
    assert result["loss"] == pytest.approx(nll / len(text), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    # Windows start every `stride` positions of the len(text) + 1, until one reaches the end.
    assert result["windows"] == max(0, math.ceil((len(text) - 16) / (stride or 16))) + 1


def test_a_char_and_a_bpe_model_score_the_same_bytes(accented, tmp_path, capsys):
    """Kills "eval: bytes counted as characters" and "eval: the text's first token not scored"."""
    path, _, _ = accented
    bpe = tok.wrap(tok.train_bpe([ACCENTED], 300, show_progress=False))
    config = tinymodel.gpt2_config(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16), len(bpe))
    bpe_path = save_checkpoint(tmp_path / "bpe.pt", tinymodel.build_model(config).eval(), config, bpe)
    text = tmp_path / "text.txt"
    text.write_text(ACCENTED[:200], encoding="utf-8")
    char_result = eval_json(capsys, "--checkpoint", path, "--input", text)
    bpe_result = eval_json(capsys, "--checkpoint", bpe_path, "--input", text)
    assert char_result["bytes"] == bpe_result["bytes"] == len(text.read_bytes())
    assert bpe_result["tokens"] < char_result["tokens"] == 200


def test_an_endoftext_written_in_the_text_is_a_token_of_no_bytes(accented, tmp_path, capsys):
    path, _, _ = accented
    story = "le café naïve."
    (tmp_path / "stories.txt").write_text(f"{story}<|endoftext|>{story}", encoding="utf-8")
    result = eval_json(capsys, "--checkpoint", path, "--input", tmp_path / "stories.txt")
    assert result["tokens"] == 2 * len(story) + 1
    assert result["bytes"] == 2 * len(story.encode("utf-8"))


def test_a_datasets_documents_each_end_with_endoftext(run, tmp_path, capsys):
    documents = ["KING:\nWhat is this.", "", "HAMLET:\nSpeak to me."]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in documents))
    result = eval_json(capsys, "--checkpoint", run / "ckpt_best.pt", "--dataset", tmp_path / "docs.jsonl",
                       "--text-column", "body")
    assert result["split"] == "train"  # a JSON Lines file's only split
    assert result["tokens"] == sum(len(d) + 1 for d in documents if d)
    assert result["bytes"] == sum(len(d) for d in documents)


# --- one text, three ways in -------------------------------------------------------------------------------------
def test_a_prepared_split_scores_exactly_like_its_text(run, as_txt, prepared, capsys):
    """txt and bin data read through their memory maps, and val.txt read as text: the same stream.
    Kills "eval: a prepared split's last token never scored"."""
    checkpoint, split = ["--checkpoint", run / "ckpt_best.pt"], "val"
    as_text = eval_json(capsys, *checkpoint, "--input", as_txt / f"{split}.txt", "--batch-size", 3)
    as_data = eval_json(capsys, *checkpoint, "--data", as_txt, "--split", split, "--batch-size", 3)
    as_bin = eval_json(capsys, *checkpoint, "--data", prepared, "--split", split, "--batch-size", 3)
    numbers = ("windows", "tokens", "bytes", "loss", "bits_per_byte")
    assert [as_data[k] for k in numbers] == [as_text[k] for k in numbers] == [as_bin[k] for k in numbers]
    assert as_text["bytes"] == len((as_txt / f"{split}.txt").read_bytes())


def test_an_exported_folder_scores_like_its_checkpoint(run, as_txt, tmp_path, capsys):
    folder = export.export(run / "ckpt_best.pt", tmp_path / "exported")
    text = ["--input", as_txt / "val.txt"]
    from_checkpoint = eval_json(capsys, "--checkpoint", run / "ckpt_best.pt", *text)
    from_folder = eval_json(capsys, "--model", folder, *text)
    assert [from_folder[k] for k in ("windows", "tokens", "bytes")] == [from_checkpoint[k] for k in ("windows", "tokens", "bytes")]
    assert from_folder["loss"] == pytest.approx(from_checkpoint["loss"], abs=1e-6)


def test_the_lines_say_what_json_says(run, as_txt, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text((as_txt / "val.txt").read_text(encoding="utf-8")[:300], encoding="utf-8")
    args = ["--checkpoint", str(run / "ckpt_best.pt"), "--input", str(text), "--stride", "8"]
    assert run_cli(evaluate.main, args) == 0
    lines = capsys.readouterr().out
    result = eval_json(capsys, *args)
    said = dict(line.split(maxsplit=1) if not line.startswith("bits") else ("bits", line.split()[-1])
                for line in lines.splitlines())
    assert said["model"] == str(run / "ckpt_best.pt") and said["text"] == str(text)
    assert said["scored"] == (f"{result['tokens']} tokens, {result['bytes']} bytes, in {result['windows']} windows "
                              "of up to 16 tokens of context, stride 8")
    assert float(said["loss"].split()[0]) == round(result["loss"], 4)
    assert float(said["perplexity"]) == round(result["perplexity"], 4)
    assert float(said["bits"]) == round(result["bits_per_byte"], 4)


# --- mistakes: one line, exit 2 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("")
    (root / "only-endoftext.txt").write_text("<|endoftext|>")
    (root / "euro.txt").write_text("KING: 5 €, or 6 ¥?\n", encoding="utf-8")
    (root / "not-a-checkpoint.pt").write_text("hello")
    (root / "docs.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    (root / "no-data").mkdir()
    return root


# In a real process: the mistakes found before torch is imported, and one found after loading the model.
# The others go through the same `run_cli` in this process (each process would spend ~3 s importing torch).
IN_A_PROCESS = {"neither", "both", "no-text", "two-texts", "missing-input", "empty-input", "unknown-chars"}


@pytest.mark.parametrize("case", [
    "neither", "both", "no-text", "two-texts", "missing-input", "empty-input", "only-endoftext", "unknown-chars",
    "not-a-checkpoint", "checkpoint-folder", "no-meta", "other-tokenizer", "wide-stride", "training-needs-data",
    "no-column", "no-such-split", "no-cuda", "split-of-input", "no-such-data-split", "column-without-dataset",
    "no-such-blocks", "stride-for-training", "no-batch",
])
def test_each_mistake_is_one_line(case, run, prepared, files, accented, capsys):
    ckpt = ["--checkpoint", run / "ckpt_best.pt"]
    text = ["--input", prepared.parent / "corpus.txt"]
    args, needles = {
        "neither": (text, ["--checkpoint", "--model"]),
        "both": ([*ckpt, "--model", "gpt2", *text], ["exactly one of --checkpoint"]),
        "no-text": (ckpt, ["--input", "--data", "--dataset"]),
        "two-texts": ([*ckpt, *text, "--data", prepared], ["got --input and --data"]),
        "missing-input": ([*ckpt, "--input", files / "nope.txt"], [str(files / "nope.txt"), "does not exist"]),
        "empty-input": ([*ckpt, "--input", files / "empty.txt"], [str(files / "empty.txt"), "empty"]),
        "only-endoftext": ([*ckpt, "--input", files / "only-endoftext.txt"], ["no text to score"]),
        "unknown-chars": ([*ckpt, "--input", files / "euro.txt"], [str(files / "euro.txt"), "'€' (U+20AC)", "'¥'"]),
        "not-a-checkpoint": (["--checkpoint", files / "not-a-checkpoint.pt", *text], ["not a checkpoint"]),
        "checkpoint-folder": (["--checkpoint", run, *text], [f"--model {run}"]),
        "no-meta": ([*ckpt, "--data", files / "no-data"], [f"--data {files / 'no-data'}", "meta.json"]),
        "other-tokenizer": (["--checkpoint", accented[0], "--data", prepared], ["another tokenizer", "--input"]),
        "wide-stride": ([*ckpt, *text, "--stride", 17], ["--stride 17", "at most 16"]),
        "training-needs-data": ([*ckpt, *text, "--blocks", "training"], ["--blocks training", "--data"]),
        "no-column": ([*ckpt, "--dataset", files / "docs.jsonl"], ["no column 'text'", "--text-column"]),
        "no-such-split": ([*ckpt, "--dataset", files / "docs.jsonl", "--split", "test"], ["no split 'test'"]),
        "no-cuda": ([*ckpt, *text, "--device", "cuda"], ["--device cuda"]),
        "split-of-input": ([*ckpt, *text, "--split", "val"], ["--split applies to --data or --dataset"]),
        "no-such-data-split": ([*ckpt, "--data", prepared, "--split", "test"], ["--split test", "train and val"]),
        "column-without-dataset": ([*ckpt, *text, "--text-column", "body"], ["--text-column applies to --dataset"]),
        "no-such-blocks": ([*ckpt, *text, "--blocks", "some"], ["--blocks must be one of all, training"]),
        "stride-for-training": ([*ckpt, "--data", prepared, "--blocks", "training", "--stride", 4],
                                ["--stride applies to --blocks all"]),
        "no-batch": ([*ckpt, *text, "--batch-size", 0], ["--batch-size must be 1 or more"]),
    }[case]
    if case == "no-cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    if case in IN_A_PROCESS:
        result = run_eval(*args)
    else:
        code = run_cli(evaluate.main, list(map(str, args)))
        out, err = capsys.readouterr()
        result = subprocess.CompletedProcess(args, code, out, err)
    assert_one_line_error(result, *needles)
