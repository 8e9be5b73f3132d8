"""A command's start-up: what `tinylm generate` and `tinylm train` import, and the collector around it.

Each command runs in a fresh process through the `tinylm` entry point (`tinylm.cli.main`), which
then reports what that process holds: the modules imported, how many objects `gc.freeze()` keeps
off the collector's walks, how many full collections ran, and whether the collector runs. No timing: the times are in
benchmarks/generate.py and docs/inference-and-demo.md#start-up.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
from helpers_checkpoint import save_checkpoint, train_tiny_model
from training_helpers import REPO

from tinylm import startup

# Nothing `tinylm generate` does needs these; each costs start-up time (datasets pulls in pandas).
NOT_FOR_SAMPLING = ("datasets", "pandas", "pyarrow", "gradio", "matplotlib", "onnx", "onnxruntime")
NOT_FOR_TRAINING = ("gradio", "matplotlib", "onnx", "onnxruntime")
# torch and transformers' GPT-2 alone build about 580,000 objects; a process that froze nothing has 0.
FROZEN_AT_LEAST = 100_000
# Full collections by the time the command returns: 0 here with the collector paused during the imports
# (1 allowed for the light imports before them); 6 when it walks torch's and transformers' imports.
FULL_COLLECTIONS_AT_MOST = 1

REPORT = """
import gc, json, sys
from tinylm.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules), "frozen": gc.get_freeze_count(),
                  "full_collections": gc.get_stats()[2]["collections"], "collector_on": gc.isenabled()}))
"""


def run_command(*argv: str) -> dict:
    """`tinylm ARGV...` in a fresh process; what the process held when the command returned."""
    result = subprocess.run([sys.executable, "-c", REPORT, *argv], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, config, tokenizer = train_tiny_model(steps=0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt_best.pt", model, config, tokenizer)


def test_generate_imports_only_what_sampling_needs_and_freezes_it(ckpt):
    """`tinylm generate` samples without importing datasets, pandas, gradio...; the collector made no
    full collection over its imports, the objects they built are frozen, and the collector runs again
    for the sampling.

    Kills: an eager `import datasets` in the sampler; the `gc.freeze()` of `heavy_imports` left out, or
    `command_process()` not called by the entry point; the collector left off after the imports; the
    sampler imported outside `heavy_imports`.
    """
    report = run_command("generate", "--checkpoint", str(ckpt), "--max-new-tokens", "3", "--device", "cpu")
    assert report["code"] == 0
    assert "tinylm.sampler" in report["modules"]
    assert [name for name in NOT_FOR_SAMPLING if name in report["modules"]] == []
    assert report["full_collections"] <= FULL_COLLECTIONS_AT_MOST
    assert report["frozen"] >= FROZEN_AT_LEAST
    assert report["collector_on"]


def test_eval_of_a_text_imports_no_datasets(ckpt, tmp_path):
    """`tinylm eval --input` scores a text file: tinylm.data is imported (for prepared data), but not the
    datasets and pyarrow that only its evaluation blocks and `load_blocks` use.

    Kills: an eager `import datasets` at the top of tinylm/data.py.
    """
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 4, encoding="utf-8")
    report = run_command("eval", "--checkpoint", str(ckpt), "--input", str(text), "--device", "cpu")
    assert report["code"] == 0
    assert "tinylm.data" in report["modules"]
    assert [name for name in NOT_FOR_SAMPLING if name in report["modules"]] == []


def test_train_freezes_its_imports_and_imports_no_extra(tmp_path):
    """`tinylm train` stopped by a user error right after its imports (no prepared data): the collector
    made no full collection over the imports, datasets among them (the evaluation blocks need it before
    the first step); they are frozen, the collector is back on, and no optional extra was imported.

    Kills: `heavy_imports` dropped around the memory module's or the trainer's imports; datasets left to
    the evaluation's set-up, after them.
    """
    report = run_command("train", "--config", str(REPO / "configs" / "baby.toml"),
                         "--processed-dir", str(tmp_path / "no-data"), "--out-dir", str(tmp_path / "run"))
    assert report["code"] == 2  # the missing data, after the imports
    assert "tinylm.trainer" in report["modules"] and "datasets" in report["modules"]
    assert [name for name in NOT_FOR_TRAINING if name in report["modules"]] == []
    assert report["full_collections"] <= FULL_COLLECTIONS_AT_MOST
    assert report["frozen"] >= FROZEN_AT_LEAST
    assert report["collector_on"]


@pytest.mark.parametrize("was_on", [True, False], ids=["collector-on", "collector-off"])
def test_used_as_a_library_heavy_imports_only_pauses_the_collector(was_on):
    """Outside a command's own process (here: pytest's), `heavy_imports` pauses the collector for the
    block and leaves it as it found it, freezing nothing: a caller's process keeps its own collector.

    Kills: `gc.enable()` unconditional (a caller's `gc.disable()` undone); `gc.freeze()` whatever the process.
    """
    frozen = gc.get_freeze_count()
    (gc.enable if was_on else gc.disable)()
    try:
        with startup.heavy_imports():
            assert not gc.isenabled()
        assert gc.isenabled() == was_on
        assert gc.get_freeze_count() == frozen
    finally:
        gc.enable()
