"""`tinylm plot checkpoints/train_log.json`: draw train/val loss curves to a PNG.

Needs matplotlib (`pip install 'tinylm[plot]'`); nothing else in tinylm does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError, run_cli


# What each evaluation record must hold for the plot.
PLOTTED_KEYS = ("iter", "train_loss", "val_loss")


def read_records(log_path: str | Path) -> list[dict]:
    """The evaluation records of a train_log.json, checked."""
    log_path = Path(log_path)
    try:
        log = json.loads(log_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{log_path} does not exist; it is written by tinylm train next to the checkpoints") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {log_path}: {exc}") from None
    records = log.get("records") if isinstance(log, dict) else None
    if not isinstance(records, list) or not records:
        raise UserError(f"{log_path} has no evaluation records yet; train past the first evaluation first")
    for number, record in enumerate(records, 1):
        bad = [key for key in PLOTTED_KEYS
               if not isinstance(record, dict) or not isinstance(record.get(key), (int, float))]
        if bad:
            raise UserError(f"{log_path}: evaluation record {number} has no number for {', '.join(bad)}; "
                            "pass a train_log.json written by tinylm train")
    return records


def plot_losses(records: list[dict], out_path: str | Path, title: str = "tinylm training") -> Path:
    """Write a PNG of train and validation loss against iteration; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'tinylm[plot]'") from None
    from .atomic import atomic_path

    iters = [record["iter"] for record in records]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    axes.plot(iters, [record["train_loss"] for record in records], marker="o", label="train")
    axes.plot(iters, [record["val_loss"] for record in records], marker="o", label="val")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss (cross-entropy, nats)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinylm plot", description=__doc__.splitlines()[0])
    parser.add_argument("log", help="path to train_log.json")
    parser.add_argument("--out", help="PNG to write (default: loss.png next to the log)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.log).with_name("loss.png")
    print(f"wrote {plot_losses(read_records(args.log), out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
