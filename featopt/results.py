"""One record per problem, the same for every method, written atomically.

A run writes `results.json` (its settings, library versions and one :class:`FeatureResult` per
problem) and `embeddings.safetensors` (the tensors). Each file is written to a temporary name
in the same folder and renamed into place, so a crash never leaves a half-written result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from featopt.atomic import atomic_folder, atomic_write
from featopt.version import __version__

__all__ = ["FeatureResult", "atomic_folder", "atomic_write", "dumps_indented", "finite", "flag_nonfinite",
           "read_results", "versions", "write_plain_results", "write_results"]

@dataclass
class FeatureResult:
    """The answer to one problem.

    `activation` is measured by a fresh forward pass of the decoded discrete tokens, so it says
    what the found input really does; `continuous_activation` is what the optimized (not
    necessarily token-like) input reached.
    """

    spec: str
    site: str
    method: str
    objective: str
    token_ids: list[int]
    tokens: list[str]
    text: str
    activation: float
    continuous_activation: float | None = None
    token_cosine: list[float] | None = None  # per position: optimized embedding vs decoded token's
    nearest_token_ids: list[int] | None = None
    pinv_nearest_agreement: float | None = None
    model: str = ""
    # Whether the model's input started with its BOS token (--bos); older files lack it: False.
    bos: bool = False
    seed: int | None = None
    dtype: str = ""
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    # What the site's features are when not its raw activation (an SAE: path, hash, ...).
    feature_map: dict | None = None
    # Some number of this result (or its row of the saved tensors) was NaN or infinite: the run
    # diverged. results.json holds null for each such number (JSON has no NaN).
    diverged: bool = False

def versions() -> dict[str, str]:
    """Versions of everything that can change a number."""
    import lightning
    import transformers

    return {
        "featopt": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
    }


def write_results(
    out_dir: str | Path, results: list[FeatureResult], run: dict, tensors: dict[str, Tensor] | None = None
) -> Path:
    """Write `results.json` (and `embeddings.safetensors` when `tensors` are given) into `out_dir`.

    `run` holds the settings that reproduce the run (model, seed, dtype, ...); versions are added.
    Returns the path of `results.json`.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = flag_nonfinite(results, tensors)
    document = {"run": finite(run)[0] | {"versions": versions()}, "results": records}
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    if tensors:
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write(out / "embeddings.safetensors", lambda tmp: save_file(cpu, tmp))
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out / "results.json"

def finite(value, name: str = "") -> tuple:
    """`value` (JSON-like: dicts, lists, numbers, ...) with every NaN or infinite float replaced by
    None, and the names of the replaced ones (`token_cosine[2]`, `extra.distance`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [name]
    if isinstance(value, dict):
        pairs = [(k, finite(v, f"{name}.{k}" if name else str(k))) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, [n for _, (_, bad) in pairs for n in bad]
    if isinstance(value, (list, tuple)):
        items = [finite(v, f"{name}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in items], [n for _, bad in items for n in bad]
    return value, []


def flag_nonfinite(results: list[FeatureResult], tensors: dict[str, Tensor] | None = None) -> list[dict]:
    """The JSON records of `results`, NaN and infinities written as null. A result with any of them
    in its numbers, or in its row of a tensor `[len(results), ...]`, gets `diverged = True` (in the
    record and on the object) and one line on stderr names them all."""
    rows = {name: ~torch.isfinite(t.detach().float()).flatten(1).all(dim=1).cpu()
            for name, t in (tensors or {}).items()
            if t.is_floating_point() and t.dim() >= 1 and len(t) == len(results) and len(results)}
    records, problems = [], []
    for i, r in enumerate(results):
        record, bad = finite(asdict(r))
        bad += [name for name, row in rows.items() if row[i]]
        if bad:
            r.diverged = record["diverged"] = True
            problems.append(f"{r.spec} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
        records.append(record)
    if problems:
        sys.stderr.write(f"featopt: warning: {len(problems)} of {len(results)} results hold NaN or infinity, written "
                         f"as null with \"diverged\": true: {'; '.join(problems[:5])}{'; ...' if len(problems) > 5 else ''}. "
                         "The run diverged: lower --lr, or use a wider --precision/--dtype.\n")
    return records


def read_results(path: str | Path) -> tuple[dict, list[FeatureResult]]:
    """Read back a `results.json` (or the folder holding it): `(run, results)`."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    document = json.loads(path.read_text(encoding="utf-8"))
    return document["run"], [FeatureResult(**r) for r in document["results"]]


def write_plain_results(out: str | Path, results: list[FeatureResult], run: dict) -> Path:
    """`featopt.results.write_results` (no tensors), byte for byte, in a third of the time.

    `write_results` turns each result into a dict with `dataclasses.asdict`, which deep-copies
    every list item and dict value one Python call at a time, then encodes with `json.dumps(...,
    indent=2)`, whose indented encoder is pure Python and yields a piece per token: for an
    exhaustive run's hundreds of results (each with its top-k) that is most of a run's time
    outside its forwards. A result's fields hold plain JSON values, so one dict of its fields
    and `dumps_indented` give the same text.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [field.name for field in dataclasses.fields(FeatureResult)]
    document = {"run": {**run, "versions": versions()},
                "results": [{name: getattr(r, name) for name in names} for r in results]}
    text = dumps_indented(document)
    if "NaN" in text or "Infinity" in text:  # rare (a diverged run, or a token spelled so): as write_results does
        document["results"] = flag_nonfinite(results)
        text = dumps_indented(document)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out / "results.json"


_encode_str = json.encoder.encode_basestring  # what json.dumps(..., ensure_ascii=False) uses


def dumps_indented(value) -> str:
    """`json.dumps(value, indent=2, ensure_ascii=False)`, the same text, built by joining strings
    rather than by the generators of json's pure-Python indented encoder. Anything else than
    str/int/float/bool/None/list/tuple/dict (or a circular value) is left to `json.dumps`."""
    try:
        return _indented(value, "\n")
    except (TypeError, RecursionError):
        return json.dumps(value, indent=2, ensure_ascii=False)


def _indented(o, newline: str) -> str:
    """`o` as json.dumps(indent=2) writes it where its lines start with `newline` (a newline and
    the current indentation)."""
    kind = type(o)
    if kind is str:
        return _encode_str(o)
    if kind is int:
        return int.__repr__(o)
    if kind is float:
        text = float.__repr__(o)
        return _FLOATS.get(text, text)
    if kind is list or kind is tuple:
        if not o:
            return "[]"
        inner = newline + "  "
        kinds = set(map(type, o))
        if kinds == {int}:
            parts = list(map(int.__repr__, o))
        elif kinds == {str}:
            parts = list(map(_encode_str, o))
        elif kinds == {float}:
            parts = list(map(float.__repr__, o))
            if not _FLOATS.keys().isdisjoint(parts):
                parts = [_FLOATS.get(text, text) for text in parts]
        else:
            parts = [_indented(v, inner) for v in o]
        return "[" + inner + ("," + inner).join(parts) + newline + "]"
    if kind is dict:
        if not o:
            return "{}"
        inner = newline + "  "
        parts = []
        for k, v in o.items():
            key = _encode_str(k if type(k) is str else _key(k)) + ": "
            kind = type(v)
            if kind is str:
                parts.append(key + _encode_str(v))
            elif v is None:
                parts.append(key + "null")
            elif kind is int:
                parts.append(key + int.__repr__(v))
            else:
                parts.append(key + _indented(v, inner))
        return "{" + inner + ("," + inner).join(parts) + newline + "}"
    if o is None:
        return "null"
    if o is True:
        return "true"
    if o is False:
        return "false"
    if isinstance(o, int):  # subclasses, as json writes them
        return int.__repr__(o)
    if isinstance(o, float):
        text = float.__repr__(o)
        return _FLOATS.get(text, text)
    if isinstance(o, (list, tuple)):
        return _indented(list(o), newline)
    if isinstance(o, dict):
        return _indented(dict(o), newline)
    raise TypeError(f"not JSON: {type(o).__name__}")


_FLOATS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _key(k) -> str:
    """A dict key as json writes it."""
    if isinstance(k, str):
        return k
    if isinstance(k, float):
        text = float.__repr__(k)
        return _FLOATS.get(text, text)
    if k is True:
        return "true"
    if k is False:
        return "false"
    if k is None:
        return "null"
    if isinstance(k, int):
        return int.__repr__(k)
    raise TypeError(f"not a JSON key: {type(k).__name__}")
