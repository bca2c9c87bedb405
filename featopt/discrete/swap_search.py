"""The loop GCG and EPO share: token gradients propose swaps, a batch of swaps is scored exactly,
each row keeps the best it has seen.

Rows are searched sequences; each row belongs to a problem (its objective) and carries a fluency
weight lambda (0 for plain GCG): its total loss is `loss + lambda * max(xent - floor, 0)`, the floor
0 (plain EPO: xent is never negative) unless a row is given one (a fluency budget: the row climbs
its objective freely while its xent stays under the floor). With `share`, every row
of a problem picks from the candidates of all rows of that problem (EPO's population: one member
per lambda, selection per lambda), otherwise from its own. A row's current sequence is the best of
its buffer (the `buffer_size` best distinct sequences it has seen), so its loss never rises.

With `pool` (GCG over many features: every problem reads the same forward, only its readout
differs), every candidate is scored for every problem, so each problem's buffer takes the best of
all problems' candidates, and a sequence proposed by several problems is forwarded once (counted
against the first that proposed it). Features that share an optimum (at deep layers of a model
without BOS, a few tokens that escape the first position's attention-sink state) find it together.
Pooled rows may carry fluency weights too (EPO over many features): a sequence's cross-entropy is
its own, whatever the problem, so the one forward to the LM head serves every row of every problem,
and each row ranks every candidate by its own problem's loss plus its own lambda times that xent.

Multi-process: every rank proposes the same candidates (rank 0's are broadcast), scores a
contiguous shard, and the shards' scores are gathered, so K processes follow the same path as one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from featopt.discrete.candidates import CandidateModel
from featopt.discrete.swaps import Seen, distinct, sample_swaps, step_penalty, top_candidates
from featopt.discrete.sweep import distributed, shard


@dataclass
class SwapSettings:
    """How the swap search proposes and keeps candidates (nanoGCG's names)."""

    steps: int = 100
    search_width: int = 512  # candidates proposed per row and step
    topk: int = 256  # tokens per position to sample swaps from (doubled for a row that found nothing new)
    n_replace: int = 1  # positions swapped per candidate
    buffer_size: int = 4  # best distinct sequences kept per row
    max_evaluations: int = 0  # per problem; 0: no limit
    curvature: float = 0.0  # weight of ||E_v - e_current||^2 added to the gradient when ranking swaps
    seed: int = 0
    progress: bool = True
    desc: str = "gcg"


@dataclass
class Evaluated:
    """One step's scored candidates: `ids [C, N]`, `problems [C]` (who proposed each), `loss [C]`
    (that problem's), `xent [C] or None`, and when pooled `all [C, P]`: every problem's loss."""

    ids: Tensor
    problems: Tensor
    loss: Tensor
    xent: Tensor | None
    all: Tensor | None = None


@dataclass
class SwapState:
    """Where the search is: per row its current (best) sequence and scores, and what it cost."""

    ids: Tensor  # [R, N]
    loss: Tensor  # [R] objective loss of ids
    xent: Tensor | None  # [R]
    total: Tensor  # [R] loss + lambda * max(xent - floor, 0), what the row minimizes
    buffers: list[tuple[Tensor, Tensor]]  # per row: (ids [B, N], total [B]) best first
    evaluations: Tensor  # [P] candidate sequences scored per problem
    trajectory: list[list[float]] = field(default_factory=list)  # per row: -loss after each step
    steps_run: int = 0


def _gather(values: Tensor, n: int) -> Tensor:
    """Every rank's shard `[n_r, ...]` of an `n`-row tensor, concatenated in rank order."""
    rank, world = distributed()
    if world == 1:
        return values
    size = -(-n // world)
    padded = values.new_zeros(size, *values.shape[1:])
    padded[:len(values)] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([parts[r][:shard(n, r, world)[1] - shard(n, r, world)[0]] for r in range(world)])


def _broadcast(tensor: Tensor) -> Tensor:
    """Rank 0's `tensor` on every rank (the shapes may differ between ranks)."""
    rank, world = distributed()
    if world == 1:
        return tensor
    shape = torch.tensor(list(tensor.shape), dtype=torch.long)
    dist.broadcast(shape, 0)
    out = tensor if rank == 0 else torch.empty(*shape.tolist(), dtype=tensor.dtype)
    dist.broadcast(out.contiguous(), 0)
    return out


def _score(model: CandidateModel, ids: Tensor, problems: Tensor) -> tuple[Tensor, Tensor | None]:
    """Exact scores of every candidate, each rank scoring its contiguous shard."""
    rank, world = distributed()
    start, stop = shard(len(ids), rank, world)
    loss, xent = model.evaluate(ids[start:stop], problems[start:stop])
    # Clones: inference tensors cannot be updated in place outside inference mode.
    loss, xent = loss.clone(), (xent.clone() if xent is not None else None)
    loss = _gather(loss, len(ids))
    return loss, (_gather(xent, len(ids)) if xent is not None else None)


def _score_all(model: CandidateModel, ids: Tensor) -> tuple[Tensor, Tensor | None]:
    """Every problem's loss of every candidate `[C, P]`, and each candidate's xent `[C]` when the
    model computes it (each rank scoring its shard)."""
    rank, world = distributed()
    start, stop = shard(len(ids), rank, world)
    loss, xent = model.evaluate_all(ids[start:stop])
    return _gather(loss.clone(), len(ids)), (_gather(xent.clone(), len(ids)) if xent is not None else None)


def _above(lam: Tensor, floor: Tensor, xent: Tensor) -> Tensor:
    """The fluency term `lam * max(xent - floor, 0)` (with floor 0, EPO's `lam * xent`)."""
    return lam * (xent - floor).clamp(min=0)


def _keep(buffer: tuple[Tensor, Tensor], ids: Tensor, total: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """The `size` lowest-total sequences of the buffer and the new ones (buffer first on ties)."""
    all_ids, all_total = torch.cat([buffer[0], ids]), torch.cat([buffer[1], total])
    order = torch.sort(all_total, stable=True).indices[:size]
    return all_ids[order], all_total[order]


def swap_search(model: CandidateModel, init: Tensor, problems: Tensor, allowed: Tensor, settings: SwapSettings, *,
                lam: Tensor | None = None, floor: Tensor | None = None, share: bool = False,
                editable: Tensor | None = None,
                stop_below: Tensor | None = None, pool: bool = False, seeds: Tensor | None = None,
                seed_problems: Tensor | None = None, likely: Tensor | None = None,
                on_step: Callable[[int, SwapState, Evaluated], None] | None = None) -> SwapState:
    """Run the search from `init [R, N]` (row r solving problem `problems[r]`, fluency weight
    `lam[r]`, default 0, above a cross-entropy `floor[r]`, default 0), swapping only
    `editable [R, N]` positions among `allowed [K]` ids.

    A row whose total falls to `stop_below[r]` or under (an exact inversion) stops searching; the
    search ends when every row has. `pool` scores every candidate for every problem (see the
    module docstring; needs `model.evaluate_all`, and no `share` or `editable`). `seeds [S, N]`
    (pooled only) are scored with the starts and enter every row's buffer by their totals, but
    no row starts from them (a corpus window for each example, where rows are one per lambda);
    `seed_problems [S]` names who brought each (for the evaluation counts; default problem 0).
    `likely [R]` (a model with xent): row r draws its swaps among the model's own `likely[r]` most
    probable tokens at each position, ranked by the gradient (0: among all; see
    `CandidateModel.gradient`).
    `on_step(step, state, evaluated)` is called after every step (step 0: the initial sequences).
    """
    if pool and (share or editable is not None):
        raise ValueError("pool scores whole sequences for every problem: not with share or editable")
    if seeds is not None and not pool:
        raise ValueError("seeds are scored for every problem: only with pool")
    R, N = init.shape
    n_problems = int(problems.max()) + 1
    lam = torch.zeros(R, dtype=torch.float64) if lam is None else lam.double()
    floor = torch.zeros(R, dtype=torch.float64) if floor is None else floor.double()
    wants_xent = bool((lam != 0).any())
    gen = torch.Generator().manual_seed(settings.seed)
    seen = Seen(N, settings.seed)
    init = init.cpu()
    if pool:
        # The starts too: each distinct one forwarded once and kept in every buffer, but each row
        # takes its first gradient step from its own start. (Starting every row from the best
        # start begins a spec's rows at one or two tokens, whose first proposals overlap: at
        # layer 8 of SmolLM2 that found the one-token optimum for 17 of 20 features, own starts 20.)
        first, first_problems = init, problems
        if seeds is not None and len(seeds):
            owners_of_seeds = torch.zeros(len(seeds), dtype=torch.long) if seed_problems is None else seed_problems.cpu()
            first, first_problems = torch.cat([init, seeds.cpu()]), torch.cat([problems, owners_of_seeds])
        starts, owners = distinct(first, first_problems, across=True)
        start_all, start_xent = _score_all(model, starts)  # [S, P], [S] or None
        fluency = start_xent if start_xent is not None else torch.zeros(len(starts), dtype=torch.float64)
        buffers = [_keep((starts[:0], start_all[:0, 0]), starts, start_all[:, problems[r]] + _above(lam[r], floor[r], fluency),
                         settings.buffer_size) for r in range(R)]
        own = (init[:, None, :] == starts[None]).all(-1).long().argmax(1)  # [R] each row's start among starts
        loss = start_all[own, problems]
        xent = start_xent[own] if start_xent is not None else None
        evaluated = Evaluated(starts, owners, start_all[torch.arange(len(starts)), owners], start_xent, start_all)
    else:
        loss, xent = _score(model, init, problems)
        starts, owners = init, problems
        buffers = None
        evaluated = Evaluated(init, problems, loss, xent)
    total = loss + (_above(lam, floor, xent) if xent is not None else 0)
    seen.add(starts, torch.zeros_like(owners) if pool else owners)
    state = SwapState(init.clone(), loss, xent, total, buffers or [(init[r:r + 1], total[r:r + 1]) for r in range(R)],
                      torch.bincount(owners, minlength=n_problems), trajectory=[[-float(v)] for v in loss])
    if on_step:
        on_step(0, state, evaluated)
    # A row whose proposals were all scored before is stuck at this top-k: widen it (doubling, up
    # to every allowed token) until it finds new sequences; back to `topk` once it improves.
    likely = torch.zeros(R, dtype=torch.long) if likely is None else likely.long().cpu()
    base_k = torch.where(likely > 0, likely.clamp(max=settings.topk), settings.topk).clamp(max=len(allowed))
    row_k = base_k.clone()
    bar = tqdm(range(1, settings.steps + 1), desc=settings.desc, unit="step",
               disable=not settings.progress or distributed()[0] != 0, leave=False)
    for step in bar:
        left = settings.max_evaluations - int(state.evaluations.max()) if settings.max_evaluations else None
        if left is not None and left <= 0:
            break
        width = settings.search_width if left is None else min(settings.search_width, left // max(1, R // n_problems))
        active = torch.ones(R, dtype=torch.bool) if stop_below is None else state.total > stop_below
        if width < 1 or not active.any():
            break
        live = active.nonzero()[:, 0]
        grad = model.gradient(state.ids[live], problems[live], lam[live] if wants_xent else None,
                              floor[live] if wants_xent else None, likely[live] if bool(likely.any()) else None, allowed)
        penalty = settings.curvature * step_penalty(model.adapter.embedding, state.ids[live]) if settings.curvature else None
        top = top_candidates(grad, allowed, int(row_k[live].max()), penalty)
        rows_editable = editable[live] if editable is not None else None
        proposed = sample_swaps(state.ids[live], top, width, settings.n_replace, gen, rows_editable,
                                row_k[live])  # [R', W, N]
        origin = live.repeat_interleave(width)
        keys = problems[origin] if share else origin
        # Pooled: one sequence is one forward whoever proposed it, so repeats are dropped across rows.
        cands, keys = distinct(proposed.reshape(-1, N), keys, across=pool)
        cand_problems = keys if share else problems[keys]
        seen_keys = torch.zeros_like(cand_problems) if pool else cand_problems
        fresh = seen.new(cands, seen_keys)
        cands, keys, cand_problems = _broadcast(cands[fresh]), _broadcast(keys[fresh]), _broadcast(cand_problems[fresh])
        before = state.total.clone()
        c_all = None  # [C, P] when pooled
        if len(cands):
            if pool:
                c_all, c_xent = _score_all(model, cands)
                c_loss = c_all[torch.arange(len(cands)), cand_problems]
            else:
                c_loss, c_xent = _score(model, cands, cand_problems)
            seen.add(cands, torch.zeros_like(cand_problems) if pool else cand_problems)
            state.evaluations += torch.bincount(cand_problems, minlength=n_problems)
            for r in range(R):
                if pool:
                    c_total = c_all[:, problems[r]] + (_above(lam[r], floor[r], c_xent) if c_xent is not None else 0)
                    state.buffers[r] = _keep(state.buffers[r], cands, c_total, settings.buffer_size)
                    continue
                mine = (cand_problems == problems[r]) if share else (keys == r)
                if not mine.any():
                    continue
                c_total = c_loss[mine] + (_above(lam[r], floor[r], c_xent[mine]) if c_xent is not None else 0)
                state.buffers[r] = _keep(state.buffers[r], cands[mine], c_total, settings.buffer_size)
        else:
            c_loss, c_xent = torch.zeros(0, dtype=torch.float64), None
        _adopt_best(state, model, problems, cands, cand_problems, c_loss, c_xent, c_all)
        for r in live.tolist():
            found = (keys == (problems[r] if share else r)).any()
            if state.total[r] < before[r]:
                row_k[r] = base_k[r]
            elif not found:
                row_k[r] = min(2 * int(row_k[r]), len(allowed))
        for r in range(R):
            state.trajectory[r].append(-float(state.loss[r]))
        state.steps_run = step
        bar.set_postfix(best=f"{float(-state.loss.mean()):.4g}")
        if on_step:
            on_step(step, state, Evaluated(cands, cand_problems, c_loss, c_xent, c_all))
    bar.close()
    return state


def _adopt_best(state: SwapState, model: CandidateModel, problems: Tensor, cands: Tensor, cand_problems: Tensor,
                c_loss: Tensor, c_xent: Tensor | None, c_all: Tensor | None = None) -> None:
    """Each row moves to its buffer's best; its loss and xent are looked up among this step's
    candidates (`c_all [C, P]`: every problem's loss, when pooled), or kept when the best is the
    row's own current sequence."""
    for r, (ids, total) in enumerate(state.buffers):
        best = ids[0]
        if torch.equal(best, state.ids[r]):
            continue
        hit = (cands == best).all(dim=1)
        if c_all is None:
            hit &= cand_problems == problems[r]
        at = int(hit.nonzero()[0]) if len(cands) and hit.any() else None
        if at is None:  # a buffer entry from an earlier step: score it again (rare, cheap)
            loss, xent = _score(model, best[None], problems[r:r + 1])
            state.loss[r], xent_r = loss[0], (xent[0] if xent is not None else None)
        elif c_all is not None:
            state.loss[r], xent_r = c_all[at, problems[r]], (c_xent[at] if c_xent is not None else None)
        else:
            state.loss[r], xent_r = c_loss[at], (c_xent[at] if c_xent is not None else None)
        if state.xent is not None and xent_r is not None:
            state.xent[r] = xent_r
        state.ids[r], state.total[r] = best, total[0]
