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


