"""`tinylm train` / `python tinylm/train.py` / `accelerate launch [--config_file F] tinylm/train.py`: the training CLI.

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

from tinylm import paths, startup
from tinylm.config import DATA_FORMATS, PRECISIONS, TOKENIZERS, Config, from_dict, load_config
from tinylm.errors import UserError, run_cli

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
    "min_lr": "training.min_lr",
    "warmup_iters": "training.warmup_iters",
    "lr_decay_iters": "training.lr_decay_iters",
    "eval_interval": "training.eval_interval",
    "eval_iters": "training.eval_iters",
    "log_interval": "training.log_interval",
    "seed": "training.seed",
    "out_dir": "training.out_dir",
    "gradient_checkpointing": "training.gradient_checkpointing",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinylm train",
        description="Train a GPT-2 style model on prepared data. Flags override the TOML config.",
    )
    parser.add_argument("--config",
                        help=f"TOML preset (default: {paths.CONFIG_EXAMPLE}; with --resume: the run's own config, "
                             "saved in the checkpoint)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, help="tokenizer the data was prepared with (data.tokenizer)")
    parser.add_argument("--max-iters", type=int, help="total optimizer steps (training.max_iters)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="training.device (default in config: auto)")
    parser.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                        help=f"continue the run saved in a checkpoint (default: <out_dir>/{paths.LAST_NAME}), "
                             "with its config; flags given here override it. OWNER/NAME[@REVISION]: the run "
                             f"[hub] push_checkpoints keeps on the Hub (branch {paths.HUB_CHECKPOINTS_BRANCH})")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an out_dir that already holds one, replacing its checkpoints")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the run's memory estimate (for --device, on any machine) and whether it fits in "
                             "--memory; train nothing, write nothing")
    parser.add_argument("--memory", metavar="SIZE",
                        help="the memory the run may use, e.g. 8GB (GB = GiB = 2**30 bytes, as GPU makers count): "
                             "stop before the first step if the estimate exceeds it (default: on a GPU, its free "
                             "memory; on a CPU, no check)")
    parser.add_argument("--processes", type=int, metavar="N",
                        help="with --dry-run: estimate each of N processes (a run has as many as accelerate launch "
                             "starts)")
    parser.add_argument("--fsdp", action="store_true",
                        help="with --dry-run and --processes: the processes shard the model with FSDP "
                             "(configs/accelerate/fsdp.yaml)")
    overrides = parser.add_argument_group("config overrides")
    overrides.add_argument("--precision", choices=PRECISIONS, help="training.precision")
    overrides.add_argument("--data-format", choices=DATA_FORMATS, help="training.data_format")
    overrides.add_argument("--processed-dir", help="data.processed_dir")
    overrides.add_argument("--batch-size", type=int, help="training.batch_size")
    overrides.add_argument("--grad-accum-steps", type=int, help="training.grad_accum_steps")
    overrides.add_argument("--learning-rate", type=float, help="training.learning_rate (the peak)")
    overrides.add_argument("--min-lr", type=float, help="training.min_lr (where the cosine decay ends)")
    overrides.add_argument("--warmup-iters", type=int, help="training.warmup_iters (linear warmup to the peak)")
    overrides.add_argument("--lr-decay-iters", type=int, help="training.lr_decay_iters (the step the decay ends)")
    overrides.add_argument("--eval-interval", type=int, help="training.eval_interval")
    overrides.add_argument("--eval-iters", type=int, help="training.eval_iters")
    overrides.add_argument("--log-interval", type=int, help="training.log_interval")
    overrides.add_argument("--seed", type=int, help="training.seed")
    overrides.add_argument("--out-dir", help="training.out_dir (checkpoints and train_log.json)")
    overrides.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                           help="training.gradient_checkpointing (recompute activations in the backward: less memory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_launch_flags(args)
    overrides = {key: getattr(args, flag) for flag, key in OVERRIDES.items()}
    if args.resume is None:
        config, resumed = load_config(args.config or paths.CONFIG_EXAMPLE, overrides), None
    else:
        config, resumed = resume_config(args, overrides)
    with startup.heavy_imports():  # torch and transformers: only once the flags and the config are valid
        from tinylm import memory

    memory_limit = None if args.memory is None else memory.parse_size(args.memory)
    if args.dry_run:
        print(memory.dry_run(config, device=config.training.device, limit=memory_limit,
                             resumed=resumed.payload if resumed else None, processes=args.processes or 1,
                             fsdp=args.fsdp))
        return 0

    with startup.heavy_imports():  # the trainer's: accelerate, datasets...
        import datasets  # noqa: F401  (the evaluation blocks: tinylm.data imports it only when it builds them)
        from accelerate import PartialState

        from tinylm.run_folder import EXPORT_NAME, final_checkpoint
        from tinylm.trainer import train

    if config.hub.repo_id:  # only runs that push need the Hub client
        from tinylm import push

        warning = push.check_run_push(config.hub)  # fails now, not after hours of training
        if warning and PartialState().is_main_process:
            print(warning, flush=True)
    summary = train(config, resume=resumed, overwrite=args.overwrite, memory_limit=memory_limit)
    if summary["stop_reason"] == "interrupted":
        return 130
    if config.hub.repo_id and PartialState().is_main_process:
        out_dir = Path(config.training.out_dir)
        print(push.push_run(final_checkpoint(out_dir), out_dir / EXPORT_NAME, config.hub), flush=True)
    return 0


def check_launch_flags(args: argparse.Namespace) -> None:
    """--processes and --fsdp describe a launch to --dry-run; a run gets them from accelerate launch."""
    if (args.processes is not None or args.fsdp) and not args.dry_run:
        flag = "--processes" if args.processes is not None else "--fsdp"
        raise UserError(f"{flag} describes a launch to --dry-run; a run gets its processes from accelerate launch: "
                        "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N tinylm/train.py "
                        "... (or configs/accelerate/multi-gpu.yaml for DDP)")
    if args.processes is not None and args.processes < 1:
        raise UserError(f"--processes must be 1 or more, got {args.processes}")
    if args.fsdp and (args.processes or 1) < 2:
        raise UserError("--fsdp shards the model across several processes: give --processes N (2 or more)")


def resume_config(args: argparse.Namespace, overrides: dict):
    """The config to resume with, and the loaded checkpoint.

    The run's own config comes from the checkpoint (max_iters, everything), so the resumed run
    continues where it was, whatever config file is around; the keys a config file named with
    --config sets, and the flags, override it. The run stays in the checkpoint's folder unless
    --out-dir or the file's training.out_dir names another. Every difference is printed. A run on the
    Hub (`--resume OWNER/NAME[@REVISION]`) is first fetched into its out_dir (`hub_run.fetch_run`).
    """
    with startup.heavy_imports():
        from tinylm import checkpoint, hub_run

    target = hub_run.resume_target(args.resume) if args.resume else None
    if target:
        load_from, path = hub_run.fetch_run(*target, lambda own: hub_out_dir(args, overrides, own),
                                            overwrite=args.overwrite)
    elif args.resume:
        load_from = path = Path(args.resume)
    else:
        out_dir = overrides["training.out_dir"] or load_config(args.config, overrides).training.out_dir
        load_from = path = Path(out_dir) / paths.LAST_NAME
    payload = checkpoint.load(load_from, flag="--resume")
    saved = payload["config"]
    if Path(saved["training"]["out_dir"]).resolve() != path.parent.resolve():  # started elsewhere, or moved
        saved = {**saved, "training": {**saved["training"], "out_dir": str(path.parent)}}
    config = load_config(args.config, overrides, base=saved, base_source=f"the config saved in {path}")
    changes = config_changes(from_dict(payload["config"], source=f"the config saved in {path}"), config)
    print(f"resuming the run saved in {path} (iter {payload['iter']})"
          + (" with changes: " + ", ".join(changes) if changes else ""), flush=True)
    return config, checkpoint.Loaded(path, payload)


def hub_out_dir(args: argparse.Namespace, overrides: dict, own: str) -> Path:
    """Where a run resumed from the Hub goes: --out-dir, else the --config file's out_dir, else the run's `own`."""
    chosen = load_config(args.config, overrides)
    return Path(chosen.training.out_dir if "training.out_dir" in chosen.given else own)


def config_changes(before: Config, after: Config) -> list[str]:
    """`section.key old -> new` for every key that differs."""
    old, new = before.to_dict(), after.to_dict()
    return [f"{section}.{key} {old[section][key]!r} -> {value!r}"
            for section, values in new.items() for key, value in values.items() if old[section][key] != value]


if __name__ == "__main__":
    startup.command_process()
    sys.exit(run_cli(main))
