"""Planted bugs: each one must make the tests that guard it fail.

    python tests/mutants.py [--only NAME ...]

For each mutant: copy the repo's tinylm/ and tests/ into a temporary folder, make one edit there
(the working tree is never touched), run the tests that guard that code, and count the mutant as
killed when they fail. Prints one line per mutant and the score. Every mutant here is a bug a
test once let through, or the bug a new test was written for; a surviving mutant is a test to
write. Run by hand (a few minutes), not by pytest: it is not a test_*.py file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (name, file, original text, mutated text, pytest selection)
MUTANTS = [
    ("checkpoint: no explicit weights_only", "tinylm/checkpoint.py",
     'torch.load(path, map_location="cpu", weights_only=True)', 'torch.load(path, map_location="cpu")',
     ["tests/test_resume.py", "-k", "run_code"]),
    ("checkpoint: no zip check", "tinylm/checkpoint.py",
     "    if not zipfile.is_zipfile(path):", "    if False:",
     ["tests/test_never_lose_a_run.py", "-k", "not_a_checkpoint"]),
    ("atomic: train_log.json written in place", "tinylm/atomic.py",
     '    with atomic_open(target, "w", encoding="utf-8") as handle:',
     '    with open(target, "w", encoding="utf-8") as handle:',
     ["tests/test_resume.py", "-k", "sigkill_while"]),
    ("atomic: temp file left behind on failure", "tinylm/atomic.py",
     "    except BaseException:\n        tmp.unlink(missing_ok=True)\n        raise",
     "    except BaseException:\n        raise",
     ["tests/test_atomic.py"]),
    ("rng: torch state not restored", "tinylm/rng.py",
     '    torch.set_rng_state(state["torch"])', "    pass",
     ["tests/test_resume.py", "-k", "reproduces"]),
    ("data: every micro-batch slot gets the same blocks", "tinylm/data.py",
     "starts[slot * batch_size :]", "starts[:batch_size]",
     ["tests/test_train.py", "-k", "grad_accumulation"]),
    ("data: batches ignore the step", "tinylm/data.py",
     "np.random.default_rng([seed, step])", "np.random.default_rng([seed, 0])",
     ["tests/test_data.py"]),
    ("sampler: every cached step at position 0", "tinylm/sampler.py",
     "self.gpt.wpe(self.positions[start:end])", "self.gpt.wpe(self.positions[0:end - start])",
     ["tests/test_generate.py", "-k", "cache_matches"]),
    ("sampler: re-prefill keeps one token too many", "tinylm/sampler.py",
     "decoder.prefill(tokens[-keep:])", "decoder.prefill(tokens[-keep - 1:])",
     ["tests/test_generate.py", "-k", "cache_matches"]),
    ("trainer: fp16 overflow skips step() (and the scaler's update)", "tinylm/trainer.py",
     "        if self.accelerator.scaler is None:\n            skip_next_step_where(self.optimizer, nonfinite)\n"
     "        self.optimizer.step()",
     "        if not bool(nonfinite):\n            self.optimizer.step()",
     ["tests/test_precision.py"]),
    ("trainer: non-finite fp32 steps applied", "tinylm/trainer.py",
     "            skip_next_step_where(self.optimizer, nonfinite)", "            pass",
     ["tests/test_precision.py"]),
    ("step_stats: skipped-step run never resets", "tinylm/step_stats.py",
     "(self.skipped_run + 1) * nonfinite", "self.skipped_run + nonfinite",
     ["tests/test_precision.py"]),
    ("checkpoint: min_delta ignored for the best checkpoint", "tinylm/checkpoint.py",
     "improved = val_loss < self.best_val_loss and self.best_val_loss - val_loss >= min_delta",
     "improved = val_loss < self.best_val_loss",
     ["tests/test_train.py", "-k", "min_delta"]),
    ("data: batches fetched for the wrong step", "tinylm/data.py",
     "self._ahead = (step, self.fetch(step))", "self._ahead = (step, self.fetch(step + 1))",
     ["tests/test_speed.py", "-k", "batches"]),
    ("trainer: learning-rate schedule never stepped", "tinylm/trainer.py",
     "        self.scheduler.step()\n        self.batches.prefetch", "        self.batches.prefetch",
     ["tests/test_train.py", "-k", "schedule"]),
    ("run_folder: a new run overwrites a trained one", "tinylm/run_folder.py",
     "    if found and not overwrite:", "    if False:",
     ["tests/test_never_lose_a_run.py", "-k", "refuses"]),
    ("hardware: resumed auto run re-measures its matmul backend", "tinylm/hardware.py",
     'if setting == "auto" and started_with in ("blas", "onednn"):', "if False:",
     ["tests/test_speed.py", "-k", "resumed"]),
    ("train: resume takes the config file, not the run", "tinylm/train.py",
     "    config = load_config(args.config, overrides, base=saved,",
     "    config = load_config(args.config or paths.CONFIG_EXAMPLE, overrides, base=None,",
     ["tests/test_never_lose_a_run.py", "-k", "resume_continues"]),
    ("hardware: matmul setting leaks out of training steps", "tinylm/hardware.py",
     "            torch.backends.mkldnn.matmul.fp32_precision = previous", "            pass",
     ["tests/test_speed.py", "-k", "scoped"]),
    ("documents: val rows picked off by one", "tinylm/documents.py",
     "return np.floor((index + 1) * fraction) > np.floor(index * fraction)",
     "return np.floor(index * fraction) > np.floor((index - 1) * fraction)",
     ["tests/test_prepare_dataset.py", "-k", "token_exact"]),
    ("documents: no eos after a document", "tinylm/documents.py",
     "np.array(encoding.ids + [eos_id], dtype=dtype)", "np.array(encoding.ids, dtype=dtype)",
     ["tests/test_prepare_dataset.py", "-k", "token_exact"]),
    ("documents: empty rows kept as documents", "tinylm/documents.py",
     "dtype=dtype) if text else np.empty(0, dtype=dtype)", "dtype=dtype) if True else np.empty(0, dtype=dtype)",
     ["tests/test_prepare_dataset.py", "-k", "token_exact"]),
    ("documents: streaming tokenizer sample unbounded", "tinylm/documents.py",
     "                        if limit_chars and seen >= limit_chars:", "                        if False:",
     ["tests/test_prepare_dataset.py", "-k", "bounded_sample"]),
    ("documents: tokenizer cache key ignores the vocab size", "tinylm/documents.py",
     "settings = [kind, vocab_size, sample_chars", "settings = [kind, sample_chars",
     ["tests/test_prepare_dataset.py", "-k", "reuses_the_cache"]),
    ("plain_text: dataset files passed to --input read as text", "tinylm/plain_text.py",
     "        if not kinds:\n            return", "        if True:\n            return",
     ["tests/test_prepare_dataset.py", "-k", "bad_dataset_input"]),
    ("formats: changed files trusted", "tinylm/formats.py",
     "and sha256_of(path) != entry[\"sha256\"]", "and False",
     ["tests/test_data.py", "-k", "changed_since"]),
    ("data: edited txt text used without retokenizing", "tinylm/data.py",
     "and formats.text_changed(text, entry):", "and False:",
     ["tests/test_data.py", "-k", "retokenized"]),
    ("data: newer data in the other format goes unmentioned", "tinylm/data.py",
     "    return meta_path if newer and", "    return None if newer and",
     ["tests/test_prepare_dataset.py", "-k", "training_says"]),
    ("data: load_blocks rows off by one token", "tinylm/data.py",
     "pa.py_buffer(tokens[:count])", "pa.py_buffer(tokens[1 : count + 1])",
     ["tests/test_prepare_dataset.py", "-k", "load_blocks_rows"]),
    ("prepare: a folder of prepared data replaced without --overwrite", "tinylm/prepare.py",
     "                if held:\n", "                if False:\n",
     ["tests/test_prepare.py", "-k", "refused_without_overwrite"]),
    ("formats: --overwrite keeps the token files no meta.json lists", "tinylm/formats.py",
     " | set(token_files(out))", "",
     ["tests/test_prepare.py", "-k", "refused_without_overwrite"]),
    ("prepare: a killed prepare's staging folder never removed", "tinylm/prepare.py",
     "stale = locks.remove_stale(out, formats.TEMP_PATTERNS)", "stale = []",
     ["tests/test_prepare.py", "-k", "killed_prepare"]),
    ("prepare: a second prepare runs in a folder being prepared", "tinylm/prepare.py",
     'with locks.FolderLock(out, "tinylm prepare"):', "with contextlib.nullcontext():",
     ["tests/test_prepare.py", "-k", "being_prepared"]),
    ("prepare: a failed prepare leaves the --out folder it created", "tinylm/prepare.py",
     "if created and {path.name", "if False and {path.name",
     ["tests/test_prepare.py", "-k", "failed_prepare"]),
    ("prepare: a repeated --dataset keeps only the last", "tinylm/prepare.py",
     "        if first is not None:\n", "        if False:\n",
     ["tests/test_prepare.py", "-k", "given_twice"]),
    ("encoding: streamed token ids held in memory", "tinylm/encoding.py",
     "    writer.write(ids.flatten().to_numpy(zero_copy_only=False))",
     "    write_rows.__dict__.setdefault('held', []).append(rows.to_pylist())\n"
     "    writer.write(ids.flatten().to_numpy(zero_copy_only=False))",
     ["tests/test_prepare_dataset.py", "-k", "holds_no_more"]),
    ("model: fine-tune context not cropped", "tinylm/model.py",
     "    if block_size < context:\n        crop_positions(model, block_size)", "    pass",
     ["tests/test_finetune.py", "-k", "starts_from"]),
    ("model: shape keys that contradict the pretrained model accepted", "tinylm/model.py",
     "if f\"model.{key}\" in config.given and", "if False and",
     ["tests/test_finetune.py", "-k", "contradicts"]),
    ("model: init_from builds a fresh model of the pretrained shape", "tinylm/model.py",
     "    model = pretrained.gpt2(init_from, config.model.init_revision, config.model.dropout)",
     "    model = build_model(pretrained.gpt2(init_from, config.model.init_revision).config)",
     ["tests/test_finetune.py", "-k", "starts_from"]),
    ("model: data from another tokenizer fine-tuned on", "tinylm/model.py",
     "    if own.get_vocab() != tokenizer.get_vocab():", "    if False:",
     ["tests/test_finetune.py", "-k", "another_tokenizer"]),
    ("sampler: --revision ignored", "tinylm/sampler.py",
     "pretrained.causal_lm(name, revision), pretrained.tokenizer(name, revision)",
     "pretrained.causal_lm(name), pretrained.tokenizer(name)",
     ["tests/test_finetune.py", "-k", "one_line"]),
    ("errors: a message links a section the page does not have", "tinylm/errors.py",
     'CUDA_NOT_DETECTED = "cuda-not-detected"', 'CUDA_NOT_DETECTED = "cuda-missing"',
     ["tests/test_troubleshooting_links.py"]),
    ("data: the missing-shards message drops its link", "tinylm/data.py",
     "            anchor=BINARY_SHARDS_NOT_FOUND,\n", "",
     ["tests/test_troubleshooting_links.py"]),
    ("documents: a streamed Parquet file scanned whole, not row group by row group", "tinylm/documents.py",
     "        train, val = train.reshard(), val.reshard() if val is not None else None", "        pass",
     ["tests/test_prepare_dataset.py", "-k", "peak_memory"]),
    ("sampler: eos does not end a sample", "tinylm/sampler.py",
     "    return sampling.stop_at_eos and token == model.config.eos_token_id", "    return False",
     ["tests/test_generate.py", "-k", "end_of_text"]),
    ("tracking: a missing tracker package trains with no metrics", "tinylm/tracking.py",
     "    if not available():", "    if False:",
     ["tests/test_tracking.py", "-k", "missing"]),
    ("trainer: train metrics never sent to the tracker", "tinylm/trainer.py",
     '                self._log({"train/loss": report.loss,', '                (lambda *args: None)({"train/loss": report.loss,',
     ["tests/test_tracking.py", "-k", "tensorboard"]),
    ("step_stats: logged train loss is rank 0's, not the mean over processes", "tinylm/step_stats.py",
     'sums = accelerator.reduce(torch.stack([self.loss_sum, self.grad_norm_sum, self.grad_norm_steps]), "sum")',
     "sums = torch.stack([self.loss_sum, self.grad_norm_sum, self.grad_norm_steps]) * accelerator.num_processes",
     ["tests/test_multiprocess.py", "-k", "twice_the_batch"]),
    ("step_stats: gradient-norm window never reset", "tinylm/step_stats.py",
     "        self.grad_norm_sum.zero_()\n        self.grad_norm_steps.zero_()\n", "",
     ["tests/test_tracking.py", "-k", "tensorboard"]),
    ("trainer: gradient norm logged after clipping", "tinylm/trainer.py",
     "self.stats.add_step(grad_norm, nonfinite)", "self.stats.add_step(grad_norm.clamp(max=max_norm), nonfinite)",
     ["tests/test_tracking.py", "-k", "tensorboard"]),
    ("sampler: cache passed by transformers' deprecated name", "tinylm/sampler.py",
     'return "cache" if "cache" in parameters else "past_key_values"', 'return "past_key_values"',
     ["tests/test_generate.py", "-k", "installed_transformers"]),
    ("onnx: traced wrapper passes the cache by the deprecated name", "tinylm/onnx_export.py",
     "            **{cache_keyword(type(self.model)): cache},", "            past_key_values=cache,",
     ["tests/test_onnx.py", "-k", "installed_transformers"]),
    ("export: model.safetensors keeps transformers' 0600", "tinylm/export.py",
     "        normalise_modes(staging)\n", "",
     ["tests/test_export.py", "-k", "folder_holds"]),
    ("model_card: --base-model accepted for a model trained from scratch", "tinylm/model_card.py",
     "        if given:\n            raise UserError", "        if False:\n            raise UserError",
     ["tests/test_export.py", "-k", "base_model_that_cannot_be"]),
    ("hub_names: a local folder named like owner/name taken for a Hub id", "tinylm/hub_names.py",
     "reads_as_hub_id(name) and (local_ok or not is_local(name))", "reads_as_hub_id(name)",
     ["tests/test_export.py", "-k", "never_named_as_hub_ids"]),
    ("model_card: a relative init_from folder taken for a Hub id when export runs elsewhere", "tinylm/model_card.py",
     'if repo and in_hub_cache(repo, "model") else', "if repo else",
     ["tests/test_export.py", "-k", "no_local_path"]),
    ("model_card: a local data file named by its path on the author's machine", "tinylm/model_card.py",
     "    return Path(path).expanduser().name or path", "    return path",
     ["tests/test_export.py", "-k", "no_local_path"]),
    ("export: config.json keeps a fine-tuned GPT-2's missing pad token", "tinylm/export.py",
     "    config.bos_token_id, config.eos_token_id, config.pad_token_id = (\n"
     "        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)\n", "",
     ["tests/test_finetune.py", "-k", "resumes_and_exports"]),
    ("model_card: model-index perplexity not the card's loss's", "tinylm/model_card.py",
     "metric_value=round(perplexity(val_loss), 2)),", "metric_value=round(perplexity(round(val_loss, 1)), 2)),",
     ["tests/test_export.py", "-k", "card"]),
    ("config: any string taken as a license", "tinylm/config.py",
     "    if value and not pattern.fullmatch(value):", "    if False:",
     ["tests/test_export.py", "-k", "license_the_hub"]),
    ("push: the card uploaded as exported, naming the folder", "tinylm/push.py",
     "path_or_fileobj=str(card).encode() if name == CARD_NAME and card else folder / name)",
     "path_or_fileobj=folder / name)",
     ["tests/test_push.py", "-k", "names_the_repo"]),
    ("push: no warning for a card without a license", "tinylm/push.py",
     "    elif not card.data.license:", "    elif False:",
     ["tests/test_push.py", "-k", "without_a_license"]),
    ("pretrained: a Hub id waits out huggingface_hub's retries when the Hub cannot be reached", "tinylm/pretrained.py",
     "    offline = None if is_local(source) or constants.HF_HUB_OFFLINE else unreachable(constants.ENDPOINT)",
     "    offline = None",
     ["tests/test_finetune.py", "-k", "unreachable and refused"]),
    ("run_folder: out_dir not locked", "tinylm/run_folder.py",
     "        folder_lock.acquire()\n", "",
     ["tests/test_nothing_lost.py", "-k", "in_use"]),
    ("trainer: --overwrite keeps the replaced run's files", "tinylm/trainer.py",
     "            replaced = run_folder.clear_replaced_run(self.out_dir)\n", "            replaced = []\n",
     ["tests/test_nothing_lost.py", "-k", "overwrite_removes"]),
    ("checkpoint: restored optimizer keeps the saved betas and weight decay", "tinylm/checkpoint.py",
     "        group.update(settings)\n", "        pass\n",
     ["tests/test_nothing_lost.py", "-k", "optimizer_settings"]),
    ("trainer: schedule restored from the saved run, not built for this config", "tinylm/trainer.py",
     "        self.scheduler = build_scheduler(optimizer, training, start_step=self.state.iter)\n",
     "        self.scheduler = build_scheduler(optimizer, training, start_step=self.state.iter)\n"
     "        if resumed:\n            self.scheduler.load_state_dict({**self.scheduler.state_dict(), "
     "\"base_lrs\": [group['initial_lr'] * 2 for group in optimizer.param_groups]})\n",
     ["tests/test_nothing_lost.py", "-k", "optimizer_settings"]),
    ("run_folder: a resume may write into a folder holding another run", "tinylm/run_folder.py",
     "    if resumed_from is not None and resumed_from.parent.resolve() == out_dir.resolve():",
     "    if resumed_from is not None:",
     ["tests/test_nothing_lost.py", "-k", "holding_another_run"]),
    ("train: a resume takes the config file's default out_dir", "tinylm/train.py",
     "    config = load_config(args.config, overrides, base=saved,",
     "    config = load_config(args.config, overrides, base=None,",
     ["tests/test_nothing_lost.py", "-k", "names_no_out_dir"]),
    ("trainer: only the main process learns that a save failed", "tinylm/trainer.py",
     "        self._stop_together(failure)\n\n    def _payload",
     "        if failure:\n            raise failure\n\n    def _payload",
     ["tests/test_nothing_lost.py", "-k", "every_process_stops"]),
    ("checkpoint: torch.save's failed write not turned into a user error", "tinylm/checkpoint.py",
     "        except RuntimeError as exc:", "        except ZeroDivisionError as exc:",
     ["tests/test_nothing_lost.py", "-k", "full_disk"]),
    ("run_folder: a dead run's temp files kept", "tinylm/run_folder.py",
     "    return locks.remove_stale(out_dir, STALE_PATTERNS)", "    return []",
     ["tests/test_nothing_lost.py", "-k", "sigkill_during"]),
    ("config: consistency checked before the flags apply", "tinylm/config.py",
     "    layered = from_dict(raw, str(path) if path is not None else source, check_consistency=False)",
     "    layered = from_dict(raw, str(path) if path is not None else source)",
     ["tests/test_nothing_lost.py", "-k", "flag_an_error_suggests"]),
    ("model: a fine-tune resume keeps the saved dropout", "tinylm/model.py",
     'GPT2Config.from_dict({**resumed["model_config"], "resid_pdrop": dropout,',
     'GPT2Config.from_dict({**resumed["model_config"], "resid_pdrop_": dropout,',
     ["tests/test_nothing_lost.py", "-k", "new_dropout"]),
    ("checkpoint: the Hub model a run fine-tunes not recorded", "tinylm/checkpoint.py",
     '        "base_model": base_model,\n', "",
     ["tests/test_finetune.py", "-k", "any_machine"]),
    ("errors: printed commands not quoted", "tinylm/errors.py",
     "    return shlex.join(map(str, words))", "    return \" \".join(map(str, words))",
     ["tests/test_nothing_lost.py", "-k", "paste_into_a_shell"]),
    ("trainer: training batches drawn from the validation split", "tinylm/trainer.py",
     'self.train_tokens = self.data.split("train")', 'self.train_tokens = self.data.split("val")',
     ["tests/test_loop_guards.py", "-k", "windows_of_the_train_file"]),
    ("trainer: train_batch reads the val tokens", "tinylm/trainer.py",
     "            self.train_tokens, block_size=self.config.model.block_size, batch_size=training.batch_size,",
     "            self.val_tokens, block_size=self.config.model.block_size, batch_size=training.batch_size,",
     ["tests/test_loop_guards.py", "-k", "windows_of_the_train_file"]),
    ("checkpoint: best val loss not restored on resume", "tinylm/checkpoint.py",
     '    run = dict(train_state(payload)["run"])', '    run = {**train_state(payload)["run"], "best_val_loss": math.inf}',
     ["tests/test_loop_guards.py", "-k", "resume_reproduces"]),
    ("checkpoint: early-stopping count restarts on resume", "tinylm/checkpoint.py",
     '    run = dict(train_state(payload)["run"])', '    run = {**train_state(payload)["run"], "evals_without_improvement": 0}',
     ["tests/test_loop_guards.py", "-k", "resume_reproduces"]),
    ("checkpoint: best iter not restored on resume", "tinylm/checkpoint.py",
     '    run = dict(train_state(payload)["run"])', '    run = {**train_state(payload)["run"], "best_iter": -1}',
     ["tests/test_loop_guards.py", "-k", "resume_reproduces"]),
    ("trainer: grad_clip ignored", "tinylm/trainer.py",
     "        max_norm = self.config.training.grad_clip or math.inf", "        max_norm = math.inf",
     ["tests/test_loop_guards.py", "-k", "grad_clip"]),
    ("trainer: train loss summed over micro-batches", "tinylm/trainer.py",
     "        return loss_sum / self.config.training.grad_accum_steps", "        return loss_sum",
     ["tests/test_loop_guards.py", "-k", "logged_train_loss"]),
    ("trainer: train loss divided by grad_accum_steps twice", "tinylm/trainer.py",
     "            loss_sum += loss.detach()\n",
     "            loss_sum += loss.detach() / self.config.training.grad_accum_steps\n",
     ["tests/test_loop_guards.py", "-k", "logged_train_loss"]),
    ("step_stats: train loss summed over the steps of a report", "tinylm/step_stats.py",
     "report = Report(loss=loss_total / (self.losses * accelerator.num_processes),",
     "report = Report(loss=loss_total / accelerator.num_processes,",
     ["tests/test_loop_guards.py", "-k", "logged_train_loss"]),
    ("sampler: temperature inverted", "tinylm/sampler.py",
     "TemperatureLogitsWarper(sampling.temperature)", "TemperatureLogitsWarper(1 / sampling.temperature)",
     ["tests/test_loop_guards.py", "-k", "sampling_filters"]),
    ("sampler: top_p taken as the mass to drop", "tinylm/sampler.py",
     "TopPLogitsWarper(sampling.top_p)", "TopPLogitsWarper(1 - sampling.top_p)",
     ["tests/test_loop_guards.py", "-k", "sampling_filters"]),
    ("sampler: top-p applied before top-k", "tinylm/sampler.py",
     "    if 0 < sampling.top_k < vocab_size:\n        processors.append(TopKLogitsWarper(sampling.top_k))\n"
     "    if sampling.top_p < 1.0:\n        processors.append(TopPLogitsWarper(sampling.top_p))\n",
     "    if sampling.top_p < 1.0:\n        processors.append(TopPLogitsWarper(sampling.top_p))\n"
     "    if 0 < sampling.top_k < vocab_size:\n        processors.append(TopKLogitsWarper(sampling.top_k))\n",
     ["tests/test_loop_guards.py", "-k", "sampling_filters"]),
    ("schedule: cosine decays over max_iters, not lr_decay_iters", "tinylm/schedule.py",
     "/ (training.lr_decay_iters - training.warmup_iters)", "/ (training.max_iters - training.warmup_iters)",
     ["tests/test_loop_guards.py", "-k", "nanogpts_learning_rate"]),
    ("schedule: warmup ends a step early", "tinylm/schedule.py",
     "    if step < training.warmup_iters:", "    if step < training.warmup_iters - 1:",
     ["tests/test_loop_guards.py", "-k", "nanogpts_learning_rate"]),
    ("trainer: the optimizer steps with the next step's learning rate", "tinylm/trainer.py",
     "                if self.accelerator.sync_gradients:\n                    self._optimizer_step()\n"
     "            loss_sum += loss.detach()\n        self.scheduler.step()\n",
     "                if self.accelerator.sync_gradients:\n                    self.scheduler.step()\n"
     "                    self._optimizer_step()\n            loss_sum += loss.detach()\n",
     ["tests/test_loop_guards.py", "-k", "nanogpts_learning_rate"]),
    ("train: the push at the end of a run skipped on the main process", "tinylm/train.py",
     "if config.hub.repo_id and PartialState().is_main_process:",
     "if config.hub.repo_id and not PartialState().is_main_process:",
     ["tests/test_train.py", "-k", "push_at_the_end"]),
    ("trainer: the process group left open at exit", "tinylm/trainer.py",
     "        close_process_group_at_exit()\n", "",
     ["tests/test_multiprocess.py", "-k", "stop_together"]),
]


def run_mutant(file: str, original: str, mutated: str, selection: list[str]) -> tuple[bool, float]:
    """(killed, seconds): apply one edit in a scratch copy of the repo and run the selected tests there."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        shutil.copytree(REPO, root, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.bin", "*.pt"))
        source = root / file
        text = source.read_text()
        if text.count(original) != 1:
            raise SystemExit(f"{file}: the text to mutate must occur exactly once: {original!r}")
        source.write_text(text.replace(original, mutated))
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
        started = time.perf_counter()
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0", *selection]
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        return result.returncode != 0, time.perf_counter() - started


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names (substrings) of the mutants to run")
    return parser


def main() -> int:
    args = build_parser().parse_args()
    chosen = [m for m in MUTANTS if not args.only or any(part in m[0] for part in args.only)]
    survivors = []
    for name, file, original, mutated, selection in chosen:
        killed, seconds = run_mutant(file, original, mutated, selection)
        print(f"{'killed  ' if killed else 'SURVIVED'} {seconds:6.1f}s  {name}", flush=True)
        if not killed:
            survivors.append(name)
    print(f"\nmutation score: {len(chosen) - len(survivors)}/{len(chosen)} killed")
    for name in survivors:
        print(f"  survived: {name}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
