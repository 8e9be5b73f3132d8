"""The model card of an exported folder: README.md, and loss_curve.png when matplotlib is installed.

The card is a `huggingface_hub.ModelCard`: Hub metadata (license, language,
datasets, base_model, tags, a model-index with the validation loss and
perplexity) above a Markdown body. It names the model by the folder's name;
`card_for_repo` renders it for a Hub repo id, which is what `tinylm push` uploads.
The card never holds a path of the author's machine: local data and models are named
by their base name, and only what the Hugging Face cache shows came from the Hub (or
what --base-model names) is called a Hub model or dataset.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from . import lora, paths, plot
from . import tokenizer as tok
from .config import SCRATCH, LoraConfig
from .errors import UserError
from .hub_names import hub_id, in_hub_cache
from .model import count_parameters

CARD_NAME = "README.md"
LOSS_CURVE_NAME = "loss_curve.png"
HUB_URL = "https://huggingface.co"
# The card's parts that name the model: `card_for_repo` rewrites them for the repo pushed to.
TITLE = re.compile(r"^# .*$", re.MULTILINE)
USAGE_HEADING = "## How to use"
# The card's parts that name the base model: `card_for_repo` rewrites them for a --base-model given to push.
ORIGIN_INTRO = re.compile(r"(fine-tuned from ).*?( with tinylm)")
ORIGIN_ROW = re.compile(r"^\| fine-tuned from \| .* \|$", re.MULTILINE)


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
    plot.save(plot.draw([plot.Run(title, records)]), target)
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
    adapter: bool = False,
) -> str:
    """README.md: Hub metadata, then what the model is, what it was trained on, how well, how to load it, its limits.

    `license` and `language` default to the run's `[hub]` settings (`payload["config"]["hub"]`,
    which checkpoints from before those keys lack: then the card states neither). `base_model`
    is the Hub model a fine-tuned checkpoint started from (see `base_model_of`), if known.
    `adapter`: the card of a LoRA run's adapter folder (`model` is then the adapted model, merged).
    """
    meta = payload.get("meta") or {}
    run = payload.get("config") or {}
    hub = run.get("hub") or {}
    license = license or hub.get("license") or None
    language = language or hub.get("language") or None
    origin = origin_of((run.get("model") or {}).get("init_from", SCRATCH), base_model)
    dataset = hub_dataset(meta)
    mixed = mix_datasets(meta)
    kind = tok.kind_of(tokenizer)
    iteration = payload["iter"]
    record = checkpoint_record(records, iteration)
    val_loss = validation_loss(payload, record)
    n_positions = model.config.n_positions
    metadata = card_metadata(name, kind, eval_results(meta, dataset, val_loss), license=license, language=language,
                             base_model=base_model, datasets=[dataset] if dataset else mixed, adapter=adapter)
    adapters = lora.section_of(payload)
    sections = [
        title_section(name, origin, source_text(meta, dataset), adapter=adapter),
        model_section(model, tokenizer, kind, origin=origin, license=license, language=language, adapters=adapters),
        ["## Training data", "", *data_lines(meta, dataset)],
        ["## Training", "", *training_lines(record, iteration, val_loss), "",
         f"![loss curve]({LOSS_CURVE_NAME})" if no_curve is None else no_curve],
        (adapter_usage_lines(name, base_model) if adapter else
         usage_lines(name, model.generation_config.to_dict(), n_positions, on_hub=False)),
        limits_section(n_positions, kind),
    ]
    text = "\n\n".join("\n".join(section) for section in sections) + "\n"  # a blank line between sections
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{text}"))


def card_metadata(
    name: str,
    kind: str,
    evals: list[EvalResult],
    *,
    license: str | None,
    language: str | None,
    base_model: str | None,
    datasets: list[str],
    adapter: bool = False,
) -> ModelCardData:
    """The card's Hub metadata: what the Hub files the model (or `adapter`) under, and the model-index of `evals`."""
    return ModelCardData(
        base_model=base_model,
        datasets=datasets or None,
        language=language,
        library_name="peft" if adapter else "transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=["tinylm", "gpt2", "text-generation", *(["character-level"] if kind == "char" else []),
              *(["lora"] if adapter else [])],
        model_name=name if evals else None,  # the model-index's name (huggingface_hub requires one with results)
        eval_results=evals or None,
    )


def origin_of(init_from: str, base_model: str | None) -> str | None:
    """How the card's text names the model this one was fine-tuned from; None for a model trained from scratch."""
    if init_from == SCRATCH:
        return None
    return origin_text(base_model) if base_model else f"the local model `{local_name(init_from)}`"


def title_section(name: str, origin: str | None, source: str | None, *, adapter: bool = False) -> list[str]:
    """The title, and one sentence: from scratch or fine-tuned from `origin` (or an `adapter` for it), on `source`
    when known."""
    if origin is None:
        intro = "A small GPT-2 language model trained from scratch with tinylm"
    elif adapter:
        intro = f"LoRA adapters for a GPT-2 language model, fine-tuned from {origin} with tinylm"
    else:
        intro = f"A GPT-2 language model fine-tuned from {origin} with tinylm"
    return [f"# {name}", "", intro + (f" on {source}." if source else ".")]


def model_section(model, tokenizer, kind: str, *, origin: str | None, license: str | None,
                  language: str | None, adapters: LoraConfig = LoraConfig()) -> list[str]:
    """The "Model" section: a table of the architecture, size, tokenizer, origin, LoRA `adapters`, license and
    language."""
    config = model.config
    trained = lora.trainable_parameters(adapters, config.n_layer, config.n_embd)
    return [
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
        *([f"| LoRA adapters | {lora.describe(adapters)}: {trained:,} parameters trained, the rest frozen |"]
          if adapters.enabled else []),
        f"| license | {f'`{license}`' if license else 'not stated by the author'} |",
        *([f"| language | `{language}` |"] if language else []),
        "",
        f"`<|endoftext|>` (id {config.eos_token_id}) is the bos, eos and pad token.",
    ]


def limits_section(n_positions: int, kind: str) -> list[str]:
    """The "Intended use and limits" section: what a small model is for, and where its context and tokenizer end."""
    return [
        "## Intended use and limits",
        "",
        "- A small model for learning and experiments: it imitates the style of its training text and "
        "knows nothing beyond it. It is not instruction-tuned and will state falsehoods fluently.",
        f"- It sees at most {n_positions} tokens. GPT-2's positions are learned, so prompt + new tokens "
        f"must stay within {n_positions}: past that, `generate` fails with an index error. For longer "
        'text pass `handle_long_generation="hole"` to the pipeline (it keeps the prompt\'s end), or use '
        "`tinylm generate`, whose context slides.",
        *(["- A char tokenizer knows only the characters of its training text; any other character "
           "becomes `[UNK]`."] if kind == "char" else []),
        "- Perplexity is per token of this tokenizer, so it is not comparable across tokenizers.",
    ]


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


def adapter_usage_lines(folder_name: str, base_model: str | None) -> list[str]:
    """The "How to use" section of an adapter folder: peft puts it on the base model."""
    base = base_model or "the base model's folder"
    return [
        USAGE_HEADING,
        "",
        "The adapters load with `peft` on the model they were trained on:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{folder_name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{folder_name}")',
        "```",
        "",
        f"Replace `{folder_name}` with the folder's path. `model.merge_and_unload()` gives a plain `transformers` "
        "model; `tinylm export` without `--adapter` writes that model's folder.",
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
    return cached_hub_dataset(source.get("dataset")) if isinstance(source, dict) else None


def cached_hub_dataset(spec) -> str | None:
    """`spec` (a --dataset) as a Hub dataset id, when it is one this machine's cache holds; else None."""
    dataset = hub_id(spec) if isinstance(spec, str) else None
    return dataset if dataset and in_hub_cache(dataset, "dataset") else None


def mix_entries(meta: dict) -> list[dict]:
    """The datasets of a mix (`prepare --dataset A --dataset B --weights ...`), as meta.json records them."""
    source = meta.get("source")
    entries = source.get("datasets") if isinstance(source, dict) else None
    return [entry for entry in entries if isinstance(entry, dict)] if isinstance(entries, list) else []


def mix_datasets(meta: dict) -> list[str]:
    """The Hub dataset ids among a mix's datasets (none for one dataset or a text)."""
    return [dataset for entry in mix_entries(meta) if (dataset := cached_hub_dataset(entry.get("dataset")))]


def mix_text(meta: dict) -> str | None:
    """A mix as the card's text names it: each dataset (linked when a Hub dataset) with its weight."""
    names = []
    for entry in mix_entries(meta):
        dataset = cached_hub_dataset(entry.get("dataset"))
        name = f"[`{dataset}`]({HUB_URL}/datasets/{dataset})" if dataset else f"`{local_name(str(entry.get('dataset')))}`"
        weight = entry.get("weight")
        names.append(name + (f" ({weight:.0%})" if isinstance(weight, (int, float)) else ""))
    return "a mix of " + ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else None


def source_name(meta: dict, dataset: str | None = None) -> str | None:
    """How the card names the data: the Hub dataset id `dataset`, else the base name of the text, folder or
    dataset file it was prepared from (meta.json's `source`; a plain string before version 2)."""
    if dataset:
        return dataset
    if mix_entries(meta):
        return " + ".join(cached_hub_dataset(entry.get("dataset")) or local_name(str(entry.get("dataset")))
                          for entry in mix_entries(meta))
    source = meta.get("source")
    if isinstance(source, dict):
        source = source.get("dataset") or source.get("input")
    return local_name(source) if isinstance(source, str) and source else None


def source_text(meta: dict, dataset: str | None) -> str | None:
    """The source for the card's text: a link to a Hub dataset, else the name in backticks."""
    if dataset:
        return f"[`{dataset}`]({HUB_URL}/datasets/{dataset})"
    if mix_entries(meta):
        return mix_text(meta)
    return f"`{source_name(meta)}`" if source_name(meta) else None


def data_lines(meta: dict, dataset: str | None = None) -> list[str]:
    """The card's data section, from the prepared data's meta.json (as stored in the checkpoint)."""
    splits = meta.get("splits") if isinstance(meta.get("splits"), dict) else {}
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    lines = []
    if source_name(meta):
        lines.append(f"- source: {source_text(meta, dataset)}")
    if source.get("dataset") or mix_entries(meta):
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
