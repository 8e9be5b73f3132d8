"""`tinylm export`: turn a checkpoint into a folder plain `transformers` loads (and, with --onnx, model.onnx).

    tinylm export --checkpoint checkpoints/ckpt_best.pt --out exported/NAME [--force] [--onnx]
                  [--license ID] [--language CODE] [--base-model ID]

The folder holds config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json and a README.md model card (plus
loss_curve.png when matplotlib is installed). It is written into a hidden
temp folder beside --out and renamed into place only when complete, so a
failure never leaves half a folder behind, and an existing folder is only
replaced with --force (and only if it is itself an earlier export). Every
file gets the usual umask-based mode.

The card is a `huggingface_hub.ModelCard`: Hub metadata (license, language,
datasets, base_model, tags, a model-index with the validation loss and
perplexity) above a Markdown body. It names the model by the folder's name;
`card_for_repo` renders it for a Hub repo id, which is what `tinylm push` uploads.
The card never holds a path of the author's machine: local data and models are named
by their base name, and only what the Hugging Face cache shows came from the Hub (or
what --base-model names) is called a Hub model or dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from . import checkpoint, onnx_export, paths, plot
from . import tokenizer as tok
from .atomic import DIR_MODE, FILE_MODE, replace_folder
from .config import SCRATCH, Sampling, check_card_field
from .errors import UserError, run_cli
from .model import count_parameters

# What makes a folder an export: `push` refuses anything without these, `--force` replaces nothing else.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
CARD_NAME = "README.md"
LOSS_CURVE_NAME = "loss_curve.png"
# transformers v4's AutoTokenizer knows this class name and v5 keeps it as an alias of its
# tokenizers backend, so naming it makes the folder load in both.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
HUB_URL = "https://huggingface.co"
# The card's parts that name the model: `card_for_repo` rewrites them for the repo pushed to.
TITLE = re.compile(r"^# .*$", re.MULTILINE)
USAGE_HEADING = "## How to use"
# The card's parts that name the base model: `card_for_repo` rewrites them for a --base-model given to push.
ORIGIN_INTRO = re.compile(r"(fine-tuned from ).*?( with tinylm)")
ORIGIN_ROW = re.compile(r"^\| fine-tuned from \| .* \|$", re.MULTILINE)
# A dataset "spec" ending like this is a data file, never a Hub id (Hub ids may contain dots).
DATA_FILE_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".arrow",
                      ".gz", ".bz2", ".xz", ".zst", ".zip")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tinylm export",
        description="Write a transformers model folder (and optionally model.onnx) from a checkpoint "
        "(see docs/export-and-deployment.md).",
    )
    parser.add_argument("--checkpoint", default=paths.CHECKPOINT_BEST,
                        help=f"checkpoint file to export (default: {paths.CHECKPOINT_BEST})")
    parser.add_argument("--out", required=True, help="folder to write, e.g. exported/my-model")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if it already holds an earlier export")
    parser.add_argument("--onnx", action="store_true",
                        help="also write model.onnx with past key values (needs pip install 'tinylm[onnx]')")
    parser.add_argument("--license", metavar="ID",
                        help="the model card's license, a Hub license id such as mit or apache-2.0 "
                        "(default: the training config's hub.license; none: the card says none is stated)")
    parser.add_argument("--language", metavar="CODE",
                        help="the model card's language, e.g. en (default: the training config's hub.language; "
                        "none: the card names no language)")
    add_base_model_argument(parser)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # transformers' per-file bars only clutter this command's output

    out = export(args.checkpoint, args.out, force=args.force, onnx=args.onnx,
                 license=args.license, language=args.language, base_model=args.base_model)
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<24} {format_size(path.stat().st_size):>10}")
    print(f"exported {args.checkpoint} to {out}; load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def add_base_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", metavar="ID",
                        help="the Hub id of the model this one was fine-tuned from, for the model card (default: "
                        "model.init_from when it is a Hub model in this machine's Hugging Face cache; a local "
                        "folder is never named as one)")


def export(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    onnx: bool = False,
    license: str | None = None,
    language: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write the export folder for `checkpoint_path` at `out`; return `out`.

    `license` and `language` (for the model card) default to the run's `[hub]` settings;
    `base_model` (a Hub id) to `model.init_from` when that is a Hub model (see `base_model_of`).
    """
    checkpoint_path, out = Path(checkpoint_path), Path(out)
    name = out.resolve().name
    check_card_field("license", license or "", "--license")
    check_card_field("language", language or "", "--language")
    check_base_model(base_model)
    check_out_folder(out, force)
    if onnx:
        onnx_export.require_onnx()  # before any work, so a missing extra costs nothing
    payload = checkpoint.load(checkpoint_path)
    model = checkpoint.model_from(payload)
    tokenizer = tokenizer_of(payload, checkpoint_path)
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"{checkpoint_path}: its tokenizer has {len(tokenizer)} tokens but the model only "
            f"{model.config.vocab_size}; the model and tokenizer do not belong together"
        )
    log_records = train_log_records(checkpoint_path)
    base_model = base_model_of(payload, base_model, checkpoint_path)

    with staged_folder(out, force) as staging:
        save_tokenizer(tokenizer, model.config.n_positions, staging)
        save_model(model, tokenizer, staging)
        curve = draw_loss_curve(log_records, staging / LOSS_CURVE_NAME, title=name)
        card = model_card(name, payload, model, tokenizer, log_records, curve, license=license, language=language,
                          base_model=base_model)
        (staging / CARD_NAME).write_text(card, encoding="utf-8")
        if onnx:
            print("writing model.onnx (tracing and checking the graph takes a few seconds)", flush=True)
            onnx_export.export_onnx(model, staging / onnx_export.ONNX_NAME)
        normalise_modes(staging)
        check_loads(staging)
    return out


# --- what goes in the folder ---------------------------------------------------------------------------


def save_model(model, tokenizer, folder: Path) -> None:
    """config.json, model.safetensors (the tied lm_head is stored once) and generation_config.json.

    Their special token ids are the saved `tokenizer`'s: a fine-tuned GPT-2 keeps OpenAI's config,
    which has no pad token, while the tokenizer pads with <|endoftext|> (`save_tokenizer`).
    """
    config = model.config
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # generate()'s defaults come from here; `tinylm generate` samples with the same settings.
    sampling = Sampling()
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        # GPT-2's positions are learned: no token can sit past n_positions. A total length cap
        # also stops pipeline() from adding its default max_new_tokens=256, which would overflow.
        max_length=config.n_positions,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(folder)


def save_tokenizer(tokenizer, n_positions: int, folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json, loadable by transformers v4 and v5 alike."""
    # model_max_length lets `truncation=True` and pipeline's handle_long_generation="hole" fit the context.
    tokenizer.model_max_length = n_positions
    # Padding a batch needs a pad token; GPT-2 convention is to reuse eos (attention masks hide it).
    tokenizer.pad_token = tok.EOS_TOKEN
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = TOKENIZER_CLASS
    # v4 defaulted this to True, which deletes spaces before punctuation on decode; v5 to False.
    config["clean_up_tokenization_spaces"] = False
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def normalise_modes(folder: Path) -> None:
    """Give every file the umask-based mode (transformers writes model.safetensors owner-only, 0600)."""
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, FILE_MODE)


def check_loads(folder: Path) -> None:
    """Load `folder` with plain transformers (local files only) and run one forward pass."""
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        ids = tokenizer("a", return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            model(input_ids=ids[:, : model.config.n_positions])
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... for broken folders
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{folder} does not load with transformers: {reason[:300]}") from None


# --- inputs ---------------------------------------------------------------------------------------------


def tokenizer_of(payload: dict[str, Any], checkpoint_path: Path):
    """The checkpoint's tokenizer: the copy stored inside it, else the tokenizer.json it names or sits beside."""
    stored = payload["tokenizer"] if isinstance(payload["tokenizer"], dict) else {}
    if stored.get("json"):
        try:
            return checkpoint.tokenizer_from(payload)
        except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
            raise UserError(f"checkpoint {checkpoint_path} holds a tokenizer that does not parse: {exc}") from None
    candidates = [Path(stored["path"])] if stored.get("path") else []
    candidates.append(checkpoint_path.parent / paths.TOKENIZER_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return tok.load(candidate)
    raise UserError(
        f"checkpoint {checkpoint_path} holds no tokenizer and there is none at "
        f"{' or '.join(map(str, candidates))}; copy the tokenizer.json from your prepared data there"
    )


def train_log_records(checkpoint_path: Path) -> list[dict]:
    """The evaluation records of the train_log.json beside the checkpoint, or [] when there is none."""
    log_path = checkpoint_path.parent / paths.TRAIN_LOG_NAME
    if not log_path.is_file():
        return []
    try:
        return plot.read_records(log_path)
    except UserError as exc:  # a damaged log only costs the card its curve, not the export
        print(f"warning: {exc}; the model card uses the checkpoint's own numbers", file=sys.stderr)
        return []


def draw_loss_curve(records: list[dict], target: Path, title: str) -> str | None:
    """Draw the loss curve if matplotlib is installed; return why not when it isn't drawn."""
    if not records:
        return f"No {paths.TRAIN_LOG_NAME} was found next to the checkpoint, so there is no loss curve."
    if importlib.util.find_spec("matplotlib") is None:
        return ("The loss curve was not drawn: matplotlib is not installed "
                "(`pip install 'tinylm[plot]'`, then export again).")
    plot.plot_losses(records, target, title=title)
    return None


# --- the model card -------------------------------------------------------------------------------------


def model_card(
    name: str,
    payload: dict,
    model,
    tokenizer,
    records: list[dict],
    no_curve: str | None,
    *,
    license: str | None = None,
    language: str | None = None,
    base_model: str | None = None,
) -> str:
    """README.md: Hub metadata, then what the model is, what it was trained on, how well, how to load it, its limits.

    `license` and `language` default to the run's `[hub]` settings (`payload["config"]["hub"]`,
    which checkpoints from before those keys lack: then the card states neither). `base_model`
    is the Hub model a fine-tuned checkpoint started from (see `base_model_of`), if known.
    """
    config = model.config
    meta = payload.get("meta") or {}
    run = payload.get("config") or {}
    hub = run.get("hub") or {}
    license = license or hub.get("license") or None
    language = language or hub.get("language") or None
    init_from = (run.get("model") or {}).get("init_from", SCRATCH)
    dataset = hub_dataset(meta)
    kind = tok.kind_of(tokenizer)
    iteration = payload["iter"]
    record = checkpoint_record(records, iteration)
    val_loss = validation_loss(payload, record)
    evals = eval_results(meta, dataset, val_loss)
    data = ModelCardData(
        base_model=base_model,
        datasets=[dataset] if dataset else None,
        language=language,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=["tinylm", "gpt2", "text-generation", *(["character-level"] if kind == "char" else [])],
        model_name=name if evals else None,  # the model-index's name (huggingface_hub requires one with results)
        eval_results=evals or None,
    )
    if init_from == SCRATCH:
        origin, intro = None, "A small GPT-2 language model trained from scratch with tinylm"
    else:
        origin = origin_text(base_model) if base_model else f"the local model `{local_name(init_from)}`"
        intro = f"A GPT-2 language model fine-tuned from {origin} with tinylm"
    source = source_text(meta, dataset)
    lines = [
        f"# {name}",
        "",
        intro + (f" on {source}." if source else "."),
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        "| architecture | GPT-2 (`GPT2LMHeadModel`), float32 safetensors |",
        f"| parameters | {count_parameters(model):,} (input and output embeddings tied) |",
        f"| layers / heads / width | {config.n_layer} / {config.n_head} / {config.n_embd} |",
        f"| context | {config.n_positions} tokens |",
        f"| tokenizer | {kind} ({'one token per character' if kind == 'char' else 'byte-level BPE'}), "
        f"{len(tokenizer):,} tokens |",
        *([f"| fine-tuned from | {origin} |"] if origin else []),
        f"| license | {f'`{license}`' if license else 'not stated by the author'} |",
        *([f"| language | `{language}` |"] if language else []),
        "",
        f"`<|endoftext|>` (id {config.eos_token_id}) is the bos, eos and pad token.",
        "",
        "## Training data",
        "",
        *data_lines(meta, dataset),
        "",
        "## Training",
        "",
        *training_lines(record, iteration, val_loss),
        "",
        f"![loss curve]({LOSS_CURVE_NAME})" if no_curve is None else no_curve,
        "",
        *usage_lines(name, model.generation_config.to_dict(), config.n_positions, on_hub=False),
        "",
        "## Intended use and limits",
        "",
        "- A small model for learning and experiments: it imitates the style of its training text and "
        "knows nothing beyond it. It is not instruction-tuned and will state falsehoods fluently.",
        f"- It sees at most {config.n_positions} tokens. GPT-2's positions are learned, so prompt + new tokens "
        f"must stay within {config.n_positions}: past that, `generate` fails with an index error. For longer "
        'text pass `handle_long_generation="hole"` to the pipeline (it keeps the prompt\'s end), or use '
        "`tinylm generate`, whose context slides.",
        *(["- A char tokenizer knows only the characters of its training text; any other character "
           "becomes `[UNK]`."] if kind == "char" else []),
        "- Perplexity is per token of this tokenizer, so it is not comparable across tokenizers.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def usage_lines(model_id: str, generation: dict, n_positions: int | None, *, on_hub: bool) -> list[str]:
    """The "How to use" section, loading `model_id`: the folder's name, or (`on_hub`) the repo id it is pushed to."""
    where = ("" if on_hub else
             f"Replace `{model_id}` with the folder's path, or with its Hub repo id once it is pushed. ")
    return [
        USAGE_HEADING,
        "",
        "Everything loads with plain `transformers` (no tinylm, no `trust_remote_code`):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{model_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")',
        f'generator = pipeline("text-generation", model="{model_id}")',
        'print(generator("Once upon a time", max_new_tokens=40)[0]["generated_text"])',
        "```",
        "",
        f"{where}`generation_config.json` samples with temperature {generation.get('temperature')} and top-k "
        f"{generation.get('top_k')}, and caps the total length (prompt + new tokens) at {n_positions}.",
    ]


def origin_text(base_model: str) -> str:
    """How the card's text names the Hub model it was fine-tuned from: a link."""
    return f"[`{base_model}`]({HUB_URL}/{base_model})"


def card_for_repo(folder: Path, repo_id: str, base_model: str | None = None) -> ModelCard | None:
    """The export's README.md as it should read in the Hub repo `repo_id` (None when the folder has no card).

    The title, the model-index's name and the "How to use" snippet name the repo instead of the
    folder (a card whose usage section was removed keeps the rest as it is); `base_model` (push's
    --base-model) becomes the base model of a fine-tuned model's card. The folder's own README.md
    is not changed: a local export goes on describing the folder.
    """
    path = folder / CARD_NAME
    if not path.is_file():
        return None
    try:
        card = ModelCard.load(path)
    except Exception as exc:  # PyYAML's errors, or huggingface_hub's ValueError for metadata it cannot read
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise UserError(f"{path} is not a valid model card ({reason}); fix its metadata block or export again") from None
    name = repo_id.split("/")[-1]
    if card.data.eval_results:
        card.data.model_name = name
    if base_model:
        check_base_model(base_model)
        if not ORIGIN_ROW.search(card.text):
            raise UserError(f"--base-model {base_model}: the model card of {folder} says the model was not "
                            "fine-tuned from another one; drop --base-model")
        card.data.base_model = base_model
        card.text = ORIGIN_INTRO.sub(lambda m: m[1] + origin_text(base_model) + m[2], card.text, count=1)
        card.text = ORIGIN_ROW.sub(f"| fine-tuned from | {origin_text(base_model)} |", card.text, count=1)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    generation_path = folder / "generation_config.json"
    generation = json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.is_file() else {}
    usage = usage_lines(repo_id, generation, config.get("n_positions"), on_hub=True)
    text = TITLE.sub(lambda _: f"# {name}", card.text, count=1)
    card.text = replace_section(text, USAGE_HEADING, "\n".join(usage))
    return card


def replace_section(text: str, heading: str, section: str) -> str:
    """`text` with the section that starts at the line `heading` (up to the next `## ` heading) replaced."""
    start = re.search(rf"^{re.escape(heading)}[ \t]*$", text, re.MULTILINE)
    if start is None:
        return text
    end = re.compile(r"^## ", re.MULTILINE).search(text, start.end())
    stop = end.start() if end else len(text)
    return text[: start.start()] + section.rstrip("\n") + "\n\n" + text[stop:]


def hub_id(name: Any, local_ok: bool = False) -> str | None:
    """`name` when it reads as a Hub repo id (`name` or `owner/name`) and (unless `local_ok`) no file or folder
    of that name is here."""
    if not isinstance(name, str) or not name or name.count("/") > 1 or name.startswith((".", "/", "~")):
        return None
    if name.lower().endswith(DATA_FILE_SUFFIXES) or (not local_ok and Path(name).exists()):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def in_hub_cache(repo_id: str, repo_type: str) -> bool:
    """Whether this machine's Hugging Face cache holds the Hub repo `repo_id`.

    Reading a model or dataset by Hub id puts it there and a local folder never does, so this tells
    a Hub id from a relative path that reads like one (`tiny`, `data/saved`) wherever export runs:
    whether such a folder exists depends on the folder export runs from.
    """
    return (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)).is_dir()


def local_name(path: str) -> str:
    """A local file or folder as the card names it: its base name, never the path on the author's machine."""
    return Path(path).expanduser().name or path


def check_base_model(base_model: str | None) -> None:
    """Refuse a --base-model that is not a Hub model id."""
    if base_model is not None and hub_id(base_model, local_ok=True) is None:
        raise UserError(f"--base-model {base_model!r} is not a Hub model id: pass one such as gpt2 or "
                        "openai-community/gpt2 (a local folder is never named as the base model)")


def base_model_of(payload: dict, given: str | None, checkpoint_path: Path) -> str | None:
    """The Hub model a checkpoint was fine-tuned from: `given` (--base-model), else the one training recorded
    (or, in older checkpoints, `model.init_from` when it is a Hub id in the Hugging Face cache); None for a
    model trained from scratch or from a local folder."""
    init_from = ((payload.get("config") or {}).get("model") or {}).get("init_from", SCRATCH)
    if init_from == SCRATCH:
        if given:
            raise UserError(f"--base-model {given}: {checkpoint_path} was trained from scratch, not fine-tuned; "
                            "drop --base-model")
        return None
    if given:
        return given
    if "base_model" in payload:  # recorded by training, which knew whether init_from was a Hub id
        repo, why = payload["base_model"], "is a local folder"
    else:  # a checkpoint from before training recorded it: judge by this machine's cache
        repo = hub_id(init_from)
        repo, why = (repo, "") if repo and in_hub_cache(repo, "model") else (None, "is not a Hub model in this "
                                                                              "machine's Hugging Face cache")
    if repo is None:
        print(f"note: model.init_from {init_from} {why}, so the model card calls it the local model "
              f"`{local_name(init_from)}` and names no base model; if it is (or copies) a Hub model, export again "
              "with --base-model ID", file=sys.stderr)
    return repo


def hub_dataset(meta: dict) -> str | None:
    """The Hub dataset id the data was prepared from (`tinylm prepare --dataset ID`), or None for local data."""
    source = meta.get("source")
    dataset = hub_id(source.get("dataset")) if isinstance(source, dict) else None
    return dataset if dataset and in_hub_cache(dataset, "dataset") else None


def source_name(meta: dict, dataset: str | None = None) -> str | None:
    """How the card names the data: the Hub dataset id `dataset`, else the base name of the text, folder or
    dataset file it was prepared from (meta.json's `source`; a plain string before version 2)."""
    if dataset:
        return dataset
    source = meta.get("source")
    if isinstance(source, dict):
        source = source.get("dataset") or source.get("input")
    return local_name(source) if isinstance(source, str) and source else None


def source_text(meta: dict, dataset: str | None) -> str | None:
    """The source for the card's text: a link to a Hub dataset, else the name in backticks."""
    if dataset:
        return f"[`{dataset}`]({HUB_URL}/datasets/{dataset})"
    return f"`{source_name(meta)}`" if source_name(meta) else None


def data_lines(meta: dict, dataset: str | None = None) -> list[str]:
    """The card's data section, from the prepared data's meta.json (as stored in the checkpoint)."""
    splits = meta.get("splits") if isinstance(meta.get("splits"), dict) else {}
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    lines = []
    if source_name(meta):
        lines.append(f"- source: {source_text(meta, dataset)}")
    if source.get("dataset"):
        parts = [f"config `{source['config_name']}`"] if source.get("config_name") else []
        parts += [f"split `{source[key]}`" if key == "split" else f"text column `{source[key]}`"
                  for key in ("split", "text_column") if source.get(key)]
        if source.get("val_split"):
            parts.append(f"validation: split `{source['val_split']}`")
        elif isinstance(source.get("val_fraction"), (int, float)):
            parts.append(f"validation: {source['val_fraction']:.0%} of the documents, held out")
        if parts:
            lines.append(f"- {', '.join(parts)}")
    for split, entry in splits.items():
        if isinstance(entry, dict) and "num_tokens" in entry:
            chars = f" ({entry['num_chars']:,} characters)" if isinstance(entry.get("num_chars"), int) else ""
            lines.append(f"- {split}: {entry['num_tokens']:,} tokens{chars}")
    return lines or ["The checkpoint records no data source or token counts."]


def checkpoint_record(records: list[dict], iteration: int) -> dict | None:
    """The evaluation record of this checkpoint: the latest at or before its iteration (ckpt_best.pt is usually
    not the last one)."""
    return next((r for r in reversed(records) if r.get("iter", math.inf) <= iteration), None)


def validation_loss(payload: dict, record: dict | None) -> float | None:
    """This checkpoint's validation loss: its evaluation record's, else the checkpoint's own `val_loss`
    (or `best_val_loss`); None when not recorded."""
    if record is not None:
        loss = record.get("val_loss")
    else:
        loss = payload.get("val_loss")
        if loss is None:
            loss = payload.get("best_val_loss")
    return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None


def training_lines(record: dict | None, iteration: int, val_loss: float | None) -> list[str]:
    """The card's training section: iterations, and train/val loss and perplexity at this checkpoint."""
    lines = [f"- iterations: {iteration:,}"]
    if record is not None:
        if record.get("tokens_seen") is not None:
            lines.append(f"- tokens seen: {record['tokens_seen']:,}")
        lines.append(f"- train loss {loss_text(record.get('train_loss'))} at iteration {record['iter']:,}")
        lines.append(f"- validation loss {loss_text(val_loss)} at iteration {record['iter']:,}")
    else:
        lines.append(f"- validation loss {loss_text(val_loss)} (train loss not recorded in the checkpoint)")
    return lines


def eval_results(meta: dict, dataset: str | None, val_loss: float | None) -> list[EvalResult]:
    """The model-index: validation loss and perplexity, rounded as the card's text shows them."""
    if val_loss is None:
        return []
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    where = dict(
        task_type="text-generation",
        task_name="Text Generation",
        # A local text has no Hub id: it is named, and its type says it is local.
        dataset_type=dataset or "local",
        dataset_name=source_name(meta, dataset) or "held-out text",
        dataset_config=source.get("config_name") if dataset else None,
        dataset_split=source.get("val_split") if dataset else None,
    )
    return [
        EvalResult(**where, metric_type="loss", metric_name="Validation loss", metric_value=round(val_loss, 4)),
        EvalResult(**where, metric_type="perplexity", metric_name="Validation perplexity",
                   metric_value=round(perplexity(val_loss), 2)),
    ]


def perplexity(loss: float) -> float:
    """`exp(loss)`, capped so a diverged loss does not overflow."""
    return math.exp(min(loss, 50.0))


def loss_text(loss: float | None) -> str:
    """`1.2345 (perplexity 3.44)`, or `not recorded`."""
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return "not recorded"
    return f"{loss:.4f} (perplexity {perplexity(loss):.2f})"


# --- the output folder ----------------------------------------------------------------------------------


def is_export_folder(folder: Path) -> bool:
    """Whether `folder` holds every file an export writes."""
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


def check_out_folder(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, a non-empty folder without --force, or (with --force) not an export."""
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out} is a file, not a folder: pass a folder path, e.g. exported/my-model")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise UserError(f"--out {out} is not empty; pass --force to replace it, or choose another folder")
    if not is_export_folder(out):
        raise UserError(
            f"--out {out} is not empty and is not an earlier export (no {' + '.join(REQUIRED_FILES)}), "
            "so --force will not replace it; choose another folder"
        )


@contextlib.contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty hidden folder beside `out`; when the block succeeds it replaces `out`."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        staging.chmod(DIR_MODE)  # mkdtemp makes it private (0700); an export is an ordinary folder
    except OSError as exc:
        raise UserError(f"cannot write into {out.parent}: {exc.strerror or exc}; choose a writable --out") from None
    try:
        yield staging
        check_out_folder(out, force)  # again: something may have appeared there meanwhile
        replace_folder(staging, out)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}; nothing was replaced") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def format_size(size: int) -> str:
    """`512 B`, `12.3 kB`, `4.5 MB`, `1.2 GB`."""
    value, unit = float(size), "B"
    for larger in ("kB", "MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, larger
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


if __name__ == "__main__":
    sys.exit(run_cli(main))
