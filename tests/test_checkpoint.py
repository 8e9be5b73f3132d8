"""The checkpoint file on its own: what a failed write says, what a load refuses.

Each test names the mutants of tests/mutation (module checkpoint) it was written to kill.
"""

from __future__ import annotations

import re
import resource
import shutil

import pytest
import torch

from tinylm import checkpoint
from tinylm.errors import UserError


def test_a_write_that_stops_short_names_the_free_space_of_that_disk(tmp_path):
    """torch.save stopped by the file-size limit (as by a full disk): the message gives the free space
    of the checkpoint's disk in MiB, as shutil.disk_usage measures it, and no file is left behind.

    Kills: `free / 2**20` -> `free * 2**20`, `2**20` -> `2**21` / `2**19`.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # Python ignores SIGXFSZ: writes just fail
    try:
        with pytest.raises(UserError) as caught:
            checkpoint.save(tmp_path / "ckpt.pt", {"model": {"weight": torch.zeros(100_000)}})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    reported = float(re.search(r"with ([0-9.]+) MiB free on that disk", str(caught.value))[1])
    assert reported == pytest.approx(shutil.disk_usage(tmp_path).free / 2**20, rel=0.2)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_the_documented_layout_version_1_loads(tmp_path):
    """A file holding the documented version-1 layout, written with plain torch.save (as every tinylm
    so far wrote it), loads; the same file with another version number is refused by name.

    Kills: `VERSION = 1` -> 2 / 0 (save and load would then agree with each other, not with the files
    users already have).
    """
    layout = {"format": "tinylm-checkpoint", "version": 1, "model": {}, "model_config": {}, "tokenizer": {},
              "config": {}, "iter": 3}
    torch.save(layout, tmp_path / "v1.pt")
    assert checkpoint.load(tmp_path / "v1.pt")["iter"] == 3
    torch.save({**layout, "version": 2}, tmp_path / "v2.pt")
    with pytest.raises(UserError, match=r"has format version 2; this tinylm reads version 1"):
        checkpoint.load(tmp_path / "v2.pt")


@pytest.mark.parametrize("content", [{"weight": torch.zeros(2)}, [1, 2, 3]], ids=["dict", "list"])
def test_a_torch_file_that_is_not_a_tinylm_checkpoint_is_named_as_such(tmp_path, content):
    """A file torch.save wrote, but not tinylm (a bare state dict, a list): one line saying it lacks the
    tinylm-checkpoint marker, not a complaint about its version or a KeyError.

    Kills: `not isinstance(payload, dict) or ...` -> `and` (a bare dict would reach the version check).
    """
    torch.save(content, tmp_path / "weights.pt")
    with pytest.raises(UserError, match=r"weights.pt is not a tinylm checkpoint \(no 'tinylm-checkpoint' marker\)"):
        checkpoint.load(tmp_path / "weights.pt")


def test_a_zip_archive_that_torch_cannot_read_is_one_line_with_torchs_reason(tmp_path):
    """A zip file (so it passes the archive check) holding no torch data: torch.load's own reason (its
    first line; the words are torch's and change between versions), in one UserError.

    Kills: `splitlines()[0]` -> `[1]` (an IndexError traceback on a one-line reason); the reason replaced
    by the exception's class name.
    """
    import zipfile

    path = tmp_path / "notes.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a model")
    with pytest.raises(UserError) as caught:
        checkpoint.load(path)
    with pytest.raises(Exception) as torch_says:
        torch.load(path, weights_only=True)
    assert str(caught.value) == f"cannot load checkpoint {path}: {str(torch_says.value).strip().splitlines()[0]}"


def test_weights_that_do_not_fit_the_model_config_name_the_first_that_does_not(tmp_path):
    """A checkpoint whose model_config says another vocabulary than its weights have: one line that
    names torch's complaint and the first weight that does not fit, with both shapes.

    Kills: the line of torch's message shown ([0] said only "Error(s) in loading state_dict").
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    weights = GPT2LMHeadModel(config).state_dict()
    payload = {"model": weights, "model_config": {**config.to_dict(), "vocab_size": 24}}
    with pytest.raises(UserError) as caught:
        checkpoint.model_from(payload)
    message = str(caught.value)
    assert message.startswith("checkpoint weights do not match its model config: Error(s) in loading state_dict")
    assert message.count("size mismatch") == 1 and "transformer.wte.weight" in message
    assert "torch.Size([20, 16])" in message and "torch.Size([24, 16])" in message and "\n" not in message


def saved_run(optimizer, rng_states: list) -> dict:
    """A payload holding `optimizer`'s state, a run at iter 3 and `rng_states` (one per process)."""
    from dataclasses import asdict

    return {"train_state": {"optimizer": optimizer.state_dict(), "scaler": None, "rng": rng_states,
                            "run": asdict(checkpoint.RunState(iter=3, best_val_loss=1.5))}}


def test_a_restore_puts_back_the_moments_with_this_runs_settings_and_this_processs_random_state():
    """The saved moments come back, with the settings this run built its optimizer with (not the saved ones); each
    process draws on from its own saved random state; another process count keeps the generators
    as they are and says so.

    Kills: the settings loop skipped; `process_index` ignored; the count check inverted.
    """
    from tinylm import rng

    weight = torch.nn.Parameter(torch.ones(4))
    saved_optimizer = torch.optim.AdamW([weight], lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    weight.grad = torch.full((4,), 0.5)
    saved_optimizer.step()
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng.capture())
    draws = []
    for state in states:
        rng.restore(state)
        draws.append(torch.rand(3))
    payload = saved_run(saved_optimizer, states)

    optimizer = torch.optim.AdamW([weight], lr=0.1, betas=(0.8, 0.99), weight_decay=0.0)
    run, warning = checkpoint.restore_training(payload, optimizer=optimizer, scaler=None, process_index=1,
                                               num_processes=2)
    assert warning is None and (run.iter, run.best_val_loss) == (3, 1.5)
    assert torch.equal(torch.rand(3), draws[1])
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.99) and optimizer.param_groups[0]["weight_decay"] == 0.0
    saved_moments = saved_optimizer.state_dict()["state"][0]
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_moments["exp_avg"])

    torch.manual_seed(7)
    untouched = rng.capture()
    run, warning = checkpoint.restore_training(payload, optimizer=optimizer, scaler=None, process_index=0,
                                               num_processes=3)
    assert warning.startswith("checkpoint was written by 2 processes, now 3: random state (dropout) is reseeded")
    assert torch.equal(torch.get_rng_state(), untouched["torch"])


def test_a_checkpoint_naming_shards_restores_through_them_with_this_runs_settings():
    """Under FSDP the file holds no optimizer state and names a shards folder: the restore loads
    through `load_shards` (tinylm.shards.load), then puts back this run's settings as for a file. Saved
    before the first step (neither), the fresh optimizer is left as it is.

    Kills: `load_shards` not called; the settings loop run before loading (the saved betas would stay).
    """
    from dataclasses import asdict

    weight = torch.nn.Parameter(torch.ones(4))
    saved_optimizer = torch.optim.AdamW([weight], lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    weight.grad = torch.full((4,), 0.5)
    saved_optimizer.step()
    optimizer = torch.optim.AdamW([weight], lr=0.1, betas=(0.8, 0.99), weight_decay=0.0)
    run = asdict(checkpoint.RunState(iter=3))
    payload = {"train_state": {"optimizer": None, "optimizer_shards": "ckpt_shards-3-abc", "scaler": None,
                               "rng": [], "run": run}}
    loads = []

    def load_shards():  # what loading the folder does: the saved moments and hyperparameters
        loads.append(1)
        optimizer.load_state_dict(saved_optimizer.state_dict())

    checkpoint.restore_training(payload, optimizer=optimizer, scaler=None, process_index=0, num_processes=1,
                                load_shards=load_shards)
    assert loads == [1] and optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    assert optimizer.param_groups[0]["weight_decay"] == 0.0
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], saved_optimizer.state_dict()["state"][0]["exp_avg"])

    fresh = torch.optim.AdamW([weight], lr=0.1)
    before_first_step = {"train_state": {**payload["train_state"], "optimizer_shards": None}}
    checkpoint.restore_training(before_first_step, optimizer=fresh, scaler=None, process_index=0, num_processes=1,
                                load_shards=load_shards)
    assert loads == [1] and not fresh.state


def test_fsdp_refuses_a_checkpoint_that_keeps_the_whole_optimizer_state_in_the_file():
    """FSDP shards the moments by parameter; a file written on one process or under DDP holds them
    whole, by index: refused in one line naming how to go on. Without FSDP, or with no moments yet, it is fine.

    Kills: the refusal dropped, or raised without FSDP, or for an optimizer that has no state.
    """
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    empty = {"iter": 0, "train_state": {"optimizer": optimizer.state_dict(), "world_size": 2}}
    weight.grad = torch.ones(4)
    optimizer.step()
    stepped = {"iter": 3, "train_state": {"optimizer": optimizer.state_dict(), "world_size": 2}}
    checkpoint.check_optimizer_fits(stepped, sharded_run=False)
    checkpoint.check_optimizer_fits(empty, sharded_run=True)
    with pytest.raises(UserError) as caught:
        checkpoint.check_optimizer_fits(stepped, sharded_run=True)
    assert str(caught.value) == (
        "cannot resume under FSDP from a checkpoint written without it (at iter 3, on 2 process(es)): its optimizer "
        "state is one unsharded file; resume it the way it was launched (one process, or DDP: "
        "configs/accelerate/multi-gpu.yaml), or start a new run under FSDP")


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_loaded_model_is_the_stored_one_as_a_model_built_and_copied_into_would_be(tmp_path, stored):
    """`model_from` builds the model on the meta device and takes the file's tensors as its weights. The
    model must be what building it on the CPU and copying the weights in gives: every parameter on the
    CPU (none left on meta), fp32 whatever the file stores, trainable, the embeddings tied, eval mode,
    and the same logits. The weights are random, not an initialisation, so a weight left out shows.

    Nothing is initialised to be overwritten (the random state is untouched), and in fp32 the weights
    are the file's tensors, not copies: the start-up speed of `tinylm generate` on a large model.

    Kills: the weights not converted to the model's dtype; `tie_weights()` left out; `.eval()` left out;
    `load_state_dict` without `assign=True`; the model built on the CPU (initialised, then overwritten).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=2, n_head=2)
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(tensor.shape, generator=generator).to(stored)
               for name, tensor in GPT2LMHeadModel(config).state_dict().items()}
    weights["lm_head.weight"] = weights["transformer.wte.weight"]  # tied, as a saved model has them
    torch.save({"model": weights, "model_config": config.to_dict()}, tmp_path / "weights.pt")

    payload = torch.load(tmp_path / "weights.pt", weights_only=True)
    random_state = torch.get_rng_state()
    loaded = checkpoint.model_from(payload)
    assert torch.equal(torch.get_rng_state(), random_state)  # no random initialisation ran, to be overwritten
    expected = GPT2LMHeadModel(config)
    expected.load_state_dict(weights)
    expected.eval()
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for (name, param), (_, want) in zip(loaded.named_parameters(), expected.named_parameters(), strict=True):
        assert (param.device.type, param.dtype, param.requires_grad) == ("cpu", torch.float32, True), name
        assert torch.equal(param, want), name
    assert not [name for name, buffer in loaded.named_buffers() if buffer.is_meta]
    if stored == torch.float32:  # the file's tensors themselves: nothing copied
        stored_weight = payload["model"]["transformer.h.1.mlp.c_fc.weight"]
        assert loaded.transformer.h[1].mlp.c_fc.weight.data_ptr() == stored_weight.data_ptr()
    ids = torch.tensor([[1, 5, 3, 19, 0, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected(ids).logits)
