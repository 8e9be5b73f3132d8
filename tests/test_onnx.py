"""`tinylm export --onnx`: model.onnx runs in onnxruntime and gives PyTorch's logits, with and without a cache.

Tolerance: onnxruntime's fp32 logits must be within 1e-4 (absolute) of PyTorch's. On these tiny
models the two differ by 1e-7 to 2e-6: the kernels sum in a different order, nothing more.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers_checkpoint import TEXT, save_checkpoint, train_tiny_model
from training_helpers import cli_here

from tinylm import checkpoint, export, onnx_export

TOLERANCE = 1e-4
MISSING = [name for name in onnx_export.REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]
needs_onnx = pytest.mark.skipif(
    bool(MISSING), reason=f"{', '.join(MISSING)} not installed: pip install 'tinylm[onnx]' to run the ONNX tests"
)
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def run_export(*args, prelude: str = "") -> subprocess.CompletedProcess:
    """`tinylm export ARGS` in a fresh interpreter; `prelude` runs first (to hide a package before any import)."""
    code = f"{prelude}\nimport sys\nfrom tinylm.cli import main\nsys.exit(main(['export', *sys.argv[1:]]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, config, tokenizer = train_tiny_model()
    return save_checkpoint(tmp_path_factory.mktemp("checkpoints") / "ckpt_best.pt", model, config, tokenizer)


@pytest.fixture(scope="module")
def session_and_model(tmp_path_factory, ckpt):
    import onnxruntime

    out = tmp_path_factory.mktemp("exported") / "model"
    result = cli_here(export.main, ["--checkpoint", ckpt, "--out", out, "--onnx"], check=True)
    assert "model.onnx" in result.stdout
    payload = checkpoint.load(ckpt)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return session, checkpoint.model_from(payload), checkpoint.tokenizer_from(payload)


def empty_past(model, batch: int) -> dict[str, np.ndarray]:
    config = model.config
    shape = (batch, config.n_head, 0, config.n_embd // config.n_head)
    return {name: np.zeros(shape, np.float32) for name in onnx_export.past_names(config.n_layer, "past_key_values")}


def run_onnx(session, model, ids, mask, positions, past):
    outputs = session.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past})
    presents = outputs[1:]
    next_past = dict(zip(onnx_export.past_names(model.config.n_layer, "past_key_values"), presents))
    return outputs[0], next_past


def test_traced_wrapper_uses_the_installed_transformers_cache_api(ckpt):
    """What export traces (no ONNX packages needed): no deprecated transformers call (a FutureWarning
    means a later version breaks it), and a cached step gives the full forward pass's logits."""
    model = checkpoint.model_from(checkpoint.load(ckpt)).eval()
    wrapper = onnx_export.DecoderWithPast(model)
    config = model.config
    ids = torch.tensor([list(range(1, 7))])
    empty = tuple(torch.zeros(1, config.n_head, 0, config.n_embd // config.n_head)
                  for _ in onnx_export.past_names(config.n_layer, "past_key_values"))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecate_kwarg warns with FutureWarning
        prompt_logits, *past = wrapper(ids[:, :5], torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], empty)
        step_logits, *presents = wrapper(ids[:, 5:], torch.ones(1, 6, dtype=torch.long), torch.tensor([[5]]),
                                         tuple(past))
        full = model(input_ids=ids).logits
    torch.testing.assert_close(prompt_logits, full[:, :5], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(step_logits[:, -1], full[:, -1], atol=TOLERANCE, rtol=0)
    assert [tensor.shape[2] for tensor in presents] == [6] * 2 * config.n_layer


@needs_onnx
def test_graph_has_past_key_values_and_dynamic_axes(session_and_model):
    session, model, _ = session_and_model
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == onnx_export.past_names(model.config.n_layer, "past_key_values")
    presents = onnx_export.past_names(model.config.n_layer, "present")
    assert [o.name for o in session.get_outputs()] == ["logits", *presents]
    assert all(isinstance(dim, str) for dim in session.get_inputs()[0].shape)  # batch and sequence are free


@needs_onnx
def test_prompt_logits_match_pytorch(session_and_model):
    session, model, tokenizer = session_and_model
    ids = np.array([tokenizer(TEXT[:16], add_special_tokens=False)["input_ids"]], dtype=np.int64)
    positions = np.arange(ids.shape[1], dtype=np.int64)[None]
    logits, _ = run_onnx(session, model, ids, np.ones_like(ids), positions, empty_past(model, 1))
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - expected).max() <= TOLERANCE


@needs_onnx
def test_cached_decoding_matches_the_full_forward_pass(session_and_model):
    session, model, tokenizer = session_and_model
    tokens = tokenizer(TEXT[:12], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([tokens])).logits[0].numpy()
    prompt = 6  # read 6 tokens at once, then feed the other 6 one at a time with the cache
    ids = np.array([tokens[:prompt]], dtype=np.int64)
    logits, past = run_onnx(session, model, ids, np.ones_like(ids), np.arange(prompt)[None], empty_past(model, 1))
    assert np.abs(logits[0] - expected[:prompt]).max() <= TOLERANCE
    for position in range(prompt, len(tokens)):
        ids = np.array([[tokens[position]]], dtype=np.int64)
        mask = np.ones((1, position + 1), dtype=np.int64)
        logits, past = run_onnx(session, model, ids, mask, np.array([[position]]), past)
        assert np.abs(logits[0, -1] - expected[position]).max() <= TOLERANCE
    assert past["past_key_values.0.key"].shape[2] == len(tokens)


@needs_onnx
def test_left_padded_batch_matches_each_prompt_alone(session_and_model):
    session, model, tokenizer = session_and_model
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("the quick brown", "lazy")]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts], dtype=np.int64)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=np.int64)
    positions = np.clip(mask.cumsum(axis=1) - 1, 0, None)
    logits, _ = run_onnx(session, model, ids, mask, positions, empty_past(model, 2))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([prompt])).logits[0, -1].numpy()
        assert np.abs(logits[row, -1] - alone).max() <= TOLERANCE


@needs_onnx
def test_a_failed_onnx_export_leaves_no_folder_behind(tmp_path, capsys):
    model, config, tokenizer = train_tiny_model(block_size=4, steps=0)
    ckpt = save_checkpoint(tmp_path / "ckpt_best.pt", model, config, tokenizer)
    out = tmp_path / "exported" / "model"
    result = cli_here(export.main, ["--checkpoint", ckpt, "--out", out, "--onnx"], capsys)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "block_size" in result.stderr.strip().splitlines()[-1]
    assert list(out.parent.iterdir()) == []  # neither the folder nor its hidden staging copy


def test_missing_onnx_packages_say_how_to_install(tmp_path, ckpt):
    out = tmp_path / "model"
    # sys.modules[name] = None makes Python (and find_spec) treat the package as absent.
    result = run_export("--checkpoint", ckpt, "--out", out, "--onnx",
                        prelude="import sys; sys.modules['onnxruntime'] = None")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "onnxruntime" in lines[0] and "pip install 'tinylm[onnx]'" in lines[0]
    assert not out.exists()
