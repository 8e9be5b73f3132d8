"""Shared helpers for tests that run real training in a subprocess on tiny data."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import runpy
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "tinylm" / "train.py"
SLOW_TRAIN = REPO / "tests" / "slow_train.py"

# The environment of a training subprocess on one thread, as the runs in the test's own process (conftest's
# one_torch_thread): their numbers agree bit for bit (on two threads torch sums in another order, and the last
# digits differ), and on a busy machine its threads do not wait for each other.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}

# A model and a run small enough to train in a few seconds on 2 CPU cores.
TINY = {
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0},
    "data": {"tokenizer": "char"},
    "training": {
        "device": "cpu", "batch_size": 4, "max_iters": 12, "eval_interval": 4, "eval_iters": 2,
        "log_interval": 4, "learning_rate": 1e-2, "min_lr": 1e-3, "warmup_iters": 2,
        "lr_decay_iters": 12, "seed": 7, "eval_sample_tokens": 0,  # samples: tests/test_trainer_checks.py
        # "auto" times both matmul backends at start: on a busy machine (tests run in parallel) two
        # runs a test compares could pick differently and differ in the last digits.
        "cpu_matmul": "blas",
    },
}

WORDS = ("the king my lord thou art good night sweet prince what is this speak to me "
         "come hither friend farewell love death crown sword heaven earth").split()


def make_corpus(path: Path, chars: int = 40_000, seed: int = 0) -> Path:
    """A deterministic play-like text of about `chars` characters."""
    rng = random.Random(seed)
    lines = []
    while sum(map(len, lines)) < chars:
        speaker = rng.choice(["HAMLET", "HORATIO", "OPHELIA", "KING"])
        speech = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        lines.append(f"{speaker}:\n{speech.capitalize()}.\n\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def prepare(corpus: Path, out: Path, *, tokenizer: str = "char", fmt: str = "bin") -> subprocess.CompletedProcess:
    """Run `python -m tinylm.prepare` on `corpus` into `out`."""
    return run([sys.executable, "-m", "tinylm.prepare", "--input", str(corpus), "--tokenizer", tokenizer,
                "--format", fmt, "--out", str(out)], check=True)


def prepare_here(corpus: Path, out: Path, *, capsys=None, tokenizer: str = "char", fmt: str = "bin"
                 ) -> subprocess.CompletedProcess:
    """`prepare`, in this process (`cli_here`)."""
    from tinylm import prepare as prepare_module

    return cli_here(prepare_module.main, ["--input", corpus, "--tokenizer", tokenizer, "--format", fmt, "--out", out],
                    capsys, check=True)


def write_config(path: Path, processed_dir: Path, out_dir: Path, **sections) -> Path:
    """Write a TOML config: TINY, pointed at `processed_dir`/`out_dir`, with per-section overrides."""
    config = {name: dict(values) for name, values in TINY.items()}
    config["data"]["processed_dir"] = str(processed_dir)
    config["training"]["out_dir"] = str(out_dir)
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return write_toml(path, config)


def write_toml(path: Path, sections: dict[str, dict]) -> Path:
    """Write `{section: {key: value}}` as a TOML config file."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def benchmark_script(name: str):
    """The globals of benchmarks/`name`, imported as those scripts import each other (their folder first on
    sys.path); the modules it imported from that folder (`data`, ...) are forgotten after."""
    folder = REPO / "benchmarks"
    sys.path.insert(0, str(folder))
    before = set(sys.modules)
    try:
        yield runpy.run_path(str(folder / name))
    finally:
        sys.path.remove(str(folder))
        for module in set(sys.modules) - before:
            if Path(getattr(sys.modules[module], "__file__", None) or "/").parent == folder:
                del sys.modules[module]


def run(command: list[str], *, check: bool = False, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run a command with the test environment; on `check`, fail with its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **kwargs.pop("env", {})}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=kwargs.pop("cwd", REPO))
    if check and result.returncode != 0:
        raise AssertionError(f"{command} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def train(config: Path, *flags: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run `python tinylm/train.py --config CONFIG FLAGS...`."""
    return run([sys.executable, str(TRAIN_SCRIPT), "--config", str(config), *flags], check=check, **kwargs)


def cli_here(main, argv: list, capsys=None, *, check: bool = False, cwd: Path | None = None
             ) -> subprocess.CompletedProcess:
    """A tinylm command's `main(argv)` through its entry point (`errors.run_cli`) in this process, as
    `CompletedProcess(argv, exit code, stdout, stderr)`: what `python -m tinylm.X ARGV` gives, without a
    fresh interpreter's 2-3 s of imports (most of this suite's time, run by run). accelerate's per-process
    state is reset after, so the next command picks its own device and precision. What only a process
    shows (signals, its exit, several processes, a fresh interpreter's imports, environment variables
    read at import) needs `run`. `capsys` is the test's; a fixture wider than a test, which has none,
    passes None and the output is caught here (sys.stdout and sys.stderr, as capsys does)."""
    from tinylm.compat import reset_accelerate_state

    from tinylm.errors import run_cli

    argv = [str(arg) for arg in argv]
    out, err = io.StringIO(), io.StringIO()
    if capsys is None:
        catching = redirected(out, err)
    else:
        capsys.readouterr()  # what the test printed before is not the command's
        catching = contextlib.nullcontext()
    try:
        with contextlib.chdir(cwd or Path.cwd()), catching:
            code = run_cli(main, argv)
    finally:
        reset_accelerate_state()
    out, err = (out.getvalue(), err.getvalue()) if capsys is None else capsys.readouterr()
    if check and code != 0:
        raise AssertionError(f"{argv} exited {code}\n{out}\n{err}")
    return subprocess.CompletedProcess(argv, code, out, err)


@contextlib.contextmanager
def redirected(out: io.StringIO, err: io.StringIO):
    """sys.stdout into `out` and sys.stderr into `err` for the block (what capsys catches)."""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield


def train_here(config: Path, *flags: str, capsys=None, check: bool = True, cwd: Path | None = None
               ) -> subprocess.CompletedProcess:
    """`tinylm train --config CONFIG FLAGS...` in this process (`cli_here`); `train` runs it in a fresh one."""
    from tinylm import train as train_module

    return cli_here(train_module.main, ["--config", config, *flags], capsys, check=check, cwd=cwd)


# Runs `python -m tinylm.prepare ARGS` and prints the process's peak resident memory (VmHWM) on exit.
# Not ru_maxrss: a child started by (v)fork inherits the parent's high-water mark (this pytest process).
REPORT_PEAK = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print(*(l for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr))\n"
    "runpy.run_module('tinylm.prepare', run_name='__main__')\n"
)


def prepare_peak_mib(cwd: Path, *args, env: dict | None = None) -> float:
    """Run `python -m tinylm.prepare ARGS` in a fresh process; its peak resident memory in MiB."""
    result = subprocess.run([sys.executable, "-c", REPORT_PEAK, *map(str, args)], cwd=cwd, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    return int(re.search(r"VmHWM:\s+(\d+) kB", result.stderr).group(1)) / 1024


def read_log(out_dir: Path) -> dict:
    return json.loads((out_dir / "train_log.json").read_text())


def losses(out_dir: Path) -> list[tuple]:
    """(iter, train_loss, val_loss) of every evaluation record."""
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in read_log(out_dir)["records"]]


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: exit code 2, one `error:` line naming the problem, no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], output


def start_slow(config: Path, step_delay: float, slow_save_from: int = 0, *flags: str,
               env: dict | None = None) -> subprocess.Popen:
    """Start tests/slow_train.py (training with test-only delays) in the background; `env` adds variables."""
    return subprocess.Popen(
        [sys.executable, str(SLOW_TRAIN), str(step_delay), str(slow_save_from), "--config", str(config), *flags],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def make_trainer(prepared: Path, folder: Path, *, trainer_class=None, **training):
    """An in-process Trainer (or `trainer_class`) on TINY (plus `training` keys), checkpoints in folder/ckpt.

    Use with the `fresh_accelerate_state` fixture: accelerate's state is per process.
    """
    from tinylm.config import load_config
    from tinylm.trainer import Trainer

    config = load_config(write_config(folder / "run.toml", prepared, folder / "ckpt", training=training))
    return (trainer_class or Trainer)(config)


def estimate_and_step_peak(trainer) -> tuple:
    """A Trainer's memory estimate (`memory.of_run`, as its banner gives it) and the tensor bytes its training
    step holds at the peak: the weights and AdamW's state, plus the most its own tensors take at once
    (`compat.TensorBytes`) in its second step (the first makes AdamW's state)."""
    from tinylm import memory
    from tinylm.compat import TensorBytes

    model = trainer.accelerator.unwrap_model(trainer.model)
    found = memory.of_run(trainer.config, model.config, device="cpu", precision="fp32",
                          cpu_matmul=trainer.cpu_matmul.backend)
    trainer.train_step(0)
    with TensorBytes() as counted:
        trainer.train_step(1)
    return found, held_bytes(model, trainer.optimizer) + counted.peak


def held_bytes(model, optimizer) -> int:
    """The bytes of the weights and the optimizer's moments this process holds (a DTensor's: its local shard)."""
    def local(tensor) -> int:
        return (tensor.to_local() if hasattr(tensor, "to_local") else tensor).nbytes

    return sum(local(weight) for weight in model.parameters()) + sum(
        local(value) for state in optimizer.state.values() for name, value in state.items() if name != "step")


def use_fsdp_on_cpu(accelerator) -> None:
    """Make `accelerator`, on CPU processes over gloo, prepare the model with FSDP2 as it would on GPUs.

    accelerate 1.x turns FSDP on only for GPU-like distributed types (in AcceleratorState, the FSDP
    branch sits under MULTI_GPU, MULTI_XPU...): launched with an FSDP config on CPUs it trains under
    DDP (MULTI_CPU) and says nothing, though torch's FSDP2 (`fully_shard`) runs on CPUs over gloo.
    These are accelerate's own switches: the distributed type, in both of its shared states
    (AcceleratorState copies PartialState's whenever one is made), and the plugin the launcher's FSDP_*
    variables describe, which Accelerator builds on GPUs. Call before prepare(). Pinned by the FSDP
    test of tests/test_multiprocess.py, which checks what tests/fsdp_cpu_train.py prints: accelerate's
    own choice (MULTI_CPU; when a release runs FSDP on CPUs itself, this is no longer needed) and
    weights that are DTensors holding half the rows on each process.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()


def cpu_trainer(precision: str, grad_scaler=None):
    """A Trainer class that trains on the CPU at `precision` (which the CPU otherwise falls back from
    to fp32), with `grad_scaler` as its fp16 loss scaler."""
    from tinylm.compat import use_loss_scaler
    from tinylm.hardware import Hardware
    from tinylm.trainer import Trainer

    if grad_scaler is not None and precision != "fp16":
        raise ValueError(f"a grad_scaler needs precision fp16, not {precision}")

    class CpuTrainer(Trainer):
        def choose_hardware(self):
            return Hardware("cpu", precision)

        def make_accelerator(self):
            accelerator = super().make_accelerator()
            if grad_scaler is not None:
                use_loss_scaler(accelerator, grad_scaler)
            return accelerator

    return CpuTrainer
