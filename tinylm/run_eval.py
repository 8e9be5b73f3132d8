"""A training run's evaluation, at each eval_interval: the mean loss of each split over its fixed
evaluation blocks, gathered from every process, and a seeded sample of what the model writes.

The blocks are the first `eval_iters * batch_size` of each split (`data.eval_loader`), the same at
every evaluation, so two evaluations differ only by the model. `loaders` builds them; the trainer
prepares them with the model and optimizer (`accelerator.prepare` shards them across processes) and
hands the prepared ones to `Evaluation`.

Not `tinylm eval` (tinylm/evaluate.py), which scores a checkpoint on a text or a prepared split.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from . import data, lora, run_report, sampler
from .config import Config, Sampling, TrainingConfig
from .hardware import CpuMatmul
from .model import per_block_loss


def loaders(config: Config, splits: dict[str, data.TokenStream]) -> dict[str, DataLoader]:
    """Each split's evaluation blocks in batches, always in the same order (not yet prepared)."""
    training = config.training
    return {split: data.eval_loader(tokens, block_size=config.model.block_size, batch_size=training.batch_size,
                                    num_blocks=training.eval_iters * training.batch_size)
            for split, tokens in splits.items()}


class Evaluation:
    """The evaluations of one run, over `loaders` as `accelerator.prepare` returned them."""

    def __init__(self, loaders: dict[str, DataLoader], accelerator: Accelerator, training: TrainingConfig,
                 tokenizer: PreTrainedTokenizerFast, cpu_matmul: CpuMatmul):
        self.loaders, self.accelerator, self.training = loaders, accelerator, training
        self.tokenizer, self.cpu_matmul = tokenizer, cpu_matmul

    @torch.no_grad()
    def losses(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean loss over the fixed evaluation blocks of each split, gathered from all processes."""
        model.eval()
        losses = {}
        with self.cpu_matmul.active():
            for split, loader in self.loaders.items():
                per_block = [self.accelerator.gather_for_metrics(per_block_loss(model, batch["input_ids"]))
                             for batch in loader]
                losses[split] = torch.cat(per_block).float().mean().item()
        model.train()
        return losses

    def sample(self, model: torch.nn.Module) -> str | None:
        """The evaluation's sample (main process): the prompt and what the model writes after it, seeded.

        Its own random generator leaves training's untouched, so a run with samples trains
        exactly like one without. Not under FSDP, where no process holds the whole model.
        """
        training = self.training
        if not run_report.samples_here(training.eval_sample_tokens, self.accelerator.is_main_process,
                                       self.accelerator.distributed_type):
            return None
        with self.cpu_matmul.active():
            written = sampler.complete(lora.gpt2_of(self.accelerator.unwrap_model(model)), self.tokenizer,
                                       training.eval_sample_prompt,
                                       Sampling(max_new_tokens=training.eval_sample_tokens), seed=training.seed)
        return training.eval_sample_prompt + written
