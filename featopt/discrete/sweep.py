"""One batched pass over candidates: every (prefix, token) pair, scored for every problem at once.

Rows of the sweep are the pairs `(g, token)` for the G prefixes and the candidate tokens, in that
order. Each prefix runs once with caching and its keys/values are broadcast over the batch, so a
candidate costs one new token through the blocks up to the deepest site (the forward stops
there). Only the running top-k per problem is kept: memory is a few batches (at most
`MERGE_BATCHES`, `MERGE_BYTES` of activations) plus `[k, problems]`.
With several processes the rows are split into contiguous shards and the top-k are merged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from featopt import memory
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site
from featopt.discrete.scoring import Scorer, TopK, merge_topk
from featopt.discrete.wide_scoring import RawActs, plan
from featopt.runs.processes import distributed

#: Rows per batch when none is given: large on a GPU (halved on out-of-memory), modest on CPU.
AUTO_BATCH = {"cuda": 8192, "cpu": 512}
#: The shortcut of `sweep` keeps batches (their activations) and merges their best rows, which
#: tightens its thresholds: after as many batches as it has merged, over MERGE_GROWTH (so often
#: while the top-k improves fast, at first), at most MERGE_BATCHES, or once they hold MERGE_BYTES.
MERGE_BATCHES, MERGE_GROWTH, MERGE_BYTES = 8, 2, 64 << 20


def is_oom(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or another device's RuntimeError saying so (the CPU allocator's
    "not enough memory", MPS's "out of memory")."""
    message = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message or "not enough memory" in message


def shard(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows `[start, stop)` of `rank`: contiguous, so shard order is candidate order."""
    if not 0 <= rank < world_size:
        raise FeatoptError(f"rank {rank} is out of range: with world size {world_size} ranks are 0-{world_size - 1}.")
    return n_rows * rank // world_size, n_rows * (rank + 1) // world_size


def gather_topk(topk: TopK) -> TopK:
    """Every rank's top-k merged (in rank order, so ties still go to the lower token id)."""
    world = dist.get_world_size()
    values = [torch.empty_like(topk.values) for _ in range(world)]
    ids = [torch.empty_like(topk.ids) for _ in range(world)]
    dist.all_gather(values, topk.values.contiguous())
    dist.all_gather(ids, topk.ids.contiguous())
    parts = []
    for v, i in zip(values, ids):
        part = TopK(topk.k, v.shape[1], v.dtype, v.device)
        part.values, part.ids = v, i
        parts.append(part)
    return merge_topk(parts)


def _part(site: Site | None, acts: dict[Site, Tensor]):
    """What a scorer reads: its site's activations, or all of them (an objective's scorer, site None)."""
    return acts if site is None else acts[site]


@torch.inference_mode()
def sweep(
    adapter: ModelAdapter,
    scorers: Sequence[tuple[Site, Scorer]],
    *,
    prefixes: Tensor | None = None,
    groups: Tensor | None = None,
    candidates: Tensor | None = None,
    k: int = 1,
    batch_size: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    isolated: bool = False,
    progress: bool = True,
    desc: str = "sweep",
    latent_chunk: int | None = None,
) -> TopK:
    """Score every candidate continuation for every problem; keep the top-k per problem.

    Args:
        scorers: `(site, Scorer)` pairs, or `(None, scorer)` for a scorer that reads several sites
            (`ObjectiveScorer`); score columns are the scorers' problems concatenated.
        prefixes: `[G, L]` token ids (None or L = 0: single-token candidates, G = 1).
        groups: `[P_total]` the prefix of each problem column (None: all use prefix 0); a
            problem only ranks candidates that continue its own prefix.
        candidates: `[V]` token ids to try, in increasing order so that ties go to the lower id
            (default: the whole vocabulary).
        rank, world_size: this process's shard (default: from torch.distributed, else 0 of 1);
            with an initialized process group the shards' top-k are merged on every rank,
            without one the result is this shard's top-k (merge with `merge_topk`).
        batch_size: rows per forward (0: automatic); halved and retried on out-of-memory.
        latent_chunk: score the single latents of a wide SAE in chunks of this many latents
            (`wide_scoring`); None: chunks, of a size that fits, only where `[batch, d_sae]` would not.
    Returns:
        `TopK` with `values [k, P_total]` and candidate token `ids [k, P_total]`.
    """
    # a selection made from an SAE (`latent(sae)`) names its site as a string: one key type for the activations
    scorers = [(adapter.site(site) if isinstance(site, str) else site, scorer) for site, scorer in scorers]
    sites = list(dict.fromkeys(s for site, scorer in scorers for s in ([site] if site is not None else scorer.sites)))
    device = adapter.device
    if candidates is None:
        candidates = torch.arange(adapter.vocab_size)
    candidates = candidates.to(device)
    kv = None
    n_groups = 1 if prefixes is None else max(prefixes.shape[0], 1)
    size = batch_size or AUTO_BATCH.get(device.type, AUTO_BATCH["cpu"])
    # Sized before allocating: on a CPU the OOM killer strikes before an out-of-memory error can be caught.
    size = memory.fit_batch(size, memory.forward_row_bytes(adapter.model.config, 1), device, flag="--batch_size",
                            what="the sweep")
    # The single latents of a wide SAE are scored chunk by chunk of latents from the site's raw
    # activation (`wide_scoring`): the model runs a view that yields it where the SAE is attached,
    # and the other scorers of that site get the SAE's latents from it (`dense`).
    wides = [plan(adapter, site, scorer, size, latent_chunk) if n_groups == 1 else None for site, scorer in scorers]
    raw: dict[Site, object] = {site: adapter.feature_map(site) for (site, _), w in zip(scorers, wides)
                               if w is not None and w.attached}
    run_view = adapter
    for site, feature_map in raw.items():
        run_view = run_view.with_features(site, RawActs(feature_map.d_in))

    def dense(acts: dict[Site, Tensor]) -> dict[Site, Tensor]:
        return {s: raw[s].features(a) if s in raw else a for s, a in acts.items()}

    # the raw sites that a scorer other than a wide one reads (it gets the SAE's latents there)
    shared = {s for (site, scorer), w in zip(scorers, wides) if w is None
              for s in ([site] if site is not None else scorer.sites) if s in raw}

    if prefixes is not None and prefixes.shape[1] > 0:
        if isolated:
            raise FeatoptError("an isolated block cannot be searched after a prefix: drop the prefix or the isolation.")
        kv = run_view.prefix(sites, prefixes.to(device))
    for site, scorer in scorers:
        scorer.set_prefix(None if kv is None else _part(site, dense(kv.acts)))
    n_problems = sum(scorer.n for _, scorer in scorers)
    groups = torch.zeros(n_problems, dtype=torch.long) if groups is None else groups
    groups = groups.to(device)
    if rank is None or world_size is None:
        rank, world_size = distributed()
    start, stop = shard(n_groups * len(candidates), rank, world_size)
    topk = TopK(k, n_problems, device=device)

    offsets = torch.tensor([0] + [scorer.n for _, scorer in scorers]).cumsum(0).tolist()
    spans = list(zip(offsets, offsets[1:]))  # each scorer's columns
    # With one prefix, a scorer whose problems are single features takes the shortcut (see
    # `Scorer.threshold`): once the top-k is full, a batch costs its forward and one pass for its
    # blocks' maxima (`Scorer.blocks`, while it is in cache), and is kept. Every few batches, a
    # threshold per problem under which no row can enter the top-k is found; the rows of the
    # kept blocks whose maximum is above it are read, those above it scored in float64 and merged
    # (`Scorer.above`, `TopK.add`). Every row is scored while the top-k fills, and always for the
    # other scorers.
    fast = [n_groups == 1 and w is None and scorer.shortcut() for (_, scorer), w in zip(scorers, wides)]
    kept: list[list[tuple[Tensor, Tensor]]] = [[] for _ in scorers]  # per scorer, `blocks` not merged yet
    kept_tokens: list[Tensor] = []  # the token ids of their batches
    seen = 0  # rows scored so far
    merged = [0]  # rows merged by the shortcut so far

    def merge() -> None:
        """Merge the kept batches' rows that can enter the top-k (`Scorer.above`)."""
        if not kept_tokens:
            return
        tokens = torch.cat(kept_tokens) if len(kept_tokens) > 1 else kept_tokens[0]
        for i, ((site, scorer), (c0, c1)) in enumerate(zip(scorers, spans)):
            if kept[i]:
                u = scorer.threshold(topk.values[-1, c0:c1], kept[i][0][0].dtype)
                scores, rows, columns = scorer.above(kept[i], u)
                topk.add(scores, tokens.index_select(0, rows), columns + c0)
                kept[i].clear()
        merged[0] += len(tokens)
        kept_tokens.clear()

    def score(lo: int, hi: int) -> tuple[list[tuple[Tensor, Tensor, Tensor | None]], dict, Tensor, dict]:
        """Rows `lo..hi-1` -> `(merges, found, tokens, raw)`: every row's scores for the problems that
        need them, as `(scores, ids, columns)` for `TopK.update`, per shortcut scorer its `blocks`,
        and per wide scorer its site's raw activation."""
        if n_groups == 1:  # the rows are the candidates
            group, tokens = None, candidates[lo:hi]
            cache = kv.broadcast(torch.zeros(hi - lo, dtype=torch.long, device=device)) if kv is not None else None
        else:
            rows = torch.arange(lo, hi, device=device)
            group, tokens = rows // len(candidates), candidates[rows % len(candidates)]
            cache = kv.broadcast(group)
        acts = run_view.run(sites, input_ids=tokens[:, None], cache=cache, isolated=isolated)
        if n_groups > 1:
            scores = torch.cat([scorer(_part(site, acts), group) for site, scorer in scorers], dim=1)
            # A candidate only counts for the problems whose prefix it continues; a batch of
            # contiguous rows spans few prefixes, so only their problems are merged.
            columns = torch.isin(groups, group.unique()).nonzero().squeeze(1)
            scores = scores[:, columns].masked_fill(group[:, None] != groups[columns][None, :], float("-inf"))
            return [(scores, tokens, columns)], {}, tokens, {}
        merges, found, wide_acts = [], {}, {}
        read = {**acts, **dense({s: acts[s] for s in shared})}  # what the other scorers read
        for i, ((site, scorer), (c0, c1)) in enumerate(zip(scorers, spans)):
            if wides[i] is not None:
                wide_acts[i] = acts[site]
            elif fast[i] and seen >= k:
                found[i] = scorer.blocks(_part(site, read))
            else:
                columns = None if len(scorers) == 1 else torch.arange(c0, c1, device=device)
                merges.append((scorer(_part(site, read)), tokens, columns))
        return merges, found, tokens, wide_acts

    bar = tqdm(total=stop - start, desc=desc, unit="tok", disable=not progress or rank != 0, leave=False)
    at = start
    while at < stop:
        end = min(at + size, stop)
        try:
            merges, found, tokens, wide_acts = score(at, end)
        except RuntimeError as error:
            if not is_oom(error) or size == 1:
                raise
            failed = True
        else:
            failed = False
        if failed:  # outside the except block, so the failed batch's tensors are freed
            size = max(1, size // 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        for scores, ids, columns in merges:
            topk.update(scores, ids, columns)
        for i, acts in wide_acts.items():  # outside the retry: a wide scorer merges as it goes
            wides[i].update(acts, tokens, topk, spans[i][0])
        if found:
            for i, part in found.items():
                kept[i].append(part)
            kept_tokens.append(tokens)
            held = sum(a.numel() * a.element_size() for parts in kept for a, _ in parts)
            due = min(MERGE_BATCHES, max(1, merged[0] // (MERGE_GROWTH * len(tokens))))
            if len(kept_tokens) >= due or held >= MERGE_BYTES:
                merge()
        seen += end - at
        bar.update(end - at)
        at = end
    merge()
    for w, (c0, _) in zip(wides, spans):
        if w is not None:
            w.finish(topk, c0, candidates[start:stop])
    bar.close()
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        topk = gather_topk(topk)
    return topk
