"""`tinylm generate`: sample text from a checkpoint or an exported model folder.

A thin layer: parse and check the flags first (so `--help` and argument errors are
instant), then import the sampling engine (`tinylm.sampler`: torch, transformers) and
stream the text to stdout. See docs/inference-and-demo.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import paths, startup
from .config import DEVICES, Sampling
from .errors import UserError, run_cli

SAMPLE_SEPARATOR = "\n---------------\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Sampling()
    parser = argparse.ArgumentParser(
        prog="tinylm generate",
        description="Sample text from a tinylm checkpoint or an exported model folder; text streams to stdout.",
    )
    add_model_arguments(parser)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (default: empty, start from <|endoftext|>)")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                        help=f"tokens to generate per sample (default: {defaults.max_new_tokens})")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help=f"below 1 is more conservative, above 1 more random, 0 is greedy "
                             f"(default: {defaults.temperature})")
    parser.add_argument("--top-k", type=int, default=defaults.top_k,
                        help=f"sample only from the k most likely tokens, 0 = all (default: {defaults.top_k})")
    parser.add_argument("--top-p", type=float, default=defaults.top_p,
                        help=f"sample only from the most likely tokens whose probabilities add up to p, "
                             f"1 = all (default: {defaults.top_p})")
    parser.add_argument("--stop-at-eos", action=argparse.BooleanOptionalAction, default=defaults.stop_at_eos,
                        help="end a sample where the model emits <|endoftext|>, the end of a document, instead "
                             "of running on into a new one (default: on; --no-stop-at-eos runs to --max-new-tokens)")
    parser.add_argument("--num-samples", type=int, default=1, help="how many samples to draw (default: 1)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed; same seed, same text (default: 1337)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to run (default: auto)")
    return parser.parse_args(argv)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, or --model (a Hub id or a model folder) with --revision: what to sample from."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--checkpoint",
                       help=f"tinylm checkpoint file or exported model folder (default: {paths.CHECKPOINT_BEST})")
    which.add_argument("--model", help="a Hub id (e.g. user/my-model, gpt2) or a local model folder")
    parser.add_argument("--revision", help="with --model: a branch, tag or commit of the Hub model")


def load_chosen_model(args: argparse.Namespace, device):
    """(model, tokenizer) that --checkpoint or --model names, on `device`."""
    from . import sampler

    if args.revision and not args.model:
        raise UserError("--revision applies to --model (a Hub id): pass --model ID --revision REV")
    if args.model:
        return sampler.load_model(args.model, args.revision, device)
    return sampler.load(args.checkpoint or paths.CHECKPOINT_BEST, device)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt
    path = Path(args.prompt_file)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--prompt-file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompt-file {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read --prompt-file {path}: {exc.strerror or exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.stop_at_eos)
    sampling.check()
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be 1 or more, got {args.num_samples}")
    if not 0 <= args.seed < 2**64:  # what torch.Generator.manual_seed takes
        raise UserError(f"--seed must be in [0, 2**64), got {args.seed}")
    prompt = read_prompt(args)
    with startup.heavy_imports():
        from . import sampler  # torch and transformers: only once the flags are known to be good

    device = sampler.pick_device(args.device)
    model, tokenizer = load_chosen_model(args, device)
    prompt_ids = sampler.model_prompt_ids(model, tokenizer, prompt)
    block_size = sampler.context_length(model)
    if len(prompt_ids) > block_size:
        print(f"note: the prompt is {len(prompt_ids)} tokens, longer than the model's context; "
              f"it sees only the last {block_size}", file=sys.stderr)
    generator = sampler.make_generator(device, args.seed)
    try:
        for index in range(args.num_samples):
            if index:
                sys.stdout.write(SAMPLE_SEPARATOR)
            sys.stdout.write(prompt)
            tokens = sampler.sample_tokens(model, prompt_ids, sampling, generator)
            for piece in sampler.decode_stream(tokenizer, tokens):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (e.g. `| head`) has gone; stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    startup.command_process()
    sys.exit(run_cli(main))
