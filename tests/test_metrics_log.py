"""metrics.jsonl on its own: a resume drops the lines past its step, a failed write stops the log, not the run.

The lines a real run writes are checked against its tracker in test_tracking.py, and a resumed run's
file against an uninterrupted run's in test_resume.py and test_loop_guards.py.
"""

from __future__ import annotations

import json
import resource

from tinylm.metrics_log import EVAL_COLUMNS, STEP_COLUMNS, MetricsLog, read_lines


def row(step: int) -> dict:
    return {"iter": step, "train_loss": 3.0 - step / 10, "lr": 1e-3, "grad_norm": float("nan"),
            "tokens_seen": step * 64, "tokens_per_s": 100.0, "elapsed_s": step / 10}


def test_a_resume_keeps_the_lines_up_to_its_step_and_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(row(step)) + "\n" for step in range(1, 9)) + '{"iter": 9, "train_lo')
    log = MetricsLog(path, start_iter=4)
    assert [line["iter"] for line in read_lines(path)] == [1, 2, 3, 4]
    assert path.read_text().endswith("\n") and not list(tmp_path.glob(".*.tmp"))
    log.log_step({**row(5), "extra": "not a column"})
    log.log_eval({"iter": 5, "train_loss": 2.5, "val_loss": 2.75, "train_ppl": 12.2, "val_ppl": 15.6, "lr": 1e-3,
                  "tokens_seen": 320, "elapsed_s": 0.5, "tokens_per_s": 640.0})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["iter"] for line in lines] == [1, 2, 3, 4, 5, 5]
    assert list(lines[-2]) == list(STEP_COLUMNS) and list(lines[-1]) == list(EVAL_COLUMNS)
    assert (lines[-1]["val_loss"], lines[-1]["eval_train_loss"]) == (2.75, 2.5)


def test_a_new_run_starts_an_empty_log_and_writes_nothing_before_its_first_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, start_iter=0)
    assert not path.exists()
    log.log_step(row(1))
    assert [line["iter"] for line in read_lines(path)] == [1]


def test_a_failed_append_warns_once_and_the_log_stops(tmp_path):
    """As on a full disk: the file-size limit makes the write fail (Python ignores SIGXFSZ)."""
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, start_iter=0)
    assert log.log_step(row(1)) is None
    before = path.read_text()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before), hard))
    try:
        warning = log.log_step(row(2))
        assert warning.startswith(f"cannot append to {path}: File too large; it stops at the step before iter 2")
        assert log.log_step(row(3)) is None  # said once
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert log.log_step(row(4)) is None and path.read_text() == before  # stopped for good
