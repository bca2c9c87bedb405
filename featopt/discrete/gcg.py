"""GCG over N real tokens (Zou et al. 2023, as in nanoGCG), for any objective: each step the
gradient of the loss w.r.t. a one-hot input proposes the `topk` best tokens per position,
`search_width` single swaps are scored exactly in batched forwards after the cached prefix that
stop at the deepest site the objective reads, and each problem keeps the best it has seen.

Every problem of the objective (every layer of a stacked one) is searched in the same batched
run; pooled (the default over several problems), one forward scores a candidate for every
problem (`Objective.loss_all`), so each problem keeps the best of all problems' candidates and a
sequence is forwarded once, whoever proposed it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from featopt.discrete.candidates import CandidateModel, prompt_xent
from featopt.discrete.measure import remeasure
from featopt.discrete.objective_scoring import ObjectiveLoss, check_discrete
from featopt.discrete.swap_search import SwapSettings, SwapState, swap_search
from featopt.models import ModelAdapter
from featopt.objectives import Objective
from featopt.objectives.problems import descriptions, feature_maps, labels
from featopt.results import FeatureResult, versions


def gcg(adapter: ModelAdapter, objective: Objective, *, prefix: Tensor, init: Tensor, allowed: Tensor,
        settings: SwapSettings, pool: bool = True, isolated: bool = False, batch_size: int = 0,
        on_step: Callable | None = None) -> SwapState:
    """Search from `init [P, N]` (row p solving problem p) after the fixed `prefix [L]`, swapping
    among the `allowed [K]` token ids; the final state (each row's best sequence and what it cost)."""
    check_discrete(objective, "GCG")
    model = CandidateModel(adapter, list(objective.sites), ObjectiveLoss(objective, adapter), prefix,
                           batch_size=batch_size, isolated=isolated)
    n = objective.n_problems
    return swap_search(model, init, torch.arange(n), allowed.to(adapter.device), settings,
                       pool=pool and n > 1, on_step=on_step)


def records(adapter: ModelAdapter, objective: Objective, state: SwapState, prefix: Tensor, init: Tensor, *, seed: int,
            isolated: bool = False) -> list[FeatureResult]:
    """One result per problem: its best sequence re-measured by a plain forward, with its search
    score, the model's own cross-entropy of it, what the search cost and its trajectory."""
    n = objective.n_problems
    ids = torch.cat([prefix.cpu().expand(n, -1), state.ids], dim=1)
    measured = remeasure(adapter, objective, ids, isolated=isolated)
    xent = prompt_xent(adapter, ids, len(prefix))
    results, stamp, described = [], versions(), descriptions(objective)
    maps = feature_maps(objective, adapter)
    for r, (site, spec) in enumerate(labels(objective)):
        row = ids[r].tolist()
        buffer_ids, buffer_total = state.buffers[r]
        results.append(FeatureResult(
            spec=spec, site=site, method="gcg", objective=described[r],
            token_ids=row, tokens=[adapter.decode([t]) for t in row], text=adapter.decode(row),
            activation=float(measured.activation[r]), model=adapter.name, bos=adapter.bos, seed=seed,
            feature_map=maps[r],
            dtype=str(adapter.dtype).replace("torch.", ""), versions=stamp,
            extra={"prefix_length": len(prefix), "per_position": measured.per_position[r],
                   "search_activation": -float(state.loss[r]), "score": float(measured.score[r]), "xent": float(xent[r]),
                   "forward_evaluations": int(state.evaluations[r]), "gradient_evaluations": state.steps_run,
                   "steps": state.steps_run, "trajectory": state.trajectory[r], "init_ids": init[r].tolist(),
                   "buffer": {"token_ids": buffer_ids.tolist(), "activations": (-buffer_total).tolist()}},
        ))
    return results
