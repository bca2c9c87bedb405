"""Greedy left-to-right search (source document 000, "Greedy Search Features"): for n = 0..N-1,
`a_n = argmax_a score(a_0..a_{n-1}, a)`, every vocabulary token tried after the current prefix.

Variant `last` scores the feature at the last position (the document's `search_maximal`), `sum`
the sum over all positions (its modified version): selections with `over="last"` or `"sum"`.
Each step runs every distinct prefix once with caching and broadcasts its keys/values over the
candidates; the prefix positions' activations are constants of that forward, added rather than
recomputed. All problems (every layer and variant of a stacked objective) advance together in one
batched sweep per step; chains that share a prefix share its rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from featopt.discrete.measure import remeasure
from featopt.discrete.objective_scoring import check_discrete, sweep_scorers
from featopt.discrete.sweep import sweep
from featopt.models import ModelAdapter
from featopt.objectives import Objective
from featopt.objectives.problems import descriptions, feature_maps, labels
from featopt.results import FeatureResult, versions

VARIANTS = ("last", "sum", "both")


def greedy(adapter: ModelAdapter, objective: Objective, *, start: Tensor, tokens: int, candidates: Tensor | None = None,
           k: int = 5, batch_size: int = 0, progress: bool = True) -> tuple[Tensor, list[list[dict]]]:
    """Grow `tokens` tokens after `start [L]` for every problem: `(sequences [P, L + tokens],
    per problem the top-k of every step {token_ids, scores})`."""
    check_discrete(objective, "greedy search")
    seqs = start.expand(objective.n_problems, -1).clone()  # [P, L]: one input per problem
    steps: list[list[dict]] = [[] for _ in range(len(seqs))]
    for step in range(tokens):
        scorers = sweep_scorers(objective, adapter, seqs.shape[1] + 1)
        prefixes, groups = torch.unique(seqs, dim=0, return_inverse=True) if seqs.shape[1] else (None, None)
        topk = sweep(adapter, scorers, prefixes=prefixes, groups=groups, candidates=candidates, k=k,
                     batch_size=batch_size, progress=progress, desc=f"greedy {step + 1}/{tokens}")
        ids, values = topk.ids.cpu(), topk.values.cpu()
        for c in range(len(seqs)):
            steps[c].append({"token_ids": ids[:, c].tolist(), "activations": values[:, c].tolist()})
        seqs = torch.cat([seqs, ids[0][:, None]], dim=1)
    return seqs, steps


def records(adapter: ModelAdapter, objective: Objective, seqs: Tensor, steps: list[list[dict]], *, start_length: int,
            methods: list[str], seed: int) -> list[FeatureResult]:
    """One result per problem (`methods[p]` names its variant), re-measured by a plain forward."""
    measured = remeasure(adapter, objective, seqs)
    described, maps = descriptions(objective), feature_maps(objective, adapter)
    stamp, results = versions(), []
    for p, (site, spec) in enumerate(labels(objective)):
        row = seqs[p].tolist()
        results.append(FeatureResult(
            spec=spec, site=site, method=methods[p], objective=described[p],
            token_ids=row, tokens=[adapter.decode([t]) for t in row], text=adapter.decode(row),
            activation=float(measured.activation[p]), model=adapter.name, bos=adapter.bos, seed=seed,
            feature_map=maps[p],
            dtype=str(adapter.dtype).replace("torch.", ""), versions=stamp,
            extra={"prefix_length": start_length, "per_position": measured.per_position[p],
                   "search_activation": steps[p][-1]["activations"][0], "score": float(measured.score[p]),
                   "steps": steps[p]},
        ))
    return results


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
