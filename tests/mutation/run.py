"""Mutation testing of the core modules with cosmic-ray: does each module's test selection fail
when its code is changed?

    python tests/mutation/run.py [MODULE ...] [--jobs 2]   # run (resumes where it stopped)
    python tests/mutation/run.py --report                  # write tests/mutation/report.md

`modules.toml` names each core module, the tests that guard it and the per-mutant time limit;
`equivalent.toml` lists the surviving mutants that change no behaviour, each with one line why.
A module's work lives in `.mutation/<module>/`: a copy of the working tree (cosmic-ray edits the
source in place, so the tree you work in is never touched), the cosmic-ray config and one session
database per source version. Interrupt a run at any time; the next one carries on. When the
module's source has changed since its last session, a new session starts, and every mutant the
last one killed on an unchanged line counts as killed without running again (the tests only get
sharper), as does every listed equivalent one as equivalent; `--fresh` runs every mutant again. Each mutant runs the module's test tiers in fresh
pytest processes, stopping at the first failure: the fast tier (tests that train in process) kills
most mutants in seconds, and only its survivors pay for the slower tiers. PYTHONPATH points at the
copy, so the training runs the tests start as subprocesses load the mutated code too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = REPO / ".mutation"
REPORT = HERE / "report.md"
VERDICTS = HERE / "verdicts"  # <module>.json: the last session's verdict per mutant key, versioned
BIN = Path(sys.executable).parent

# One mutant per operator where cosmic-ray offers many: '+' becomes '-', not also '*', '<<', '|'...
# Comparisons get their boundary and their negation; the variable inserter/replacer are left out
# (they replace a name with a random number, which reads as noise in a report).
EXCLUDED_OPERATORS = [
    "core/ReplaceBinaryOperator_(?!(Add_Sub|Sub_Add|Mul_Div|Div_Mul|FloorDiv_Div|Mod_FloorDiv|Pow_Mul)$)",
    "core/ReplaceComparisonOperator_(?!(Eq_NotEq|NotEq_Eq|Lt_LtE|LtE_Lt|Gt_GtE|GtE_Gt|Is_IsNot|IsNot_Is)$)",
    "core/ReplaceUnaryOperator_(?!(Delete_USub|Delete_Not|Delete_Invert)$)",
    "core/Variable(Replacer|Inserter)",
]


@dataclass(frozen=True)
class Module:
    name: str
    source: str
    tiers: list[list[str]]
    timeout: float

    @property
    def folder(self) -> Path:
        return WORK / self.name


def load_modules() -> dict[str, Module]:
    table = tomllib.loads((HERE / "modules.toml").read_text(encoding="utf-8"))
    return {name: Module(name, entry["source"], entry["tiers"], float(entry["timeout"]))
            for name, entry in table.items()}


def load_equivalents() -> dict[str, dict[str, str]]:
    """{module: {mutant key: why}}."""
    table = tomllib.loads((HERE / "equivalent.toml").read_text(encoding="utf-8"))
    return {name: {entry["mutant"]: entry["why"] for entry in entries} for name, entries in table.items()}


def sessions(module: Module) -> list[Path]:
    """The module's sessions, oldest first (named by their order and the source version)."""
    return sorted(module.folder.glob("session-*.sqlite"))


def copy_tree(module: Module) -> Path:
    """A fresh copy of the working tree for this module's mutants (undoes a half-applied mutant)."""
    repo = module.folder / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(REPO, repo, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".mutation", "__pycache__", "*.bin", "*.pt", "site", "data", "checkpoints"))
    return repo


def test_command(module: Module) -> str:
    """The module's test tiers, in order, each only if the one before passed (a shell `&&` chain)."""
    pytest = f"{shlex.quote(sys.executable)} -m pytest -x -q -p no:cacheprovider -n 0 -o addopts="
    chain = " && ".join(f"{pytest} {' '.join(map(shlex.quote, tier))}" for tier in module.tiers)
    return f"sh -c {shlex.quote(chain)}"


def write_config(module: Module) -> Path:
    command = test_command(module)
    lines = [
        "[cosmic-ray]",
        f'module-path = "{module.source}"',
        f"timeout = {module.timeout}",
        "excluded-modules = []",
        f"test-command = {json.dumps(command)}",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "[cosmic-ray.filters.operators-filter]",
        f"exclude-operators = {json.dumps(EXCLUDED_OPERATORS)}",
    ]
    config = module.folder / "config.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


@dataclass(frozen=True)
class Mutant:
    job: str
    key: str  # see `mutants`
    line: int
    verdict: str  # see `outcome`


def mutants(session: Path) -> list[Mutant]:
    """The session's mutants, through `cosmic-ray dump`, each named by what it changes rather than
    where, so the name outlives edits elsewhere in the module: operator, function, the line's text,
    the column within the line, and "#2", "#3"... for a second or third mutant the operator makes at
    the same spot (a number plus one, then minus one)."""
    out = subprocess.run([BIN / "cosmic-ray", "dump", session], check=True, capture_output=True, text=True).stdout
    lines = session.with_suffix(".py").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in out.splitlines()]
    rows.sort(key=lambda row: (row[0]["mutations"][0]["operator_name"], row[0]["mutations"][0]["occurrence"]))
    found, seen = [], {}
    for item, result in rows:
        mutation = item["mutations"][0]
        row, col = mutation["start_pos"]
        text = lines[row - 1]
        key = (f'{mutation["operator_name"]} in {mutation["definition_name"]}: {text.strip()} '
               f'@{col - (len(text) - len(text.lstrip()))}')
        seen[key] = seen.get(key, 0) + 1
        found.append(Mutant(item["job_id"], key if seen[key] == 1 else f"{key} #{seen[key]}", row, outcome(result)))
    return sorted(found, key=lambda mutant: mutant.line)


def outcome(result: dict | None) -> str:
    """killed / survived / timeout / incompetent / skipped / pending."""
    if result is None:
        return "pending"
    if result["worker_outcome"] == "skipped":
        return "skipped"
    if result["worker_outcome"] != "normal":
        return "incompetent"
    if result["test_outcome"] == "killed" and result["output"] == "timeout":
        return "timeout"
    return result["test_outcome"]


def start_session(module: Module, repo: Path, config: Path, fresh: bool, retry: bool) -> Path:
    """The session for the current source: the last one if the source is unchanged, else a new one
    that takes over the last one's verdicts on lines that did not change (see `carry_over`)."""
    source = repo / module.source
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    earlier = sessions(module)
    if earlier and earlier[-1].stem.endswith(digest) and not (fresh or retry):
        return earlier[-1]
    saved = saved_verdicts(module)
    # Sessions are numbered across machines: a clone carries on from the committed verdicts' number.
    number = len(earlier) + 1 if earlier else int(saved["last"]["session"].split("-")[1]) + 1 if saved else 1
    session = module.folder / f"session-{number:02d}-{digest}.sqlite"
    shutil.copyfile(source, session.with_suffix(".py"))
    subprocess.run([BIN / "cosmic-ray", "init", config, session], cwd=repo, check=True)
    subprocess.run([BIN / "cr-filter-operators", session, config], cwd=repo, check=True)
    if not fresh:
        if earlier:
            carry_over(module, {mutant.key: mutant.verdict for mutant in mutants(earlier[-1])}, session,
                       earlier[-1].name)
        elif saved:  # a fresh clone: what the last run, wherever it ran, found
            carry_over(module, saved["verdicts"], session, f"{VERDICTS.name}/{module.name}.json")
    return session


def carry_over(module: Module, verdicts: dict[str, str], session: Path, source: str) -> None:
    """Record in `session` the verdict (from `source`) of each mutant killed there, and of each that
    survived there and equivalent.toml lists (equivalent code stays equivalent however sharp the tests)."""
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    equivalents = load_equivalents().get(module.name, {})
    carried = {"killed": [], "equivalent": []}
    for mutant in mutants(session):
        before = verdicts.get(mutant.key)
        if before in ("killed", "timeout"):
            carried["killed"].append(mutant.job)
        elif before in ("survived", "equivalent") and mutant.key in equivalents:
            carried["equivalent"].append(mutant.job)
    with use_db(str(session)) as db:
        for verdict, outcome_ in (("killed", TestOutcome.KILLED), ("equivalent", TestOutcome.SURVIVED)):
            for job in carried[verdict]:
                db.set_result(job, WorkResult(worker_outcome=WorkerOutcome.NORMAL, test_outcome=outcome_,
                                              output=f"{verdict} in an earlier session", diff=None))
    print(f"{module.name}: carried over from {source}: {len(carried['killed'])} killed, "
          f"{len(carried['equivalent'])} equivalent", flush=True)


def saved_verdicts(module: Module) -> dict | None:
    path = VERDICTS / f"{module.name}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def save_verdicts(module: Module) -> None:
    """tests/mutation/verdicts/<module>.json from the local sessions: the first session's counts (kept
    from the file when that session ran on another machine), the last one's counts and verdicts."""
    found = sessions(module)
    if not found:
        return
    saved = saved_verdicts(module) or {}
    equivalents = load_equivalents().get(module.name, {})
    last = mutants(found[-1])
    first = ({"session": found[0].stem, "counts": tally(module, found[0])}
             if found[0].stem.startswith("session-01-") or "first" not in saved else saved["first"])
    record = {
        "first": first,
        "last": {"session": found[-1].stem, "counts": tally(module, found[-1])},
        "verdicts": {mutant.key: "equivalent" if mutant.verdict == "survived" and mutant.key in equivalents
                     else mutant.verdict for mutant in last if mutant.verdict != "skipped"},
    }
    VERDICTS.mkdir(exist_ok=True)
    (VERDICTS / f"{module.name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n",
                                                  encoding="utf-8")


def run_module(module: Module, fresh: bool, retry: bool, threads: int) -> None:
    module.folder.mkdir(parents=True, exist_ok=True)
    repo = copy_tree(module)
    config = write_config(module)
    session = start_session(module, repo, config, fresh, retry)
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": str(threads)}
    if any(mutant.verdict == "pending" for mutant in mutants(session)):
        try:
            check_baseline(module, repo, env)
        except SystemExit as refused:  # said now: the pool would raise it only when its turn came
            print(refused, file=sys.stderr, flush=True)
            raise
    print(f"{module.name}: running {session.name}", flush=True)
    subprocess.run([BIN / "cosmic-ray", "exec", config, session], cwd=repo, env=env, check=True)
    save_verdicts(module)
    print(f"{module.name}: done: {tally(module, session)}", flush=True)


def check_baseline(module: Module, repo: Path, env: dict[str, str]) -> None:
    """The tests must pass on the unmutated copy, or every mutant would count as killed."""
    result = subprocess.run(shlex.split(test_command(module)), cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{module.name}: the tests fail on the unmutated code, so no mutant can be judged; "
                         f"fix them first:\n{result.stdout[-3000:]}")


def tally(module: Module, session: Path) -> dict[str, int]:
    equivalents = load_equivalents().get(module.name, {})
    counts = dict.fromkeys(("killed", "timeout", "survived", "equivalent", "incompetent", "pending"), 0)
    for mutant in mutants(session):
        if mutant.verdict == "skipped":
            continue
        counts["equivalent" if mutant.verdict == "survived" and mutant.key in equivalents else mutant.verdict] += 1
    return counts


def score(counts: dict[str, int]) -> str:
    judged = counts["killed"] + counts["timeout"] + counts["survived"]
    if not judged:
        return "-"
    percent = f"{100 * (counts['killed'] + counts['timeout']) / judged:.0f}%"
    return f"{percent} of the {judged} run so far" if counts["pending"] else percent


def write_report(modules: dict[str, Module]) -> None:
    """tests/mutation/report.md from the verdict files (refreshed first from the local sessions)."""
    header = ("| module | session | mutants | killed | timeout | survived | equivalent | incompetent | pending "
              "| score |\n|---|---|---|---|---|---|---|---|---|---|")
    rows, details = [], []
    for module in modules.values():
        save_verdicts(module)
        saved = saved_verdicts(module)
        if not saved:
            rows.append(f"| {module.name} | not run yet | | | | | | | | |")
            continue
        for label in ("first", "last"):
            counts = saved[label]["counts"]
            rows.append(f"| {module.name} | {label}: {saved[label]['session']} | {sum(counts.values())} | "
                        f"{counts['killed']} | {counts['timeout']} | {counts['survived']} | {counts['equivalent']} | "
                        f"{counts['incompetent']} | {counts['pending']} | {score(counts)} |")
        equivalents = load_equivalents().get(module.name, {})
        lines = [line.strip() for line in (REPO / module.source).read_text(encoding="utf-8").splitlines()]
        listed = [key for key, verdict in saved["verdicts"].items() if verdict in ("survived", "equivalent")]
        if listed:
            details.append(f"\n### {module.name}\n")
        for key in sorted(listed, key=lambda key: _line_of(key, lines)):
            why = equivalents.get(key)
            details.append(f"- `{module.source}:{_line_of(key, lines)}` `{key}`: "
                           + (f"equivalent: {why}" if why else "**survives**"))
    text = ("# Mutation report\n\nWritten by `python tests/mutation/run.py --report` (see docs/testing.md) from "
            "tests/mutation/verdicts/. Per module, the first session is the run before its tests were "
            "sharpened, the last the current one (verdicts on unchanged lines carried over). Score: killed "
            "(time-outs included) of the mutants run that are not equivalent.\n\n" + header + "\n"
            + "\n".join(rows) + "\n\n## Surviving and equivalent mutants, last session\n" + "\n".join(details) + "\n")
    REPORT.write_text(text, encoding="utf-8")
    print(text)


def _line_of(key: str, lines: list[str]) -> int:
    """The line number of a mutant key's line text in the current source (0 when it is gone)."""
    text = key.split(": ", 1)[1].rsplit(" @", 1)[0]
    return lines.index(text) + 1 if text in lines else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"modules to mutate (default: all of {', '.join(load_modules())})")
    parser.add_argument("--jobs", type=int, default=1, help="modules mutated at once (each its own copy)")
    parser.add_argument("--fresh", action="store_true", help="run every mutant again, carrying nothing over")
    parser.add_argument("--retry", action="store_true",
                        help="a new session even if the source is unchanged: the survivors run again (after new tests)")
    parser.add_argument("--report", action="store_true", help="only write the report from the sessions so far")
    return parser


def main() -> int:
    modules = load_modules()
    parser = build_parser()
    args = parser.parse_args()
    unknown = sorted(set(args.modules) - set(modules))
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; tests/mutation/modules.toml names {', '.join(modules)}")
    if not args.report:
        chosen = [modules[name] for name in args.modules or modules]
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run_module, module, args.fresh, args.retry, threads) for module in chosen]:
                future.result()
    write_report(modules)
    return 0


if __name__ == "__main__":
    sys.exit(main())
