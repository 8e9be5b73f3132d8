"""Guards on the training loop whose expected values come from outside the code under test.

A test that compares the trainer with itself (its own helpers, its own state, a second run of the
same code) passes whatever the trainer does, as long as it does it consistently. Here every
expectation comes from somewhere else: the token files on disk (read with numpy, in the dtype
meta.json names), plain torch (the loss, the gradient, clipping and AdamW done by hand), nanoGPT's
formulas written out in the test, or an uninterrupted run compared with an interrupted one. Each
test names, in its docstring, the planted bugs of tests/mutants.py it kills.

The runs are in-process Trainers on tests/training_helpers.TINY, a few steps each.
"""

from __future__ import annotations

import collections
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import TINY, WORDS, load_checkpoint, make_trainer, write_config
from transformers import GPT2LMHeadModel

from tinylm import prepare, sampler
from tinylm.config import Sampling, load_config
from tinylm.locks import LOCK_NAME, OWNER_NAME
from tinylm.trainer import Trainer

TRAIN_CHARS, VAL_CHARS = 15_000, 5_000
SEED, BLOCK, BATCH = TINY["training"]["seed"], TINY["model"]["block_size"], TINY["training"]["batch_size"]
RUN_FILES = ("ckpt_last.pt", "ckpt_best.pt", "train_log.json", "metrics.jsonl")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def words(rng: random.Random, chars: int, case) -> str:
    """`chars` characters of random WORDS, each passed through `case`."""
    text, length = [], 0
    while length < chars:
        text.append(case(rng.choice(WORDS)))
        length += len(text[-1]) + 1
    return " ".join(text)[:chars]


@pytest.fixture(scope="module")
def split_data(tmp_path_factory) -> Path:
    """Prepared char data (bin) whose splits cannot be mistaken for each other: the train split (the
    first 75% of the text) is lowercase words, the val split (the last 25%) Capitalised ones, so every
    block of val holds a capital, a token the train file never holds."""
    root = tmp_path_factory.mktemp("split")
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text(words(rng, TRAIN_CHARS, str.lower) + words(rng, VAL_CHARS, str.capitalize))
    out = root / "data"
    assert not prepare.main(["--input", str(corpus), "--tokenizer", "char", "--format", "bin",
                             "--out", str(out), "--val-fraction", "0.25"])
    assert (len(read_split(out, "train")), len(read_split(out, "val"))) == (TRAIN_CHARS, VAL_CHARS)
    return out


def read_split(folder: Path, split: str) -> np.ndarray:
    """A split's tokens straight from its files, in the dtype meta.json names (little-endian, as prepare writes)."""
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    files = [folder / entry["tokens"] for entry in meta["splits"][split]["files"]]
    return np.concatenate([np.fromfile(path, dtype=dtype) for path in files]).astype(np.int64)


def documented_blocks(tokens: np.ndarray, step: int, slot: int, batch_size: int = BATCH,
                      block_size: int = BLOCK, seed: int = SEED) -> torch.Tensor:
    """The micro-batch `slot` of optimizer step `step`, by the rule data.train_batch documents: one global
    batch of offsets from numpy's default_rng([seed, step]) over [0, len - block_size), `batch_size`
    offsets per slot; a block is the block_size + 1 tokens from its offset."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - block_size, size=(slot + 1) * batch_size)[slot * batch_size:]
    return torch.from_numpy(np.stack([tokens[start : start + block_size + 1] for start in starts]))


def plain_loss(model: GPT2LMHeadModel, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of every block, in plain torch."""
    logits = model(input_ids=blocks[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), blocks[:, 1:].reshape(-1))


def plain_model(trainer: Trainer, weights: dict[str, torch.Tensor]) -> GPT2LMHeadModel:
    """A fresh transformers GPT-2 of the trainer's shape, holding `weights`."""
    model = GPT2LMHeadModel(trainer.accelerator.unwrap_model(trainer.model).config)
    model.load_state_dict(weights)
    return model.train()


def weights_of(trainer: Trainer) -> dict[str, torch.Tensor]:
    """A copy of the trainer's weights as they are now."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def nanogpt_lr(step: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """nanoGPT's train.py get_lr, written out."""
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step > decay:
        return min_lr
    ratio = (step - warmup) / (decay - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (lr - min_lr)


# --- 1. the batches a run trains on ------------------------------------------------------------


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_training_batches_are_windows_of_the_train_file_on_disk(split_data, tmp_path):
    """Every block a real run trains on is a window of train.bin as numpy reads it, none a window of
    val.bin, and each micro-batch is the one data.train_batch's documented rule draws from that file.

    Kills: "trainer: training batches drawn from the validation split" (self.data.split("train") ->
    "val"), "trainer: train_batch reads the val tokens" (the train_batch call's self.train_tokens ->
    self.val_tokens).
    """
    train, val = read_split(split_data, "train"), read_split(split_data, "val")
    train_windows = {train[i : i + BLOCK].tobytes() for i in range(len(train) - BLOCK + 1)}
    val_windows = {val[i : i + BLOCK].tobytes() for i in range(len(val) - BLOCK + 1)}
    assert not train_windows & val_windows, "the splits must not share a block, or the test proves nothing"

    steps, accum = 3, 2
    trainer = make_trainer(split_data, tmp_path, max_iters=steps, grad_accum_steps=accum, eval_interval=100)
    trained_on = []
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.register_forward_pre_hook(
        lambda module, args, kwargs: trained_on.append(kwargs["input_ids"].clone()) if module.training else None,
        with_kwargs=True)
    trainer.fit()

    assert len(trained_on) == steps * accum
    rows = torch.cat(trained_on).numpy().astype(np.int64)
    assert not [row for row in rows if row.tobytes() in val_windows], "trained on blocks of the val split"
    assert all(row.tobytes() in train_windows for row in rows), "trained on blocks that are not in train.bin"
    expected = [documented_blocks(train, step, slot)[:, :-1] for step in range(steps) for slot in range(accum)]
    for got, want in zip(trained_on, expected):
        assert torch.equal(got, want)


# --- 2. resume reproduces every file of an uninterrupted run -----------------------------------

VOLATILE = {"elapsed_s", "tokens_per_s"}  # wall-clock measurements: the only things allowed to differ


def assert_same(actual, expected, where: str = "") -> None:
    """Equal to the bit, recursively: tensors, numbers, strings; keys in VOLATILE skipped."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"{where}: keys {set(actual) ^ set(expected)}"
        for key in expected:
            if key not in VOLATILE:
                assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{index}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where}: tensors differ"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_same_files(folder: Path, reference: Path) -> None:
    """Every file the run wrote: the same names, and each equal to the reference's (but for wall-clock times)."""
    def names(path):
        return {p.name for p in path.iterdir() if p.name not in (LOCK_NAME, OWNER_NAME)}

    assert names(folder) == names(reference) == set(RUN_FILES)
    for name in ("ckpt_last.pt", "ckpt_best.pt"):
        assert_same(load_checkpoint(folder / name), load_checkpoint(reference / name), name)
    assert_same(json.loads((folder / "train_log.json").read_text()),
                json.loads((reference / "train_log.json").read_text()), "train_log.json")
    assert_same(*([json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
                  for path in (folder, reference)), "metrics.jsonl")


def fit(config: Path, resume: Path | None = None, interrupt_at: int | None = None) -> Trainer:
    """A whole in-process run of `config`; with `interrupt_at`, stopped there the way Ctrl-C stops it."""
    from tinylm.compat import reset_accelerate_state

    trainer = Trainer(load_config(config), resume=resume)
    if interrupt_at is not None:
        step_once = trainer.train_step

        def step_then_interrupt(step):
            loss = step_once(step)
            if step + 1 == interrupt_at:
                trainer.accelerator.set_trigger()  # what the Ctrl-C handler's flag leads to
            return loss

        trainer.train_step = step_then_interrupt
    trainer.fit()
    reset_accelerate_state()  # the next run builds its own Accelerator
    return trainer


def improvements(records: list[dict]) -> list[bool]:
    """Which evaluations improve on the best before them (docs/training.md's rule, min_delta 0)."""
    best, improved = math.inf, []
    for record in records:
        improved.append(record["val_loss"] < best)
        best = min(best, record["val_loss"])
    return improved


def longest_stretch(improved: list[bool]) -> int:
    """The most evaluations in a row without improvement."""
    longest = current = 0
    for flag in improved:
        current = 0 if flag else current + 1
        longest = max(longest, current)
    return longest


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_reproduces_every_file_of_the_uninterrupted_run(prepared, tmp_path):
    """A run interrupted (as by Ctrl-C) and resumed writes the same ckpt_last.pt, ckpt_best.pt and
    train_log.json as the run that never stopped: weights, optimizer, RNG and run state (best val loss,
    best iter, evaluations without improvement), every record, the summary. The learning rate is high
    enough that val loss rises for a while and falls again, so the run is interrupted in a stretch of
    evaluations that do not improve, with improvements before and after it; with early stopping on, the
    uninterrupted run stops inside that stretch after the resume point.

    Kills: "trainer: best val loss not restored on resume", "trainer: early-stopping count restarts
    on resume", "trainer: best iter not restored on resume"; (mutation) ckpt_best.pt written on the
    evaluations that do not improve.
    """
    training = {"learning_rate": 0.1, "min_lr": 0.01, "max_iters": 24, "lr_decay_iters": 24,
                "eval_interval": 2, "log_interval": 2}
    out = tmp_path / "ckpt"

    plain = write_config(tmp_path / "plain.toml", prepared, out, training=training)
    records = fit(plain).state.records
    # ckpt_best.pt holds the evaluation with the lowest val loss (the first of equals), by the records.
    lowest = min(records, key=lambda record: record["val_loss"])
    assert load_checkpoint(out / "ckpt_best.pt")["iter"] == lowest["iter"]
    out.rename(tmp_path / "plain-reference")
    iters, improved = [r["iter"] for r in records], improvements(records)
    # The first stretch of >= 2 evaluations without improvement that follows an improvement after iter 0.
    start = next(i for i in range(2, len(improved) - 1)
                 if improved[i - 1] and not improved[i] and not improved[i + 1])
    length = next((n for n in range(1, len(improved) - start) if improved[start + n]), len(improved) - start)
    assert longest_stretch(improved[:start]) < length, "an earlier stretch would stop the run before"
    interrupt_at = iters[start + 1]  # after one evaluation of the stretch: the checkpoint counts it
    assert any(improved[iters.index(interrupt_at):]), "the run must improve again after the resume point"

    # Without early stopping: evaluations after the resume that do not improve, then ones that do.
    fit(plain, interrupt_at=interrupt_at)
    interrupted = load_checkpoint(out / "ckpt_last.pt")["train_state"]["run"]
    assert interrupted["iter"] == interrupt_at and interrupted["evals_without_improvement"] == 1
    assert 0 < interrupted["best_iter"] < interrupt_at
    fit(plain, resume=out / "ckpt_last.pt")
    assert_same_files(out, tmp_path / "plain-reference")
    out.rename(tmp_path / "plain-resumed")

    # With early stopping, patience the stretch's length: the uninterrupted run stops at its end.
    stopping = write_config(tmp_path / "stopping.toml", prepared, out, training={
        **training, "early_stopping": True, "early_stopping_patience": length})
    fit(stopping)
    summary = json.loads((out / "train_log.json").read_text())["summary"]
    assert summary["stop_reason"] == "early_stopping" and summary["iters"] == iters[start + length - 1] > interrupt_at
    out.rename(tmp_path / "stopping-reference")
    fit(stopping, interrupt_at=interrupt_at)
    fit(stopping, resume=out / "ckpt_last.pt")
    assert_same_files(out, tmp_path / "stopping-reference")


# --- 3. gradient clipping, by its effect on the update ------------------------------------------


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_grad_clip_scales_the_update_as_plain_torch_does(split_data, tmp_path):
    """Two optimizer steps with a tiny grad_clip leave in ckpt_last.pt the weights plain torch gives:
    the gradient of the mean cross-entropy on the blocks read from train.bin, scaled by
    max_norm / (norm + 1e-6) when the total norm is larger (torch.nn.utils.clip_grad_norm_), then
    torch.optim.AdamW (decay on matrices only) at nanoGPT's learning rate. Adam's update is nearly
    scale-free, so the clip is made so small that the clipped gradients are of the order of Adam's
    eps, where the clip shows in the weights.

    Kills: "trainer: grad_clip ignored".
    """
    clip, lr, min_lr, warmup, decay, weight_decay = 1e-6, 1e-2, 1e-3, 2, 12, 0.1
    trainer = make_trainer(split_data, tmp_path, grad_clip=clip, weight_decay=weight_decay, max_iters=2)
    start = weights_of(trainer)
    trainer.fit()
    trained = load_checkpoint(tmp_path / "ckpt" / "ckpt_last.pt")["model"]
    train = read_split(split_data, "train")

    def by_hand(max_norm: float) -> dict[str, torch.Tensor]:
        model = plain_model(trainer, start)
        params = list(model.parameters())  # the tied embedding once
        optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
            lr=lr, betas=(0.9, 0.99), eps=1e-8)
        for step in range(2):
            optimizer.zero_grad()
            plain_loss(model, documented_blocks(train, step, slot=0)).backward()
            norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
            scale = min(1.0, max_norm / (float(norm) + 1e-6))
            for p in params:
                p.grad.mul_(scale)
            for group in optimizer.param_groups:
                group["lr"] = nanogpt_lr(step, lr, min_lr, warmup, decay)
            optimizer.step()
        return {name: value.detach() for name, value in model.state_dict().items()}

    clipped, unclipped = by_hand(clip), by_hand(math.inf)
    differs = max((clipped[name] - unclipped[name]).abs().max().item() for name in clipped)
    assert differs > 1e-4, "the clip must change the weights by far more than the tolerance below"
    for name in trained:
        torch.testing.assert_close(trained[name], clipped[name], rtol=0, atol=1e-6, msg=name)


# --- 4. the train loss printed every log_interval ---------------------------------------------


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_logged_train_loss_is_the_mean_over_micro_batches_and_steps(split_data, tmp_path, capsys):
    """The loss printed every log_interval is the mean, over the steps since the last report and their
    grad_accum_steps micro-batches, of each micro-batch's mean cross-entropy, computed here in plain
    torch on the weights each step started from and the blocks read from train.bin. By the later reports
    the model has trained, so the micro-batches' losses differ from each other.

    Kills: "trainer: train loss summed over micro-batches", "trainer: train loss divided by
    grad_accum_steps twice", "trainer: train loss summed over the steps of a report".
    """
    steps, accum, interval = 6, 3, 2
    trainer = make_trainer(split_data, tmp_path, max_iters=steps, grad_accum_steps=accum, log_interval=interval,
                           eval_interval=100)
    started_from = {}
    step_once = trainer.train_step

    def remember_weights(step):
        started_from[step] = weights_of(trainer)
        return step_once(step)

    trainer.train_step = remember_weights
    trainer.fit()
    printed = {int(it): float(loss) for it, loss in re.findall(r"^iter (\d+)/\d+ \| loss ([0-9.]+)",
                                                               capsys.readouterr().out, re.M)}
    assert sorted(printed) == [2, 4, 6]

    train = read_split(split_data, "train")
    with torch.no_grad():
        micro = {step: [plain_loss(plain_model(trainer, started_from[step]), documented_blocks(train, step, slot))
                        .item() for slot in range(accum)] for step in range(steps)}
    assert max(micro[steps - 1]) - min(micro[steps - 1]) > 1e-3, "micro-batch losses must differ"
    for report in (2, 4, 6):
        window = [loss for step in range(report - interval, report) for loss in micro[step]]
        assert printed[report] == pytest.approx(sum(window) / len(window), abs=1e-4), report


# --- 5. sampling filters against a hand-computed distribution ----------------------------------

LOGITS = [2.0, 1.0, 1.0, 0.5, -1.0, 3.0, 0.5, 0.0]  # ties at 1.0 and at 0.5


def filtered_by_hand(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The next-token distribution nanoGPT / transformers' generate define: logits / temperature; top-k
    keeps every token whose logit is at least the k-th largest (ties at the k-th all kept); softmax;
    top-p keeps the most likely tokens, in order, until their probability reaches p; renormalised."""
    scaled = [x / temperature for x in logits]
    if 0 < top_k < len(scaled):
        kth = sorted(scaled, reverse=True)[top_k - 1]
        scaled = [x if x >= kth else -math.inf for x in scaled]
    weights = [math.exp(x) for x in scaled]
    probs = [w / sum(weights) for w in weights]
    if top_p < 1.0:
        order = sorted(range(len(probs)), key=lambda i: -probs[i])
        total, nucleus = 0.0, []
        for index in order:
            nucleus.append(index)
            total += probs[index]
            if total >= top_p:
                break
        rest = [probs[i] for i in order[len(nucleus):]]
        assert total - top_p > 1e-6 and (not rest or probs[nucleus[-1]] - max(rest) > 1e-6), "no boundary ties"
        probs = [p / total if i in nucleus else 0.0 for i, p in enumerate(probs)]
    return probs


SAMPLING_CASES = [  # (temperature, top_k, top_p)
    (0.7, 3, 1.0),   # cooled; the 3rd largest logit is a tie: both tied tokens stay
    (1.5, 0, 0.7),   # heated, top-p alone (the nucleus ends after both tied tokens)
    (1.0, 3, 0.8),   # top-k (with the tie) then top-p on what is left: top-p first would keep 3 tokens, not 2
    (0.5, 5, 0.9),   # cooled, top-k with a tie at the 5th, then top-p
    (2.0, 8, 1.0),   # top_k = vocab size and top_p = 1: temperature only
]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SAMPLING_CASES)
def test_sampling_filters_give_the_hand_computed_distribution(temperature, top_k, top_p):
    """logits_warpers (the filter chain `choose` applies) turns fixed logits into exactly the
    distribution computed by hand, and `choose` draws from it: never a filtered-out token, and each
    kept token about as often as its probability says.

    Kills: "sampler: temperature inverted", "sampler: top_p taken as the mass to drop", "sampler: top-p
    applied before top-k".
    """
    expected = filtered_by_hand(LOGITS, temperature, top_k, top_p)
    setting = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    warpers = sampler.logits_warpers(setting, len(LOGITS))
    logits = torch.tensor([LOGITS])
    got = torch.softmax(warpers(None, logits.clone()), dim=-1)[0]
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-7)

    draws, generator = 4000, torch.Generator().manual_seed(0)
    counts = collections.Counter(sampler.choose(logits.clone(), setting, warpers, generator) for _ in range(draws))
    for token, p in enumerate(expected):
        if p == 0:
            assert counts[token] == 0, f"token {token} was filtered out but drawn"
        else:
            assert abs(counts[token] / draws - p) < 5 * math.sqrt(p * (1 - p) / draws) + 1 / draws, token


# --- 6. the learning rate each optimizer step uses ----------------------------------------------


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_each_step_uses_nanogpts_learning_rate(split_data, tmp_path):
    """The learning rate every optimizer step really applies (read from the torch optimizer as it
    steps) is nanoGPT's get_lr for that step, written out here: linear warmup, the step where warmup
    ends, cosine decay over lr_decay_iters (not max_iters), then min_lr after lr_decay_iters.

    Kills: "schedule: cosine decays over max_iters, not lr_decay_iters", "schedule: warmup ends a
    step early", "trainer: the optimizer steps with the next step's learning rate".
    """
    lr, min_lr, warmup, decay, steps = 1e-2, 1e-3, 3, 10, 14
    trainer = make_trainer(split_data, tmp_path, learning_rate=lr, min_lr=min_lr, warmup_iters=warmup,
                           lr_decay_iters=decay, max_iters=steps, eval_interval=100, log_interval=100)
    used = []
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: used.append([group["lr"] for group in optimizer.param_groups]))
    trainer.fit()
    assert len(used) == steps
    for step, rates in enumerate(used):
        expected = nanogpt_lr(step, lr, min_lr, warmup, decay)
        assert rates == [pytest.approx(expected, rel=1e-12)] * len(rates), f"step {step}"

