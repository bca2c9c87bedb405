"""What the command line and the Python API read off a config dataclass: its fields, their help
texts (each field's docstring, the one mechanism), and the checks every command shares."""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from dataclasses import MISSING, Field, fields
from functools import lru_cache

from featopt.errors import FeatoptError
from featopt.objectives import Objective
from featopt.runs.outdir import check_out


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """`{field: help}`: the string right after each field's annotation in the class body (PEP 257
    attribute docstrings), from the class and its bases (a subclass's own doc wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue  # built-ins, or a class without source (a frozen install): no help, not an error
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def default_of(f: Field):
    """A field's default value (a fresh one for a `default_factory`)."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def flag_of(name: str) -> str:
    """The command-line flag of a field: `--name`, with a trailing `_` dropped (`from_` -> `--from`)."""
    return f"--{name.rstrip('_')}"


def check_config(config) -> None:
    """What every command requires of its settings before it runs: finite numbers (nan and inf are
    no setting of any float flag) and an `--out` featopt may write into."""
    for f in fields(config):
        value = getattr(config, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise FeatoptError(f"{flag_of(f.name)} must be a finite number, got {v}.")
    check_out(getattr(config, "out", None))


def check_at_least(config, names, low: int = 1) -> None:
    """Each of `names` is a number of at least `low`; one sentence naming the first that is not."""
    for name in names:
        value = getattr(config, name)
        if value is None or value < low:
            raise FeatoptError(f"{flag_of(name)} must be at least {low}, got {value}.")


def check_choice(config, name: str, allowed) -> None:
    """`config.<name>` is one of `allowed`; one sentence naming them otherwise."""
    if getattr(config, name) not in allowed:
        raise FeatoptError(f"{flag_of(name)} {getattr(config, name)!r} is not known: allowed are {', '.join(allowed)}.")


def record_of(config) -> dict:
    """The config as results record it (`run.config`): plain values; an objective given as a value
    (the Python API) is written as its description."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        out[f.name] = value.description if isinstance(value, Objective) else value
    return out
