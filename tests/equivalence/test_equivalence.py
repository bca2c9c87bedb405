"""Refactor equivalence: every `featopt` subcommand, run on the built-in tiny models with fixed
seeds, must reproduce the records committed in tests/equivalence/fixtures (written by the code
before the refactor; `python -m tests.equivalence.record` rewrites them).

One module-scoped fixture runs all command lines once, in order (later ones read earlier ones'
SAEs); then one test per command compares its records, and one its printed output, loosely.
"""

from __future__ import annotations

import pytest

from .commands import COMMANDS
from .fixture import FIXTURES, build, differences, path_of, read
from .intended import added_line, excused, intended_argv
from .normalize import stdout_skeleton
from .runner import run_suite

pytestmark = pytest.mark.equivalence  # registered in setup.cfg; `-m "not equivalence"` leaves the suite out
NAMES = [c.name for c in COMMANDS]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """`{name: fresh fixture}` for every command, all run once in this process."""
    root = tmp_path_factory.mktemp("equivalence").resolve()
    runs = run_suite(root)
    return {name: build(ran, root) for name, ran in runs.items()}


def test_every_fixture_belongs_to_a_command():
    # A fixture whose command was removed or renamed would silently stop being checked.
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_records_match_the_fixture(suite, name):
    assert path_of(name).is_file(), f"{name}: no fixture {path_of(name)}; run `python -m tests.equivalence.record`"
    expected, actual = read(name), suite[name]
    assert actual["argv"] == intended_argv(name, expected["argv"]), (
        f"{name}: the command line differs from the one the fixture was recorded with "
        f"(re-record only from pre-refactor code):\n  fixture {expected['argv']}\n  now     {actual['argv']}")
    problems = [f"{file}: not written" for file in expected["files"] if file not in actual["files"]]
    for file, record in expected["records"].items():
        if file in actual["records"]:
            problems += differences(record, actual["records"][file], f"{file}:")
    problems = [p for p in problems if not excused(name, p)]  # intended.py: each deliberate change, with why
    if problems:  # one line per difference, without pytest's dump of the whole suite
        pytest.fail(f"{name}: {len(problems)} difference(s) from the fixture:\n  " + "\n  ".join(problems),
                    pytrace=False)


@pytest.mark.parametrize("name", NAMES)
def test_printed_output_matches_loosely(suite, name):
    """The printed table, numbers masked and whitespace collapsed: the same lines in the same order."""
    expected = stdout_skeleton(read(name)["stdout"])
    actual = [line for line in stdout_skeleton(suite[name]["stdout"]) if not added_line(line)]  # intended.py
    if expected != actual:
        missing = [line for line in expected if line not in actual] or ["(none: the order or extra lines differ)"]
        pytest.fail(f"{name}: printed output differs (numbers masked as #). Lines of the fixture not printed now:\n  "
                    + "\n  ".join(missing[:20]) + "\nprinted now:\n  " + "\n  ".join(actual[:40]), pytrace=False)


def test_the_comparison_itself():
    """What counts as the same: new keys are fine, floats within tolerance, all else exact."""
    fixture = {"a": [1, 2.0, "x", None, True], "b": {"c": 0.5}}
    assert differences(fixture, {"a": [1, 2.0 + 1e-6, "x", None, True], "b": {"c": 0.5, "new": 1}, "d": 0}) == []
    found = differences(fixture, {"a": [1.0, 2.1, "y", 0, 1], "b": {}}, "f.json:")
    assert found == ["f.json:a[0]: expected 1, got 1.0", "f.json:a[1]: expected 2.0, got 2.1",
                     'f.json:a[2]: expected "x", got "y"', "f.json:a[3]: expected null, got 0",
                     "f.json:a[4]: expected true, got 1", "f.json:b.c: missing (expected 0.5)"]
    assert differences({"a": [1, 2]}, {"a": [1]}) == ["a: expected 2 elements, got 1: expected [1, 2], got [1]"]
    # CE loss recovered is ill-conditioned on the tiny models: 1e-3 relative, every other float 1e-5
    assert differences({"m": {"ce_loss_recovered": -1.73217, "fvu": 0.5}}, {"m": {"ce_loss_recovered": -1.73213, "fvu": 0.5}}) == []
    assert differences({"m": {"ce_loss_recovered": -1.73217}}, {"m": {"ce_loss_recovered": -1.74}}) != []
