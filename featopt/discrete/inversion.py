"""Discrete inversion (`featopt invert --method gcg`): recover texts from their outputs at a site
by searching over real tokens with GCG, under the same output-matching objectives (L1, cosine) as
the gradient inversion. One row per text; padded positions are never swapped and never scored.
A text stops being searched once its outputs match (distance 0 up to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from featopt.discrete.candidates import CandidateModel
from featopt.discrete.swap_search import SwapSettings, swap_search
from featopt.discrete.swaps import top_candidates
from featopt.discrete.trajectory import Trajectory
from featopt.models import ModelAdapter, Site
from featopt.objectives.matching import Batch, token_matches
from featopt.objectives.objective import Context, Objective
from featopt.results import FeatureResult, versions

#: A text counts as matched (and stops) when its distance is at most this share of its target's
#: scale (L1: of the target's own L1 norm; cosine: absolute): batched forwards differ by rounding.
MATCHED = 1e-5


def _position_distance(kind: str, acts: Tensor, target: Tensor) -> Tensor:
    """Distance of `acts [B, W]` to `target [B, W]` at one position, by the objective's kind."""
    if kind == "l1":
        return (acts - target).abs().sum(dim=-1)
    return 1 - F.cosine_similarity(acts.double(), target.double(), dim=-1)


def causal_pass(adapter: ModelAdapter, site, kind: str, target: Tensor, batch, current: Tensor, allowed: Tensor,
                topk: int, batch_size: int = 512, progress: bool = True, start: Tensor | None = None) -> tuple[Tensor, int]:
    """Left to right, place at each position the token whose output there is closest to the
    target's, given the tokens already placed (a causal model's output at position k depends on
    tokens 0..k only, so the true token scores 0 once the prefix is right). Candidates at k are
    the `topk` allowed tokens with the most negative gradient of that distance w.r.t. a one-hot
    input at k, each scored exactly by a one-token forward after the cached prefix.

    `current [P, T]` -> `(new ids [P, T], candidate sequences scored)`; `start [L]`: fixed tokens
    before every text (the BOS token of `--bos`), never searched."""
    P, T = current.shape
    start = torch.zeros(0, dtype=torch.long) if start is None else start.cpu()
    ids, scored = current.clone(), 0
    E = adapter.embedding
    k_top = min(topk, len(allowed))
    for k in tqdm(range(T), desc="invert gcg: causal pass", disable=not progress, leave=False):
        rows = batch.mask[:, k].nonzero()[:, 0]
        if not len(rows):
            continue
        prefix = torch.cat([start.expand(len(rows), -1), ids[rows, :k]], dim=1)
        with torch.no_grad():
            kv = adapter.prefix([site], prefix.to(adapter.device)) if prefix.shape[1] else None
        goal = target[rows, k].to(adapter.device)
        onehot = F.one_hot(ids[rows, k].to(E.device), E.shape[0]).to(E.dtype).requires_grad_(True)
        with torch.enable_grad():
            cache = kv.broadcast(torch.arange(len(rows))) if kv is not None else None
            acts = adapter.run([site], inputs_embeds=(onehot @ E)[:, None], cache=cache)[site][:, -1]
            (grad,) = torch.autograd.grad(_position_distance(kind, acts.float(), goal).sum(), onehot)
        top = top_candidates(grad[:, None], allowed, k_top)[:, 0].cpu()  # [rows, k_top]
        flat_row = torch.arange(len(rows)).repeat_interleave(k_top)
        flat_tok = top.reshape(-1)
        distance = torch.empty(len(flat_tok), dtype=torch.float64)
        with torch.inference_mode():
            for s in range(0, len(flat_tok), batch_size):
                r, t = flat_row[s:s + batch_size], flat_tok[s:s + batch_size]
                cache = kv.broadcast(r.to(adapter.device)) if kv is not None else None
                out = adapter.run([site], input_ids=t[:, None], cache=cache)[site][:, -1]
                distance[s:s + len(t)] = _position_distance(kind, out.float(), goal[r.to(goal.device)]).double().cpu()
        # argmin takes the first minimum: among equals, the token the gradient ranked higher.
        pick = top.gather(1, distance.view(len(rows), k_top).argmin(dim=1, keepdim=True))[:, 0]
        scored += len(flat_tok)
        ids[rows, k] = pick
    return ids, scored


@dataclass
class SwapInversion:
    """How the discrete inversion searches (`featopt invert --method gcg`'s flags)."""

    objective: str | None = "l1"  # the pure distance ("l1" or "cosine"); None: another objective (no causal pass, no early stop)
    steps: int = 600
    search_width: int = 256
    topk: int = 128
    n_replace: int = 1
    causal_topk: int = 4096  # candidates per position of the left-to-right pass (0: none)
    batch_size: int = 0
    seed: int = 0
    progress: bool = True


def invert(adapter: ModelAdapter, site: Site, batch: Batch, target: Tensor, objective: Objective, allowed: Tensor,
           how: SwapInversion, out: Path) -> tuple[list[FeatureResult], dict]:
    """Invert every text of `batch` at once by GCG under `objective` (a distance to the texts'
    outputs `target [P, T, W]`, as `how.objective` names it, or any objective over the texts'
    rows); one result per text and the overall metrics (TensorBoard scalars under `out/tensorboard`)."""
    kind = how.objective
    head = adapter.encode("")  # [BOS] with --bos (a fixed first token, never searched), else nothing

    def loss(acts, problems):  # the texts' positions only: the BOS is no part of the target
        return objective.loss(Context({s: a[:, len(head):] for s, a in acts.items()}, None, problems, adapter))

    def squared(acts, problems):  # L1's smooth surrogate for proposing swaps: its gradient points at the target
        a = acts[site][:, len(head):]
        t, m = target.to(a.device)[problems], batch.mask.to(a.device)[problems]
        return (torch.where(m[..., None], a - t, 0.0) ** 2).sum(dim=(1, 2))

    P, T = batch.ids.shape
    gen = torch.Generator().manual_seed(how.seed)
    init = torch.where(batch.mask, allowed[torch.randint(0, len(allowed), (P, T), generator=gen)], batch.ids)
    start, causal_scored = causal_pass(adapter, site, kind, target, batch, init, allowed.to(adapter.device),
                                       how.causal_topk, progress=how.progress, start=head) if how.causal_topk and kind else (init, 0)
    scale = target.abs().sum(dim=(1, 2)).double() if kind == "l1" else torch.ones(P, dtype=torch.float64)
    model = CandidateModel(adapter, list(dict.fromkeys((site, *objective.sites))), loss, head,
                           batch_size=how.batch_size, proposal=squared if kind == "l1" else None)
    settings = SwapSettings(steps=how.steps, search_width=how.search_width, topk=how.topk,
                            n_replace=how.n_replace, buffer_size=4, seed=how.seed, progress=how.progress,
                            desc="invert gcg", curvature=1.0 if kind == "l1" else 0.0)
    log = Trajectory(out, [f"invert-gcg/text{p}/activation" for p in range(P)])
    try:
        state = swap_search(model, start, torch.arange(P), allowed.to(adapter.device), settings, editable=batch.mask,
                            stop_below=MATCHED * scale if kind else None, on_step=log)
    finally:
        log.close()
    ids = torch.where(batch.mask, state.ids, batch.ids)
    correct, valid = token_matches(ids, batch.ids, batch.mask)
    with torch.inference_mode():
        acts = {s: a.float() for s, a in adapter.run(list(dict.fromkeys((site, *objective.sites))), input_ids=ids,
                                                     bos=adapter.bos).items()}
    distance = objective.loss(Context(acts, None, torch.arange(P), adapter)).cpu()
    metrics = {"token_recovery": float(correct.sum()) / float(valid.sum()),
               "exact_match": int((correct == valid).sum()) / P, "distance": float(distance.mean()),
               "tokens": int(valid.sum()), "tokens_recovered": int(correct.sum()), "texts": P,
               "texts_recovered": int((correct == valid).sum()),
               "forward_evaluations": causal_scored + int(state.evaluations.sum()),
               "steps": state.steps_run}
    stamp, results = versions(), []
    for p, text in enumerate(batch.texts):
        n = int(valid[p])
        row = ids[p, :n].tolist()
        results.append(FeatureResult(
            spec=text, site=str(site), method="gcg-inversion", objective=objective.description,
            token_ids=row, tokens=[adapter.decode([t]) for t in row], text=adapter.decode(row),
            activation=-float(distance[p]), model=adapter.name, bos=adapter.bos, seed=how.seed,
            dtype=str(adapter.dtype).replace("torch.", ""), versions=stamp,
            extra={"original_token_ids": batch.ids[p, :n].tolist(), "token_recovery": int(correct[p]) / n,
                   "tokens_recovered": int(correct[p]), "exact_match": bool(correct[p] == n),
                   "distance": float(distance[p]), "search_evaluations": int(state.evaluations[p]),
                   "trajectory": state.trajectory[p], "init_ids": init[p, :n].tolist(),
                   "after_causal_pass": start[p, :n].tolist()},
        ))
    return results, metrics
