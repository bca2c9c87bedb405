"""Greedy left-to-right search (source document 000, "Greedy Search Features"): for n = 0..N-1,
`a_n = argmax_a O_f(a | a_0..a_{n-1})`, every vocabulary token tried after the current prefix.

Variant `last` scores the feature at the last position (the document's `search_maximal`), `sum`
the sum over all positions (its modified version). Each step runs every distinct prefix once with
caching and broadcasts its keys/values over the candidates; the prefix positions' activations
are constants of that forward, added rather than recomputed. All problems, layers and variants
advance together in one batched sweep per step; chains that share a prefix share its rows.
`run(GreedyConfig(...))` is the one entry point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from featopt.errors import FeatoptError
from featopt.specs import parse_features
from featopt.models import ModelAdapter
from featopt.results import FeatureResult, versions, write_results
from featopt.discrete import common
from featopt.discrete.common import (
    SearchRun, check_common, load, out_dir, parse_candidates, per_position, sites_for, spawn,
)
from featopt.discrete.scoring import Scorer
from featopt.discrete.sweep import distributed, sweep
from featopt.discrete.tokens import check_length

__all__ = ["GreedyConfig", "run", "format_table", "agreement", "VARIANTS"]

VARIANTS = ("last", "sum", "both")


@dataclass
class GreedyConfig:
    """Settings of one greedy search (the flags of `featopt search greedy`)."""

    model: str = "tiny-gpt2"
    bos: bool = False  # start the model input with its BOS token (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    layer: int | str = 0  # one layer, or several: "0,3,7" or "0-3"
    site: str = "resid_post"  # or several kinds, "resid_post,mlp_out", each at every layer
    features: str = "[:, :, 0-3]"  # the position field must be ":" (the variant decides)
    tokens: int = 4  # N, tokens to add
    variant: str = "last"  # last position, sum over positions, or both (one run, shared rows)
    prefix: str | None = None  # fixed text to start from
    top_k: int = 5  # best candidates kept per step (in results' extra)
    candidates: str | None = None  # token ids to try ("0-4095"); default: the whole vocabulary
    batch_size: int = 0  # candidates per forward; 0: automatic, halved on out-of-memory
    untrained: bool = False
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    devices: int = 1  # processes; each step's candidates are sharded across them
    out: str | None = None
    progress: bool = True


def position_weights(variant: str, n_problems: int, n_tokens: int) -> torch.Tensor:
    """`[P, n_tokens]`: 1 at the last position (`last`) or at every position (`sum`)."""
    weights = torch.zeros(n_problems, n_tokens, dtype=torch.float64)
    weights[:, -1 if variant == "last" else slice(None)] = 1.0
    return weights


def run(config: GreedyConfig, adapter: ModelAdapter | None = None) -> SearchRun:
    """Grow `config.tokens` tokens greedily for every problem, layer and variant.

    Returns one result per (site, variant, problem) in that order, written to `out/results.json`.
    """
    check_common(config)
    if config.tokens < 1:
        raise FeatoptError(f"--tokens must be at least 1, got {config.tokens}.")
    if config.variant not in VARIANTS:
        raise FeatoptError(f"--variant {config.variant!r} is not known: allowed are {', '.join(VARIANTS)}.")
    if config.devices > 1 and distributed()[1] == 1:
        return spawn(run, config, adapter)
    adapter = load(config, adapter)
    plans = []  # (site, variant, problems): one chain of problems each, every one with its own input
    for site in sites_for(adapter, config):
        problems = parse_features(config.features, width=adapter.width(site), site=str(site))
        if any(p.positions is not None for p in problems):
            raise FeatoptError(f"greedy search needs the position field \":\" in {config.features!r}: "
                               "the variant chooses the positions (last, or sum over all).")
        variants = ["last", "sum"] if config.variant == "both" else [config.variant]
        plans += [(site, variant, problems) for variant in variants]
    candidates = parse_candidates(config.candidates, adapter.vocab_size)
    k = min(config.top_k, adapter.vocab_size if candidates is None else len(candidates))
    start = adapter.encode(config.prefix)  # [BOS] alone when --bos and no prefix
    check_length(adapter, len(start), config.tokens)
    seqs = start.expand(sum(len(problems) for *_, problems in plans), -1).clone()  # [C, L]: one input per problem
    steps: list[list[dict]] = [[] for _ in range(len(seqs))]
    for step in range(config.tokens):
        n_tokens = seqs.shape[1] + 1
        scorers = [(site, Scorer([p.features for p in ps], adapter.width(site), position_weights(variant, len(ps), n_tokens)))
                   for site, variant, ps in plans]
        prefixes, groups = torch.unique(seqs, dim=0, return_inverse=True) if seqs.shape[1] else (None, None)
        topk = sweep(adapter, scorers, prefixes=prefixes, groups=groups, candidates=candidates, k=k,
                     batch_size=config.batch_size, progress=config.progress, desc=f"greedy {step + 1}/{config.tokens}")
        ids, values = topk.ids.cpu(), topk.values.cpu()
        for c in range(len(seqs)):
            steps[c].append({"token_ids": ids[:, c].tolist(), "activations": values[:, c].tolist()})
        seqs = torch.cat([seqs, ids[0][:, None]], dim=1)
    results, stamp, col = [], versions(), 0
    for site, variant, problems in plans:
        inputs = seqs[col:col + len(problems)]
        acts = per_position(adapter, site, inputs, [p.features for p in problems]).double()  # [P, T], a plain forward
        measured = acts[:, -1] if variant == "last" else acts.sum(1)
        for p, problem in enumerate(problems):
            row, c = inputs[p].tolist(), col + p
            results.append(FeatureResult(
                spec=problem.spec, site=str(site), method=f"greedy-{variant}",
                objective=f"maximize({site}, {'last position' if variant == 'last' else 'sum over positions'})",
                token_ids=row, tokens=[adapter.decode([t]) for t in row], text=adapter.decode(row),
                activation=float(measured[p]), model=adapter.name, bos=adapter.bos, seed=config.seed,
                feature_map=adapter.describe_features(site),
                dtype=str(adapter.dtype).replace("torch.", ""), versions=stamp,
                extra={"prefix_length": len(start), "per_position": acts[p].tolist(),
                       "search_activation": steps[c][-1]["activations"][0], "steps": steps[c]},
            ))
        col += len(problems)
    out = out_dir(config)
    if distributed()[0] == 0:
        meta = {"method": "greedy", "config": asdict(config), "model": adapter.name, "world_size": distributed()[1],
                "sites": list(dict.fromkeys(str(site) for site, *_ in plans)), "prefix_ids": start.tolist()}
        write_results(out, results, {**meta, "variant_agreement": agreement(results)})
    return SearchRun(results, out)


def agreement(results: list[FeatureResult]) -> dict[str, dict[str, int]]:
    """Per site, with both variants: how many problems got the same tokens from `last` and `sum`,
    and how many of their positions agree (the document says all do); `{}` with one variant."""
    last = {(r.site, r.spec): r.token_ids for r in results if r.method == "greedy-last"}
    counts: dict[str, dict[str, int]] = {}
    for r in results:
        if r.method == "greedy-sum" and (r.site, r.spec) in last:
            a, c = last[(r.site, r.spec)], counts.setdefault(r.site, dict.fromkeys(
                ("problems", "same_tokens", "positions", "same_positions"), 0))
            c["problems"] += 1
            c["same_tokens"] += a == r.token_ids
            c["positions"] += len(a)
            c["same_positions"] += sum(x == y for x, y in zip(a, r.token_ids))
    return counts


def format_table(results: list[FeatureResult], **kw) -> str:
    """The documents' table, then (with both variants) how often they agree at each site."""
    lines = [common.format_table(results, **kw)]
    for site, c in agreement(results).items():
        lines.append(f"{site}: last and sum give the same tokens for {c['same_tokens']}/{c['problems']} problems, "
                     f"{c['same_positions']}/{c['positions']} positions")
    return "\n".join(lines)
