"""Exhaustive single-token search (source document 000, "Complete Search Features"): every token of
the vocabulary as the input, `a_i = argmax_a O_f(a)`, exact for one-token inputs.

One batched pass over the vocabulary scores every problem of the objective at once (every layer
of a stacked one), so the features of a whole layer cost one sweep. With a fixed `prefix` the
candidate token comes after it (positions then index the whole sequence) and the prefix runs
once, cached.
"""

from __future__ import annotations

import torch
from torch import Tensor

from featopt.discrete.measure import remeasure
from featopt.discrete.objective_scoring import check_discrete, sweep_scorers
from featopt.discrete.scoring import TopK
from featopt.discrete.sweep import sweep
from featopt.discrete.wide_scoring import RawActs, plan
from featopt.models import ModelAdapter
from featopt.objectives import Maximize, Objective, Sum
from featopt.objectives.problems import descriptions, feature_maps, labels, parts, primary
from featopt.results import FeatureResult, versions


def exhaustive(adapter: ModelAdapter, objective: Objective, *, prefix: Tensor | None = None,
               candidates: Tensor | None = None, k: int = 10, batch_size: int = 0, isolated: bool = False,
               progress: bool = True, latent_chunk: int | None = None) -> TopK:
    """The top-k single tokens (after `prefix [L]`) of every problem: `values [k, P]` are the
    objective's scores (minus its loss), `ids [k, P]` the tokens, ties to the lower id.
    `latent_chunk`: score a wide SAE's latents in chunks of this many (see `sweep`)."""
    objective = objective.bind(adapter)  # a library caller may pass it unbound (widths from the model)
    check_discrete(objective, "the exhaustive sweep")
    prefix = torch.zeros(0, dtype=torch.long) if prefix is None else prefix
    scorers = sweep_scorers(objective, adapter, len(prefix) + 1)
    return sweep(adapter, scorers, prefixes=prefix[None] if len(prefix) else None, candidates=candidates, k=k,
                 batch_size=batch_size, isolated=isolated, progress=progress, desc="exhaustive",
                 latent_chunk=latent_chunk)


def is_maximize(objective: Objective) -> bool:
    """Whether every problem's score is its activation (a plain maximize, per layer)."""
    return all(isinstance(p, Maximize) or (isinstance(p, Sum) and len(p.terms) == 1 and p.terms[0][0] == 1
                                           and isinstance(p.terms[0][1], Maximize)) for p in parts(objective))


def measure(adapter: ModelAdapter, objective: Objective, inputs: Tensor, *, isolated: bool = False,
            latent_chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """`(score [P], activation [P])` float64 of row p of `inputs [P, T]` for problem p, by plain
    forwards: the single latents of a wide SAE chunk by chunk of latents (`wide_scoring`), every
    other problem by `remeasure`."""
    score = torch.zeros(len(inputs), dtype=torch.float64)
    activation = torch.zeros(len(inputs), dtype=torch.float64)
    rest = torch.ones(len(inputs), dtype=torch.bool)
    at = 0
    for part, (site, scorer) in zip(parts(objective), sweep_scorers(objective, adapter, inputs.shape[1])):
        n = scorer.n
        planned = plan(adapter, site, scorer, 256, latent_chunk) if site is not None else None
        if planned is not None:
            view = adapter.with_features(site, RawActs(planned.sae.d_in)) if planned.attached else adapter
            per_position = planned.measure(view, site, inputs[at:at + n], isolated=isolated)  # [n, T]
            weights = primary(part).position_weights(inputs.shape[1], dtype=torch.float64)
            score[at:at + n] = (per_position * scorer.weights.cpu()).sum(1)
            activation[at:at + n] = (per_position * weights.cpu()).sum(1)
            rest[at:at + n] = False
        at += n
    if bool(rest.any()):
        problems = rest.nonzero().squeeze(1)
        measured = remeasure(adapter, objective, inputs[problems], problems, isolated=isolated)
        score[problems], activation[problems] = measured.score, measured.activation
    return score, activation


def records(adapter: ModelAdapter, objective: Objective, topk: TopK, prefix: Tensor, *, seed: int,
            isolated: bool = False, latent_chunk: int | None = None) -> list[FeatureResult]:
    """One result per problem: its best token after the prefix, re-measured by a plain forward,
    with the sweep's top-k (`scores`; `activations` too where scores are activations)."""
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

    n = objective.n_problems
    inputs = torch.cat([prefix.expand(n, -1), ids[0, :, None]], dim=1)
    score, activation = measure(adapter, objective, inputs, isolated=isolated, latent_chunk=latent_chunk)
    plain = is_maximize(objective)
    stamp, dtype = versions(), str(adapter.dtype).replace("torch.", "")
    described = descriptions(objective)
    maps = feature_maps(objective, adapter)
    results = []
    for p, ((site, spec), row) in enumerate(zip(labels(objective), inputs.tolist())):
        best_ids, best_values = top_ids[p], top_values[p]
        top = {"token_ids": best_ids, "tokens": [name(t) for t in best_ids], "scores": best_values}
        if plain:
            top["activations"] = best_values
        results.append(FeatureResult(
            spec=spec, site=site, method="exhaustive", objective=described[p],
            token_ids=row, tokens=[name(t) for t in row], text=text(row),
            activation=float(activation[p]), model=adapter.name, bos=adapter.bos, seed=seed,
            feature_map=maps[p], dtype=dtype, versions=stamp,
            extra={"prefix_length": len(prefix), "sweep_activation": best_values[0],
                   "score": float(score[p]), "top_k": top},
        ))
    return results

