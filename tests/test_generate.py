"""`tinylm generate` and the sampling library: determinism, greedy equivalence, the sliding window, errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from helpers_checkpoint import BLOCK_SIZE, TEXT, save_checkpoint, save_exported, train_tiny_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from tinylm import generate, sampler, tokenizer as tok
from tinylm.errors import UserError, run_cli as run_cli_in_process

GREEDY = sampler.Sampling(stop_at_eos=False, max_new_tokens=10 * BLOCK_SIZE, temperature=0.0)
pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


@pytest.fixture(scope="module")
def trained():
    """(model, tokenizer) of the tiny model trained on TEXT."""
    model, _, tokenizer = train_tiny_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def untrained():
    """(model, tokenizer) straight from random init: near-uniform logits make ties and slips likelier."""
    model, _, tokenizer = train_tiny_model(steps=0, seed=3)
    return model, tokenizer


@pytest.fixture(scope="module")
def scrambled():
    """(model, tokenizer) with large random weights, position table largest: greedy decoding picks
    another token as the position and the context change, so a wrong window or position shows."""
    model, _, tokenizer = train_tiny_model(steps=0, seed=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        wpe = model.transformer.wpe.weight
        wpe.copy_(torch.randn(wpe.shape, generator=generator) * 2)
    return model, tokenizer


@pytest.fixture(params=["trained", "scrambled"])
def varied(request):
    """Both models whose greedy output varies: one that learned text, one that follows positions."""
    model, tokenizer = request.getfixturevalue(request.param)
    prompt = sampler.encode_prompt(tokenizer, "the lazy dog")
    output = list(sampler.sample_tokens_recompute(model, prompt, GREEDY, context="nanogpt"))
    assert len(set(output)) >= 5, "a model that repeats one token cannot tell a right window from a wrong one"
    return model, tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, trained):
    model, tokenizer = trained
    path = tmp_path_factory.mktemp("ckpt") / "ckpt_best.pt"
    return save_checkpoint(path, model, model.config, tokenizer)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "tinylm.generate", *args], capture_output=True, text=True,
                          encoding="utf-8", timeout=timeout, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


# --- determinism and sampling settings -------------------------------------------------------

def test_same_seed_same_text_different_seed_different_text(trained):
    model, tokenizer = trained
    hot = sampler.Sampling(stop_at_eos=False, max_new_tokens=120, temperature=1.5, top_k=0)
    first = sampler.complete(model, tokenizer, "the ", hot, seed=7)
    again = sampler.complete(model, tokenizer, "the ", hot, seed=7)
    other = sampler.complete(model, tokenizer, "the ", hot, seed=8)
    assert len(first) >= 120  # a character per token, more for a special token such as <|endoftext|>
    assert first == again
    assert first != other


def test_sampling_stops_at_the_end_of_text_token_unless_told_not_to(untrained):
    """An untrained model emits <|endoftext|> now and then: with stop_at_eos the sample is the text before it."""
    model, tokenizer = untrained
    eos = model.config.eos_token_id
    hot = dict(max_new_tokens=4 * BLOCK_SIZE, temperature=1.0, top_k=0)
    stopped = 0
    for seed in range(10):
        full = list(sampler.sample_tokens(model, [eos], sampler.Sampling(stop_at_eos=False, **hot),
                                          sampler.make_generator("cpu", seed)))
        short = list(sampler.sample_tokens(model, [eos], sampler.Sampling(**hot), sampler.make_generator("cpu", seed)))
        assert len(full) == hot["max_new_tokens"]
        assert short == full[: full.index(eos)] if eos in full else short == full
        stopped += eos in full
    assert stopped >= 3  # the check above really ran on samples that hold an eos


def test_top_k_1_is_greedy_and_matches_an_argmax_reference(varied):
    model, tokenizer = varied
    prompt = tokenizer("the quick", add_special_tokens=False)["input_ids"]
    room = BLOCK_SIZE - len(prompt)  # tokens before the context is full: plain argmax needs no window
    reference = list(prompt)
    with torch.inference_mode():
        for _ in range(room):
            logits = model(input_ids=torch.tensor([reference])).logits[0, -1]
            reference.append(int(logits.argmax()))
    top1 = sampler.Sampling(stop_at_eos=False, max_new_tokens=room, temperature=1.3, top_k=1)
    sampled = list(sampler.sample_tokens(model, prompt, top1, sampler.make_generator("cpu", 0)))
    assert sampled == reference[len(prompt):]
    # Far past the context too, top-k=1 at any temperature and seed is exactly greedy.
    long_top1 = sampler.Sampling(stop_at_eos=False, max_new_tokens=GREEDY.max_new_tokens, temperature=2.0, top_k=1)
    assert list(sampler.sample_tokens(model, prompt, long_top1, sampler.make_generator("cpu", 5))) == list(
        sampler.sample_tokens(model, prompt, GREEDY)
    )


def test_top_p_and_top_k_restrict_the_choices(untrained):
    """An untrained model spreads probability widely; top-k/top-p must keep samples inside the allowed set."""
    model, tokenizer = untrained
    prompt = [0]
    with torch.inference_mode():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], dim=-1)
    order = probs.argsort(descending=True).tolist()
    nucleus = order[: int((probs[order].cumsum(0) < 0.5).sum()) + 1]  # smallest set reaching p = 0.5
    for sampling, allowed in [
        (sampler.Sampling(stop_at_eos=False, max_new_tokens=1, temperature=1.0, top_k=3), set(order[:3])),
        (sampler.Sampling(stop_at_eos=False, max_new_tokens=1, temperature=1.0, top_k=0, top_p=0.5), set(nucleus)),
    ]:
        firsts = {next(sampler.sample_tokens(model, prompt, sampling, sampler.make_generator("cpu", seed)))
                  for seed in range(60)}
        assert firsts <= allowed
        assert len(firsts) > 1  # still random within the set


# --- the sliding window with a KV cache ------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", "the quick", "the quick brown fox jumps over"])  # empty, short, > context
def test_cache_matches_full_recompute_within_the_first_block(varied, prompt):
    """Before the window first overflows, cached and nanoGPT's uncached sampler see the same context."""
    model, tokenizer = varied
    ids = sampler.encode_prompt(tokenizer, prompt)
    room = max(1, BLOCK_SIZE - len(ids))
    sampling = sampler.Sampling(stop_at_eos=False, max_new_tokens=room, temperature=0.0)
    cached = list(sampler.sample_tokens(model, ids, sampling))
    naive = list(sampler.sample_tokens_recompute(model, ids, sampling, context="nanogpt"))
    assert cached == naive


@pytest.mark.parametrize("keep", [1, 5, BLOCK_SIZE // 2, BLOCK_SIZE - 1, BLOCK_SIZE])
def test_cache_matches_recompute_with_the_same_window_far_past_the_context(varied, keep):
    """Ten blocks long: the re-prefilled cache (positions restarting at 0) equals recomputing that window."""
    model, tokenizer = varied
    ids = sampler.encode_prompt(tokenizer, "the lazy dog")
    cached = list(sampler.sample_tokens(model, ids, GREEDY, keep=keep))
    reference = list(sampler.sample_tokens_recompute(model, ids, GREEDY, context="refill", keep=keep))
    assert len(cached) == GREEDY.max_new_tokens
    assert cached == reference


def gpt2_with_other_settings():
    """A GPT-2 using config options tinylm leaves at their defaults: the lean decoder must honour them too."""
    config = GPT2Config(vocab_size=23, n_positions=BLOCK_SIZE, n_embd=24, n_layer=3, n_head=3, n_inner=40,
                        activation_function="relu", scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-3)
    torch.manual_seed(5)
    return GPT2LMHeadModel(config).eval()


# The same fp32 arithmetic in other matrix shapes differs by rounding only: up to 2e-6 seen, on logits up to 10.
LOGITS_TOLERANCE = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["tinylm model", "other GPT-2 settings"])
def test_lean_gpt2_decoder_gives_the_full_models_logits(untrained, which):
    """Prefill, steps, a re-prefill (positions back to 0) and steps after it: each matches a plain forward pass."""
    model = untrained[0] if which == "tinylm model" else gpt2_with_other_settings()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (3 * BLOCK_SIZE,), generator=torch.Generator().manual_seed(1)).tolist()
    decoder = sampler.decoder_for(model)
    assert isinstance(decoder, sampler.GPT2Decoder)

    def full_model(window: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([window])).logits[:, -1]

    checked = 0
    # The first window, then a re-prefill from later tokens; then one of two tokens, the shortest
    # prefill that needs the causal mask.
    for start, prefill in ((0, 5), (BLOCK_SIZE + 3, 5), (1, 2)):
        window = ids[start : start + prefill]
        torch.testing.assert_close(decoder.prefill(window), full_model(window), **LOGITS_TOLERANCE)
        for token in ids[start + prefill : start + BLOCK_SIZE]:  # step until the cache is full
            window.append(token)
            torch.testing.assert_close(decoder.step(token), full_model(window), **LOGITS_TOLERANCE)
            checked += 1
        assert decoder.length == len(window) == BLOCK_SIZE
        with pytest.raises(ValueError, match="do not fit"):  # no position embedding past block_size
            decoder.step(ids[0])
    assert checked == 2 * (BLOCK_SIZE - 5) + BLOCK_SIZE - 2


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=23, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=BLOCK_SIZE)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_other_causal_lms_use_transformers_cache_and_slide_the_same_way():
    """An exported folder may hold any causal LM (here a tiny Llama): it runs on a DynamicCache, same window."""
    model = tiny_llama()
    assert isinstance(sampler.decoder_for(model), sampler.DynamicCacheDecoder)
    cached = list(sampler.sample_tokens(model, [1, 2, 3], GREEDY, keep=5))
    assert cached == list(sampler.sample_tokens_recompute(model, [1, 2, 3], GREEDY, context="refill", keep=5))


@pytest.mark.parametrize("which", ["GPT2Decoder", "DynamicCacheDecoder on GPT-2", "DynamicCacheDecoder on Llama"])
def test_cached_decoding_uses_the_installed_transformers_api_and_still_matches_recompute(untrained, which):
    """A deprecation warning from transformers means a later version breaks the call: none may come from
    ours. Every cached step must still give the logits of recomputing the whole window, so a renamed
    cache argument that the model silently drops (or internals the lean decoder relies on) show too."""
    model = tiny_llama() if "Llama" in which else untrained[0]
    decoder = (sampler.GPT2Decoder if which == "GPT2Decoder" else sampler.DynamicCacheDecoder)(model)
    ids = torch.randint(0, model.config.vocab_size, (BLOCK_SIZE,), generator=torch.Generator().manual_seed(2)).tolist()
    positions = torch.arange(BLOCK_SIZE).unsqueeze(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' deprecate_kwarg warns with FutureWarning
        cached = [decoder.prefill(ids[:4]), *(decoder.step(token) for token in ids[4:])]
        with torch.inference_mode():
            reference = [sampler.next_logits(model, torch.tensor([ids[:end]]), positions[:, :end])
                         for end in range(4, BLOCK_SIZE + 1)]
        greedy = sampler.Sampling(stop_at_eos=False, max_new_tokens=3 * BLOCK_SIZE, temperature=0.0)
        sampled = list(sampler.sample_tokens(model, ids[:3], greedy))
        recomputed = list(sampler.sample_tokens_recompute(model, ids[:3], greedy, context="refill"))
    if isinstance(decoder, sampler.DynamicCacheDecoder):
        assert decoder.cache.get_seq_length() == BLOCK_SIZE  # the model really filled our cache
    for got, want in zip(cached, reference, strict=True):
        torch.testing.assert_close(got, want, **LOGITS_TOLERANCE)
    assert sampled == recomputed


def test_seeded_sampling_past_the_context_matches_the_uncached_reference(untrained):
    """Same seed, same window: the cached sampler draws exactly what the reference draws."""
    model, tokenizer = untrained
    ids = sampler.encode_prompt(tokenizer, "a")
    sampling = sampler.Sampling(stop_at_eos=False, max_new_tokens=5 * BLOCK_SIZE, temperature=1.0, top_k=0)
    cached = list(sampler.sample_tokens(model, ids, sampling, sampler.make_generator("cpu", 11)))
    reference = list(sampler.sample_tokens_recompute(
        model, ids, sampling, sampler.make_generator("cpu", 11), context="refill"))
    assert cached == reference


def test_long_generation_stays_on_the_learned_text(trained):
    """Far past the 16-token context, the trained model keeps writing its sentence, character for character."""
    model, tokenizer = trained
    text = sampler.complete(model, tokenizer, "the quick", GREEDY)
    assert len(text) == GREEDY.max_new_tokens
    assert "the quick" + text in TEXT


def test_a_prompt_exactly_one_context_long_and_a_longer_one(trained):
    model, tokenizer = trained
    exact = TEXT[:BLOCK_SIZE]
    longer = TEXT[:3 * BLOCK_SIZE + 5]
    for prompt in (exact, longer):
        text = sampler.complete(model, tokenizer, prompt, sampler.Sampling(stop_at_eos=False, max_new_tokens=40, temperature=0.0))
        assert prompt + text in TEXT


# --- prompts and decoding --------------------------------------------------------------------

def test_empty_prompt_starts_from_endoftext(trained):
    model, tokenizer = trained
    assert sampler.encode_prompt(tokenizer, "") == [0]
    assert tokenizer.convert_ids_to_tokens(0) == tok.EOS_TOKEN
    text = sampler.complete(model, tokenizer, "", sampler.Sampling(stop_at_eos=False, max_new_tokens=30))
    assert len(text) == 30


def test_unknown_characters_are_named(trained):
    _, tokenizer = trained
    with pytest.raises(UserError) as caught:
        sampler.encode_prompt(tokenizer, "The Quick fox")
    message = str(caught.value)
    assert "'T' (U+0054)" in message and "'Q' (U+0051)" in message
    assert "'f'" not in message


def test_streamed_bpe_pieces_never_split_a_character():
    """Byte-level BPE splits 'é' and emoji over several tokens; the stream holds them back until whole."""
    corpus = ["plain ascii text with some words " * 20, "café naïve 日本語 🙂🚀"]
    tokenizer = tok.wrap(tok.train_bpe(corpus, vocab_size=270, show_progress=False))
    text = "a café, 日本語 and 🙂🚀 here"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.encode("utf-8")) // 2  # mostly single bytes: characters really are split
    pieces = list(sampler.decode_stream(tokenizer, ids))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) > 5  # streamed, not decoded in one go


def test_exported_folder_gives_the_same_text_as_the_checkpoint(tmp_path, ckpt):
    model, tokenizer = sampler.load(ckpt)
    folder = save_exported(tmp_path / "exported", model, tokenizer)
    exported_model, exported_tokenizer = sampler.load(folder)
    sampling = sampler.Sampling(stop_at_eos=False, max_new_tokens=50, temperature=1.0)
    assert sampler.complete(exported_model, exported_tokenizer, "the ", sampling, seed=3) == sampler.complete(
        model, tokenizer, "the ", sampling, seed=3)


# --- the command line ------------------------------------------------------------------------
# Subprocesses (about 4 s each, mostly importing torch + transformers) where the process itself
# matters: streaming, repeatability across runs, exit code 2 without a traceback (one case). The rest
# run `main` in-process through the same `run_cli` wrapper the `tinylm` command uses.

def run_main(capsys, *args: str) -> tuple[int, str, str]:
    code = run_cli_in_process(generate.main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_streams_samples_and_is_repeatable(ckpt):
    args = ["--checkpoint", str(ckpt), "--prompt", "the ", "--max-new-tokens", "60",
            "--num-samples", "2", "--temperature", "1.2", "--seed", "5"]
    first, again = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    samples = first.stdout.rstrip("\n").split(generate.SAMPLE_SEPARATOR)
    assert len(samples) == 2 and samples[0] != samples[1]
    assert all(sample.startswith("the ") and len(sample) >= len("the ") + 60 for sample in samples)


def test_cli_output_arrives_while_generating(ckpt):
    """The first text is readable long before a very long sample is finished."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tinylm.cli", "generate", "--checkpoint", str(ckpt), "--prompt", "the ",
         "--max-new-tokens", "1000000", "--temperature", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    try:
        head = process.stdout.read(len("the ") + 20).decode("utf-8")
        assert process.poll() is None  # still generating
        assert head in TEXT
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("what", ["missing", "not a checkpoint"])
def test_cli_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys, what):
    path = tmp_path / "ckpt_best.pt"
    if what == "not a checkpoint":
        path.write_text("just some text\n", encoding="utf-8")
    code, out, err = run_main(capsys, "--checkpoint", str(path), "--prompt", "the")
    assert_one_line_error(subprocess.CompletedProcess([], code, out, err), str(path))


def test_cli_unknown_characters(ckpt):
    """In a process of its own: the exit code and the one line a user sees."""
    assert_one_line_error(run_cli("--checkpoint", str(ckpt), "--prompt", "Hello"), "'H' (U+0048)")


def test_long_prompt_is_cut_to_the_context_with_a_note(ckpt, tmp_path, capsys):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(TEXT[:100], encoding="utf-8")
    code, out, err = run_main(capsys, "--checkpoint", str(ckpt), "--prompt-file", str(prompt_file),
                              "--max-new-tokens", "20", "--temperature", "0")
    assert code == 0, err
    assert "the prompt is 100 tokens" in err and f"only the last {BLOCK_SIZE}" in err
    assert out.startswith(TEXT[:100]) and out.rstrip("\n") in TEXT


def test_empty_prompt_from_the_command_line(ckpt, capsys):
    code, out, err = run_main(capsys, "--checkpoint", str(ckpt), "--max-new-tokens", "25")
    assert code == 0, err
    assert len(out.rstrip("\n")) >= 25  # <|endoftext|> prints as its 13 characters


def test_cli_ends_a_sample_at_endoftext_or_prints_it_with_no_stop_at_eos(untrained, tmp_path, capsys):
    """docs/inference-and-demo.md: by default the sample ends where the model emits <|endoftext|>, which is
    not printed; --no-stop-at-eos prints it as `<|endoftext|>` and runs on to --max-new-tokens."""
    model, tokenizer = untrained
    path = save_checkpoint(tmp_path / "ckpt_best.pt", model, model.config, tokenizer)
    args = ["--checkpoint", str(path), "--prompt", "the ", "--max-new-tokens", str(4 * BLOCK_SIZE),
            "--temperature", "1.0", "--top-k", "0"]
    for seed in range(20):
        code, full, err = run_main(capsys, *args, "--seed", str(seed), "--no-stop-at-eos")
        assert code == 0, err
        if "<|endoftext|>" in full:
            break
    else:
        pytest.fail("no seed made the untrained model emit <|endoftext|>")
    assert full.startswith("the ")
    eos = model.config.eos_token_id
    tokens = list(sampler.sample_tokens(model, sampler.encode_prompt(tokenizer, "the "),
                                        sampler.Sampling(stop_at_eos=False, max_new_tokens=4 * BLOCK_SIZE,
                                                         temperature=1.0, top_k=0),
                                        sampler.make_generator("cpu", seed)))
    assert len(tokens) == 4 * BLOCK_SIZE and eos in tokens  # ran on past it, to --max-new-tokens
    code, stopped, err = run_main(capsys, *args, "--seed", str(seed))
    assert code == 0, err
    assert stopped == full[: full.index("<|endoftext|>")] + "\n"


@pytest.mark.parametrize("what", ["folder without config.json", "dict without the marker", "broken folder"])
def test_other_bad_checkpoints(tmp_path, capsys, what):
    path = tmp_path / "ckpt_best.pt"
    if what == "folder without config.json":
        path = tmp_path / "folder"
        path.mkdir()
    elif what == "dict without the marker":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path = tmp_path / "exported"
        path.mkdir()
        (path / "config.json").write_text("{not json", encoding="utf-8")
    code, _, err = run_main(capsys, "--checkpoint", str(path))
    assert code == 2 and err.startswith("error: ") and str(path) in err and len(err.splitlines()) == 1
    if what == "broken folder":  # transformers' reason, not just the name of its exception
        assert "config.json' is not a valid JSON file" in err, err


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-3"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--num-samples", "0"], "--num-samples"),
    (["--prompt-file", "no/such/prompt.txt"], "no/such/prompt.txt"),
])
def test_bad_settings(ckpt, capsys, flags, needle):
    code, _, err = run_main(capsys, "--checkpoint", str(ckpt), *flags)
    assert code == 2 and err.startswith("error: ") and needle in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu(ckpt, capsys):
    code, _, err = run_main(capsys, "--checkpoint", str(ckpt), "--device", "cuda")
    assert code == 2 and "--device cpu" in err


@pytest.mark.parametrize("unseen, more", [("ABCDEFGHIJKLM", " and 3 more"), ("ABCDEFGHIJK", " and 1 more"),
                                          ("ABCDEFGHIJ", "")])
def test_a_prompt_with_many_unknown_characters_names_ten_and_counts_the_rest(unseen, more):
    """A char tokenizer trained on lowercase text, a prompt with 13, 11 or 10 characters it never saw:
    the error names the first ten (sorted) with their code points and says how many more there are.

    Kills (sampler): the count of the characters not shown off by one; "and 0 more" for exactly ten.
    """
    tokenizer = tok.wrap(tok.train_char(["the quick brown fox"]))
    with pytest.raises(UserError) as caught:
        sampler.encode_prompt(tokenizer, "the " + unseen)
    message = str(caught.value)
    shown = ", ".join(f"'{char}' (U+{ord(char):04X})" for char in unseen[:10])
    assert f"never saw in training: {shown}{more}; " in message


def test_model_flag_takes_a_local_folder_and_refuses_a_revision_for_it(tmp_path, ckpt, capsys):
    """`--model FOLDER` samples from a model folder as `--checkpoint` samples from the checkpoint it was
    saved from; `--revision` names a Hub commit, so with a folder it is refused.

    Kills (sampler): `if revision:` inverted in load_model (every folder refused, a revision ignored).
    """
    model, tokenizer = sampler.load(ckpt)
    folder = save_exported(tmp_path / "exported", model, tokenizer)
    flags = ["--prompt", "the ", "--max-new-tokens", "30", "--seed", "3"]
    code, by_checkpoint, err = run_main(capsys, "--checkpoint", str(ckpt), *flags)
    assert code == 0, err
    code, by_model, err = run_main(capsys, "--model", str(folder), *flags)
    assert code == 0 and by_model == by_checkpoint, err
    code, _, err = run_main(capsys, "--model", str(folder), "--revision", "v1", *flags)
    assert code == 2 and err == f"error: --revision applies to a Hub id; {folder} is a local folder: drop --revision\n"


def test_the_window_keeps_half_the_context_and_at_least_one_token():
    """The documented refill (docs/inference-and-demo.md): when the window overflows it keeps the newest
    block_size // 2 tokens, never none.

    Kills (sampler): refill_length's floor of one token changed (a 1-position model could not sample).
    """
    assert [sampler.refill_length(size) for size in (1, 2, 3, 4, 5, 16, 1024)] == [1, 1, 1, 2, 2, 8, 512]


@pytest.mark.parametrize("keep", [0, BLOCK_SIZE + 1])
def test_a_window_that_keeps_no_token_or_more_than_the_context_is_refused(untrained, keep):
    """keep = 0 would refill the window with the whole text (`tokens[-0:]`), more than fits.

    Kills (sampler): the lower bound of keep's check lowered to 0.
    """
    model, _ = untrained
    with pytest.raises(ValueError, match=rf"^keep must be in \[1, {BLOCK_SIZE}\], got {keep}$"):
        next(sampler.sample_tokens(model, [1, 2], GREEDY, keep=keep))


@pytest.mark.parametrize("bos", [0, 5])
def test_an_empty_prompt_starts_from_the_models_bos_token_when_the_tokenizer_names_none(scrambled, bos):
    """A tokenizer without a bos token (a bare `tokenizers` object wrapped as it is): an empty prompt
    starts from the model config's bos_token_id (0, <|endoftext|>, in tinylm's models; 5 stands for another).

    Kills (sampler): stream_completion's fallback for the model's bos changed (`or 1`: 0 is falsy; `and`).
    """
    from transformers import PreTrainedTokenizerFast

    model, tokenizer = scrambled  # its text depends on the first token (the trained model's hardly does)
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    assert bare.bos_token_id is None and model.config.bos_token_id == 0
    sampling = sampler.Sampling(stop_at_eos=False, max_new_tokens=40, temperature=1.0)
    expected = bare.decode(list(sampler.sample_tokens(model, [bos], sampling, sampler.make_generator("cpu", 5))))
    model.config.bos_token_id = bos
    try:
        sampled = "".join(sampler.stream_completion(model, bare, "", sampling, sampler.make_generator("cpu", 5)))
    finally:
        model.config.bos_token_id = 0  # the fixture is shared
    assert sampled == expected


def test_a_model_with_fewer_embeddings_than_its_tokenizer_has_tokens_is_refused_everywhere(tmp_path, trained):
    """A checkpoint, a model folder and an export of a model whose vocabulary is one token short of
    its tokenizer's: each is refused by name (an id past the embeddings would crash mid-sample).

    Kills: the check negated or its bound loosened in sampler.load, sampler.load_model, export.export.
    """
    from tinylm import export, model as tinymodel
    from tinylm.config import ModelConfig

    _, tokenizer = trained
    small = tinymodel.build_model(tinymodel.gpt2_config(
        ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=BLOCK_SIZE), vocab_size=len(tokenizer) - 1))
    ckpt = save_checkpoint(tmp_path / "ckpt_best.pt", small, small.config, tokenizer)
    folder = save_exported(tmp_path / "folder", small, tokenizer)
    message = rf"the tokenizer has {len(tokenizer)} tokens but the model only {len(tokenizer) - 1}; the model and"
    for load, source in ((sampler.load, ckpt), (sampler.load_model, folder),
                         (lambda path: export.export(path, tmp_path / "exported"), ckpt)):
        with pytest.raises(UserError, match=rf"^{re.escape(str(source))}: {message}"):
            load(source if load is not sampler.load_model else str(source))
    assert not (tmp_path / "exported").exists()
