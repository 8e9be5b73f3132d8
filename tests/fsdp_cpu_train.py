"""Run `tinylm train` under FSDP on CPU processes over gloo, as accelerate runs it on GPUs.

Usage: accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 --cpu \
           tests/fsdp_cpu_train.py KILL_AT [train flags...]
On a CPU accelerate would train this launch under DDP (see `use_fsdp_on_cpu`); here the Trainer's
accelerator is switched to FSDP before it prepares the model, and each process prints
"fsdp-cpu: RANK <accelerate's own choice> <first parameter's class> <its local shard's rows>" so a
test sees the model really was sharded.
KILL_AT: an iter, or 0 for none. Every process SIGKILLs itself at the save of that iter, once the
optimizer shards are written and before any checkpoint file is: a preemption at the worst moment.
STEP_DELAY_S (environment, default 0): seconds every process sleeps before each step, so the
background uploads of a run that pushes to the Hub keep up with its evaluations.
MEASURE_STEP (environment, default 0: none): at that step every process prints "fsdp-memory: RANK
ESTIMATE MEASURED", the banner's memory estimate and the bytes its weights, optimizer state and the
step's tensors took at the peak (compat.TensorBytes, each DTensor by its local shard).
OUT_DIR_ELSEWHERE (environment): the processes other than the main one append "-elsewhere" to the
--out-dir they are given: the same path on a second machine's own disk, not on a filesystem they share.
The product code is untouched.
"""

import os
import signal
import sys
import time

import tinylm.shards as shards_module
import tinylm.trainer as trainer_module
from tinylm.compat import TensorBytes
from tinylm.errors import run_cli
from tinylm.train import main
from training_helpers import held_bytes, use_fsdp_on_cpu

kill_at = int(sys.argv[1])
original_make_accelerator = trainer_module.Trainer.make_accelerator
original_set_up = trainer_module.Trainer._set_up
original_save_shards = shards_module.save
original_step = trainer_module.Trainer.train_step
step_delay = float(os.environ.get("STEP_DELAY_S", "0"))
measure_step = int(os.environ.get("MEASURE_STEP", "0"))


def make_accelerator(self):
    accelerator = original_make_accelerator(self)
    self.chosen_by_accelerate = accelerator.distributed_type
    use_fsdp_on_cpu(accelerator)
    return accelerator


def set_up(self, resume):
    original_set_up(self, resume)
    weight = next(self.model.parameters())
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    line = (f"fsdp-cpu: {self.accelerator.process_index} {self.chosen_by_accelerate.name} "
            f"{type(weight).__name__} {local.shape[0]}/{weight.shape[0]}\n")
    # One write per line: print() writes the text and its newline separately, so the two processes'
    # lines could interleave on the shared stderr ("...22/45fsdp-cpu: 0 ...", seen in CI).
    os.write(sys.stderr.fileno(), line.encode())


def save_shards(out_dir, model, optimizer, *, step, is_main):
    name = original_save_shards(out_dir, model, optimizer, step=step, is_main=is_main)
    if kill_at and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return name


def train_step(self, step):
    time.sleep(step_delay)
    if step != measure_step:
        return original_step(self, step)
    held = held_bytes(self.model, self.optimizer.optimizer)
    with TensorBytes() as counted:
        result = original_step(self, step)
    line = f"fsdp-memory: {self.accelerator.process_index} {self.memory_estimate.peak} {held + counted.peak}\n"
    os.write(sys.stderr.fileno(), line.encode())
    return result


trainer_module.Trainer.make_accelerator = make_accelerator
if step_delay or measure_step:
    trainer_module.Trainer.train_step = train_step
trainer_module.Trainer._set_up = set_up
shards_module.save = save_shards
argv = sys.argv[2:]
if os.environ.get("OUT_DIR_ELSEWHERE") and os.environ.get("RANK", "0") != "0":
    argv[argv.index("--out-dir") + 1] += "-elsewhere"
sys.exit(run_cli(main, argv))
