"""Memory estimate (tinylm/memory.py) against measured peaks, each run in a fresh process.

    python benchmarks/memory_estimate.py [--only NAME ...] [--steps 3] [--threads 1] [--speed NAME ...]
    python benchmarks/memory_estimate.py --device cuda [--precision bf16]   # on a GPU

For each shape of SHAPES, with gradient checkpointing off and on, a fresh process builds a real
Trainer on data prepared here (the built-in corpus) and runs its real steps (Trainer.train_step):

- on the CPU, two measures of the steps after the first (the first makes AdamW's state and loads
  what the kernels keep, so the steps measured are the steady ones):
  * peak RSS growth: the process's resident-memory high-water mark over those steps (VmHWM, reset
    through /proc/self/clear_refs) minus its resident memory (VmRSS) after the first step, with
    glibc's malloc told to give freed memory back at once (MALLOC below); compared with the estimate
    less what is resident already, the weights and AdamW's moments. Everything the process touches
    is in it: the kernels' scratch memory, Python objects, malloc's rounding to pages.
  * tensor bytes: compat.TensorBytes over one more step (every tensor an op makes, from the op to
    its release), plus the weights and AdamW's moments: on the CPU what torch.cuda.max_memory_allocated
    counts on a GPU; compared with the estimate.
- on a GPU (--device cuda): torch.cuda.max_memory_allocated over the steps after the first, against
  the estimate (not run in the docs' measurements: they had no GPU).

It prints one line per run, then a Markdown table (docs/small-gpu.md has one) and the ratio of
the peaks with and without checkpointing. `--speed NAME` also times checkpointing's cost for those
shapes: a Trainer with it and one without in one process, alternating rounds of `--steps` steps, the
median ratio of their times. The machine should be quiet: runs go one at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20

# name -> ([model], [training], prepared data: "char", "bpe" (8192 tokens) or "gpt2-like" (init_from a local
# GPT-2 folder of that BPE vocabulary: GPT-2's gelu_new, 6 x 384, context 256))
SHAPES = {
    "baby (char)": ({"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}, {"batch_size": 12}, "char"),
    "6x384, block 256, dropout 0.2 (char)": (
        {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "dropout": 0.2}, {"batch_size": 8}, "char"),
    "4x256, block 256, vocab 8192": (
        {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256}, {"batch_size": 8}, "bpe"),
    "fine-tune 6x384 gelu_new, vocab 8192, 2 micro-batches": (
        {"block_size": 128}, {"batch_size": 4, "grad_accum_steps": 2}, "gpt2-like"),
}
BPE_VOCAB = 8192
# glibc's malloc, told to give freed memory back at once: blocks of 64 KiB and more are mapped and unmapped one
# by one (without the threshold its default raises as it goes), and the heap is trimmed as soon as it can be.
# Left at its defaults, malloc keeps what a step freed for the next one, and the resident size after a step
# says little about the step's own peak.
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(spec: dict) -> dict:
    """One run: a Trainer of `spec`'s config, its steps measured; the numbers as a dict."""
    import torch

    from tinylm import memory
    from tinylm.compat import TensorBytes
    from tinylm.config import load_config
    from tinylm.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    trainer = Trainer(load_config(spec["config"]))
    trainer.close()  # only train_step is called: the run's folder is not needed
    model = trainer.accelerator.unwrap_model(trainer.model)
    found = memory.of_run(trainer.config, model.config, device=trainer.hardware.device,
                          precision=trainer.hardware.precision, cpu_matmul=trainer.cpu_matmul.backend)
    trainer.model.train()  # as fit() does (a pretrained model is loaded in eval mode)
    cuda = trainer.hardware.device == "cuda"
    gc.collect()
    result = {"estimate": found.peak, "weights": found.weights, "parameters": found.parameters}
    if cuda:
        trainer.train_step(0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for step in range(1, spec["steps"] + 1):
            trainer.train_step(step)
        torch.cuda.synchronize()
        result["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        return result
    trainer.train_step(0)  # makes AdamW's state; loads the kernels' code and buffers that stay
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = status_kib("VmRSS")
    for step in range(1, spec["steps"] + 1):
        trainer.train_step(step)
    result["rss_growth"] = (status_kib("VmHWM") - before) * 1024
    with TensorBytes() as counted:
        trainer.train_step(spec["steps"] + 1)
    result["moments"] = sum(value.nbytes for state in trainer.optimizer.state.values()
                            for name, value in state.items() if name != "step")
    result["tensor_peak"] = found.weights + result["moments"] + counted.peak
    return result


def speed_child(spec: dict) -> dict:
    """Seconds per step with checkpointing over seconds without: two Trainers of `spec`'s two configs in this
    process, alternating `rounds` rounds of `steps` steps each after a warm-up step; the median ratio."""
    import statistics

    import torch

    from tinylm.config import load_config
    from tinylm.trainer import Trainer

    torch.set_num_threads(spec["threads"])
    trainers = [Trainer(load_config(config)) for config in spec["configs"]]
    for trainer in trainers:
        trainer.close()
        trainer.model.train()
        trainer.train_step(0)
    ratios, step = [], 1
    for _ in range(spec["rounds"]):
        seconds = []
        for trainer in trainers:
            started = time.perf_counter()
            for offset in range(spec["steps"]):
                trainer.train_step(step + offset)
            seconds.append(time.perf_counter() - started)
        step += spec["steps"]
        ratios.append(seconds[1] / seconds[0])
    return {"ratio": statistics.median(ratios), "ratios": ratios}


def prepare_data(root: Path) -> dict[str, Path]:
    """The built-in corpus prepared char, BPE (8192) and for a local GPT-2 folder of that BPE vocabulary."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tinylm import prepare
    from tinylm import tokenizer as tok

    folders = {"char": root / "char", "bpe": root / "bpe", "gpt2-like": root / "gpt2-like"}
    for kind in ("char", "bpe"):
        extra = ["--vocab-size", str(BPE_VOCAB)] if kind == "bpe" else []
        assert prepare.main(["--tokenizer", kind, "--out", str(folders[kind]), *extra]) == 0
    base = root / "gpt2-base"
    tokenizer = tok.load(folders["bpe"] / "tokenizer.json")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=384, n_layer=6,
                               n_head=6, bos_token_id=0, eos_token_id=0)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    assert prepare.main(["--tokenizer", "pretrained", "--from", str(base), "--out", str(folders["gpt2-like"])]) == 0
    return folders | {"base": base}


def write_config(path: Path, name: str, folders: dict, checkpointing: bool, device: str, precision: str) -> Path:
    model, training, data = SHAPES[name]
    sections = {
        "model": {**model, **({"init_from": str(folders["base"])} if data == "gpt2-like" else {})},
        "data": {"processed_dir": str(folders[data]),
                 "tokenizer": {"char": "char", "bpe": "bpe", "gpt2-like": "pretrained"}[data]},
        "training": {"device": device, "precision": precision, "cpu_matmul": "blas", "eval_iters": 1,
                     "out_dir": str(path.parent / "out"), "gradient_checkpointing": checkpointing, **training},
    }
    lines = []
    for section, values in sections.items():
        lines += [f"[{section}]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_child(spec: dict, kind: str = "--child") -> dict:
    env = {**os.environ, **MALLOC, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, kind, json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{spec['config']} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def error(estimate: float, measured: float) -> str:
    return f"{100 * (estimate - measured) / measured:+.1f}%"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names (substrings) of the shapes to run")
    parser.add_argument("--steps", type=int, default=3, help="steps measured after the first (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="on cuda only")
    parser.add_argument("--speed", nargs="*", metavar="NAME", default=[],
                        help="also time checkpointing against none for these shapes (substrings), in one process")
    parser.add_argument("--rounds", type=int, default=5, help="--speed: alternating rounds (default 5)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--speed-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child or args.speed_child:
        print(json.dumps(child(json.loads(args.child)) if args.child else speed_child(json.loads(args.speed_child))))
        return 0
    names = [name for name in SHAPES if not args.only or any(part in name for part in args.only)]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folders = prepare_data(root)
        for name in names:
            for checkpointing in (False, True):
                folder = root / f"run-{len(rows)}"
                folder.mkdir()
                config = write_config(folder / "run.toml", name, folders, checkpointing, args.device, args.precision)
                found = run_child({"config": str(config), "steps": args.steps, "threads": args.threads})
                rows.append((name, checkpointing, found, config))
                print(name, "checkpointing" if checkpointing else "", json.dumps(found), flush=True)
        speeds = {}
        for name in (name for name in SHAPES if any(part in name for part in args.speed)):
            configs = [str(config) for shape, _, _, config in rows if shape == name]
            speeds[name] = run_child({"configs": configs, "steps": args.steps, "rounds": args.rounds,
                                      "threads": args.threads}, "--speed-child")
            print(name, "speed", json.dumps(speeds[name]), flush=True)
    print()
    if args.device == "cuda":
        print("| shape | checkpointing | estimate (MiB) | max_memory_allocated (MiB) | error |")
        print("|---|---|---|---|---|")
        for name, checkpointing, found, _ in rows:
            print(f"| {name} | {'on' if checkpointing else 'off'} | {found['estimate'] / MIB:.1f} | "
                  f"{found['max_memory_allocated'] / MIB:.1f} | "
                  f"{error(found['estimate'], found['max_memory_allocated'])} |")
        return 0
    print("| shape | checkpointing | estimate (MiB) | tensor bytes at the peak (MiB) | error | "
          "estimate less weights and moments (MiB) | peak RSS growth (MiB) | error |")
    print("|---|---|---|---|---|---|---|---|")
    for name, checkpointing, found, _ in rows:
        above = found["estimate"] - found["weights"] - found["moments"]
        print(f"| {name} | {'on' if checkpointing else 'off'} | {found['estimate'] / MIB:.1f} | "
              f"{found['tensor_peak'] / MIB:.1f} | {error(found['estimate'], found['tensor_peak'])} | "
              f"{above / MIB:.1f} | {found['rss_growth'] / MIB:.1f} | {error(above, found['rss_growth'])} |")
    print("\n| shape | peak with / without checkpointing: estimate | tensor bytes | step's RSS growth | "
          "time per step with / without |")
    print("|---|---|---|---|---|")
    for (name, _, off, _), (_, _, on, _) in zip(rows[::2], rows[1::2]):
        speed = f"{speeds[name]['ratio']:.2f}" if name in speeds else ""
        print(f"| {name} | {on['estimate'] / off['estimate']:.2f} | {on['tensor_peak'] / off['tensor_peak']:.2f} | "
              f"{on['rss_growth'] / off['rss_growth']:.2f} | {speed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
