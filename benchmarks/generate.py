"""Sampling speed and start-up: `tinylm generate` and `tinylm train` against nanoGPT's scripts.

After load (in this process): tokens per second of `tinylm generate`'s cached sliding window and of
nanoGPT's recompute-everything sampler. Both run on the same randomly initialised baby GPT (4 layers,
4 heads, 128 wide, a 65-character vocabulary, as nanoGPT's Shakespeare-char model) in this process,
alternating run by run so that machine noise hits both alike, for 500 and 2000 new tokens at
block_size 64 and 256. Speed does not depend on what the weights have learned, so no training is needed.

End to end (fresh processes, as a user starts them), each pair alternating for --rounds rounds,
median and range, wall and CPU seconds: `tinylm generate` on a real checkpoint (one training step of
the baby preset on the built-in corpus) against `nanogpt_sample.py` (nanoGPT's sample.py on the
same shape) for 1 new token (the time to the first token: start-up and load, to the process's exit)
and for 500; `tinylm train` with the baby preset against `nanogpt_train.py` (nanoGPT's train.py on
the same shape, data and settings) to the line of the first training step; and the floor of each:
the process that only imports transformers' GPT-2 (tinylm's model) or torch (nanoGPT's).

    python benchmarks/generate.py [--repeats 3] [--rounds 5] [--device auto] [--threads N]
                                    [--only samplers|end-to-end]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tinylm import sampler
from reference_gpt import GPT
from tinylm.config import DEVICES, ModelConfig, apply_overrides, load_config
from tinylm.model import build_model, gpt2_config
from tinylm.prepare import main as prepare_main
from tinylm.trainer import Trainer

VOCAB_SIZE = 65
GPT2_MODULE = "transformers.models.gpt2.modeling_gpt2"  # GPT2LMHeadModel: the least of transformers tinylm imports
FROZEN_IMPORT = ("from tinylm import startup\nstartup.command_process()\n"
                 "with startup.heavy_imports():\n    import {}")
BLOCK_SIZES = (64, 256)
NEW_TOKENS = (500, 2000)
SAMPLERS = {
    "cached (tinylm)": lambda model, prompt, sampling, gen: sampler.sample_tokens(model, prompt, sampling, gen),
    "no cache (nanoGPT)": lambda model, prompt, sampling, gen: sampler.sample_tokens_recompute(
        model, prompt, sampling, gen, context="nanogpt"),
}


def tokens_per_second(sample_fn, model, sampling: sampler.Sampling, device: torch.device) -> float:
    generator = sampler.make_generator(device, 0)
    start = time.perf_counter()
    count = sum(1 for _ in sample_fn(model, [0], sampling, generator))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per sampler and case; the fastest is reported, the least disturbed by "
                             "other work on the machine")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--threads", type=int, help="CPU threads for torch, here and (OMP_NUM_THREADS) in the "
                        "end-to-end processes (default: torch's choice); 1 is steadier on a machine shared with "
                        "other work")
    parser.add_argument("--rounds", type=int, default=5,
                        help="end to end: alternating rounds of fresh processes; the median is reported")
    parser.add_argument("--only", choices=("samplers", "end-to-end"),
                        help="time only the samplers after load, or only the fresh processes (default: both)")
    args = parser.parse_args()
    device = sampler.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only != "end-to-end":
        samplers_after_load(device, args.repeats)
    if args.only != "samplers":
        end_to_end(args.rounds, args.threads)


def samplers_after_load(device: torch.device, repeats: int) -> None:
    """Tokens per second of both samplers on the same model in this process, best of `repeats` alternating runs."""
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"best of {repeats} alternating runs\n")

    rows = []
    cases = [(block, new) for block in BLOCK_SIZES for new in NEW_TOKENS]
    progress = tqdm(total=len(cases) * repeats * len(SAMPLERS), desc="timing", unit="run")
    for block_size, new_tokens in cases:
        torch.manual_seed(0)
        config = gpt2_config(ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=block_size), VOCAB_SIZE)
        model = build_model(config).to(device).eval()
        sampling = sampler.Sampling(max_new_tokens=new_tokens)
        for sample_fn in SAMPLERS.values():  # warm-up: first calls allocate and pick kernels
            tokens_per_second(sample_fn, model, sampler.Sampling(max_new_tokens=block_size + 8), device)
        speeds = {name: [] for name in SAMPLERS}
        for _ in range(repeats):
            for name, sample_fn in SAMPLERS.items():
                speeds[name].append(tokens_per_second(sample_fn, model, sampling, device))
                progress.update()
        rows.append((block_size, new_tokens, {name: max(runs) for name, runs in speeds.items()}))
    progress.close()

    cached, baseline = SAMPLERS
    print(f"\n{'block_size':>10} {'new tokens':>10} {cached + ' tok/s':>22} {baseline + ' tok/s':>25} {'speedup':>8}")
    for block_size, new_tokens, best in rows:
        print(f"{block_size:>10} {new_tokens:>10} {best[cached]:>22.0f} {best[baseline]:>25.0f} "
              f"{best[cached] / best[baseline]:>7.2f}x")


def end_to_end(rounds: int, threads: int | None) -> None:
    """Fresh processes, as a user starts them: tinylm against nanoGPT's scripts, alternating, round by round."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        prepare_main(["--out", str(work / "data")])
        baby = here.parent / "configs" / "baby.toml"
        config = apply_overrides(load_config(baby), {
            "data.processed_dir": str(work / "data"), "training.out_dir": str(work / "ckpt"),
            "training.max_iters": 1, "training.eval_iters": 1, "training.device": "cpu"})
        trainer = Trainer(config)
        trainer.fit()
        shape, training = config.model, config.training
        vocab_size = trainer.data.vocab_size
        reference = GPT(vocab_size, shape.block_size, shape.n_layer, shape.n_head, shape.n_embd)
        torch.save({"model_args": {"vocab_size": vocab_size, "block_size": shape.block_size, "n_layer": shape.n_layer,
                                   "n_head": shape.n_head, "n_embd": shape.n_embd},
                    "model": reference.state_dict(),
                    "itos": trainer.tokenizer.convert_ids_to_tokens(list(range(vocab_size)))}, work / "nanogpt.pt")
        baby_settings = load_config(baby)  # the preset as a user trains it: 20 evaluation batches per split
        nanogpt_train = json.dumps({
            "token_file": str(trainer.train_tokens.files[0]), "val_file": str(trainer.val_tokens.files[0]),
            "dtype": str(trainer.data.dtype), "vocab_size": vocab_size, "n_layer": shape.n_layer,
            "n_head": shape.n_head, "n_embd": shape.n_embd, "block_size": shape.block_size,
            "batch_size": training.batch_size, "learning_rate": training.learning_rate,
            "weight_decay": training.weight_decay, "betas": [training.beta1, training.beta2],
            "grad_clip": training.grad_clip, "eval_iters": baby_settings.training.eval_iters})
        run_number = itertools.count()

        def tinylm_train() -> list[str]:  # a new out_dir each time: the run is killed after its first step
            return [sys.executable, "-m", "tinylm.cli", "train", "--config", str(baby), "--device", "cpu",
                    "--processed-dir", str(work / "data"), "--out-dir", str(work / f"run{next(run_number)}"),
                    "--max-iters", "1"]

        cases = [  # (what, {side: (command maker, the output line that ends the timing, or None: the exit)})
            ("first token", {
                "tinylm": (lambda: generate_command(work, 1), None),
                "nanoGPT": (lambda: [sys.executable, str(here / "nanogpt_sample.py"), str(work / "nanogpt.pt"), "1"],
                            None)}),
            ("500 tokens", {
                "tinylm": (lambda: generate_command(work, 500), None),
                "nanoGPT": (lambda: [sys.executable, str(here / "nanogpt_sample.py"), str(work / "nanogpt.pt"),
                                     "500"], None)}),
            ("first training step", {
                "tinylm": (tinylm_train, r"^iter 1/"),
                "nanoGPT": (lambda: [sys.executable, str(here / "nanogpt_train.py"), nanogpt_train], r"^iter 0:")}),
            ("floor: imports", {
                "tinylm": (lambda: [sys.executable, "-c", f"import {GPT2_MODULE}"], None),
                "nanoGPT": (lambda: [sys.executable, "-c", "import torch"], None)}),
            ("floor: imports, frozen", {
                "tinylm": (lambda: [sys.executable, "-c", FROZEN_IMPORT.format(GPT2_MODULE)], None),
                "nanoGPT": (lambda: [sys.executable, "-c", FROZEN_IMPORT.format("torch")], None)}),
        ]
        print(f"\nend to end on {cpu_model()} ({os.cpu_count()} CPUs): fresh processes, {rounds} alternating rounds, "
              f"OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')}; median (min-max) seconds, wall and CPU "
              "(user + system)")
        print(f"floor: a process that only imports the model's library, tinylm's `{GPT2_MODULE}` against "
              "nanoGPT's `torch`; frozen: as tinylm's commands import it (tinylm.startup)")
        print(f"{'':<24} {'tinylm wall':>17} {'nanoGPT wall':>17} {'ratio':>6}   {'tinylm CPU':>17} "
              f"{'nanoGPT CPU':>17} {'ratio':>6}")
        for what, sides in cases:
            wall, cpu = {side: [] for side in sides}, {side: [] for side in sides}
            for _ in range(rounds):
                for side, (command, until) in sides.items():
                    seconds, cpu_seconds = timed(command(), env, until)
                    wall[side].append(seconds)
                    cpu[side].append(cpu_seconds)
            print(f"{what:<24} {spread(wall['tinylm']):>17} {spread(wall['nanoGPT']):>17} "
                  f"{statistics.median(wall['tinylm']) / statistics.median(wall['nanoGPT']):>5.2f}x   "
                  f"{spread(cpu['tinylm']):>17} {spread(cpu['nanoGPT']):>17} "
                  f"{statistics.median(cpu['tinylm']) / statistics.median(cpu['nanoGPT']):>5.2f}x")
    print("first token and 500 tokens: to the process's exit; first training step: to its line (tinylm's "
          "`iter 1/...`, after an evaluation with a sample and a checkpoint at iter 0; nanoGPT's `iter 0:`, "
          "after an evaluation)")


def generate_command(work: Path, new_tokens: int) -> list[str]:
    return [sys.executable, "-m", "tinylm.cli", "generate", "--device", "cpu",
            "--checkpoint", str(work / "ckpt" / "ckpt_last.pt"), "--max-new-tokens", str(new_tokens)]


def timed(command: list[str], env: dict, until: str | None) -> tuple[float, float]:
    """(wall, CPU) seconds of a fresh process: to its exit, or to its first output line that matches
    `until` (the process is then killed, so what it does after that line is not counted)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = []
    for line in process.stdout:
        output.append(line)
        if until and re.search(until, line):
            process.kill()
            break
    wall = time.perf_counter() - started
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    reached = re.search(until, "".join(output), re.MULTILINE) if until else process.returncode == 0
    if not reached:
        raise RuntimeError(f"{shlex.join(command)} exited {process.returncode}:\n{''.join(output)}")
    return wall, usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    """The CPU's model name as Linux reports it (lscpu's "Model name"), else the platform's word for it."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    main()
