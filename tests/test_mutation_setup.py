"""The mutation run's configuration (tests/mutation/) and the planted bugs of tests/mutants.py name things
that exist.

A test selection that names a moved test, an equivalent-mutant entry whose line was rewritten, or a
planted bug whose code moved would quietly weaken the mutation score, or stop a 70-minute run of
tests/mutants.py halfway; this catches them in the ordinary test run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "mutation"))

import run as mutation  # noqa: E402  (tests/mutation/run.py)

sys.path.insert(0, str(REPO / "tests"))
import mutants  # noqa: E402  (tests/mutants.py)

MODULES = mutation.load_modules()
KEY = re.compile(r"^(?P<operator>core/\w+) in (?P<function>\w+): (?P<line>.+) @(?P<column>\d+)( #\d+)?$")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_module_and_test_it_names_exists(name):
    module = MODULES[name]
    assert (REPO / module.source).is_file(), module.source
    assert module.tiers and all(module.tiers), f"{name}: every tier names tests"
    for selection in (test for tier in module.tiers for test in tier):
        file, _, function = selection.partition("::")
        assert (REPO / file).is_file(), f"{name}: {file} does not exist"
        if function:
            assert re.search(rf"^def {re.escape(function)}\(", (REPO / file).read_text(), re.M), \
                f"{name}: {selection} names no test"


def test_each_equivalent_mutant_names_a_line_of_its_module():
    for name, entries in mutation.load_equivalents().items():
        assert name in MODULES, f"equivalent.toml: {name} is not a module of modules.toml"
        source = (REPO / MODULES[name].source).read_text().splitlines()
        for key, why in entries.items():
            match = KEY.match(key)
            assert match, f"{name}: {key!r} is not 'operator in function: line @column'"
            assert why.strip(), f"{name}: {key} needs a reason"
            assert match["line"] in (line.strip() for line in source), \
                f"{name}: no line {match['line']!r} in {MODULES[name].source} any more; run the mutants again"


@pytest.mark.parametrize("file, original, selection", [mutant[1:3] + (mutant[4],) for mutant in mutants.MUTANTS],
                         ids=[mutant[0] for mutant in mutants.MUTANTS])
def test_each_planted_bug_names_code_that_is_there_once_and_test_files_that_exist(file, original, selection):
    """Kills: a planted bug left behind when its code moved or changed (a refactor). A `-k` that selects no
    test is caught when tests/mutants.py runs it (pytest's exit 5 stops the run)."""
    assert (REPO / file).read_text().count(original) == 1, f"{file} must hold the text to mutate exactly once"
    paths = [argument for index, argument in enumerate(selection)
             if not argument.startswith("-") and (index == 0 or selection[index - 1] != "-k")]
    for path in paths:
        file_part, _, test = path.partition("::")
        assert (REPO / file_part).is_file(), f"{file_part} does not exist"
        if test:
            function = test.split("[")[0]
            assert re.search(rf"^def {re.escape(function)}\(", (REPO / file_part).read_text(), re.M), path
