"""Exhaustive single-token search (source document 000, "Complete Search Features"): every token of
the vocabulary as the input, `a_i = argmax_a O_f(a)`, exact for one-token inputs.

One batched pass over the vocabulary scores every problem of every requested site at once, so the
features of a whole layer cost one sweep. With a fixed `prefix` the candidate token comes after
it (positions then index the whole sequence) and the prefix runs once, cached.
`run(ExhaustiveConfig(...))` is the one entry point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from featopt.errors import FeatoptError
from featopt.specs import parse_features
from featopt.models import ModelAdapter
from featopt.results import FeatureResult, versions
from featopt.discrete.common import (
    SearchRun, check_common, format_table, load, out_dir, parse_candidates, per_position, sites_for, spawn,
    write_plain_results,
)
from featopt.discrete.scoring import Scorer
from featopt.discrete.sweep import distributed, sweep
from featopt.discrete.tokens import check_length

__all__ = ["ExhaustiveConfig", "run", "format_table"]


@dataclass
class ExhaustiveConfig:
    """Settings of one exhaustive sweep (the flags of `featopt search exhaustive`)."""

    model: str = "tiny-gpt2"
    bos: bool = False  # start the model input with its BOS token (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    layer: int | str = 0  # one layer, or several read in the same forward: "0,3,7" or "0-3"
    site: str = "resid_post"  # or several kinds, "resid_post,mlp_out", each at every layer
    features: str = "[:, :, 0-4]"
    prefix: str | None = None  # fixed text before the candidate token
    top_k: int = 10  # best tokens kept per problem
    candidates: str | None = None  # token ids to try ("0-4095", "17,42"); default: the whole vocabulary
    batch_size: int = 0  # candidates per forward; 0: automatic, halved on out-of-memory
    isolated: bool = False  # the site's block alone (no prefix then)
    untrained: bool = False
    seed: int = 0
    dtype: str = "float32"  # float32, float64, bfloat16, float16
    device: str = "auto"  # auto (cuda when there is one), cpu, cuda
    devices: int = 1  # processes; the vocabulary is sharded across them
    out: str | None = None  # default: featopt-runs/<time>
    progress: bool = True
    sae: str | None = None  # an SAE folder: its latents are the features, at its own site


def weights_for(problems, n_tokens: int) -> torch.Tensor:
    """`[P, n_tokens]`: the mean over each problem's positions (all of them for `:`)."""
    weights = torch.zeros(len(problems), n_tokens, dtype=torch.float64)
    rows: dict[tuple[int, ...] | None, list[int]] = {}  # problems by positions: one assignment each
    for p, problem in enumerate(problems):
        rows.setdefault(problem.positions, []).append(p)
    for positions, chosen in rows.items():
        positions = list(range(n_tokens)) if positions is None else list(positions)
        weights[torch.tensor(chosen)[:, None], torch.tensor(positions)[None, :]] = 1.0 / len(positions)
    return weights


def run(config: ExhaustiveConfig, adapter: ModelAdapter | None = None) -> SearchRun:
    """Sweep the vocabulary once for every problem of `config.features` at every layer.

    Returns one result per (site, problem), site-major (kinds, then layers), and writes them to
    `out/results.json` (rank 0 only with several processes; every rank returns them).
    """
    check_common(config)
    if config.devices > 1 and distributed()[1] == 1:
        return spawn(run, config, adapter)
    adapter = load(config, adapter)
    sites = sites_for(adapter, config)
    prefix = adapter.encode(config.prefix)  # [BOS] alone when --bos and no prefix
    check_length(adapter, len(prefix), 1)
    if config.isolated and len(prefix):
        raise FeatoptError("--isolated cannot be combined with --prefix or --bos: a block alone cannot continue a cached prefix.")
    if config.isolated and len({site.layer for site in sites}) > 1:
        raise FeatoptError("--isolated runs one block alone: give one layer, not several.")
    n_tokens = len(prefix) + 1
    plans = [(site, parse_features(config.features, n_tokens=n_tokens, width=adapter.width(site), site=str(site)))
             for site in sites]
    for problem in plans[0][1]:
        if problem.positions is not None and n_tokens - 1 not in problem.positions:
            raise FeatoptError(f"{problem.spec} selects only prefix positions, which every candidate shares: "
                               f"include position {n_tokens - 1}, the candidate token (or write \":\").")
    scorers = [(site, Scorer([p.features for p in problems], adapter.width(site), weights_for(problems, n_tokens)))
               for site, problems in plans]
    candidates = parse_candidates(config.candidates, adapter.vocab_size)
    k = min(config.top_k, adapter.vocab_size if candidates is None else len(candidates))
    topk = sweep(adapter, scorers, prefixes=prefix[None] if len(prefix) else None, candidates=candidates, k=k,
                 batch_size=config.batch_size, isolated=config.isolated, progress=config.progress, desc="exhaustive")
    values, ids = topk.values.cpu(), topk.ids.cpu()
    top_values, top_ids = values.T.tolist(), ids.T.tolist()  # per problem, its top-k
    names: dict[int, str] = {}  # many problems share tokens: decode each once
    texts: dict[tuple[int, ...], str] = {}

    def name(token: int) -> str:
        if token not in names:
            names[token] = adapter.decode([token])
        return names[token]

    def text(row: list[int]) -> str:
        if len(row) == 1:
            return name(row[0])
        key = tuple(row)
        if key not in texts:
            texts[key] = adapter.decode(row)
        return texts[key]

    results, stamp, col = [], versions(), 0
    dtype = str(adapter.dtype).replace("torch.", "")
    for (site, problems), (_, scorer) in zip(plans, scorers):
        P = len(problems)
        inputs = torch.cat([prefix.expand(P, -1), ids[0, col:col + P, None]], dim=1)
        acts = per_position(adapter, site, inputs, [p.features for p in problems], config.isolated)
        measured = (acts.double() * scorer.weights).sum(1).tolist()
        objective, feature_map = f"maximize({site}, mean over the selection)", adapter.describe_features(site)
        for p, (problem, row) in enumerate(zip(problems, inputs.tolist())):
            best_ids, best_values = top_ids[col + p], top_values[col + p]
            results.append(FeatureResult(
                spec=problem.spec, site=str(site), method="exhaustive", objective=objective,
                token_ids=row, tokens=[name(t) for t in row], text=text(row),
                activation=measured[p], model=adapter.name, bos=adapter.bos, seed=config.seed,
                feature_map=None if feature_map is None else dict(feature_map), dtype=dtype, versions=stamp,
                extra={"prefix_length": len(prefix), "sweep_activation": best_values[0], "top_k": {
                    "token_ids": best_ids, "tokens": [name(t) for t in best_ids], "activations": best_values,
                }},
            ))
        col += P
    out = out_dir(config)
    if distributed()[0] == 0:
        meta = {"method": "exhaustive", "config": asdict(config), "model": adapter.name, "world_size": distributed()[1],
                "sites": [str(s) for s in sites], "prefix_ids": prefix.tolist()}
        write_plain_results(out, results, meta)  # what write_results writes, faster
    return SearchRun(results, out)
