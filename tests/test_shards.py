"""The folder of optimizer shards a checkpoint names under FSDP (tinylm.shards), in one process.

torch.distributed.checkpoint runs without a process group here, as it does when an FSDP run is
resumed on one process; the two-process save, kill and resume is
tests/test_multiprocess.py::test_an_fsdp_run_killed_mid_save_resumes_from_its_optimizer_shards_exactly.
"""

from __future__ import annotations

import pytest
import torch

from tinylm import checkpoint, run_folder, shards
from tinylm.errors import UserError


def trained(seed: int, steps: int):
    """Two layers of different shapes and their AdamW after `steps` steps on random data."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(steps):
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_the_moments_come_back_on_their_own_parameters_from_a_renamed_folder(tmp_path, fresh_accelerate_state):
    """Kills: the staging folder left in place (or renamed to another name than the one returned);
    `load` reading nothing back (the fresh optimizer's zero-step moments would stay)."""
    model, optimizer = trained(seed=1, steps=3)
    name = shards.save(tmp_path, model, optimizer, step=3, is_main=True)
    assert name.startswith("ckpt_shards-3-") and [path.name for path in tmp_path.iterdir()] == [name]
    assert (tmp_path / name / ".metadata").is_file()

    other_model, other_optimizer = trained(seed=2, steps=0)
    shards.load(tmp_path / name, other_model, other_optimizer)
    saved, loaded = optimizer.state_dict(), other_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, moments in saved["state"].items():
        assert set(moments) == set(loaded["state"][index]) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in moments.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)


def test_an_optimizer_that_has_taken_no_step_writes_nothing(tmp_path, fresh_accelerate_state):
    """Saved before the first step (the evaluation at iter 0): asking torch for the state would first
    give the optimizer moments and a step count (a step at lr 0), changing the run; nothing is saved.

    Kills: the no-state check dropped (the optimizer would hold state after the save)."""
    model, optimizer = trained(seed=1, steps=0)
    assert shards.save(tmp_path, model, optimizer, step=0, is_main=True) is None
    assert not optimizer.state and list(tmp_path.iterdir()) == []


def test_a_missing_or_unfinished_folder_is_refused_in_one_line(tmp_path):
    model, optimizer = trained(seed=1, steps=0)
    (tmp_path / "ckpt_shards-4-abc").mkdir()  # no .metadata: DCP writes it last
    for folder in (tmp_path / "ckpt_shards-4-abc", tmp_path / "ckpt_shards-8-gone"):
        with pytest.raises(UserError, match=rf"^cannot resume: the optimizer shards {folder} the checkpoint "
                                            r"names are missing or incomplete; copy that folder along with the checkpoint \(where every"):
            shards.load(folder, model, optimizer)
    assert not optimizer.state


def test_a_run_starting_removes_the_shards_no_checkpoint_names_and_overwrite_removes_all(tmp_path):
    """ckpt_last.pt and ckpt_best.pt name two folders (the best is older); a third was written but the
    checkpoint naming it never was, a fourth was being written. The run that starts there removes
    those two and says so; --overwrite removes the named ones too.

    Kills: the removal of unnamed folders dropped, or removing named ones; the staging pattern
    missing from the stale patterns; --overwrite leaving the folders.
    """
    for name, folder in (("ckpt_last.pt", "ckpt_shards-8-aaa"), ("ckpt_best.pt", "ckpt_shards-4-bbb")):
        checkpoint.save(tmp_path / name, {"iter": 8, "train_state": {"optimizer": None, "optimizer_shards": folder}})
    for folder in ("ckpt_shards-8-aaa", "ckpt_shards-4-bbb", "ckpt_shards-12-ccc", ".ckpt_shards-12-ddd.tmp"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__0_0.distcp").write_bytes(b"shard")
    said = []
    folder_lock = run_folder.lock(tmp_path)
    try:
        run_folder.claim(tmp_path, folder_lock, is_main=True, resumed_from=tmp_path / "ckpt_last.pt",
                         overwrite=False, say=said.append)
    finally:
        folder_lock.release()
    assert said == [f"removed 2 unfinished file(s) a stopped run left in {tmp_path}: .ckpt_shards-12-ddd.tmp, "
                    "ckpt_shards-12-ccc"]
    assert sorted(path.name for path in tmp_path.glob("*ckpt_shards*")) == ["ckpt_shards-4-bbb", "ckpt_shards-8-aaa"]

    removed = run_folder.clear_replaced_run(tmp_path)
    assert removed == ["ckpt_best.pt", "ckpt_last.pt", "ckpt_shards-4-bbb", "ckpt_shards-8-aaa"]
    assert list(tmp_path.glob("*ckpt_shards*")) == []
