"""The TOML config loader: presets load, bad keys and values get clear errors, flags override."""

import ast
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.config import Config, Sampling, apply_overrides, from_dict, load_config
from tinylm.errors import UserError

PRESETS = ["base", "baby", "rtx4060", "gpt2-124m", "finetune-gpt2", "finetune-cpu", "finetune-gpt2-8gb",
           "finetune-gpt2-medium-8gb", "finetune-gpt2-medium-lora"]


# What each preset is for: (n_layer, n_embd, block_size, precision, batch_size, grad_accum_steps).
PRESET_SHAPES = {
    "base": (4, 128, 64, "fp32", 12, 1),  # CONFIG_EXAMPLE: a laptop-CPU char model
    "baby": (4, 128, 64, "fp32", 12, 1),  # nanoGPT's CPU baby GPT
    "rtx4060": (6, 384, 256, "fp16", 8, 4),  # the training page's RTX 4060 example
    "gpt2-124m": (12, 768, 1024, "bf16", 12, 40),  # GPT-2 small, nanoGPT's 8-GPU recipe on one process
    # Fine-tuning: the shape keys are the pretrained model's (defaults here, never given), the context cropped.
    "finetune-gpt2": (4, 128, 1024, "bf16", 8, 4),
    "finetune-cpu": (4, 128, 128, "fp32", 4, 2),
    "finetune-gpt2-8gb": (4, 128, 1024, "bf16", 4, 8),  # with gradient checkpointing: docs/small-gpu.md
    "finetune-gpt2-medium-8gb": (4, 128, 1024, "bf16", 1, 32),
    "finetune-gpt2-medium-lora": (4, 128, 1024, "bf16", 1, 32),
}
FINETUNED = {"finetune-gpt2": "gpt2", "finetune-cpu": "distilgpt2", "finetune-gpt2-8gb": "gpt2",
             "finetune-gpt2-medium-8gb": "gpt2-medium", "finetune-gpt2-medium-lora": "gpt2-medium"}
LORA = {"finetune-gpt2-medium-lora": (16, 32, ["c_attn", "c_proj", "c_fc"])}  # r, lora_alpha, target_modules


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_with_the_shape_they_are_for(name):
    config = load_config(f"configs/{name}.toml")
    model, training = config.model, config.training
    assert (model.n_layer, model.n_embd, model.block_size, training.precision, training.batch_size,
            training.grad_accum_steps) == PRESET_SHAPES[name]
    assert model.init_from == FINETUNED.get(name, "scratch")
    if name in FINETUNED:  # the model's shape, not the config's: no shape key is given
        assert not {"model.n_layer", "model.n_head", "model.n_embd"} & config.given
    adapters = config.lora
    assert adapters.enabled == (name in LORA)
    assert (adapters.r, adapters.lora_alpha, adapters.target_modules) == LORA.get(name, (8, 8, ["c_attn"]))


def test_page_defaults():
    training = Config().training
    assert training.grad_accum_steps == 1
    assert training.precision == "fp32"
    assert training.early_stopping is False


DOCS = Path(__file__).resolve().parents[1] / "docs"


def documented_defaults(page: str) -> dict[str, str]:
    """{key: default as written} from `page`'s tables of keys or flags and their defaults
    ("| `a`, `b` | `1`, `2` |", "| `--flag N` | 5 |") and from its "`key` (`value`)" lists."""
    text = (DOCS / page).read_text(encoding="utf-8")
    found = {}
    for names, values in re.findall(r"^\| ((?:`[^`]+`(?:, | / )?)+) \| ([^|]+?) \|", text, re.MULTILINE):
        keys = re.findall(r"`--?([a-z-]+)|`([a-z_0-9]+)`", names)
        literals = [value.strip().strip("`") for value in values.split(",")]
        for (flag, key), literal in zip(keys, literals):
            found[(flag or key).replace("-", "_")] = literal
    for key, literal in re.findall(r"`([a-z_]+)` \(`?([^`),:]*)`?[),:]", text):
        found.setdefault(key, literal)
    return found


def as_value(literal: str):
    """A documented default as Python: `true`/`on`, `false`, numbers and quoted strings; else the text."""
    if literal in ("true", "on", "false"):
        return literal != "false"
    try:
        return ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        return literal


def test_every_default_is_the_one_the_docs_state():
    """Each [model], [data], [training], [lora] and [hub] default is the one docs/training.md states, and each
    sampling default the one docs/inference-and-demo.md's flag table states."""
    config = Config()
    training_page = documented_defaults("training.md")
    checked = 0
    for section in ("model", "data", "training", "lora", "hub"):
        for key, default in config.to_dict()[section].items():
            if key in training_page:
                assert as_value(training_page[key]) == default, f"{section}.{key}"
                checked += 1
    sampling_page = documented_defaults("inference-and-demo.md")
    for key, default in vars(Sampling()).items():
        assert as_value(sampling_page[key]) == default, f"--{key.replace('_', '-')}"
        checked += 1
    assert checked >= 45


def test_baby_preset_matches_nanogpt():
    config = load_config("configs/baby.toml")
    m, t = config.model, config.training
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (t.batch_size, t.learning_rate, t.warmup_iters, t.min_lr, t.lr_decay_iters) == (12, 1e-3, 100, 1e-4, 2000)
    assert (t.beta2, t.weight_decay, t.grad_clip, t.max_iters) == (0.99, 0.1, 1.0, 2000)


def test_rtx4060_preset_is_the_page_example():
    config = load_config("configs/rtx4060.toml")
    t = config.training
    assert (t.batch_size, t.grad_accum_steps, t.precision) == (8, 4, "fp16")
    assert config.effective_batch_size == 32  # batch_size * grad_accum_steps, as the page writes it


@pytest.mark.parametrize("key", ["model.dropout", "training.beta1", "training.beta2"])
def test_rates_are_at_least_0_and_below_1(key):
    section, name = key.split(".")
    for value in (0.0, 0.999):
        assert getattr(getattr(from_dict({section: {name: value}}), section), name) == value
    for value in (1.0, -0.001):
        with pytest.raises(UserError, match=rf"{key} must be in \[0\.0, 1\.0\), got {value}"):
            from_dict({section: {name: value}})


def test_the_largest_seed_is_numpys():
    assert from_dict({"training": {"seed": 2**32 - 1}}).training.seed == 2**32 - 1
    with pytest.raises(UserError, match=f"training.seed must be at most {2**32 - 1}, got {2**32}"):
        from_dict({"training": {"seed": 2**32}})


@pytest.mark.parametrize("settings, message", [
    ({}, None), ({"temperature": 0.0}, None), ({"top_p": 1.0, "top_k": 0, "max_new_tokens": 1}, None),
    ({"max_new_tokens": 0}, "--max-new-tokens must be 1 or more, got 0"),
    ({"temperature": -0.1}, "--temperature must be 0 (greedy) or more, got -0.1"),
    ({"temperature": math.inf}, "--temperature must be 0 (greedy) or more, got inf"),
    ({"top_k": -1}, "--top-k must be 0 (off) or more, got -1"),
    ({"top_p": 0.0}, "--top-p must be in (0, 1] (1 is off), got 0.0"),
    ({"top_p": 1.01}, "--top-p must be in (0, 1] (1 is off), got 1.01"),
])
def test_sampling_settings_at_their_bounds(settings, message):
    if message is None:
        Sampling(**settings).check()
    else:
        with pytest.raises(UserError) as caught:
            Sampling(**settings).check()
        assert str(caught.value) == message


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"training": {"batchsize": 4}}, "unknown key training.batchsize (did you mean 'batch_size'?)"),
        ({"trainig": {}}, "unknown section [trainig] (did you mean 'training'?)"),
        ({"training": {"grad_accum_step": 2}}, "did you mean 'grad_accum_steps'?"),
        ({"training": {"batch_size": "8"}}, "training.batch_size must be an integer, got a string '8'"),
        ({"training": {"batch_size": 0}}, "training.batch_size must be greater than 0"),
        ({"training": {"precision": "fp8"}}, 'training.precision must be one of "fp32", "fp16", "bf16"'),
        ({"training": {"save_best": "yes"}}, "training.save_best must be a boolean"),
        ({"training": {"learning_rate": math.nan}}, "training.learning_rate must be a number, got nan"),
        ({"model": {"dropout": 1.5}}, "model.dropout must be in [0.0, 1.0)"),
        ({"model": {"n_embd": 100, "n_head": 3}}, "must be divisible by model.n_head"),
        ({"model": 3}, "[model] must be a table of keys"),
        ({"hub": {"license": "MIT"}}, "hub.license must be a Hub license id such as \"mit\""),
        ({"hub": {"license": "my license"}}, "hub.license must be a Hub license id"),
        ({"hub": {"language": "English"}}, "hub.language must be an ISO 639 language code"),
        ({"lora": {"enabled": True, "r": 0}}, "lora.r must be greater than 0, got 0"),
        ({"lora": {"enabled": True, "lora_alpha": -8}}, "lora.lora_alpha must be greater than 0, got -8"),
        ({"lora": {"enabled": True, "lora_dropout": 1.0}}, "lora.lora_dropout must be in [0.0, 1.0), got 1.0"),
        ({"lora": {"enabled": True, "target_modules": "c_attn"}},
         "lora.target_modules must be an array, got a string 'c_attn'"),
        ({"lora": {"enabled": True, "target_modules": ["c_attn", "q_proj"]}},
         "lora.target_modules: 'q_proj' is not a GPT-2 layer LoRA can adapt; choose from \"c_attn\" (attention's "
         "query/key/value projection), \"c_proj\" (attention's and the MLP's output projections), \"c_fc\" (the "
         "MLP's first layer)"),
        ({"lora": {"enabled": True, "target_modules": [1]}}, "1 is not a GPT-2 layer LoRA can adapt"),
        ({"lora": {"enabled": True, "target_modules": []}}, "lora.target_modules is empty"),
        ({"lora": {"enabled": True, "target_modules": ["c_fc", "c_fc"]}},
         "lora.target_modules names a layer twice: ['c_fc', 'c_fc']"),
        ({"lora": {"rank": 8}}, "unknown key lora.rank (valid: enabled, lora_alpha, lora_dropout, r, target_modules)"),
        ({"lora": {"enabled": True}}, 'lora.enabled fine-tunes a pretrained model through small adapters, but '
                                      'model.init_from is "scratch": a new model must train all its weights'),
        ({"lora": {"r": 16, "target_modules": ["c_fc"]}}, "lora.r = 16, lora.target_modules = ['c_fc'] does nothing "
                                                          "while lora.enabled is false: set lora.enabled = true"),
    ],
)
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(UserError) as error:
        from_dict(raw, source="my.toml")
    assert message in str(error.value)
    assert str(error.value).startswith("my.toml: ")


@pytest.mark.parametrize("content", [b"[training\nbatch_size = ", b"\xff\xfe\x00binary", b"[model]\n[model]\n"])
def test_not_toml(tmp_path, content):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(UserError, match="is not valid TOML"):
        load_config(path)


def test_missing_and_folder(tmp_path):
    with pytest.raises(UserError, match="missing"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(UserError, match="a folder"):
        load_config(tmp_path)


def test_int_accepted_for_float_and_overrides_win():
    config = from_dict({"training": {"learning_rate": 1, "max_iters": 10}})
    assert config.training.learning_rate == 1.0
    config = apply_overrides(config, {"training.max_iters": 5, "training.device": None})
    assert config.training.max_iters == 5 and config.training.device == "auto"
    with pytest.raises(UserError, match="training.max_iters must be greater than 0"):
        apply_overrides(config, {"training.max_iters": -1})


toml_scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.booleans(),
                         st.text(max_size=8), st.lists(st.integers(), max_size=2))
keys = st.sampled_from(["batch_size", "precision", "dropout", "n_head", "n_embd", "device", "seed",
                        "learning_rate", "min_lr", "save_best", "tokenizer", "bogus", "eval_iters"])
documents = st.dictionaries(
    st.sampled_from(["model", "data", "training", "extra"]),
    st.one_of(st.dictionaries(keys, toml_scalars, max_size=5), toml_scalars),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_any_document_loads_or_fails_cleanly(raw):
    """Property: the loader never raises anything but UserError, and what it returns is valid."""
    try:
        config = from_dict(raw)
    except UserError:
        return
    assert config.model.n_embd % config.model.n_head == 0
    assert config.training.batch_size > 0


toml_lines = st.lists(
    st.one_of(
        st.sampled_from(["[model]", "[data]", "[training]", "[training.extra]", "[[training]]", "[other]"]),
        st.builds(lambda key, value: f"{key} = {value}",
                  st.sampled_from(["batch_size", "n_head", "precision", "dropout", "device", "bogus", '"quoted key"']),
                  st.sampled_from(["1", "-3", "0", "1e-3", "nan", "inf", "true", '"fp16"', '"cuda"', "[1, 2]",
                                   "{a = 1}", "1979-05-27", "0x10", "'x'", '"""multi"""', "", "= ="])),
        st.text(max_size=20),
    ),
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(toml_lines)
def test_any_toml_text_loads_or_fails_cleanly(tmp_path_factory, lines):
    """Property: any file content gives a valid Config or a UserError naming the file, nothing else."""
    path = tmp_path_factory.mktemp("fuzz") / "fuzz.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    try:
        config = load_config(path)
    except UserError as error:
        assert str(path) in str(error)
        return
    assert config.training.batch_size > 0


# --- what the config mutation run let through (tests/mutation, module config) ----------------------

def test_a_card_field_suggests_its_lowercase_only_when_that_is_valid():
    """Kills: the hint's condition negated."""
    from tinylm.config import check_card_field

    with pytest.raises(UserError, match=r"--license must be .*got 'MIT' \(did you mean 'mit'\?\)$"):
        check_card_field("license", "MIT", "--license")
    with pytest.raises(UserError) as refused:
        check_card_field("license", "Not A License", "--license")
    assert "did you mean" not in str(refused.value)


def test_a_config_that_cannot_be_read_is_one_line():
    """/proc/self/mem is a file whose read fails (EIO), as one without read permission would.

    Kills: `except OSError` in _read_toml replaced."""
    with pytest.raises(UserError, match=r"^cannot read config /proc/self/mem: Input/output error$"):
        load_config("/proc/self/mem")


def test_errors_name_where_the_value_came_from(tmp_path):
    """A bad key of the file names the file alone, even with flags; a rule broken by the flags and the
    file together names both; by flags alone, the flags.

    Kills: the file's own check given the combined source; `path is not None` inverted in the sources;
    the sources joined with `and` (always "defaults")."""
    path = tmp_path / "run.toml"
    path.write_text("[training]\nmax_iters = 0\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: training.max_iters must be greater than 0"):
        load_config(path, {"training.batch_size": 4})
    path.write_text("[training]\nwarmup_iters = 100\n")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))} \+ command-line flags: training.warmup_iters"):
        load_config(path, {"training.lr_decay_iters": 50})
    with pytest.raises(UserError, match=r"^command-line flags: training.warmup_iters"):
        load_config(None, {"training.warmup_iters": 100, "training.lr_decay_iters": 50})


def test_a_flag_can_fix_what_the_file_alone_gets_wrong(tmp_path):
    """The rules between keys are checked on the result only. Kills: the file checked for them alone."""
    path = tmp_path / "run.toml"
    path.write_text("[training]\nwarmup_iters = 100\nlr_decay_iters = 50\n")
    with pytest.raises(UserError, match="warmup_iters"):
        load_config(path)
    assert load_config(path, {"training.lr_decay_iters": 200}).training.lr_decay_iters == 200


def test_a_flag_not_given_does_not_end_the_overrides():
    """Kills: `continue` -> `break` for a flag that was not given (None)."""
    config = apply_overrides(Config(), {"training.device": None, "training.max_iters": 5})
    assert config.training.max_iters == 5


def test_non_negative_keys_refuse_minus_one_and_accept_zero():
    """Kills: `value >= 0` -> `value >= -1` (and the boundary, 0 accepted)."""
    for key in ("training.warmup_iters", "training.min_lr", "training.grad_clip"):
        assert getattr(apply_overrides(Config(), {key: 0}).training, key.split(".")[1]) == 0
        with pytest.raises(UserError, match=f"{key} must be"):
            apply_overrides(Config(), {key: -1})


def test_init_revision_needs_a_model_to_start_from():
    """Kills: `init_from == SCRATCH` -> `!=`."""
    with pytest.raises(UserError, match="model.init_revision applies to model.init_from"):
        from_dict({"model": {"init_revision": "main"}})
    finetune = {"model": {"init_from": "gpt2", "init_revision": "main"}, "data": {"tokenizer": "pretrained"}}
    assert from_dict(finetune).model.init_revision == "main"


def test_a_warmup_as_long_as_the_decay_is_accepted():
    """Warmup to the peak, then straight at min_lr: a schedule, if a steep one. Kills: `>` -> `>=`."""
    config = from_dict({"training": {"warmup_iters": 50, "lr_decay_iters": 50}})
    assert (config.training.warmup_iters, config.training.lr_decay_iters) == (50, 50)


def test_the_last_process_seed_may_reach_max_seed_but_not_pass_it():
    """Each process seeds with seed + rank. Kills: `seed + n - 1` -> `seed + n + 1` / `seed + n - 0`."""
    from tinylm.config import MAX_SEED, check_seed_fits

    check_seed_fits(MAX_SEED, 1)
    check_seed_fits(MAX_SEED - 1, 2)
    with pytest.raises(UserError, match=f"training.seed {MAX_SEED} is too large for 2 processes"):
        check_seed_fits(MAX_SEED, 2)
