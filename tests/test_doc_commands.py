"""Every shell command the docs show runs, or at least parses: a renamed flag breaks the build, not a user.

The commands are the lines of the fenced ```bash / ```sh / ```console / ```shell blocks of README.md and
docs/*.md (`#` comments, `\\` continuations, `&&` chains, `$ ` prompts and `NAME=value` prefixes understood),
and the code spans with a flag in the "command" column of a docs table (the launch table of docs/multi-gpu.md).

Each command is either

- executed here (the default: a command that matches no rule of RULES runs), in a fresh temporary project
  (configs/, accelerate_config.yaml, the placeholder files the docs name, and what it needs from earlier
  steps: prepared data, a trained run, an export; see PREREQUISITES), with `tinylm` and `python` from this
  venv, offline, at the tiny sizes of TINY_REWRITES; it must exit 0 (or its EXPECTED_EXIT); or
- flag-checked, when a rule of RULES says why it cannot run here (a GPU, the network, a server that never
  exits, an install, or slow and executed by another test): its flags go through the command's own argparse
  parser (tinylm's, accelerate's, torchrun's) and every config file it names exists and loads.

Executed commands are flag-checked too. Flag checks refuse abbreviations (argparse would take `--vocab` for
`--vocab-size`, so a flag renamed to a longer name would slip through).

Run with `-s` to see the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from training_helpers import REPO, benchmark_script, make_corpus

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "shell-session"}
COMMAND_WORDS = {"tinylm", "python", "python3", "accelerate", "torchrun", "pip", "pip3", "hf", "huggingface-cli"}

# --- What cannot run here, and why (first match wins; a command that matches none is EXECUTED) ---------------
# kind: "install" (not run; the extras it names must exist in pyproject.toml), "suite" and "external" (not run:
# the test suite, another project's command), anything else: flag-checked. Patterns match the normalized command: `.venv/bin/` dropped, `python3` -> `python`.
RULES: list[tuple[str, str, str]] = [
    (r"^python -m venv\b", "install", "creates a virtual environment"),
    (r"^(pip|python -m pip) install\b", "install", "installs packages (the extras it names are checked)"),
    (r"^pytest\b", "suite", "runs this test suite"),
    (r"\[--", "synopsis", "a usage synopsis: [optional] flags and NAME placeholders"),
    # A dry run estimates for a GPU on any machine, offline for OpenAI's GPT-2 sizes: those run here.
    (r"^(?!.*--dry-run).*--device cuda\b", "gpu", "--device cuda"),
    (r"^(?!.*--dry-run).*configs/(gpt2-124m|rtx4060|finetune-gpt2|finetune-gpt2-8gb|finetune-gpt2-medium-8gb"
     r"|finetune-gpt2-medium-lora)\.toml", "gpu", "the preset sets device = cuda and bf16/fp16 precision"),
    (r"configs/accelerate/(multi-gpu|multi-node|fsdp)\.yaml", "gpu", "an NCCL launch over GPUs or machines"),
    (r"(^| )\.\.\.( |$)", "elided", "elided arguments (`...`)"),
    (r"^python benchmarks/gpu_check\.py\b(?!.*--smoke)", "gpu", "benchmarks/gpu_check.py needs one NVIDIA GPU"),
    (r"^python benchmarks/gpu_check\.py .*--smoke", "slow",
     "slow (imports, the built-in corpus, four tiny runs); executed in "
     "tests/test_gpu_check.py::test_smoke_runs_every_part_and_the_fp16_run_skips_the_overflow_steps_and_halves_the_scale"),
    (r"configs/finetune-cpu\.toml", "network", "model.init_from = distilgpt2: downloads the model from the Hub"),
    (r"--from \S+", "network", "--from: downloads the model's tokenizer from the Hub"),
    (r"--dataset (roneneldan/TinyStories|wikitext|HuggingFaceFW/\S+)", "network", "a Hub dataset"),
    (r"--model \S+/\S+", "network", "--model: a Hub model id"),
    (r"^tinylm push (?!.*--dry-run)", "network", "uploads to the Hub"),
    (r"--resume (?!\S*\.pt\b)[\w.-]+/[\w.-]+(@\S+)?( |$)", "network",
     "--resume OWNER/NAME: fetches a run's checkpoints from the Hub"),
    (r"^(hf|huggingface-cli) ", "network", "talks to the Hub"),
    (r"^tinylm demo\b", "interactive", "serves the demo until stopped (tests/test_demo.py drives it)"),
    (r"^lm_eval\b", "external", "EleutherAI's lm-evaluation-harness: another project's command, not installed here, "
     "whose tasks download their data (not run, and its flags are its own)"),
    (r"--adapter\b", "slow",
     "needs a LoRA run's checkpoint; executed in tests/test_lora.py::test_the_adapter_export_loads_with_peft_on_the_base"),
    (r"--onnx\b", "slow",
     "slow (torch.onnx.export); executed in tests/test_onnx.py::test_graph_has_past_key_values_and_dynamic_axes"),
    (r"^accelerate launch --config_file accelerate_config\.yaml ", "slow",
     "slow (accelerate's launcher); executed in tests/test_train.py::test_accelerate_launch_and_console_command"),
    (r"tests/(mutants\.py|mutation/run\.py)", "slow",
     "plants bugs and runs the tests once per bug (minutes to hours; by hand, docs/testing.md)"),
    (r"/tmp/bpb/", "slow",
     ("trains two baby.toml models for 300 steps and scores 478,160 characters with each "
      "(about 7 minutes on 2 CPU cores; by hand, docs/inference-and-demo.md)")),
    (r"configs/accelerate/cpu-2proc\.yaml", "slow",
     ("slow (2 gloo processes); "
      "executed in tests/test_multiprocess.py::test_two_processes_train_stop_together_and_resume")),
]

# A command the docs show failing on purpose: pattern -> exit code.
EXPECTED_EXIT: dict[str, int] = {}

# --- Tiny sizes: (pattern the command must match, flag, value, whether to add the flag when missing) ---------
TRAIN = r"^(tinylm train|python tinylm/train\.py)\b"
NEW_RUN = TRAIN + r"(?!.*--resume)"
TINY_REWRITES: list[tuple[str, str, str, bool]] = [
    (NEW_RUN, "--max-iters", "4", True),
    (TRAIN, "--max-iters", "4", False),  # a resumed run: the prerequisite run stopped at iter 2 of 4
    (NEW_RUN, "--eval-interval", "2", True),
    (NEW_RUN, "--eval-iters", "1", True),
    (NEW_RUN, "--log-interval", "2", True),
    (NEW_RUN, "--batch-size", "2", True),
    (r"^(tinylm |python -m tinylm\.)generate\b", "--max-new-tokens", "16", True),
]
TINY_FLAGS = ["--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "2",
              "--batch-size", "2"]  # the prerequisite runs (saved at iter 2, then given max_iters 4)

# --- What a command needs in its project before it runs (every matching line adds its piece) -----------------
PREREQUISITES: list[tuple[str, str, str]] = [
    (TRAIN, "data", "training reads prepared data (data/train.bin)"),
    (r"--resume(?! \S)", "run", "--resume continues checkpoints/ckpt_last.pt"),
    (r"\bcheckpoints/", "run", "a trained run in checkpoints/"),
    (r"\bruns/a/", "run_a", "a trained run in runs/a/"),
    (r"^(?!tinylm export|python -m tinylm\.export).*\bexported/", "export", "an export in exported/shakespeare-char"),
    (r"--retokenize data/processed", "txt", "txt data in data/processed (tinylm prepare --format txt)"),
]
# A `&&` chain is one recipe: it runs in a bare project, each step making what the next needs.

# Placeholder names the docs use for the reader's own files: small versions of them.
PLACEHOLDER_FILES = {
    "my_book.txt": 6_000, "my_text.txt": 6_000, "YOUR_TEXT": 6_000, "YOUR_CORPUS": 6_000,
    "texts/part1.txt": 3_000, "texts/part2.txt": 3_000,
    "big_corpus/a.txt": 3_000, "big_corpus/b.txt": 3_000,
}
# Placeholder values for flags whose parser checks a type (flag-check only).
PLACEHOLDER_VALUES = {"R": "1"}


@dataclass
class Command:
    doc: str
    line: int
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    chain: tuple[str, int] | None = None  # (doc:line, length) for a step of an && chain

    @property
    def text(self) -> str:
        return shlex.join(self.argv)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def normalize(argv: list[str]) -> list[str]:
    """`.venv/bin/tinylm` -> `tinylm`, `python3` -> `python`: the same command for the rules."""
    head = argv[0].removeprefix(".venv/bin/")
    head = {"python3": "python", "pip3": "pip"}.get(head, head)
    return [head, *argv[1:]]


def split_logical_lines(lines: list[tuple[int, str]], console: bool) -> list[tuple[int, str]]:
    """Join `\\` continuations; in console blocks keep only `$ ` lines (the rest is output)."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for number, text in lines:
        if pending is None:
            if console:
                if not text.lstrip().startswith("$ "):
                    continue
                text = text.lstrip()[2:]
            pending = (number, "")
        joined = pending[1] + text
        if joined.rstrip().endswith("\\"):
            pending = (pending[0], joined.rstrip()[:-1] + " ")
            continue
        out.append((pending[0], joined))
        pending = None
    if pending is not None:
        out.append(pending)
    return out


def commands_of_line(doc: str, number: int, text: str) -> list[Command]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    steps: list[list[str]] = [[]]
    for token in tokens:
        if token in ("&&", ";"):
            steps.append([])
        elif token and set(token) <= set("();<>|&"):
            raise AssertionError(f"{doc}:{number}: shell syntax {token!r} in {text!r}: "
                                 "teach tests/test_doc_commands.py to run it")
        else:
            steps[-1].append(token)
    steps = [step for step in steps if step]
    commands = []
    for step in steps:
        env = {}
        while step and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", step[0]):
            name, value = step.pop(0).split("=", 1)
            env[name] = value
        commands.append(Command(doc, number, normalize(step), env,
                                (f"{doc}:{number}", len(steps)) if len(steps) > 1 else None))
    return commands


def fenced_blocks(text: str):
    """(language, [(line number, text)]) of each fenced block."""
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        match = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", lines[index])
        if not match:
            index += 1
            continue
        fence, language, body = match.group(2), match.group(3).lower(), []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append((index + 1, lines[index]))
            index += 1
        index += 1
        yield language, body


def table_commands(doc: str, text: str) -> list[Command]:
    """The code spans with a flag in the "command" column of the doc's tables."""
    commands, column = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|"):
            column = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if column is None:
            column = cells.index("command") if "command" in cells else -1
            continue
        if column < 0 or column >= len(cells):
            continue
        for span in re.findall(r"`([^`]+)`", cells[column]):
            if " --" in span and span.split()[0] in COMMAND_WORDS | {"ACCELERATE_USE_CPU=1"}:
                commands += commands_of_line(doc, number, span)
    return commands


def extract(docs: dict[str, str]) -> list[Command]:
    commands = []
    for doc, text in docs.items():
        for language, body in fenced_blocks(text):
            if language not in SHELL_LANGUAGES:
                continue
            console = language in ("console", "shell-session") or any(
                line.lstrip().startswith("$ ") for _, line in body)  # `$ ` prompts: the other lines are output
            for number, line in split_logical_lines(body, console):
                commands += commands_of_line(doc, number, line)
        commands += table_commands(doc, text)
    return commands


def read_docs() -> dict[str, str]:
    return {str(path.relative_to(REPO)): path.read_text(encoding="utf-8") for path in DOCS}


def classify(command: Command) -> tuple[str, str]:
    """(kind, reason): "run" for a command no rule holds back."""
    for pattern, kind, reason in RULES:
        if re.search(pattern, command.text):
            return kind, reason
    return "run", "executed"


COMMANDS = extract(read_docs())


# --- Flag checks -----------------------------------------------------------------------------------------------
class Parsed(Exception):
    def __init__(self, namespace, extras):
        self.namespace, self.extras = namespace, extras


@contextlib.contextmanager
def stop_after_parsing():
    """Make argparse stop a command's main() as soon as its flags are parsed (parse_args goes through
    parse_known_args): main() parses with its own parser and does nothing else."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        self.allow_abbrev = False  # a doc's `--vocab` must not pass for a flag renamed to `--vocab-size`
        raise Parsed(*original(self, args, namespace))

    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_known_args = original


def parse_with(main, argv: list[str], what: str):
    """Parse `argv` with the parser `main` builds; fail with argparse's message on a bad flag."""
    stderr = io.StringIO()
    with stop_after_parsing(), contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except Parsed as parsed:
            assert not parsed.extras, f"{what}: {argv} does not parse: unrecognized arguments {parsed.extras}"
            return parsed.namespace
        except SystemExit as exit:
            if argv == ["--help"] and exit.code == 0:
                return None
            raise AssertionError(f"{what}: {argv} does not parse: {stderr.getvalue().strip()}") from None
    raise AssertionError(f"{what}: main() returned without parsing its flags")


def check_config(path: str, what: str) -> None:
    if path == "...":
        return
    from tinylm.config import load_config

    assert (REPO / path).is_file(), f"{what}: config {path} does not exist"
    load_config(REPO / path)


def check_tinylm(module_name: str, argv: list[str], what: str) -> None:
    module = importlib.import_module(module_name)
    # `--flag ...` keeps "..." as the flag's value; a bare `...` (more arguments) is dropped, and a command of
    # nothing else is checked for its --help.
    argv = [arg for i, arg in enumerate(argv) if arg != "..." or (i and argv[i - 1].startswith("-"))]
    argv = argv or ["--help"]
    namespace = parse_with(module.main, argv, what)
    if module_name == "tinylm.train" and namespace is not None and namespace.config:
        check_config(namespace.config, what)


def check_script(argv: list[str], what: str) -> None:
    """`tinylm/train.py ARGS` launched by accelerate or torchrun."""
    assert argv and argv[0] == "tinylm/train.py", f"{what}: launches {argv[:1]}, not tinylm/train.py"
    assert (REPO / argv[0]).is_file()
    check_tinylm("tinylm.train", argv[1:], what)


def check_flags(command: Command) -> None:
    argv = [PLACEHOLDER_VALUES.get(arg, arg) for arg in command.argv]
    argv = [arg.strip("[]") for arg in argv]  # a synopsis: every [optional] flag given
    what = f"{command.where}: {command.text}"
    head = argv[0]
    if head == "tinylm":
        from tinylm.cli import COMMANDS as CLI

        assert len(argv) > 1 and argv[1] in CLI, f"{what}: no such tinylm command"
        check_tinylm(CLI[argv[1]][0], argv[2:], what)
    elif head == "python" and argv[1:2] == ["-m"] and argv[2].startswith("tinylm."):
        check_tinylm(argv[2], argv[3:], what)
    elif head == "python" and argv[1:2] == ["tinylm/train.py"]:
        check_script(argv[1:], what)
    elif head == "python" and argv[1:2] in (["tests/mutants.py"], ["tests/mutation/run.py"]):
        parser = runpy.run_path(str(REPO / argv[1]))["build_parser"]()  # the script's own parser
        parser.allow_abbrev = False
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                parser.parse_args(argv[2:])
            except SystemExit:
                raise AssertionError(f"{what}: {argv[1]} rejects it: {stderr.getvalue().strip()}") from None
    elif head == "python" and argv[1:2] == ["benchmarks/gpu_check.py"]:
        with benchmark_script("gpu_check.py") as script:
            parse_with(script["main"], argv[2:], what)
    elif head == "accelerate" and argv[1:2] == ["launch"]:
        from accelerate.commands.config.config_args import load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        parser = launch_command_parser()
        parser.allow_abbrev = False
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                args = parser.parse_args(argv[2:])
            except SystemExit:
                raise AssertionError(f"{what}: accelerate launch rejects it: {stderr.getvalue().strip()}") from None
        if args.config_file:
            assert (REPO / args.config_file).is_file(), f"{what}: {args.config_file} does not exist"
            load_config_from_file(str(REPO / args.config_file))
        check_script([args.training_script, *args.training_script_args], what)
    elif head == "torchrun":
        from torch.distributed.run import get_args_parser

        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            try:
                parser = get_args_parser()
                parser.allow_abbrev = False
                args = parser.parse_args(argv[1:])
            except SystemExit:
                raise AssertionError(f"{what}: torchrun rejects it: {stderr.getvalue().strip()}") from None
        check_script([args.training_script, *args.training_script_args], what)
    else:
        raise AssertionError(f"{what}: no parser known for {head!r}: teach check_flags about it")


def check_install(command: Command) -> None:
    """pip install '...[extras]' / -e '.[extras]': the extras exist."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for arg in command.argv:
        match = re.fullmatch(r"(tinylm|\.)\[([\w,-]+)\]", arg)
        if match:
            missing = set(match.group(2).split(",")) - set(extras)
            assert not missing, f"{command.where}: {command.text}: no extra {sorted(missing)} in pyproject.toml"


# --- Execution -------------------------------------------------------------------------------------------------
def tiny(command: Command) -> list[str]:
    argv = list(command.argv)
    for pattern, flag, value, add in TINY_REWRITES:
        if not re.search(pattern, shlex.join(argv)):
            continue
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        elif add:
            argv += [flag, value]
    return argv


def needs(command: Command) -> set[str]:
    return {piece for pattern, piece, _ in PREREQUISITES if re.search(pattern, command.text)}


@dataclass
class Unit:
    """What runs in one subprocess: one command, or the runnable steps of one && chain."""
    where: str
    commands: list[Command]
    also: list[str] = field(default_factory=list)  # the same commands shown elsewhere
    copies: int = 0  # doc commands of those other places

    @property
    def needs(self) -> set[str]:
        return set() if len(self.commands) > 1 or self.commands[0].chain else needs(self.commands[0])

    def script(self) -> str:
        return " && ".join(
            shlex.join([*(f"{k}={v}" for k, v in command.env.items()), *tiny(command)]) for command in self.commands
        )


def units(commands: list[Command]) -> list[Unit]:
    """The runnable commands grouped into subprocesses; a unit the docs show twice (README.md and
    docs/index.md share the quickstart) runs once, under both names."""
    out: dict[str, Unit] = {}
    for command in commands:
        if classify(command)[0] != "run":
            continue
        key = command.chain[0] if command.chain else f"{command.where}#{len(out)}"
        out.setdefault(key, Unit(command.where, [])).commands.append(command)
    unique: dict[tuple, Unit] = {}
    for unit in out.values():
        same = unique.setdefault((unit.script(), tuple(sorted(unit.needs))), unit)
        if same is not unit:
            same.also.append(unit.where)
            same.copies += len(unit.commands)
    return list(unique.values())


def copy_into(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


@contextlib.contextmanager
def working_directory(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def make_bare_project(root: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(REPO / "configs", root / "configs")
    shutil.copy2(REPO / "accelerate_config.yaml", root)
    (root / "tinylm").symlink_to(REPO / "tinylm")  # `python tinylm/train.py` from the project root
    for seed, (name, chars) in enumerate(PLACEHOLDER_FILES.items()):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make_corpus(root / name, chars=chars, seed=seed)
    stories = [{"text": f"Once upon a time story {i} was told by the king to his friend."} for i in range(40)]
    (root / "stories.jsonl").write_text("".join(json.dumps(row) + "\n" for row in stories))
    poems = [{"text": f"Poem {i}: the rose is red, the night is long, and {i} stars sing."} for i in range(40)]
    (root / "poems.jsonl").write_text("".join(json.dumps(row) + "\n" for row in poems))
    (root / "prompt.txt").write_text("ROMEO:")
    (root / "checkpoints").mkdir()  # the repo ships checkpoints/ and data/ (with a README), so do we
    (root / "data").mkdir()
    return root


@pytest.fixture(scope="module")
def pieces(tmp_path_factory):
    """The prerequisites, made once in process: {piece: [paths relative to the project]} and their folder."""
    from tinylm.compat import reset_accelerate_state

    from tinylm import checkpoint, export, prepare, train

    root = make_bare_project(tmp_path_factory.mktemp("doc-pieces") / "project")
    with working_directory(root):
        make_corpus(Path("corpus.txt"), chars=20_000)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert prepare.main(["--input", "corpus.txt", "--out", "data"]) == 0
            assert prepare.main(["--input", "corpus.txt", "--format", "txt"]) == 0
            for out_dir in ("checkpoints", "runs/a"):
                try:
                    assert train.main(["--config", "configs/base.toml", "--device", "cpu", "--out-dir", out_dir,
                                       *TINY_FLAGS]) == 0
                finally:
                    reset_accelerate_state()
                # What Ctrl-C at iter 2 of a 4-iteration run leaves: --resume has something to do.
                path = Path(out_dir) / "ckpt_last.pt"
                payload = checkpoint.load(path)
                payload["config"]["training"]["max_iters"] = 4
                checkpoint.save(path, payload)
            export.export("checkpoints/ckpt_best.pt", "exported/shakespeare-char")
    layout = {
        "data": ["data/train.bin", "data/val.bin", "data/meta.json", "data/tokenizer.json"],
        "txt": ["data/processed"],
        "run": ["checkpoints", "data/train.bin", "data/val.bin", "data/meta.json", "data/tokenizer.json"],
        "run_a": ["runs/a", "data/train.bin", "data/val.bin", "data/meta.json", "data/tokenizer.json"],
        "export": ["exported"],
    }
    for paths in layout.values():
        for path in paths:
            assert (root / path).exists(), path
    return root, layout


UNITS = units(COMMANDS)


def run_unit(unit: Unit, project: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
    }
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run(["bash", "-c", unit.script()], check=False, cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("unit", UNITS, ids=[" ".join([u.where, *u.also, u.commands[0].text[:60]]) for u in UNITS])
def test_doc_command_runs(unit, pieces, tmp_path):
    for command in unit.commands:
        check_flags(command)  # strictly (no abbreviations), before the slow part
    source, layout = pieces
    project = make_bare_project(tmp_path / "project")
    for piece in sorted(unit.needs):
        for path in layout[piece]:
            copy_into(source / path, project / path)
    result = run_unit(unit, project, tmp_path)
    expected = next((code for pattern, code in EXPECTED_EXIT.items() if re.search(pattern, unit.commands[-1].text)), 0)
    assert result.returncode == expected, (
        f"{unit.where}: `{unit.script()}` exited {result.returncode} (expected {expected})\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )


CHECKED = [command for command in COMMANDS if classify(command)[0] not in ("run", "suite", "external")]


@pytest.mark.parametrize("command", CHECKED, ids=[f"{c.where} {c.text[:60]}" for c in CHECKED])
def test_doc_command_flags_parse(command):
    if classify(command)[0] == "install":
        check_install(command)
    else:
        check_flags(command)


def test_counts_and_every_command_is_accounted_for():
    assert COMMANDS, "no commands found in the docs"
    kinds = Counter(classify(command) for command in COMMANDS)
    by_kind = Counter(kind for kind, _ in kinds.elements())
    executed = sum(len(unit.commands) + unit.copies for unit in UNITS)
    checked = len(COMMANDS) - by_kind["run"] - by_kind["suite"] - by_kind["install"] - by_kind["external"]
    print(f"\ndoc commands: {len(COMMANDS)} found: {executed} executed (in {len(UNITS)} subprocesses), "
          f"{checked} flag-checked, {by_kind['install']} installs (extras checked), "
          f"{by_kind['suite']} not run (the test suite), {by_kind['external']} other projects' commands")
    for (kind, reason), n in sorted(kinds.items()):
        print(f"  {n:3d}  {kind:<11} {reason}")
    assert executed == by_kind["run"]


def test_the_tests_named_for_slow_commands_exist():
    """"slow; executed in tests/test_X.py::test_Y" must name a test that exists, or the table lies."""
    for _, _, reason in RULES:
        for path, name in re.findall(r"(tests/\w+\.py)::(\w+)", reason):
            assert re.search(rf"^def {name}\(", (REPO / path).read_text(), re.MULTILINE), f"{reason}: no {path}::{name}"


def test_unlabelled_blocks_hold_no_commands():
    """A command in a ```text or unlabelled block would escape these tests: label it ```bash."""
    for doc, text in read_docs().items():
        for language, body in fenced_blocks(text):
            if language in SHELL_LANGUAGES or language not in ("", "text", "txt"):
                continue
            for number, line in body:
                words = line.split()
                assert not (words and normalize(words)[0] in COMMAND_WORDS), (
                    f"{doc}:{number}: {line.strip()!r} is a command in a ```{language} block: make it ```bash")


# --- The tests catch a renamed flag ------------------------------------------------------------------------------
PLANTED = """
Some prose.

```console
$ tinylm prepare --input my_text.txt \\
    --no-such-flag 3      # renamed
error: unrecognized arguments: --no-such-flag 3
$ tinylm prepare --dataset roneneldan/TinyStories --vocab-sise 8192 && tinylm train --max-steps 4
$ accelerate launch --config_file configs/accelerate/fsdp.yaml --num-procs 2 tinylm/train.py --config ...
```

| where | command |
|---|---|
| here | `python tinylm/train.py --config configs/nope.toml --device cpu` |
| there | `tinylm prepare --input my_book.txt --tokenizer bpe --vocab 4096` |
"""


def test_a_renamed_flag_fails(tmp_path):
    commands = extract({"planted.md": PLANTED})
    assert [c.text for c in commands] == [
        "tinylm prepare --input my_text.txt --no-such-flag 3",
        "tinylm prepare --dataset roneneldan/TinyStories --vocab-sise 8192",
        "tinylm train --max-steps 4",
        "accelerate launch --config_file configs/accelerate/fsdp.yaml --num-procs 2 tinylm/train.py --config ...",
        "python tinylm/train.py --config configs/nope.toml --device cpu",
        "tinylm prepare --input my_book.txt --tokenizer bpe --vocab 4096",  # argparse would take `--vocab`
    ]
    assert [classify(c)[0] for c in commands] == ["run", "network", "run", "gpu", "run", "run"]
    for command in commands:  # flag-checked, each is refused
        with pytest.raises(AssertionError, match="does not parse|rejects it|does not exist|unrecognized"):
            check_flags(command)
    # Executed (the default for a command no rule holds back), the first one exits 2.
    unit = units(commands)[0]
    assert unit.commands == commands[:1]
    result = run_unit(unit, make_bare_project(tmp_path / "project"), tmp_path)
    assert result.returncode == 2 and "--no-such-flag" in result.stderr, result.stderr
