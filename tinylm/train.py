"""`tinylm train` / `python tinylm/train.py` / `accelerate launch tinylm/train.py`: the training CLI.

A thin layer: parse flags, load the TOML config, apply the flag overrides, run
`tinylm.trainer.train`. See docs/training.md.
"""

if not __package__:  # run as a script (`python tinylm/train.py`): import the package, not sibling files
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import sys
from pathlib import Path

from tinylm import paths
from tinylm.config import DATA_FORMATS, PRECISIONS, TOKENIZERS, apply_overrides, load_config
from tinylm.errors import run_cli

# Flag -> dotted config key it overrides (flags win over the TOML file).
OVERRIDES = {
    "tokenizer": "data.tokenizer",
    "processed_dir": "data.processed_dir",
    "max_iters": "training.max_iters",
    "device": "training.device",
    "precision": "training.precision",
    "data_format": "training.data_format",
    "batch_size": "training.batch_size",
    "grad_accum_steps": "training.grad_accum_steps",
    "learning_rate": "training.learning_rate",
    "eval_interval": "training.eval_interval",
    "eval_iters": "training.eval_iters",
    "log_interval": "training.log_interval",
    "seed": "training.seed",
    "out_dir": "training.out_dir",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylm train",
        description="Train a GPT-2 style model on prepared data. Flags override the TOML config.",
    )
    parser.add_argument("--config", default=paths.CONFIG_EXAMPLE,
                        help=f"TOML preset (default: {paths.CONFIG_EXAMPLE})")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, help="tokenizer the data was prepared with (data.tokenizer)")
    parser.add_argument("--max-iters", type=int, help="total optimizer steps (training.max_iters)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="training.device (default in config: auto)")
    parser.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                        help=f"continue from a checkpoint (default: <out_dir>/{paths.LAST_NAME})")
    overrides = parser.add_argument_group("config overrides")
    overrides.add_argument("--precision", choices=PRECISIONS, help="training.precision")
    overrides.add_argument("--data-format", choices=DATA_FORMATS, help="training.data_format")
    overrides.add_argument("--processed-dir", help="data.processed_dir")
    overrides.add_argument("--batch-size", type=int, help="training.batch_size")
    overrides.add_argument("--grad-accum-steps", type=int, help="training.grad_accum_steps")
    overrides.add_argument("--learning-rate", type=float, help="training.learning_rate")
    overrides.add_argument("--eval-interval", type=int, help="training.eval_interval")
    overrides.add_argument("--eval-iters", type=int, help="training.eval_iters")
    overrides.add_argument("--log-interval", type=int, help="training.log_interval")
    overrides.add_argument("--seed", type=int, help="training.seed")
    overrides.add_argument("--out-dir", help="training.out_dir (checkpoints and train_log.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = load_config(args.config)
    config = apply_overrides(config, {key: getattr(args, flag) for flag, key in OVERRIDES.items()},
                             source=f"{args.config} + command-line flags")
    resume = None
    if args.resume is not None:
        resume = Path(args.resume) if args.resume else Path(config.training.out_dir) / paths.LAST_NAME

    from tinylm.trainer import train  # heavy imports (torch, transformers) only once flags are valid

    summary = train(config, resume=resume)
    return 130 if summary["stop_reason"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
