"""Atomic writes: a file appears whole or not at all, and a failed write leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from tinylm.atomic import atomic_open, write_json


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, failure):
    target = tmp_path / "train_log.json"
    write_json(target, {"records": [1]})
    with pytest.raises(type(failure)):
        with atomic_open(target) as handle:
            handle.write('{"records": [1, 2')
            raise failure
    assert json.loads(target.read_text()) == {"records": [1]}
    assert [path.name for path in tmp_path.iterdir()] == ["train_log.json"]
