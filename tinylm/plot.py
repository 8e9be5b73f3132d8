"""`tinylm plot RUN [RUN ...]`: draw how runs learn (loss, best val loss, learning rate) to a PNG.

A RUN is a run's out_dir or its train_log.json. The loss panel draws the training loss of every
logged step (metrics.jsonl, when the run wrote one), the train and val loss of each evaluation
(train_log.json) and the best val loss; the panel below draws the learning rate. One colour per run.
Needs matplotlib (`pip install 'tinylm[plot]'`); nothing else in tinylm does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import metrics_log, startup
from .errors import UserError, run_cli
from .paths import METRICS_NAME, TRAIN_LOG_NAME

# What each evaluation record (train_log.json) and each logged step (metrics.jsonl) must hold.
PLOTTED_KEYS = ("iter", "train_loss", "val_loss")
STEP_KEYS = ("iter", "train_loss", "lr")
X_AXES = {"iter": ("iter", "iteration"), "tokens": ("tokens_seen", "tokens seen")}


@dataclass
class Run:
    """One run to draw: its label, evaluation records and logged steps (either may be empty)."""
    name: str
    records: list[dict]
    steps: list[dict] = field(default_factory=list)


def missing_numbers(row: object, keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if not isinstance(row, dict) or not isinstance(row.get(key), (int, float))]


def read_records(log_path: str | Path, keys: tuple[str, ...] = PLOTTED_KEYS, *, empty_ok: bool = False) -> list[dict]:
    """The evaluation records of a train_log.json, checked."""
    log_path = Path(log_path)
    try:
        log = json.loads(log_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{log_path} does not exist; it is written by tinylm train next to the checkpoints") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {log_path}: {exc}") from None
    records = log.get("records") if isinstance(log, dict) else None
    if not isinstance(records, list) or not (records or empty_ok):
        raise UserError(f"{log_path} has no evaluation records yet; train past the first evaluation first")
    for number, record in enumerate(records, 1):
        if bad := missing_numbers(record, keys):
            raise UserError(f"{log_path}: evaluation record {number} has no number for {', '.join(bad)}; "
                            "pass a train_log.json written by tinylm train")
    return records


def read_steps(path: Path, keys: tuple[str, ...] = STEP_KEYS) -> list[dict]:
    """The logged steps of a metrics.jsonl in iteration order, or [] when there is none."""
    try:
        lines = metrics_log.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    steps = {}
    for number, step in lines:
        if isinstance(step, json.JSONDecodeError):
            if number == lines[-1][0]:
                break  # a run killed mid-write leaves its last line cut short: the lines before it stand
            raise UserError(f"{path}: line {number} is not JSON ({step.msg}); remove it or pass another run")
        if isinstance(step, dict) and "val_loss" in step:
            continue  # an evaluation's line: the evaluations are drawn from train_log.json
        if bad := missing_numbers(step, keys):
            raise UserError(f"{path}: line {number} has no number for {', '.join(bad)}; "
                            "pass a metrics.jsonl written by tinylm train")
        steps[step["iter"]] = step  # a resume logs again the steps after its checkpoint: the later line wins
    return [steps[i] for i in sorted(steps)]


def load_run(path: str | Path, x_key: str = "iter") -> tuple[Path, list[dict], list[dict]]:
    """(folder, records, steps) of a run given as its out_dir or its train_log.json."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run's out_dir or its {TRAIN_LOG_NAME}")
    folder, log = (path.parent, path) if path.is_file() else (path, path / TRAIN_LOG_NAME)
    metrics = folder / METRICS_NAME
    if not log.exists() and not metrics.exists():
        raise UserError(f"{folder} holds no {TRAIN_LOG_NAME} or {METRICS_NAME}; pass the out_dir of a tinylm train run")
    steps = read_steps(metrics, tuple(dict.fromkeys((*STEP_KEYS, x_key))))
    records = []
    if log.exists():  # with steps logged, a log with no evaluation yet is a run that has not reached one
        records = read_records(log, tuple(dict.fromkeys((*PLOTTED_KEYS, x_key))), empty_ok=bool(steps))
    if not records and not steps:
        raise UserError(f"{metrics} has no logged steps yet; train past the first log_interval first")
    return folder, records, steps


def labels(folders: list[Path]) -> list[str]:
    """Each run's folder name; parent/name for names that several runs share (runs/a and sweep/a)."""
    folders = [folder.resolve() for folder in folders]  # `.` and `runs/a/..` have names too
    names = [folder.name for folder in folders]
    return [f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]


def draw(runs: list[Run], *, log_scale: bool = False, x: str = "iter"):
    """The figure (not saved): a loss panel over a learning-rate panel that shares its x axis."""
    try:
        from matplotlib.figure import Figure  # a Figure, not pyplot: no global state, no display
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'tinylm[plot]'") from None
    key, x_label = X_AXES[x]
    figure = Figure(figsize=(8, 6.5), dpi=120, layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    several = len(runs) > 1
    x_middle = max(row[key] for run in runs for row in run.records + run.steps) / 2
    for number, run in enumerate(runs):
        colour, prefix = f"C{number}", f"{run.name}: " if several else ""

        def line(axes, rows, column, label, **style):
            return axes.plot([r[key] for r in rows], [r[column] for r in rows], color=colour,
                             label=prefix + label, **style)

        if run.steps:
            line(loss_axes, run.steps, "train_loss", "train loss (each logged step)", linewidth=0.8, alpha=0.7)
        if run.records:
            line(loss_axes, run.records, "train_loss", "train loss (at eval)", linestyle="none", marker="o",
                 markerfacecolor="none", markersize=5)
            line(loss_axes, run.records, "val_loss", "val loss", linestyle="--", marker="o", markersize=5)
        finite = [r for r in run.records if math.isfinite(r["val_loss"])]
        if finite:
            best = min(finite, key=lambda r: r["val_loss"])  # the first of equal minima, as the trainer keeps it
            line(loss_axes, [best], "val_loss", "best val loss", linestyle="none", marker="*", markersize=16,
                 markeredgecolor="black", zorder=3)
            # Text on the side of the star facing the middle, so it stays inside the axes; one line up per run.
            right = best[key] > x_middle
            loss_axes.annotate(f"best {best['val_loss']:.4f} @ iter {best['iter']}", (best[key], best["val_loss"]),
                               xytext=(-8 if right else 8, 10 + 14 * number), textcoords="offset points",
                               ha="right" if right else "left", color=colour, fontsize="small", fontweight="bold",
                               bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none",
                                     "alpha": 0.8})
        # lr: every logged step when there are steps; else the evaluations that recorded it (older logs may not)
        lr_rows = run.steps or [r for r in run.records if isinstance(r.get("lr"), (int, float))]
        if lr_rows:  # markers when the lr is known only at the evaluations: the line between them is a guess
            line(lr_axes, lr_rows, "lr", "learning rate", linewidth=1.2, marker=None if run.steps else "o",
                 markersize=3)
    if log_scale:
        from matplotlib.ticker import LogFormatter

        loss_axes.set_yscale("log")
        # Plain 2, 3, 4 rather than 2x10^0: a loss rarely spans a decade, so the minor ticks carry the labels.
        loss_axes.yaxis.set_major_formatter(LogFormatter())
        loss_axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    loss_axes.set_ylabel("loss (cross-entropy, nats)")
    figure.suptitle(" vs ".join(run.name for run in runs))
    # Below the panels, where it hides no curve; with several runs one column per run, each column one run's key.
    handles, names = loss_axes.get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", fontsize="small",
                  ncols=len(runs) if several else len(names))
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel(x_label)
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for axes in (loss_axes, lr_axes):
        axes.grid(alpha=0.3)
    return figure


def save(figure, out_path: str | Path) -> Path:
    """Write the figure as a PNG, atomically (a reader never sees half an image)."""
    from .atomic import atomic_path

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        figure.savefig(tmp, format="png")
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinylm plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help=f"a run's out_dir or its {TRAIN_LOG_NAME}")
    parser.add_argument("--out", metavar="PATH", help="PNG to write (default: loss.png in the run's folder; "
                                      "required with several runs)")
    parser.add_argument("--log", action="store_true", help="log scale on the loss axis")
    parser.add_argument("--x", choices=X_AXES, default="iter", help="x axis: iterations or tokens seen (compares runs "
                                                                     "of different batch sizes)")
    args = parser.parse_args(argv)
    if len(args.runs) > 1 and not args.out:
        raise UserError("plotting several runs needs --out PATH: the PNG to write")
    loaded = [load_run(run, X_AXES[args.x][0]) for run in args.runs]
    runs = [Run(name, records, steps) for name, (_, records, steps) in zip(labels([f for f, _, _ in loaded]), loaded)]
    out = Path(args.out) if args.out else loaded[0][0] / "loss.png"
    print(f"wrote {save(draw(runs, log_scale=args.log, x=args.x), out)}")
    return 0


if __name__ == "__main__":
    startup.command_process()
    sys.exit(run_cli(main))
