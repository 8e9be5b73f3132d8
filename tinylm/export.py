"""`tinylm export`: turn a checkpoint into a folder plain `transformers` loads (and, with --onnx, model.onnx).

    tinylm export --checkpoint checkpoints/ckpt_best.pt --out exported/NAME [--force] [--onnx | --adapter]
                  [--license ID] [--language CODE] [--base-model ID]

The folder holds config.json, model.safetensors, generation_config.json,
tokenizer.json, tokenizer_config.json and a README.md model card (plus
loss_curve.png when matplotlib is installed). A LoRA run's model is exported
with its adapters merged into its weights; with --adapter, the folder holds
the adapters instead (adapter_config.json and adapter_model.safetensors, which
peft's `PeftModel.from_pretrained` puts on the base model), with the tokenizer
and the card. It is written into a hidden
temp folder beside --out and renamed into place only when complete, so a
failure never leaves half a folder behind, and an existing folder is only
replaced with --force (and only if it is itself an earlier export). Every
file gets the usual umask-based mode.

The model card is written by model_card.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.utils import logging as hf_logging

from . import checkpoint, lora, onnx_export, paths, startup
from . import tokenizer as tok
from .atomic import dir_mode, file_mode, replace_folder
from .config import Sampling, check_card_field
from .errors import UserError, run_cli
from .model_card import (CARD_NAME, LOSS_CURVE_NAME, base_model_of, check_base_model, draw_loss_curve, model_card,
                         train_log_records)

# What makes a folder an export: `push` refuses anything without these, `--force` replaces nothing else.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# What makes a folder an --adapter export, which --force replaces too.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json")
# transformers v4's AutoTokenizer knows this class name and v5 keeps it as an alias of its
# tokenizers backend, so naming it makes the folder load in both.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"


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
    parser.add_argument("--adapter", action="store_true",
                        help="a LoRA run's adapters as a PEFT adapter folder, which PeftModel.from_pretrained puts "
                        "on the base model, instead of the model with its adapters merged (needs peft)")
    parser.add_argument("--license", metavar="ID",
                        help="the model card's license, a Hub license id such as mit or apache-2.0 "
                        "(default: the training config's hub.license; none: the card says none is stated)")
    parser.add_argument("--language", metavar="CODE",
                        help="the model card's language, e.g. en (default: the training config's hub.language; "
                        "none: the card names no language)")
    add_base_model_argument(parser)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # transformers' per-file bars only clutter this command's output

    out = export(args.checkpoint, args.out, force=args.force, onnx=args.onnx, adapter=args.adapter,
                 license=args.license, language=args.language, base_model=args.base_model)
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<24} {format_size(path.stat().st_size):>10}")
    load = (f"PeftModel.from_pretrained(base_model, {str(out)!r}) on the model it was fine-tuned from" if args.adapter
            else f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    print(f"exported {args.checkpoint} to {out}; load it with {load}")
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
    adapter: bool = False,
    license: str | None = None,
    language: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write the export folder for `checkpoint_path` at `out` (`adapter`: a LoRA run's adapter folder); return `out`.

    `license` and `language` (for the model card) default to the run's `[hub]` settings;
    `base_model` (a Hub id) to `model.init_from` when that is a Hub model (see `base_model_of`).
    """
    checkpoint_path, out = Path(checkpoint_path), Path(out)
    name = out.resolve().name
    check_card_field("license", license or "", "--license")
    check_card_field("language", language or "", "--language")
    check_base_model(base_model)
    check_out_folder(out, force)
    if onnx and adapter:
        raise UserError("--onnx writes a whole model and --adapter only the LoRA adapters: drop one (without "
                        "--adapter, the model is exported with its adapters merged)")
    if onnx:
        onnx_export.require_onnx()  # before any work, so a missing extra costs nothing
    payload = checkpoint.load(checkpoint_path)
    if adapter and "adapter" not in payload:
        raise UserError(f"--adapter: {checkpoint_path} is not a LoRA run's checkpoint (its config has no [lora] "
                        "enabled), so it has no adapters; export it without --adapter")
    model = checkpoint.model_from(payload)
    tokenizer = tokenizer_of(payload, checkpoint_path)
    tok.check_fits(tokenizer, model.config.vocab_size, checkpoint_path)
    log_records = train_log_records(checkpoint_path)
    base_model = base_model_of(payload, base_model, checkpoint_path)

    with staged_folder(out, force) as staging:
        save_tokenizer(tokenizer, model.config.n_positions, staging)
        if adapter:
            set_special_tokens_and_sampling(model, tokenizer)  # for the card, which describes the adapted model
            lora.save_adapter(checkpoint.trained_model(payload), staging, base_model)
        else:
            save_model(model, tokenizer, staging)
        curve = draw_loss_curve(log_records, staging / LOSS_CURVE_NAME, title=name)
        card = model_card(name, payload, model, tokenizer, log_records, curve, license=license, language=language,
                          base_model=base_model, adapter=adapter)
        (staging / CARD_NAME).write_text(card, encoding="utf-8")
        if onnx:
            print("writing model.onnx (tracing and checking the graph takes a few seconds)", flush=True)
            onnx_export.export_onnx(model, staging / onnx_export.ONNX_NAME)
        normalise_modes(staging)
        if adapter:
            check_adapter_loads(staging, payload)
        else:
            check_loads(staging)
    return out


# --- what goes in the folder ---------------------------------------------------------------------------


def save_model(model, tokenizer, folder: Path) -> None:
    """config.json, model.safetensors (the tied lm_head is stored once) and generation_config.json,
    with `set_special_tokens_and_sampling`."""
    set_special_tokens_and_sampling(model, tokenizer)
    model.save_pretrained(folder)


def set_special_tokens_and_sampling(model, tokenizer) -> None:
    """The saved `tokenizer`'s special token ids in `model.config`, and `tinylm generate`'s sampling in its
    generation config: a fine-tuned GPT-2 keeps OpenAI's config, which has no pad token, while the
    tokenizer pads with <|endoftext|> (`save_tokenizer`)."""
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
    mode = file_mode()  # read once: each read creates a probe file
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


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


def check_adapter_loads(folder: Path, payload: dict[str, Any]) -> None:
    """Put the adapter `folder` on the checkpoint's base model with peft's `PeftModel.from_pretrained`
    (local files only) and run one forward pass."""
    try:
        model = lora.from_adapter_folder(checkpoint.gpt2_from(payload), folder)
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long))
    except Exception as exc:  # peft and transformers raise many types for broken folders
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{folder} does not load with peft: {reason[:300]}") from None


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


# --- the output folder ----------------------------------------------------------------------------------


def is_export_folder(folder: Path) -> bool:
    """Whether `folder` holds every file an export writes."""
    return folder.is_dir() and all((folder / name).is_file() for name in REQUIRED_FILES)


def check_out_folder(out: Path, force: bool) -> None:
    """Refuse an --out that is a file, a non-empty folder without --force, or (with --force) not an export."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder: pass a folder path, e.g. exported/my-model")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise UserError(f"--out {out} is not empty; pass --force to replace it, or choose another folder")
    if not (is_export_folder(out) or all((out / name).is_file() for name in ADAPTER_FILES)):
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
        staging.chmod(dir_mode())  # mkdtemp makes it private (0700); an export is an ordinary folder
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
    startup.command_process()
    sys.exit(run_cli(main))
