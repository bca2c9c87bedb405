"""The sweep over the latents of a wide SAE, a chunk of latents at a time (`sae.wide`).

A `Scorer` whose problems are single latents of an SAE (attached to the model view with
`with_features`, or the scorer's own feature map: the SAE, its `pre_activation_map` or its
`firing_map`) would read `[batch, 1, d_sae]` latents and score them as `[batch, P]` float64: gigabytes
for 1M latents. Here the sweep reads the site's raw activation and this class encodes it chunk by
chunk of latents, each chunk updating the running top-k of its own problems only:

- *positive* mode (an SAE's latents, every weight positive): latents are `>= 0`, so only the
  positive ones can rank above a latent that is 0; only those above the problem's threshold (see
  `Scorer.threshold`) are merged (`TopK.add`), and at the end the places left are filled with the
  lowest candidate ids whose latent is 0, exactly what the dense sweep returns (the zeros tie, so
  the lower ids win; a latent that never fires gets the first k candidates). A topk SAE is read
  sparsely: each row's k kept latents, never a dense chunk.
- *general* mode (readouts, which go below 0, or a negative weight): each chunk is merged densely
  while its problems' top-k are not full, then only the entries above the thresholds.

Scores are computed exactly as `Scorer.__call__` computes them, so the top-k equal the dense sweep's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from featopt import memory
from featopt.discrete.scoring import Scorer, TopK
from featopt.models.sae import wide
from featopt.models.sae.readouts import FiringScores, PreActivations

#: The dense path's bytes per (row, latent): the float32 latents, activate's copies, the float64 scores.
DENSE_BYTES = 20
#: A sweep goes wide when its dense batch would hold more than this (or half of what is free).
WIDE_BYTES = 2 << 30
#: Above this share of a chunk's entries, merge the chunk densely rather than entry by entry.
DENSE_SHARE = 0.25


class RawActs:
    """A feature map that passes a site's activation `[..., d_in]` through: a model view that reads
    the raw activation where another view attaches an SAE."""

    def __init__(self, d_in: int):
        self.d_in = self.width = d_in

    def features(self, acts: Tensor) -> Tensor:
        return acts

    def describe(self) -> dict:
        return {"kind": "raw"}


def _sae_of(feature_map):
    """`(sae, readout)` of a feature map this module can chunk (readout: None, "pre" or "firing")."""
    if isinstance(feature_map, PreActivations):
        return feature_map.sae, "pre"
    if isinstance(feature_map, FiringScores):
        return feature_map.sae, "firing"
    if hasattr(feature_map, "W_enc") and hasattr(feature_map, "cfg"):
        return feature_map, None
    return None, None


def plan(adapter, site, scorer, batch: int, latent_chunk: int | None = None) -> "WideScorer | None":
    """The wide scorer for `scorer` at `site`, or None where the ordinary path does: its problems are
    not all single latents of a chunkable SAE, or the dense batch `[batch, d_sae]` fits (unless
    `latent_chunk` forces chunks of that many latents)."""
    if not isinstance(scorer, Scorer) or not scorer.reduce.all_single:
        return None
    lookup = getattr(adapter, "feature_map", None)  # (test doubles of the adapter may have none)
    attached = lookup(site) if lookup is not None else None
    if scorer.feature_map is not None:
        if attached is not None:  # the scorer's map reads the view's features: not an SAE's input
            return None
        feature_map = scorer.feature_map
    else:
        feature_map = attached
    sae, readout = _sae_of(feature_map)
    if sae is None or not wide.chunkable(sae):
        return None
    device = adapter.device
    if not latent_chunk:
        free = memory.available(device)
        limit = WIDE_BYTES if free is None else min(WIDE_BYTES, free // 2)
        if batch * sae.d_sae * DENSE_BYTES <= limit:
            return None
    chunk = latent_chunk or wide.chunk_size(sae, batch, device)
    return WideScorer(scorer, sae, readout, chunk, attached is not None)


class WideScorer:
    """Scores `scorer`'s problems (single latents of `sae`, read through `readout`) chunk by chunk.

    `attached`: the SAE is the model view's feature map at the site (the sweep then runs a view
    that yields the raw activation there, see `RawActs`)."""

    def __init__(self, scorer: Scorer, sae, readout: str | None, chunk: int, attached: bool):
        self.scorer, self.sae, self.readout, self.chunk, self.attached = scorer, sae, readout, chunk, attached
        idx = scorer.reduce.single_idx
        self.order = torch.sort(idx, stable=True).indices  # problems by latent
        self.latents = idx.index_select(0, self.order)
        starts = torch.arange(0, sae.d_sae + chunk, chunk).clamp(max=sae.d_sae)
        self.bounds = torch.searchsorted(self.latents, starts).tolist()  # each chunk's problems
        self.identity = scorer.reduce.identity
        self.device = None

    def _to(self, device) -> None:
        if self.device != device:
            self.order, self.latents = self.order.to(device), self.latents.to(device)
            self.device = device

    @property
    def positive(self) -> bool:
        w, _, sign = self.scorer._last(self.order.device)
        return self.readout is None and sign is None and bool((w > 0).all())

    def chunks(self, x: Tensor):
        """`(start, features [..., c])` of raw activations `x [..., d_in]`, chunk by chunk: the
        SAE's latents or its readout."""
        if self.readout == "pre":
            return wide.pre_act_chunks(self.sae, x, self.chunk)
        if self.readout == "firing":
            return wide.firing_chunks(self.sae, x, self.chunk)
        return wide.encode_chunks(self.sae, x, self.chunk)

    def measure(self, view, site, ids: Tensor, *, isolated: bool = False, batch: int = 256) -> Tensor:
        """Each problem's features on its own input, by plain forwards of `view` (which yields the raw
        activation at `site`): row p of `ids [P, T]` -> `[P, T]` float64, problem p's latent at every
        position. Problems that share an input share its forward."""
        unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
        inverse = inverse.to(self.order.device)
        out = torch.zeros(len(ids), ids.shape[1], dtype=torch.float64)
        for lo in range(0, len(unique), batch):
            hi = min(lo + batch, len(unique))
            x = view.run([site], input_ids=unique[lo:hi], isolated=isolated)[site]
            self._to(x.device)
            row = inverse.to(x.device)
            for (start, a), c0, c1 in zip(self.chunks(x), self.bounds, self.bounds[1:]):
                problems = self.order[c0:c1]
                r = row.index_select(0, problems)
                mine = ((r >= lo) & (r < hi)).nonzero().squeeze(1)
                p, r = problems.index_select(0, mine), r.index_select(0, mine) - lo
                lat = self.latents[c0:c1].index_select(0, mine) - start
                out[p.cpu()] = a.to(x.dtype)[r, :, lat].double().cpu()  # [n, T]
        return out

    def update(self, acts: Tensor, tokens: Tensor, topk: TopK, c0: int) -> None:
        """Merge a batch: the raw activation `acts [B, 1, d_in]` of candidates `tokens [B]` into the
        top-k columns `c0 .. c0 + P` of `topk`."""
        x = acts[:, -1]
        self._to(x.device)
        w, c, sign = self.scorer._last(x.device)
        P = len(w)
        kth = topk.values[-1, c0:c0 + P]
        dtype = x.dtype
        u = self.scorer.threshold(kth, torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
        positive = self.positive
        if positive:
            u = u.clamp(min=0)  # only latents above 0 are merged; the zeros are filled in at the end
        if positive and not wide.elementwise(self.sae):
            latents, values = wide.encode_topk(self.sae, x, self.chunk)
            self._merge_sparse(latents, values.to(dtype), u, tokens, topk, c0)
            return
        if positive and getattr(self.sae, "keeps_pre", False) and torch.promote_types(self.sae.W_enc.dtype, dtype) == dtype:
            self._merge_above(x, u, tokens, topk, c0)
            return
        for (start, a), lo, hi in zip(self.chunks(x), self.bounds, self.bounds[1:]):
            if hi == lo:
                continue
            a = a.to(dtype)
            if not (self.identity and hi - lo == a.shape[1]):
                a = a.index_select(1, self.latents[lo:hi] - start)
            problems = self.order[lo:hi]
            bound = u.index_select(0, problems)
            keys = a if sign is None else a * sign.index_select(0, problems).to(a.dtype)
            hits = ~(keys <= bound)  # NaN sorts first, as in the dense merge
            if not positive and (bool(torch.isinf(bound).any()) or int(hits.sum()) > DENSE_SHARE * hits.numel()):
                self._merge_dense(a, problems, tokens, topk, c0, w, c)
                continue
            r, j = hits.nonzero().unbind(1)
            if positive and len(r) > DENSE_SHARE * hits.numel():
                self._merge_dense(a, problems, tokens, topk, c0, w, c)
                continue
            p = problems.index_select(0, j)
            self._add(a[r, j], p, tokens.index_select(0, r), topk, c0, w, c)

    def _merge_above(self, x: Tensor, u: Tensor, tokens: Tensor, topk: TopK, c0: int) -> None:
        """Positive mode for an SAE whose latent is its pre-activation above `max(firing bar, 0)` and
        0 below (`keeps_pre`): one comparison of the pre-activations with `max(bar, 0, threshold)`
        per chunk finds the entries to merge, without forming the latents. Only where the model's
        dtype holds the SAE's exactly (so that comparing before the cast to it is the same)."""
        w, c, _ = self.scorer._last(x.device)
        for (start, pre), lo, hi in zip(wide.pre_act_chunks(self.sae, x, self.chunk), self.bounds, self.bounds[1:]):
            if hi == lo:
                continue
            floor = torch.clamp(self.sae.firing_bar_columns(pre, start), min=0).expand(pre.shape[1])
            if not (self.identity and hi - lo == pre.shape[1]):
                local = self.latents[lo:hi] - start
                pre, floor = pre.index_select(1, local), floor.index_select(0, local)
            problems = self.order[lo:hi]
            bound = torch.maximum(u.index_select(0, problems), floor.to(u.dtype))
            r, j = (pre > bound).nonzero().unbind(1)
            self._add(pre[r, j].to(x.dtype), problems.index_select(0, j), tokens.index_select(0, r), topk, c0, w, c)

    def _add(self, values: Tensor, problems: Tensor, ids: Tensor, topk: TopK, c0: int, w: Tensor, c) -> None:
        """Merge activations `values [n]` of candidates `ids [n]` for `problems [n]` (each problem's in
        candidate order), scored as `Scorer.__call__` scores them."""
        if not len(values):
            return
        scores = values.to(w.dtype) * w.index_select(0, problems)
        scores = scores if c is None else scores + c.index_select(0, problems)
        topk.add(scores, ids, problems + c0)

    def _merge_dense(self, a: Tensor, problems: Tensor, tokens: Tensor, topk: TopK, c0: int, w: Tensor, c) -> None:
        scores = a.to(w.dtype) * w.index_select(0, problems)
        scores = scores if c is None else scores + c.index_select(0, problems)
        topk.update(scores, tokens, problems + c0)

    def _merge_sparse(self, latents: Tensor, values: Tensor, u: Tensor, tokens: Tensor, topk: TopK, c0: int) -> None:
        """Merge a topk SAE's kept latents `latents, values [B, k]` (each row's positive ones only)."""
        w, c, _ = self.scorer._last(values.device)
        r, j = (values > 0).nonzero().unbind(1)  # rows ascending: candidate order
        latent, value = latents[r, j], values[r, j]
        # every problem of each latent (a latent may be several problems, or none)
        first = torch.searchsorted(self.latents, latent)
        count = torch.searchsorted(self.latents, latent, right=True) - first
        if not self.identity:
            r, value, first = r.repeat_interleave(count), value.repeat_interleave(count), first.repeat_interleave(count)
            steps = torch.arange(len(first), device=first.device) - (torch.cumsum(count, 0) - count).repeat_interleave(count)
            first = first + steps
        problems = self.order.index_select(0, first)
        hit = (value > u.index_select(0, problems)).nonzero().squeeze(1)
        self._add(value.index_select(0, hit), problems.index_select(0, hit), tokens.index_select(0, r.index_select(0, hit)),
                  topk, c0, w, c)

    def finish(self, topk: TopK, c0: int, candidates: Tensor) -> None:
        """Positive mode: fill each problem's places after its entries above a latent of 0 with the
        lowest `candidates` (this process's, in order) not among those entries, scored as a 0."""
        if not self.positive:
            return
        w, c, _ = self.scorer._last(topk.values.device)
        P, k = len(w), topk.k
        zero = w.new_zeros(P) * w if c is None else w.new_zeros(P) * w + c  # a latent of 0's score
        first = candidates[:k].to(topk.ids.device)
        for lo in range(0, P, 1 << 16):  # [m, k, block] comparisons, block by block
            hi = min(P, lo + (1 << 16))
            values, ids = topk.values[:, c0 + lo:c0 + hi], topk.ids[:, c0 + lo:c0 + hi]
            s0 = zero[lo:hi]
            above = values > s0  # best first: these lead every column
            n_above = above.sum(0)
            need = (n_above < k).nonzero().squeeze(1)
            if not len(need):
                continue
            held = torch.where(above[:, need], ids[:, need], -2)  # [k, b]
            free = ~(first[:, None, None] == held[None]).any(1)  # [m, b]: candidates not above 0
            slot = torch.cumsum(free, 0) - 1 + n_above[need]
            new_values = torch.where(above[:, need], values[:, need], float("-inf"))
            new_ids = torch.where(above[:, need], ids[:, need], -1)
            place = free & (slot < k)
            j, b = place.nonzero().unbind(1)
            new_values[slot[j, b], b] = s0[need][b]
            new_ids[slot[j, b], b] = first[j]
            topk.values[:, c0 + lo + need] = new_values
            topk.ids[:, c0 + lo + need] = new_ids
