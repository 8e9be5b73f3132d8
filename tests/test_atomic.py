"""Atomic writes: a file appears whole or not at all, and a failed write leaves nothing behind."""

from __future__ import annotations

import json
import os

import pytest

from tinylm.atomic import atomic_open, atomic_path, replace_folder, write_json


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


def test_replace_folder_swaps_a_whole_folder_and_puts_the_old_one_back_on_failure(tmp_path):
    out = tmp_path / "exported"
    for version in ("one", "two"):
        staging = tmp_path / f".staging-{version}"
        staging.mkdir()
        (staging / f"{version}.txt").write_text(version)
        replace_folder(staging, out)
        assert [p.name for p in out.iterdir()] == [f"{version}.txt"] and not staging.exists()
    with pytest.raises(OSError):
        replace_folder(tmp_path / "no-such-staging", out)
    assert [p.name for p in out.iterdir()] == ["two.txt"], "the old folder is put back whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"], "nothing moved aside is left behind"


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_of_the_current_umask_which_is_left_as_it_was(tmp_path, mask):
    previous = os.umask(mask)
    try:
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
        assert os.umask(mask) == mask, "the umask is unchanged"
    finally:
        os.umask(previous)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~mask
