"""`tinylm plot`: what it draws (read off the matplotlib figure, not the pixels), the PNG it writes, its errors."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_checkpoint import assert_one_line_error

from tinylm import plot
from tinylm.errors import UserError
from tinylm.paths import METRICS_NAME, TRAIN_LOG_NAME

matplotlib = pytest.importorskip("matplotlib")
REPO = Path(__file__).resolve().parents[1]
TOKENS_PER_STEP = 8192
TRAINING = {"learning_rate": 6e-4, "warmup_iters": 100, "lr_decay_iters": 2000, "min_lr": 6e-5, "max_iters": 2000,
            "eval_interval": 200, "log_interval": 10}


def lr_at(i: int, t: dict = TRAINING, peak: float = 1.0) -> float:
    """Linear warmup, then cosine decay to min_lr: the shape of tinylm's schedule."""
    if i < t["warmup_iters"]:
        return peak * t["learning_rate"] * (i + 1) / (t["warmup_iters"] + 1)
    ratio = min(1.0, (i - t["warmup_iters"]) / (t["lr_decay_iters"] - t["warmup_iters"]))
    return peak * (t["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (t["learning_rate"] - t["min_lr"]))


def make_run(folder: Path, *, metrics: bool = True, seed: int = 0, scale: float = 1.0, peak: float = 1.0) -> Path:
    """A run's out_dir as tinylm train leaves it: loss decaying like 4.2 exp(-i/300) + 1.5 with noise; the val
    loss turns up after iter 1200 (overfitting), so the best evaluation is not the last one."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def loss(i, floor):
        return scale * 4.2 * math.exp(-i / 300) + floor

    records = []
    for i in range(0, TRAINING["max_iters"] + 1, TRAINING["eval_interval"]):
        train, val = loss(i, 1.45), loss(i, 1.55) + 2.5e-7 * max(0, i - 1200) ** 2
        records.append({"iter": i, "train_loss": round(train, 4), "val_loss": round(val, 4),
                        "train_ppl": math.exp(train), "val_ppl": math.exp(val), "lr": lr_at(i, peak=peak),
                        "tokens_seen": i * TOKENS_PER_STEP, "elapsed_s": i * 0.05, "tokens_per_s": 163840.0})
    best = min(records, key=lambda r: r["val_loss"])
    log = {"config": {"training": TRAINING}, "records": records,
           "summary": {"stop_reason": "max_iters", "iters": 2000, "best_val_loss": best["val_loss"],
                       "best_iter": best["iter"]}}
    (folder / TRAIN_LOG_NAME).write_text(json.dumps(log))
    if metrics:
        lines = [{"iter": i, "train_loss": round(loss(i, 1.5) + rng.gauss(0, 0.06), 4), "lr": lr_at(i, peak=peak),
                  "grad_norm": 1.0, "tokens_seen": i * TOKENS_PER_STEP, "tokens_per_s": 163840.0, "elapsed_s": i * 0.05}
                 for i in range(0, TRAINING["max_iters"] + 1, TRAINING["log_interval"])]
        (folder / METRICS_NAME).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def lines_of(axes) -> dict:
    return {line.get_label(): line for line in axes.get_lines()}


def xy(line) -> tuple[list, list]:
    return list(line.get_xdata()), list(line.get_ydata())


def drawn(*folders: Path, **options):
    loaded = [plot.load_run(folder, plot.X_AXES[options.get("x", "iter")][0]) for folder in folders]
    names = plot.labels([folder for folder, _, _ in loaded])
    return plot.draw([plot.Run(name, records, steps) for name, (_, records, steps) in zip(names, loaded)], **options)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinylm.cli", "plot", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_a_run_with_metrics_draws_every_step_the_evaluations_the_best_and_the_lr(tmp_path):
    """Kills: the best marked at the last evaluation; lr from the evaluations though every step was logged."""
    run = make_run(tmp_path / "run")
    steps, records = read_jsonl(run / METRICS_NAME), json.loads((run / TRAIN_LOG_NAME).read_text())["records"]
    figure = drawn(run)
    loss_axes, lr_axes = figure.axes
    loss = lines_of(loss_axes)
    assert xy(loss["train loss (each logged step)"]) == ([s["iter"] for s in steps], [s["train_loss"] for s in steps])
    assert xy(loss["train loss (at eval)"]) == ([r["iter"] for r in records], [r["train_loss"] for r in records])
    assert xy(loss["val loss"]) == ([r["iter"] for r in records], [r["val_loss"] for r in records])
    best = min(records, key=lambda r: r["val_loss"])
    assert best is not records[-1]  # the val loss turns up at the end: the best is not the last evaluation
    assert xy(loss["best val loss"]) == ([best["iter"]], [best["val_loss"]])
    assert [text.get_text() for text in loss_axes.texts] == [f"best {best['val_loss']:.4f} @ iter {best['iter']}"]
    # The schedule of every logged step, not the coarser one of the evaluations.
    assert xy(lines_of(lr_axes)["learning rate"]) == ([s["iter"] for s in steps], [s["lr"] for s in steps])
    assert loss_axes.get_yscale() == "linear" and lr_axes.get_xlabel() == "iteration"


def test_an_older_run_without_metrics_draws_its_evaluations_and_their_lr(tmp_path):
    """A run from before metrics.jsonl, given the old way (its train_log.json)."""
    run = make_run(tmp_path / "old", metrics=False)
    records = json.loads((run / TRAIN_LOG_NAME).read_text())["records"]
    loss_axes, lr_axes = drawn(run / TRAIN_LOG_NAME).axes  # the old form: the log's path
    assert set(lines_of(loss_axes)) == {"train loss (at eval)", "val loss", "best val loss"}
    assert xy(lines_of(lr_axes)["learning rate"]) == ([r["iter"] for r in records], [r["lr"] for r in records])


def test_a_run_before_its_first_evaluation_draws_its_logged_steps(tmp_path):
    """Kills: a log with no records yet refused though metrics.jsonl has steps."""
    run = make_run(tmp_path / "run")
    steps = read_jsonl(run / METRICS_NAME)
    (run / TRAIN_LOG_NAME).unlink()  # no evaluation saved yet: no train_log.json
    loss_axes, lr_axes = drawn(run).axes
    assert set(lines_of(loss_axes)) == {"train loss (each logged step)"} and not loss_axes.texts
    assert list(lines_of(lr_axes)["learning rate"].get_ydata()) == [s["lr"] for s in steps]
    (run / TRAIN_LOG_NAME).write_text(json.dumps({"config": {}, "records": [], "summary": None}))
    assert set(lines_of(drawn(run).axes[0])) == {"train loss (each logged step)"}


def test_a_diverged_run_and_a_log_from_before_lr_was_recorded(tmp_path):
    """Kills: a NaN val loss marked best; records without lr read as if they had one."""
    run = make_run(tmp_path / "run", metrics=False)
    log = json.loads((run / TRAIN_LOG_NAME).read_text())
    for record in log["records"]:
        record["val_loss"] = math.nan  # diverged from the start: no evaluation is a best
        del record["lr"]
    (run / TRAIN_LOG_NAME).write_text(json.dumps(log))
    loss_axes, lr_axes = drawn(run).axes
    assert "best val loss" not in lines_of(loss_axes) and not loss_axes.texts
    assert not lr_axes.get_lines()


def test_a_failed_save_leaves_the_previous_png(tmp_path, monkeypatch):
    """Kills: the PNG written in place."""
    run = make_run(tmp_path / "run")
    out = run / "loss.png"
    out.write_bytes(b"the previous plot")
    figure = drawn(run)

    def full_disk(path, **options):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(figure, "savefig", full_disk)
    with pytest.raises(UserError, match="No space left on device"):
        plot.save(figure, out)
    assert out.read_bytes() == b"the previous plot"
    assert sorted(p.name for p in run.iterdir()) == sorted([TRAIN_LOG_NAME, METRICS_NAME, "loss.png"])


def test_log_scale_and_tokens_on_the_x_axis(tmp_path):
    """Kills: log_scale ignored by draw; --x tokens ignored."""
    run = make_run(tmp_path / "run")
    assert drawn(run, log_scale=True).axes[0].get_yscale() == "log"
    loss_axes, lr_axes = drawn(run, x="tokens").axes
    steps = read_jsonl(run / METRICS_NAME)
    assert list(lines_of(loss_axes)["train loss (each logged step)"].get_xdata()) == [s["tokens_seen"] for s in steps]
    assert lr_axes.get_xlabel() == "tokens seen"


def test_two_runs_get_one_colour_and_one_labelled_set_each(tmp_path):
    """Kills: one colour for every run; equal folder names not told apart."""
    runs = [make_run(tmp_path / "sweep1" / "a"), make_run(tmp_path / "sweep2" / "a", seed=1, scale=1.3)]
    assert plot.labels(runs) == ["sweep1/a", "sweep2/a"]  # equal folder names told apart by their parent
    loss_axes, lr_axes = drawn(*runs).axes
    loss = lines_of(loss_axes)
    kinds = ("train loss (each logged step)", "train loss (at eval)", "val loss", "best val loss")
    assert set(loss) == {f"{name}: {kind}" for name in ("sweep1/a", "sweep2/a") for kind in kinds}
    for name in ("sweep1/a", "sweep2/a"):
        assert len({loss[f"{name}: {kind}"].get_color() for kind in kinds}) == 1
    assert loss["sweep1/a: val loss"].get_color() != loss["sweep2/a: val loss"].get_color()
    assert set(lines_of(lr_axes)) == {"sweep1/a: learning rate", "sweep2/a: learning rate"}
    assert len(loss_axes.texts) == 2
    legend = loss_axes.figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [f"{n}: {k}" for n in ("sweep1/a", "sweep2/a") for k in kinds]


def test_a_cut_short_last_line_is_skipped_a_bad_middle_line_is_an_error(tmp_path):
    """Kills: every unparsable line skipped; a cut-short last line an error."""
    run = make_run(tmp_path / "run")
    metrics = run / METRICS_NAME
    whole = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(whole) + whole[-1][:25])  # killed mid-write: half a line, no newline
    steps = plot.load_run(run)[2]
    assert [s["iter"] for s in steps] == [json.loads(line)["iter"] for line in whole]
    metrics.write_text("".join(whole[:5]) + whole[5][:25] + "\n" + "".join(whole[6:]))
    with pytest.raises(UserError, match=rf"{METRICS_NAME}: line 6 is not JSON"):
        plot.load_run(run)


def test_a_resumed_run_keeps_the_later_line_of_a_step_logged_twice(tmp_path):
    """Kills: the earlier line of a step logged twice kept."""
    run = make_run(tmp_path / "run")
    metrics = run / METRICS_NAME
    steps = read_jsonl(metrics)
    # Killed at iter 150 after the checkpoint of iter 100; the resume logs 110..150 again.
    again = [{**s, "train_loss": s["train_loss"] - 0.5} for s in steps if 100 < s["iter"] <= 150]
    kept = [s for s in steps if s["iter"] <= 150] + again
    metrics.write_text("".join(json.dumps(s) + "\n" for s in kept))
    loaded = plot.load_run(run)[2]
    assert [s["iter"] for s in loaded] == [s["iter"] for s in steps if s["iter"] <= 150]
    assert loaded[-5:] == again


def test_main_passes_its_flags_to_the_figure(tmp_path, monkeypatch):
    """Kills: --log ignored by main; the default PNG not in the run's folder."""
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b", seed=1)]
    figures = []
    monkeypatch.setattr(plot, "save", lambda figure, out: figures.append((figure, out)) or Path(out))
    assert plot.main([str(runs[0]), str(runs[1]), "--log", "--x", "tokens", "--out", str(tmp_path / "ab.png")]) == 0
    assert plot.main([str(runs[0] / TRAIN_LOG_NAME)]) == 0
    (both, out), (one, default_out) = figures
    assert both.axes[0].get_yscale() == "log" and both.axes[1].get_xlabel() == "tokens seen"
    assert out == tmp_path / "ab.png" and default_out == runs[0] / "loss.png"
    assert one.axes[0].get_yscale() == "linear" and one.axes[1].get_xlabel() == "iteration"


def test_cli_writes_a_png_that_reads_back(tmp_path):
    """The command end to end: a PNG matplotlib reads back, no temporary file beside it."""
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b", seed=1, scale=1.3, metrics=False)]
    out = tmp_path / "plots" / "ab.png"
    result = cli(*runs, "--log", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}"
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (960, 780)
    assert [p.name for p in out.parent.iterdir()] == ["ab.png"]  # no temporary file left beside it
    result = cli(runs[1])  # one run: loss.png in its folder
    assert result.returncode == 0 and (runs[1] / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_each_bad_input_is_one_line_naming_the_file(tmp_path):
    """Kills: a traceback for a missing run, a folder with neither file, a metrics line without lr, a record without
    tokens_seen under --x tokens, or no matplotlib; several runs plotted without --out."""
    good = make_run(tmp_path / "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_records = tmp_path / "fresh"
    no_records.mkdir()
    (no_records / TRAIN_LOG_NAME).write_text(json.dumps({"config": {}, "records": [], "summary": None}))
    bad_json = tmp_path / "bad" / TRAIN_LOG_NAME
    bad_json.parent.mkdir()
    bad_json.write_text('{"records": [')
    bad_line = make_run(tmp_path / "badline")
    (bad_line / METRICS_NAME).write_text('{"iter": 0, "train_loss": 4.0, "lr": 0.0}\n{oops\n{"iter": 20}\n')
    no_lr = make_run(tmp_path / "nolr")
    (no_lr / METRICS_NAME).write_text('{"iter": 0, "train_loss": 4.0, "lr": 0.0}\n{"iter": 10, "train_loss": 3.9}\n')
    untokened = make_run(tmp_path / "untokened", metrics=False)  # a log from before tokens_seen was recorded
    log = json.loads((untokened / TRAIN_LOG_NAME).read_text())
    del log["records"][3]["tokens_seen"]
    (untokened / TRAIN_LOG_NAME).write_text(json.dumps(log))
    cases = [
        ((tmp_path / "nope",), (str(tmp_path / "nope"), "does not exist")),
        ((empty,), (str(empty), TRAIN_LOG_NAME, METRICS_NAME)),
        ((no_records,), (str(no_records / TRAIN_LOG_NAME), "no evaluation records yet")),
        ((bad_json,), (str(bad_json), "cannot read")),
        ((bad_line,), (f"{bad_line / METRICS_NAME}: line 2 is not JSON",)),
        ((no_lr,), (f"{no_lr / METRICS_NAME}: line 2 has no number for lr",)),
        ((untokened, "--x", "tokens"), (f"{untokened / TRAIN_LOG_NAME}: evaluation record 4", "tokens_seen")),
        ((good, empty), ("--out",)),
    ]
    for args, needles in cases:
        assert_one_line_error(cli(*args), *needles)
    assert not list(tmp_path.rglob("*.png"))
    without = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['matplotlib'] = None; from tinylm.cli import main; "
         f"sys.exit(main(['plot', {str(good)!r}]))"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert_one_line_error(without, "matplotlib", "pip install")
    assert not (good / "loss.png").exists()



def test_a_real_runs_folder_is_drawn_from_its_steps_and_evaluations(prepared, tmp_path, fresh_accelerate_state):
    """A run tinylm train wrote: metrics.jsonl holds steps and evaluations; the steps make the train line,
    the evaluations come from train_log.json."""
    from training_helpers import make_trainer

    make_trainer(prepared, tmp_path, max_iters=6, log_interval=1, eval_interval=3, cpu_matmul="blas").fit()
    folder, records, steps = plot.load_run(tmp_path / "ckpt")
    assert [step["iter"] for step in steps] == [1, 2, 3, 4, 5, 6]
    assert [record["iter"] for record in records] == [0, 3, 6]
    train_line = plot.draw([plot.Run("real", records, steps)]).axes[0].lines[0]
    assert list(train_line.get_xdata()) == [1, 2, 3, 4, 5, 6]
