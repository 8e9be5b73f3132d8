"""The mutation run's configuration (tests/mutation/) names things that exist.

A test selection that names a moved test, or an equivalent-mutant entry whose line was rewritten,
would quietly weaken the mutation score; this catches both in the ordinary test run.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "mutation"))

import run as mutation  # noqa: E402  (tests/mutation/run.py)

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
