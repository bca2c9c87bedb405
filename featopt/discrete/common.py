"""What the exhaustive and greedy searches share: layers, loading, re-measuring, the table, and
running in several processes."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site, load_model, model_options
from featopt.results import FeatureResult, atomic_write, flag_nonfinite, read_results, versions
from featopt.discrete.scoring import SCORE_DTYPE

_DIGITS = re.compile("[0-9]{1,9}")  # not \d: it also matches other scripts' digits
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SearchRun:
    results: list[FeatureResult]  # site-major: every problem of the first layer, then the next
    out: Path


def parse_indices(value: int | str | list[int], size: int, flag: str, noun: str) -> list[int]:
    """`3`, `"3"`, `"0,3,7"`, `"0-3"` or `[0, 3]` -> sorted distinct indices, each below `size`."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    chosen: set[int] = set()
    for item in items:
        lo, dash, hi = str(item).strip().partition("-")
        if not _DIGITS.fullmatch(lo) or (dash and not _DIGITS.fullmatch(hi)) or int(hi or lo) < int(lo):
            raise FeatoptError(f"{flag} {value!r} is malformed: write an index, a list or a range, like 3, 0,3,7 or 0-3.")
        chosen.update(range(int(lo), int(hi or lo) + 1))
    if max(chosen) >= size:
        raise FeatoptError(f"{noun} {max(chosen)} is out of range: this model has {size} {noun}s (0-{size - 1}).")
    return sorted(chosen)


def parse_layers(layer: int | str | list[int], n_layers: int) -> list[int]:
    return parse_indices(layer, n_layers, "--layer", "layer")


def parse_sites(adapter: ModelAdapter, site: str, layer: int | str | list[int]) -> list[Site]:
    """Every kind of `site` (comma-separated; a full `blocks.L.KIND` name stands alone) at every
    layer of `layer`, kind-major: `"resid_post,mlp_out"` at `"0,3"` gives four sites."""
    layers = parse_layers(layer, adapter.n_layers)
    sites: list[Site] = []
    for kind in str(site).split(","):
        kind = kind.strip()
        sites += [adapter.site(kind)] if kind.startswith("blocks.") else [adapter.site(kind, lay) for lay in layers]
    return list(dict.fromkeys(sites))


def parse_candidates(candidates: str | None, vocab_size: int) -> torch.Tensor | None:
    """The token ids to try (`"0-4095"`, `"17,42"`), or None for the whole vocabulary."""
    if candidates is None:
        return None
    return torch.tensor(parse_indices(candidates, vocab_size, "--candidates", "token id"), dtype=torch.long)


def check_common(config) -> None:
    for name in ("top_k", "devices"):
        if getattr(config, name) < 1:
            raise FeatoptError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    if config.batch_size < 0:
        raise FeatoptError(f"--batch_size must be 0 (automatic) or more, got {config.batch_size}.")
    if config.dtype not in DTYPES:
        raise FeatoptError(f"--dtype {config.dtype!r} is not known: allowed are {', '.join(DTYPES)}.")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", config.device):
        raise FeatoptError(f"--device {config.device!r} is not known: allowed are auto, cpu, cuda, cuda:N, mps.")


def device_for(config, adapter: ModelAdapter | None) -> str:
    """`config.device`, with "auto" resolved: a given adapter's device, else cuda when there is one."""
    if config.device != "auto":
        return config.device
    if adapter is not None:
        return str(adapter.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(config, adapter: ModelAdapter | None) -> ModelAdapter:
    """The config's model (or `adapter`, seen with the config's `--bos`) on the config's device;
    rank r of a group uses cuda:r."""
    device = device_for(config, adapter)
    if adapter is None:
        adapter = load_model(config.model, untrained=config.untrained, seed=config.seed, dtype=DTYPES[config.dtype],
                             **model_options(config))
    elif hasattr(config, "bos"):  # as the processes of --devices, which load the model from the config, see it
        adapter = adapter.with_bos(config.bos)
    if device.startswith("cuda") and dist.is_available() and dist.is_initialized():
        device = f"cuda:{dist.get_rank() % torch.cuda.device_count()}"
    adapter = adapter.to(device)
    if getattr(config, "sae", None):
        from featopt.models.sae.attach import attach_path

        adapter, _ = attach_path(adapter, config.sae)
    return adapter


def sites_for(adapter: ModelAdapter, config) -> list[Site]:
    """The sites a search reads: the SAE's own with `--sae` (its latents are the features), else
    every `config.site` kind at every `config.layer`."""
    if getattr(config, "sae", None):
        return list(adapter.feature_sites)
    return parse_sites(adapter, config.site, config.layer)


def out_dir(config) -> Path:
    return Path(config.out or Path("featopt-runs") / time.strftime("%Y%m%d-%H%M%S"))


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


@torch.inference_mode()
def per_position(adapter: ModelAdapter, site: Site, ids: Tensor, features: list, isolated: bool = False) -> Tensor:
    """A plain forward (no cache) of `ids [N, T]`: row n's problem `features[n]` at each position, `[N, T]`."""
    acts = adapter.run([site], input_ids=ids, isolated=isolated)[site].to(SCORE_DTYPE)
    weights = torch.zeros(len(features), acts.shape[-1], 1, dtype=SCORE_DTYPE)  # [N, width, 1]
    single = [(n, chosen[0]) for n, chosen in enumerate(features) if chosen is not None and len(chosen) == 1]
    if single:  # one assignment for all the single features (often every row)
        weights[torch.tensor([n for n, _ in single]), torch.tensor([f for _, f in single]), 0] = 1.0
    for n, chosen in enumerate(features):
        if chosen is None or len(chosen) > 1:
            chosen = range(acts.shape[-1]) if chosen is None else chosen
            weights[n, list(chosen)] = 1.0 / len(chosen)
    return torch.bmm(acts, weights.to(acts.device))[..., 0].cpu()


def format_table(results: list[FeatureResult], *, activations: bool = True) -> str:
    """The documents' table: one row per site (block; per method too when several), one column
    per feature problem, each cell the found text after any fixed prefix and its re-measured
    activation."""
    specs = list(dict.fromkeys(r.spec for r in results))
    several = len({r.method for r in results}) > 1

    def label(r: FeatureResult) -> str:
        return f"{r.site} {r.method}" if several else r.site

    sites = list(dict.fromkeys(label(r) for r in results))
    cell = {(label(r), r.spec): r for r in results}

    def show(r: FeatureResult | None) -> str:
        if r is None:
            return ""
        skip = r.extra.get("prefix_length", 0)
        text = repr("".join(r.tokens[skip:]) if skip else r.text)
        return f"{text} {r.activation:.4g}" if activations else text

    rows = [[""] + specs] + [[site] + [show(cell.get((site, s))) for s in specs] for site in sites]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, run_fn, config, adapter, port: int) -> None:
    backend = "nccl" if config.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=config.devices)
    try:
        run_fn(config, adapter)
    finally:
        dist.destroy_process_group()


def spawn(run_fn, config, adapter: ModelAdapter | None) -> SearchRun:
    """Run `run_fn(config, adapter)` in `config.devices` processes (one process group); rank 0
    writes the results, which are read back here."""
    import torch.multiprocessing as mp

    config = dataclasses.replace(config, out=str(out_dir(config)), device=device_for(config, adapter))
    mp.spawn(_worker, args=(run_fn, config, adapter, _free_port()), nprocs=config.devices, join=True)
    _, results = read_results(config.out)
    return SearchRun(results, Path(config.out))
