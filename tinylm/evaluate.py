"""`tinylm eval`: score a model on a text: loss per token, perplexity and bits per byte.

How a text is scored (docs/inference-and-demo.md, "Scoring a model"):

- The text is one stream of tokens that starts with the model's bos token (`<|endoftext|>`):
  a plain text's tokens; a dataset's documents, each followed by `<|endoftext|>` as `tinylm
  prepare` writes them; or a prepared split's tokens as stored. Every token after the bos
  token is a target, so every byte of the text is scored, whatever the tokenizer.
- Windows of at most the model's context (`block_size` inputs, one more token for the last
  target) start every `stride` tokens (default: the context, no overlap). Each scores only the
  targets no earlier window scored: every target once, after at least `context - stride`
  tokens of its window (fewer only at the start of the text).
- bits per byte = the scored targets' negative log-likelihood in bits / the UTF-8 bytes those
  targets spell (special tokens spell none). Unlike a loss per token, it does not depend on how
  the tokenizer cuts the text, so a char model and a BPE model on the same text compare.

`--blocks training` scores instead the blocks a training run evaluates (`data.eval_dataset`, as
`run_eval` does), so the loss is the run's recorded val_loss.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from . import startup
from .errors import UserError, run_cli

BLOCKS = ("all", "training")
DEFAULT_BATCH_SIZE = 4  # windows per forward pass: the logits take batch * context * vocab floats
DATA_SPLITS = ("train", "val")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tinylm eval", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a tinylm checkpoint file (e.g. checkpoints/ckpt_best.pt)")
    parser.add_argument("--model", help="instead of --checkpoint: a folder written by `tinylm export`, or a Hub id "
                                        "in the local Hugging Face cache")
    parser.add_argument("--input", help="a UTF-8 text file (or a folder of them) to score")
    parser.add_argument("--data", help="instead of --input: a prepared data folder (tinylm prepare's --out)")
    parser.add_argument("--dataset", help="instead of --input: a dataset file or folder, or a cached Hub dataset")
    parser.add_argument("--split", help="with --data: train or val (default: val); with --dataset: a split "
                                        "(default: validation if it has one, else train)")
    parser.add_argument("--text-column", default="text", help="with --dataset: the column holding the text "
                                                              "(default: text)")
    parser.add_argument("--blocks", default="all", help="all: every token of the text (default); training: the "
                                                        "blocks training evaluates (with --checkpoint and --data)")
    parser.add_argument("--stride", type=int, help="tokens between window starts, 1 to the context (default: the "
                                                   "context: windows do not overlap)")
    parser.add_argument("--batch-size", type=int, help=f"windows per forward pass (default: {DEFAULT_BATCH_SIZE}; "
                                                       "with --blocks training, the run's batch_size)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the lines")
    return parser.parse_args(argv)


def check_flags(args: argparse.Namespace) -> None:
    """Every mistake in the flags, as one line, before torch is imported."""
    if bool(args.checkpoint) == bool(args.model):
        raise UserError("pass exactly one of --checkpoint FILE (a tinylm checkpoint) and --model NAME "
                        "(an exported folder or a Hub id)")
    texts = [flag for flag in ("input", "data", "dataset") if getattr(args, flag)]
    if len(texts) != 1:
        raise UserError("pass exactly one of --input FILE, --data DIR and --dataset NAME: the text to score"
                        + (f" (got --{' and --'.join(texts)})" if texts else ""))
    if args.split is not None and args.input:
        raise UserError("--split applies to --data or --dataset, not to an --input text: drop it")
    if args.data and args.split not in (None, *DATA_SPLITS):
        raise UserError(f"--split {args.split}: prepared data has the splits {' and '.join(DATA_SPLITS)}")
    if args.text_column != "text" and not args.dataset:
        raise UserError("--text-column applies to --dataset: drop it")
    if args.blocks not in BLOCKS:
        raise UserError(f"--blocks must be one of {', '.join(BLOCKS)}, got {args.blocks!r}")
    if args.blocks == "training" and not (args.checkpoint and args.data):
        raise UserError("--blocks training scores the blocks a run evaluated: it needs --checkpoint (whose config "
                        "names them) and --data (the run's prepared data)")
    if args.blocks == "training" and args.stride is not None:
        raise UserError("--stride applies to --blocks all: training's blocks are fixed; drop --stride")
    for flag in ("stride", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be 1 or more, got {getattr(args, flag)}")


@dataclass
class Score:
    """Sums over the scored targets; the reported numbers are read from them."""

    windows: int = 0
    tokens: int = 0
    bytes: int = 0
    nll: float = 0.0  # nats

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None  # None: only special tokens


def token_losses(model, blocks):
    """Cross-entropy of each of `blocks[:, 1:]` given the tokens before it: shape (batch, length - 1).

    `model.per_block_loss` per token instead of per block (a window scores only some targets);
    tests/test_eval.py checks the two agree on the blocks training evaluates.
    """
    import torch

    # Embeddings looked up here, as `sampler.next_logits` does: given ids that hold the pad token (our
    # bos/eos), transformers warns the input "may be padded", which it never is.
    logits = model(inputs_embeds=model.get_input_embeddings()(blocks[:, :-1]), use_cache=False).logits
    targets = blocks[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view_as(targets)


def score(model, batches, byte_counts) -> Score:
    """Sum the losses and bytes of the targets of `batches`: (blocks, skip), the first `skip` targets not scored."""
    import torch

    total = Score()
    with torch.no_grad():
        for blocks, skip in batches:
            blocks = blocks.to(model.device)
            targets = blocks[:, 1 + skip:]
            total.nll += token_losses(model, blocks)[:, skip:].double().sum().item()
            total.tokens += targets.numel()
            total.bytes += int(byte_counts[targets.cpu()].sum())
            total.windows += len(blocks)
    return total


def byte_counts(tokenizer):
    """The UTF-8 bytes each token id spells, as a tensor: none for special tokens.

    A byte-level BPE token (GPT-2's, tinylm's bpe) is one symbol per byte; any other token (a
    char tokenizer's) is its text. `text_tokens` checks the counts add up to the text's bytes.
    """
    import torch

    byte_level = "ByteLevel" in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str())["decoder"])
    special = special_ids(tokenizer)
    counts = torch.zeros(len(tokenizer), dtype=torch.int64)
    for token, index in tokenizer.get_vocab().items():
        if index not in special:
            counts[index] = len(token) if byte_level else len(token.encode("utf-8"))
    return counts


def special_ids(tokenizer) -> set[int]:
    """`<|endoftext|>`, `[UNK]` and any other special or added token: none is text."""
    return set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)


def window_batches(read, length: int, context: int, stride: int, batch_size: int):
    """(blocks, skip) batches over positions 0..length-1; `read(start, stop)` gives those tokens.

    Window k reads positions [k * stride, k * stride + context + 1) (cut at the end) and scores
    the targets after the last one window k - 1 scored; windows of one shape share a batch.
    """
    import torch

    pending, shape, scored_to = [], None, 1  # position 0, the bos token, is never a target
    for start in range(0, length - 1, stride):
        stop = min(start + context + 1, length)
        window_shape = (stop - start, scored_to - (start + 1))
        if pending and (window_shape != shape or len(pending) == batch_size):
            yield torch.stack(pending), shape[1]
            pending = []
        pending.append(read(start, stop))
        shape, scored_to = window_shape, stop
        if stop == length:
            break
    yield torch.stack(pending), shape[1]


def text_tokens(tokenizer, pieces, bos: int, eos: int | None, where: str, counts):
    """The stream to score: bos, then the tokens of each piece of text (`eos` after each, when given).

    A piece is a document (followed by eos) or a chunk of one text (eos None). Characters a
    char tokenizer never saw become `[UNK]`, which the model never saw either: refused. A
    special token written in the text (`<|endoftext|>` between stories) is that token, no text.
    """
    import torch

    from .tokenizer import batched

    special = special_ids(tokenizer)
    ids, unknown, text_bytes = [bos], set(), 0
    for group in batched(pieces, 16):
        for text, encoding in zip(group, tokenizer.backend_tokenizer.encode_batch(group, add_special_tokens=False)):
            ids += encoding.ids + ([eos] if eos is not None else [])
            text_bytes += len(text.encode("utf-8"))
            for token, (start, end) in zip(encoding.ids, encoding.offsets):
                if token == tokenizer.unk_token_id:
                    unknown.add(text[start:end])
                elif token in special:
                    text_bytes -= len(text[start:end].encode("utf-8"))
    if unknown:
        shown = ", ".join(f"{char!r} (U+{ord(char[0]):04X})" for char in sorted(unknown)[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise UserError(f"{where} has characters the model's tokenizer never saw in training: {shown}{more}; "
                        "remove or replace them (a char model knows only the characters of its training text)")
    if not text_bytes:  # nothing, or only special tokens: no byte to score
        raise UserError(f"{where} holds no text to score: pass a text with at least one character")
    ids = torch.tensor(ids)
    spelled = int(counts[ids].sum())
    if spelled != text_bytes:  # a tokenizer that normalizes the text, or spells bytes its own way
        raise UserError(f"the tokens of {where} spell {spelled} bytes, but the text has {text_bytes}: the model's "
                        "tokenizer does not spell text byte for byte, so bits per byte would be wrong; tinylm eval "
                        "counts bytes for char and byte-level BPE tokenizers")
    return ids


def dataset_pieces(spec: str, split: str | None, column: str):
    """(the split's name, its non-empty documents) of a dataset, read as `tinylm prepare --dataset` reads it."""
    import datasets

    from . import documents

    if not sys.stderr.isatty():  # as `tinylm prepare --dataset`: datasets' bars would print line after line
        datasets.disable_progress_bars()
    splits = documents.load(spec, None, streaming=False)
    split = split or ("validation" if "validation" in splits else "train")
    if split not in splits:
        raise UserError(f"dataset {spec} has no split {split!r}; its splits are {', '.join(splits)}: "
                        "pass --split NAME")
    documents.check_column(splits[split], column, spec)
    return split, documents.Documents(spec, splits[split], None, column, {}).texts()


def open_prepared(folder: Path):
    """The prepared data whose meta.json is in `folder`, or in data/ for data/processed (as training looks)."""
    from . import data, formats, paths

    for candidate in data.bin_candidates(folder):
        meta_path = candidate / paths.META_NAME
        if meta_path.is_file():
            return data.PreparedData(formats.load_meta(meta_path), meta_path)
    raise UserError(f"--data {folder} holds no {paths.META_NAME}: pass the folder `tinylm prepare` wrote "
                    f"(its --out: {paths.DATA_DIR} for bin data, {paths.PROCESSED_DIR} for txt)")


def prepared_reader(stream, bos: int):
    """`read(start, stop)` over bos followed by a prepared split's memory-mapped tokens."""
    import numpy as np
    import torch

    def read(start: int, stop: int):
        if start == 0:
            return torch.cat([torch.tensor([bos]), read(1, stop)])
        return stream.blocks(np.array([start - 1]), stop - start - 1)[0]  # position p is the split's token p - 1

    return read


def load_model(args: argparse.Namespace, device):
    """(model, tokenizer, the run's config or None) for --checkpoint or --model, in eval mode on `device`."""
    from . import checkpoint, sampler
    from . import tokenizer as tok

    if args.model:
        return (*sampler.load_model(args.model, None, device), None)
    path = Path(args.checkpoint)
    if path.is_dir():
        raise UserError(f"--checkpoint {path} is a folder: pass a model folder with --model {path}, "
                        "or a checkpoint file with --checkpoint")
    payload = checkpoint.load(path)
    model, tokenizer = checkpoint.model_from(payload), checkpoint.tokenizer_from(payload)
    tok.check_fits(tokenizer, model.config.vocab_size, path)
    return model.to(device).eval(), tokenizer, payload["config"]


def bos_id(model, tokenizer) -> int:
    """The token a text starts from: the tokenizer's bos (tinylm's and GPT-2's: `<|endoftext|>`), else its eos."""
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id, model.config.bos_token_id):
        if candidate is not None:
            return candidate
    raise UserError("the model's tokenizer names no bos or eos token for the text to start from")


def batches_to_score(args, text, model, tokenizer, run_config, counts):
    """The (blocks, skip) batches the flags ask for (`text`: the --input's `plain_text.Source`), with the
    context and stride of their windows; `args.split` becomes the split read."""
    from . import data, sampler

    context, bos = sampler.context_length(model), bos_id(model, tokenizer)
    stride = args.stride or context
    if stride > context:
        raise UserError(f"--stride {stride} is longer than the model's context ({context}): it would skip tokens; "
                        f"pass at most {context}")
    batch_size = args.batch_size or DEFAULT_BATCH_SIZE
    if args.input or args.dataset:
        if args.input:
            ids = text_tokens(tokenizer, text.chunks(), bos, None, args.input, counts)
        else:
            args.split, documents = dataset_pieces(args.dataset, args.split, args.text_column)
            ids = text_tokens(tokenizer, documents, bos, tokenizer.eos_token_id, f"dataset {args.dataset}", counts)
        return window_batches(lambda start, stop: ids[start:stop], len(ids), context, stride, batch_size), context, stride
    prepared = open_prepared(Path(args.data))
    if prepared.tokenizer().get_vocab() != tokenizer.get_vocab():
        raise UserError(f"{prepared.meta_path} was prepared with another tokenizer than the model's "
                        f"({prepared.tokenizer_kind}, {prepared.vocab_size} tokens; the model's has {len(tokenizer)}): "
                        "its token ids mean other text; score the text itself with --input, or prepare it with the "
                        "model's tokenizer")
    args.split = args.split or "val"
    stream = prepared.split(args.split)
    if args.blocks == "all":
        reader = prepared_reader(stream, bos)
        return window_batches(reader, stream.num_tokens + 1, context, stride, batch_size), context, stride
    # Exactly what a run's evaluation serves (run_eval.loaders): the run's block_size and
    # eval_iters * batch_size blocks.
    training, block_size = run_config["training"], run_config["model"]["block_size"]
    blocks = data.eval_dataset(stream, block_size=block_size, num_blocks=training["eval_iters"] * training["batch_size"])
    batch_size = args.batch_size or training["batch_size"]
    return (((blocks[i : i + batch_size]["input_ids"], 0) for i in range(0, len(blocks), batch_size)),
            block_size, None)


def report(args, result: Score, context: int, stride: int | None) -> dict:
    """What `--json` prints; the lines say the same."""
    return {
        "model": args.checkpoint or args.model, "text": args.input or args.dataset or args.data,
        "split": args.split, "blocks": args.blocks,
        "context": context, "stride": stride, "windows": result.windows, "tokens": result.tokens,
        "bytes": result.bytes, "loss": result.loss, "perplexity": math.exp(min(result.loss, 700.0)),
        "bits_per_byte": result.bits_per_byte,
    }


def lines(result: dict) -> str:
    """The report for people."""
    split = f" ({result['split']} split)" if result["split"] else ""
    windows = (f"windows of up to {result['context']} tokens of context, stride {result['stride']}"
               if result["stride"] else f"blocks of {result['context']} + 1 tokens, the ones training evaluates")
    bits = result["bits_per_byte"]
    return (f"model          {result['model']}\n"
            f"text           {result['text']}{split}\n"
            f"scored         {result['tokens']} tokens, {result['bytes']} bytes, in {result['windows']} {windows}\n"
            f"loss           {result['loss']:.4f} nats per token\n"
            f"perplexity     {result['perplexity']:.4f}\n"
            f"bits per byte  {'n/a (the scored tokens spell no text)' if bits is None else f'{bits:.4f}'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_flags(args)
    from .plain_text import Source

    text = Source.open(args.input) if args.input else None  # a missing or empty file: said before loading a model
    with startup.heavy_imports():
        from . import sampler  # torch and transformers: only once the flags are known to be good

    model, tokenizer, run_config = load_model(args, sampler.pick_device(args.device))
    counts = byte_counts(tokenizer)
    batches, context, stride = batches_to_score(args, text, model, tokenizer, run_config, counts)
    result = report(args, score(model, batches, counts), context, stride)
    print(json.dumps(result) if args.json else lines(result))
    return 0


if __name__ == "__main__":
    startup.command_process()
    sys.exit(run_cli(main))
