"""Decoded neurons on disk: `neurons.safetensors` (per layer `layers.L.ids [N, k]`, `layers.L.probs
[N, k]`, `layers.L.logsumexp [N]`, `layers.L.top_mean [N]`, settings in the header metadata),
`neurons.json` (settings, versions, per-layer summary) and `neurons.csv` (one row per neuron).
Every file is written to a temporary name and renamed into place: never half a file."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import torch

from featopt.errors import FeatoptError
from featopt.results import atomic_write, versions
from featopt.weights.decode import Decoded

FIELDS = ("ids", "probs", "logsumexp", "top_mean")


def token_strings(adapter, ids) -> dict[int, str]:
    """`{id: text}` for the distinct ids given (each decoded once)."""
    return {int(i): adapter.decode([int(i)]) for i in torch.as_tensor(ids).unique().tolist()}


def layer_summary(adapter, layer: int, decoded: Decoded, strings: dict[int, str], n: int = 10) -> dict:
    top1 = decoded.ids[:, 0].tolist()
    return {
        "layer": layer, "neurons": len(top1),
        "mean_top_prob": float(decoded.probs[:, 0].mean()),
        "most_common_top_tokens": [[strings[t], c] for t, c in Counter(top1).most_common(n)],
    }


def save_decoded(out_dir: str | Path, decoded: dict[int, Decoded], settings: dict, adapter) -> Path:
    """Write the three files into `out_dir`; returns the safetensors path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{layer}.{name}": getattr(d, name).contiguous()
               for layer, d in decoded.items() for name in FIELDS}
    meta = {key: json.dumps(value) for key, value in settings.items()}
    atomic_write(out / "neurons.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))
    strings = token_strings(adapter, torch.cat([d.ids.flatten() for d in decoded.values()]))
    summary = {"settings": settings, "versions": versions(),
               "layers": [layer_summary(adapter, layer, d, strings) for layer, d in decoded.items()]}
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    atomic_write(out / "neurons.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["layer", "neuron", "top_token", "top_prob", "top_mean", "tokens", "probs"])
    for layer, d in decoded.items():
        for n, (ids, probs, mean) in enumerate(zip(d.ids.tolist(), d.probs.tolist(), d.top_mean.tolist())):
            writer.writerow([layer, n, strings[ids[0]], f"{probs[0]:.6g}", f"{mean:.6g}",
                             json.dumps([strings[i] for i in ids], ensure_ascii=False),
                             json.dumps([float(f"{p:.6g}") for p in probs])])
    atomic_write(out / "neurons.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue(), encoding="utf-8"))
    return out / "neurons.safetensors"


def load_decoded(path: str | Path) -> tuple[dict, dict[int, Decoded]]:
    """Read back `neurons.safetensors` (or the folder holding it): `(settings, {layer: Decoded})`."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "neurons.safetensors"
    if not path.is_file():
        raise FeatoptError(f"no decoded neurons at {path}: give a neurons.safetensors file or the folder of a decode run.")
    with safe_open(str(path), framework="pt") as f:
        settings = {key: json.loads(value) for key, value in (f.metadata() or {}).items()}
        layers = sorted({int(key.split(".")[1]) for key in f.keys()})
        decoded = {layer: Decoded(*(f.get_tensor(f"layers.{layer}.{name}") for name in FIELDS)) for layer in layers}
    return settings, decoded
