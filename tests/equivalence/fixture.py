"""A command's fixture: what it is built from, where it lives, and how a new run is compared to it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .normalize import load_records, normalize_stdout, output_files
from .runner import Ran

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REL_TOL, ABS_TOL = 1e-5, 1e-6  # floats are never compared exactly: thread counts and op order may differ
# CE loss recovered is (ce_zero - ce_sae) / (ce_zero - ce_clean); on the tiny random models the
# denominator is ~1e-2 of the CE values (6.249 - 6.259), so float32 rounding of the three CEs, which
# are compared at REL_TOL themselves, moves it ~1000x more: 2e-5 between two CPUs for the same code.
ILL_CONDITIONED = {"ce_loss_recovered": 1e-3}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def build(ran: Ran, root: Path) -> dict:
    """The normalized fixture of one command's run under `root`."""
    return {
        "command": ran.command.name,
        "argv": [a.replace(str(root), "<TMP>") for a in ran.argv],
        "files": output_files(ran.out),
        "records": load_records(ran.out, ran.command.argv, root),
        "stdout": normalize_stdout(ran.stdout, root),
    }


def path_of(name: str, folder: Path = FIXTURES) -> Path:
    return folder / f"{name}.json"


def write(fixture: dict, folder: Path = FIXTURES) -> Path:
    path = path_of(fixture["command"], folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fixture, indent=1, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read(name: str, folder: Path = FIXTURES) -> dict:
    return json.loads(path_of(name, folder).read_text(encoding="utf-8"))


def differences(expected, actual, path: str = "", limit: int = 20) -> list[str]:
    """Where `actual` departs from `expected`: every key of `expected` must be in `actual` with an
    equal value (keys only in `actual` are fine: a refactor may add fields); lists have equal
    length and are compared element by element; floats within REL_TOL/ABS_TOL, everything else
    exactly. Each entry names the JSON path and both values; at most `limit` entries."""
    found: list[str] = []
    _walk(expected, actual, path, found, limit)
    return found


def _walk(expected, actual, path, found, limit) -> None:
    if len(found) >= limit:
        return
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            found.append(f"{path or '<root>'}: expected an object, got {_short(actual)}")
            return
        for key, value in expected.items():
            child = _join(path, key)
            if key not in actual:
                found.append(f"{child}: missing (expected {_short(value)})")
            else:
                _walk(value, actual[key], child, found, limit)
    elif isinstance(expected, list):
        if not isinstance(actual, list):
            found.append(f"{path}: expected a list of {len(expected)}, got {_short(actual)}")
        elif len(actual) != len(expected):
            found.append(f"{path}: expected {len(expected)} elements, got {len(actual)}: "
                         f"expected {_short(expected)}, got {_short(actual)}")
        else:
            for i, (e, a) in enumerate(zip(expected, actual)):
                _walk(e, a, f"{path}[{i}]", found, limit)
    elif isinstance(expected, float):
        numeric = isinstance(actual, (int, float)) and not isinstance(actual, bool)
        rel = ILL_CONDITIONED.get(re.split(r"[.:\[]", path)[-1], REL_TOL)
        same = numeric and (math.isclose(expected, actual, rel_tol=rel, abs_tol=ABS_TOL)
                            or (math.isnan(expected) and math.isnan(actual)))
        if not same:
            found.append(f"{path}: expected {expected!r}, got {_short(actual)}")
    elif type(expected) is not type(actual) or expected != actual:  # str, int, bool, None: exactly
        found.append(f"{path}: expected {_short(expected)}, got {_short(actual)}")


def _join(path: str, key: str) -> str:
    """`results` + `run` -> `results.run`; a key that is no identifier (`0/res`) -> `path['0/res']`;
    a path ending in ':' (the file's name) takes the key bare."""
    if not _NAME.match(key):
        return f"{path}[{key!r}]"
    return f"{path}{key}" if not path or path.endswith(":") else f"{path}.{key}"


def _short(value, width: int = 160) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
