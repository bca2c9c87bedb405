"""Which files of a command's output folder are its records, and how they are normalized.

A record is a JSON file loaded as is, or a safetensors file summarized (shape, dtype and a few
numbers per tensor: the tensors themselves would make the fixtures large). Normalizing drops
what legitimately changes from run to run or machine to machine and keeps everything else:

- `versions` (library and Python versions) and `seconds` (wall time) are dropped wherever they
  occur;
- the run's temporary root is replaced by `<TMP>` in every string (absolute paths);
- content hashes (`sha256`, `hash`: digests of float weights, which change with the last bit of
  any weight, while the weights themselves are compared with a tolerance through the
  safetensors summaries) become `<hash>`; the key stays, so a record that loses it still fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# Patterns (relative to the command's --out, `Path.glob` syntax) of each subcommand's records.
RECORDS: dict[str, tuple[str, ...]] = {
    "optimize": ("results.json", "embeddings.safetensors"),
    "invert": ("results.json", "embeddings.safetensors"),
    "search": ("results.json", "fronts.json"),
    "compare": ("compare.json", "*/results.json", "*/*/results.json", "*/*/embeddings.safetensors"),
    "align": ("align.json", "exhaustive/results.json"),
    "neurons decode": ("neurons.json", "neurons.safetensors"),
    "neurons find": ("find.json",),
    "neurons compare": ("compare.json",),
    "neurons clamp": ("clamp.json",),
    "sae train": ("training.json", "cfg.json", "*/cfg.json", "sae_weights.safetensors", "*/sae_weights.safetensors"),
    "sae cache": ("activations.json", "shard_*.safetensors"),
    "sae eval": ("metrics.json",),
    "sae features": ("features.json", "features.safetensors"),
    "sae lens": ("lens.json",),
    "sae ablate": ("ablate.json",),
    "sae mcs": ("mcs.json",),
    "sae dashboard": ("records.json", "dashboard.json"),
    "flow match": ("matches.json", "matches.safetensors"),
    "flow graph": ("graph.json",),
    "flow groups": ("groups.json",),
    "flow transition": ("transition.json",),
    "flow deactivate": ("deactivation.json",),
    "flow steer": ("steering.json", "run.json", "graph/graph.json"),
}

DROPPED_KEYS = {"versions", "seconds"}
HASH_KEYS = {"sha256", "hash"}
_SECONDS = re.compile(r"\b\d+(?:\.\d+)? s\b")  # a wall time as printed: "256 neurons decoded in 0.3 s"
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?%?")


def subcommand(argv) -> str:
    """`("sae", "train", "--model", ...)` -> "sae train"; `("optimize", ...)` -> "optimize"."""
    return " ".join(argv[:2]) if argv[0] in ("neurons", "sae", "flow") else argv[0]


def record_files(out: Path, argv) -> list[Path]:
    """The records a command wrote into `out`, in sorted order."""
    found = {p for pattern in RECORDS[subcommand(argv)] for p in out.glob(pattern) if p.is_file()}
    return sorted(found)


def output_files(out: Path) -> list[str]:
    """Every file a command wrote (pictures and pages too, which are not compared), so that one it
    stops writing is noticed; TensorBoard's event files are named by time and host, so that folder
    counts as one entry."""
    names = {"tensorboard/" if "tensorboard" in p.relative_to(out).parts else p.relative_to(out).as_posix()
             for p in out.rglob("*") if p.is_file()}
    return sorted(names)


def normalize(value, root: str):
    """`value` (parsed JSON) with the volatile parts dropped or replaced (see the module docstring)."""
    if isinstance(value, dict):
        return {_text(k, root): ("<hash>" if k in HASH_KEYS and isinstance(v, str) else normalize(v, root))
                for k, v in value.items() if k not in DROPPED_KEYS}
    if isinstance(value, list):
        return [normalize(v, root) for v in value]
    if isinstance(value, str):
        return _text(value, root)
    return value


def _text(text: str, root: str) -> str:
    return text.replace(root, "<TMP>")


def summarize_safetensors(path: Path) -> dict:
    """Per tensor: shape, dtype; integer tensors' sum and first values (exact), float tensors'
    sum of absolute values, sum of squares and first values (compared with a tolerance). Sums of
    magnitudes, not plain sums: a plain sum of weights cancels to near zero, where a relative
    tolerance means nothing."""
    from safetensors.torch import load_file

    summary = {}
    for name, tensor in sorted(load_file(str(path)).items()):
        flat = tensor.reshape(-1)
        entry = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", "")}
        if tensor.is_floating_point():
            wide = flat.double()
            entry.update(abs_sum=float(wide.abs().sum()), sq_sum=float((wide * wide).sum()),
                         head=[float(v) for v in wide[:8]])
        else:
            entry.update(sum=int(flat.long().sum()), head=[int(v) for v in flat[:16]])
        summary[name] = entry
    return summary


def load_records(out: Path, argv, root: Path) -> dict:
    """`{relative path: normalized record}` for a command's output folder `out`."""
    records = {}
    for path in record_files(out, argv):
        rel = path.relative_to(out).as_posix()
        value = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else summarize_safetensors(path)
        records[rel] = normalize(value, str(root))
    return records


def normalize_stdout(text: str, root: Path) -> str:
    """A command's printed output with the run's root replaced (paths), wall times replaced by
    `<seconds>` (they differ on every run) and trailing spaces cut."""
    text = _SECONDS.sub("<seconds> s", text.replace(str(root), "<TMP>"))
    return "\n".join(line.rstrip() for line in text.splitlines())


def stdout_skeleton(text: str) -> list[str]:
    """The loose form stdout is compared in: every number masked as `#` (they are rounded for
    print, and wall times appear there; the records hold the exact values), runs of whitespace
    collapsed (column widths follow the widest cell), blank lines left out."""
    return [" ".join(_NUMBER.sub("#", line).split()) for line in text.splitlines() if line.strip()]
