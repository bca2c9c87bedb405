"""Corpus statistics of every latent of an SAE in one streamed pass (document 002's top examples
and "uniform examples").

Per latent, over every token of a corpus except the first `skip_first` positions of each context
(an attention sink on real models), with `L` the context length and token `(c, p)` of the corpus
numbered `c * L + p` (its global index):

- the `top_k` largest activations, descending (ties: smaller global index first);
- how often it fires (`z > 0`), its max and the sum of its activations (latents are `>= 0`);
- a histogram of its positive activations in `n_bins` bins `[i w, (i+1) w)` with one example
  drawn uniformly at random from each non-empty bin;
- for every kept example its context window (`window = (before, after)` tokens around it) and
  the latent's activations there, taken from the batch when the example enters: nothing re-runs.

Memory is flat in the corpus size: every state is `[d_sae, ...]`. The bin width `w` must be
known before the max is, so it is a power of two, the smallest with `n_bins * w > max`: when a
larger activation arrives `w` doubles as often as needed and bins `2i, 2i+1` merge into `i`
(exact: the old edges are among the new ones), so the final `w` and counts do not depend on the
order of the data. Each positive activation gets an i.i.d. uniform key (seeded) and each bin
keeps its smallest-key entry: an exactly uniform draw, and a merge keeps the smaller minimum.

The result is a :class:`~featopt.dictionaries.feature_stats.FeatureStats` (saved, read back and
turned into each latent's record there).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import Tensor

from featopt.data import ContextSources
from featopt.dictionaries.feature_stats import TENSORS, FeatureStats, locate
from featopt.errors import FeatoptError
from featopt.models.sae import wide

def _pow2_width(m: Tensor, n_bins: int) -> Tensor:
    """The smallest power of two `w` with `n_bins * w > m`, elementwise, for `m > 0` (float64)."""
    m = m.double()
    w = torch.ldexp(torch.ones_like(m), torch.frexp(m / n_bins).exponent)
    # m / n_bins is rounded: fix up with exact comparisons (n_bins * w is exact in float64).
    w = torch.where(n_bins * w <= m, 2 * w, w)
    return torch.where(n_bins * w / 2 > m, w / 2, w)


def _order(values: Tensor, index: Tensor) -> Tensor:
    """Per row of `[R, m]`, the permutation sorting by value descending, then index ascending."""
    by_index = torch.argsort(index, dim=1, stable=True)
    by_value = torch.argsort(values.gather(1, by_index), dim=1, descending=True, stable=True)
    return by_index.gather(1, by_value)


class StatsAccumulator:
    """Running per-latent statistics of latents `z [B, L, d_sae]`; see the module docstring.

    `state` holds every tensor it keeps, each `[d_sae, ...]` whatever the number of batches.
    """

    def __init__(self, d_sae: int, *, top_k: int = 20, n_bins: int = 10, window: tuple[int, int] = (24, 8), seed: int = 0):
        if d_sae < 1 or top_k < 1 or n_bins < 1 or min(window) < 0:
            raise FeatoptError(f"corpus statistics need d_sae, top_k, n_bins >= 1 and a window of sizes >= 0, got "
                               f"d_sae={d_sae}, top_k={top_k}, n_bins={n_bins}, window={tuple(window)}.")
        self.d_sae, self.top_k, self.n_bins, self.seed = d_sae, top_k, n_bins, seed
        self.window = (int(window[0]), int(window[1]))
        self.width = sum(self.window) + 1
        self.tokens = 0
        self.context_length: int | None = None
        self.state: dict[str, Tensor] = {}
        self._generator: torch.Generator | None = None

    def _start(self, device: torch.device) -> None:
        d, k, n, W = self.d_sae, self.top_k, self.n_bins, self.width
        full = lambda shape, value, dtype: torch.full(shape, value, dtype=dtype, device=device)  # noqa: E731
        self.state = {  # tokens -1 and acts 0 mark padding; index -1 an empty slot
            "top_values": full((d, k), -math.inf, torch.float32), "top_index": full((d, k), -1, torch.int64),
            "top_tokens": full((d, k, W), -1, torch.int32), "top_acts": full((d, k, W), 0.0, torch.float32),
            "bin_width": full((d,), 0.0, torch.float32), "bin_counts": full((d, n), 0, torch.int64),
            "bin_key": full((d, n), math.inf, torch.float64), "bin_index": full((d, n), -1, torch.int64),
            "bin_values": full((d, n), 0.0, torch.float32), "bin_tokens": full((d, n, W), -1, torch.int32),
            "bin_acts": full((d, n, W), 0.0, torch.float32), "freq": full((d,), 0, torch.int64),
            "max": full((d,), 0.0, torch.float32), "sum": full((d,), 0.0, torch.float64),
        }
        self._generator = torch.Generator(device=device).manual_seed(self.seed)

    def update(self, z: Tensor, ids: Tensor, start: int, skip_first: int = 1) -> None:
        """Add a batch: latents `z [B, L, d_sae]` of token ids `ids [B, L]` of contexts
        `start .. start + B - 1`; positions `p < skip_first` are left out."""
        if z.dim() != 3 or z.shape[-1] != self.d_sae or tuple(ids.shape) != tuple(z.shape[:2]):
            raise FeatoptError(f"expected latents [B, L, {self.d_sae}] and ids [B, L], got {tuple(z.shape)} and {tuple(ids.shape)}.")
        # Inference mode throughout, so the state is made and changed in one mode.
        with torch.inference_mode():
            self._begin(z.shape[1], start, skip_first, z.device)
            self._update(z.detach(), ids.to(z.device), start, skip_first)

    def _begin(self, length: int, start: int, skip_first: int, device) -> None:
        """Check a batch of `length`-token contexts against the ones before; make the state at the first."""
        if self.context_length not in (None, length):
            raise FeatoptError(f"contexts of {length} tokens after contexts of {self.context_length}: give one context length.")
        if start < 0 or not 0 <= skip_first < length:
            raise FeatoptError(f"start must be >= 0 and skip_first in [0, {length}), got start={start}, skip_first={skip_first}.")
        if not self.state:
            self.context_length = length
            self._start(device)

    def update_sparse(self, rows: Tensor, cols: Tensor, values: Tensor, ids: Tensor, start: int,
                      skip_first: int = 1) -> None:
        """`update` from the nonzero latents only: COO `(rows, cols, values)` `[nnz]` of the
        flattened `[B * L, d_sae]` latents, sorted by row then latent (`sae.wide.encode_sparse`), of
        token ids `ids [B, L]`; the same statistics as `update` of the dense latents."""
        if ids.dim() != 2 or not (len(rows) == len(cols) == len(values)):
            raise FeatoptError(f"expected ids [B, L] and rows, cols, values of one length, got {tuple(ids.shape)} "
                               f"and {len(rows)}, {len(cols)}, {len(values)}.")
        length = ids.shape[1]
        with torch.inference_mode():
            self._begin(length, start, skip_first, values.device)
            key = rows * self.d_sae + cols  # the dense flat index: ascending

            def at(index: Tensor) -> Tensor:  # the dense latents at flat `index`, 0 where absent
                pos = torch.searchsorted(key, index).clamp_(max=max(len(key) - 1, 0))
                found = key[pos] == index if len(key) else torch.zeros_like(index, dtype=torch.bool)
                return torch.where(found, values[pos] if len(key) else 0.0, 0.0)

            keep = ((rows % length) >= skip_first) & (values > 0)
            self._add(ids.shape[0], ids.reshape(-1).to(values.device), start, skip_first, key[keep], values[keep], at)

    def _update(self, z: Tensor, ids: Tensor, start: int, skip: int) -> None:
        L, d = self.context_length, self.d_sae
        # The positive entries only (~L0 per token): everything below is linear in their number.
        # Flat (1-D) indexing throughout: much cheaper than advanced indexing of [B, L, d_sae].
        batch, z, ids = z.shape[0], z.reshape(-1), ids.reshape(-1)
        positive = z > 0
        positive.view(-1, L, d)[:, :skip] = False
        flat = positive.nonzero().squeeze(1)  # ascending: ordered by global index, then latent
        self._add(batch, ids, start, skip, flat, z[flat], z.__getitem__)

    def _add(self, batch: int, ids: Tensor, start: int, skip: int, flat: Tensor, val: Tensor, at) -> None:
        """Add the positive entries at dense flat indices `flat [E]` (ascending) with values `val [E]`;
        `at(index)` reads the batch's latents at any flat index (the windows)."""
        s, L, d = self.state, self.context_length, self.d_sae
        self.tokens += batch * (L - skip)
        if flat.numel() == 0:
            return
        token, lat = flat // d, flat % d
        val = val.float()
        e = SimpleNamespace(at=at, ids=ids, token=token, p=token % L, lat=lat, val=val, g=start * L + token)
        s["freq"] += torch.bincount(lat, minlength=d)
        s["sum"].index_add_(0, lat, val.double())
        s["max"].scatter_reduce_(0, lat, val, "amax")
        self._update_top(e)
        self._update_bins(e)

    def _windows(self, e: SimpleNamespace, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Windows of entries `rows [E]`: token ids `[E, W]` (int32, -1 outside the context) and
        the entry's latent on them `[E, W]` (0 outside)."""
        before, after = self.window
        offset = torch.arange(-before, after + 1, device=e.p.device)
        inside = (e.p[rows, None] + offset >= 0) & (e.p[rows, None] + offset < self.context_length)
        token = torch.where(inside, e.token[rows, None] + offset, 0)  # flat token index in the batch
        tokens = torch.where(inside, e.ids[token], -1).to(torch.int32)
        acts = torch.where(inside, e.at(token * self.d_sae + e.lat[rows, None]).float(), 0.0)
        return tokens, acts

    def _update_top(self, e: SimpleNamespace) -> None:
        # The k slots of a latent are kept unsorted (sorted once, in result): an entry that
        # enters takes the slot of one that leaves, so windows are written once and never moved.
        s, k, device = self.state, self.top_k, e.val.device
        # Only entries at least the latent's k-th value can enter (>=: ties go by index).
        cand = (e.val >= s["top_values"].amin(1)[e.lat]).nonzero().squeeze(1)
        if cand.numel() == 0:
            return
        # Rank by (latent, value desc, index asc): stable sorts over the index-ordered entries.
        cand = cand[torch.argsort(e.val[cand], descending=True, stable=True)]
        cand = cand[torch.argsort(e.lat[cand], stable=True)]
        lat = e.lat[cand]
        counts = torch.bincount(lat, minlength=self.d_sae)
        rank = torch.arange(len(cand), device=device) - (counts.cumsum(0) - counts)[lat]
        cand, lat, rank = cand[rank < k], lat[rank < k], rank[rank < k]
        rows, row = torch.unique(lat, return_inverse=True)  # the latents that may change, [R]
        values = torch.full((len(rows), k), -math.inf, device=device)
        index = torch.full((len(rows), k), -1, dtype=torch.int64, device=device)
        entry = torch.full((len(rows), k), -1, dtype=torch.int64, device=device)
        values[row, rank], index[row, rank], entry[row, rank] = e.val[cand], e.g[cand], cand
        # [R, 2k]: kept slots, then candidates. Among empty (-inf) ones the kept come first, so
        # only real candidates are chosen and exactly as many enter as kept slots are freed.
        values = torch.cat([s["top_values"][rows], values], 1)
        index = torch.cat([s["top_index"][rows], index], 1)
        chosen = torch.zeros(values.shape, dtype=torch.bool, device=device)
        chosen.scatter_(1, _order(values, index)[:, :k], True)
        enter_row, enter_col = chosen[:, k:].nonzero(as_tuple=True)
        free_row, free_slot = (~chosen[:, :k]).nonzero(as_tuple=True)  # same rows, same order
        latent = rows[free_row]
        s["top_values"][latent, free_slot] = values[enter_row, k + enter_col]
        s["top_index"][latent, free_slot] = index[enter_row, k + enter_col]
        s["top_tokens"][latent, free_slot], s["top_acts"][latent, free_slot] = self._windows(e, entry[enter_row, enter_col])

    def _update_bins(self, e: SimpleNamespace) -> None:
        s, n, W = self.state, self.n_bins, self.width
        batch_max = torch.zeros(self.d_sae, device=e.val.device).scatter_reduce_(0, e.lat, e.val, "amax")
        old = s["bin_width"]
        width = torch.where(batch_max > 0, torch.maximum(old.double(), _pow2_width(batch_max, n)), old.double()).float()
        grow = ((old > 0) & (width > old)).nonzero().squeeze(1)
        if grow.numel():
            self._merge(grow, torch.log2(width[grow] / old[grow]).round().long())
        s["bin_width"] = width
        # Division by a power of two is exact, so the bin is exactly floor(value / width) < n.
        slot = e.lat * n + torch.floor(e.val / width[e.lat]).long().clamp_(max=n - 1)
        s["bin_counts"].view(-1).index_add_(0, slot, torch.ones_like(slot))
        key = torch.rand(len(slot), generator=self._generator, device=e.val.device, dtype=torch.float64)
        best = torch.full((self.d_sae * n,), math.inf, dtype=torch.float64, device=key.device)
        best.scatter_reduce_(0, slot, key, "amin")
        win = ((key == best[slot]) & (key < s["bin_key"].view(-1)[slot])).nonzero().squeeze(1)
        # Equal float64 keys in one slot are all but impossible; keep the first to stay exact.
        slots, inverse = torch.unique(slot[win], return_inverse=True)
        first = torch.full((len(slots),), len(win), device=win.device).scatter_reduce_(
            0, inverse, torch.arange(len(win), device=win.device), "amin")
        win = win[first]
        s["bin_key"].view(-1)[slots], s["bin_index"].view(-1)[slots] = key[win], e.g[win]
        s["bin_values"].view(-1)[slots] = e.val[win]
        s["bin_tokens"].view(-1, W)[slots], s["bin_acts"].view(-1, W)[slots] = self._windows(e, win)

    def _merge(self, rows: Tensor, shift: Tensor) -> None:
        """Widen the bins of latents `rows [R]` by `2 ** shift [R]`: old bin j goes to j >> shift."""
        s, n = self.state, self.n_bins
        j = torch.arange(n, device=rows.device).expand(len(rows), n).contiguous()
        target = j >> shift.clamp(max=32)[:, None]
        counts = torch.zeros_like(j).scatter_add_(1, target, s["bin_counts"][rows])
        key = s["bin_key"][rows]
        best = torch.full_like(key, math.inf).scatter_reduce_(1, target, key, "amin")
        winner = (key == best.gather(1, target)) & torch.isfinite(key)
        source = torch.full_like(j, n).scatter_reduce_(1, target, torch.where(winner, j, n), "amin")
        has = source < n
        source = source.clamp(max=n - 1)
        for name, fill in (("bin_key", math.inf), ("bin_index", -1), ("bin_values", 0.0), ("bin_tokens", -1), ("bin_acts", 0.0)):
            old, wide = s[name][rows], s[name].dim() == 3
            taken = old.gather(1, source[..., None].expand_as(old) if wide else source)
            s[name][rows] = torch.where(has[..., None] if wide else has, taken, fill)
        s["bin_counts"][rows] = counts

    def result(self, sources: ContextSources | None = None, meta: dict | None = None) -> FeatureStats:
        """The statistics so far, on the CPU; `sources` (of the same contexts) name each
        example's document and position."""
        if not self.state:
            raise FeatoptError("no batch was added: call update with at least one batch before result.")
        with torch.inference_mode(False):  # plain tensors for the caller, even inside inference mode
            s = {name: t.detach().cpu().clone() for name, t in self.state.items()}
            order = _order(s["top_values"], s["top_index"])
            for name in ("top_values", "top_index", "top_tokens", "top_acts"):
                s[name] = s[name].gather(1, order if s[name].dim() == 2 else order[..., None].expand_as(s[name]))
            s["top_values"] = torch.where(s["top_index"] >= 0, s["top_values"], 0.0)
            top_doc, top_pos = locate(s["top_index"], sources, self.context_length)
            bin_doc, bin_pos = locate(s["bin_index"], sources, self.context_length)
            tensors = {name: s[name] for name in TENSORS if name in s}
            return FeatureStats(**tensors, top_doc=top_doc, top_pos=top_pos, bin_doc=bin_doc, bin_pos=bin_pos,
                                tokens=self.tokens, documents=list(sources.documents) if sources else [],
                                meta=dict(meta or {}), window=self.window, context_length=self.context_length)


def corpus_stats(
    adapter, sae, contexts: Tensor, *, sources: ContextSources | None = None, batch_contexts: int = 8, top_k: int = 20,
    n_bins: int = 10, window: tuple[int, int] = (24, 8), seed: int = 0, skip_first: int = 1, progress: bool = True,
    latent_chunk: int | None = None,
) -> FeatureStats:
    """Statistics of every latent of `sae` over token contexts `[n, L]`: the model runs only to
    the SAE's site (early exit), `batch_contexts` contexts at a time. A batch's latents are
    encoded sparsely, chunk by chunk of `latent_chunk` latents (`sae.wide.encode_sparse`), when
    `latent_chunk` is given or the dense `[tokens, d_sae]` would not fit (`wide.dense_fits`)."""
    from tqdm.auto import tqdm

    from featopt.models.sae.attach import site_of

    if contexts.dim() != 2 or contexts.shape[0] == 0:
        raise FeatoptError(f"contexts must be token ids [n, L] with n >= 1, got shape {tuple(contexts.shape)}.")
    if batch_contexts < 1:
        raise FeatoptError(f"batch_contexts must be at least 1, got {batch_contexts}.")
    site = adapter.site(site_of(sae))
    if adapter.feature_map(site) is not None:
        raise FeatoptError(f"the adapter yields a feature map's features at {site}: give the plain adapter.")
    if adapter.width(site) != sae.d_in:
        raise FeatoptError(f"the SAE reads {sae.d_in}-wide activations but {site} of model {adapter.name!r} is "
                           f"{adapter.width(site)} wide: use an SAE trained for this model and site.")
    acc = StatsAccumulator(sae.d_sae, top_k=top_k, n_bins=n_bins, window=window, seed=seed)
    device = sae.W_enc.device
    with torch.inference_mode(), tqdm(total=contexts.numel(), desc="corpus statistics", unit="tok",
                                      unit_scale=True, disable=not progress, leave=False) as bar:
        for start in range(0, contexts.shape[0], batch_contexts):
            ids = contexts[start:start + batch_contexts]
            x = adapter.run([site], input_ids=ids.to(adapter.device))[site].to(device)
            if latent_chunk or not wide.dense_fits(sae, ids.numel(), device):
                acc.update_sparse(*wide.encode_sparse(sae, x, latent_chunk), ids, start, skip_first)
            else:
                acc.update(sae.encode(x), ids, start, skip_first)
            bar.update(ids.numel())
    meta = {"model": adapter.name, "sae": sae.describe(), "seed": seed, "skip_first": skip_first,
            "tokens": acc.tokens, "contexts": contexts.shape[0], "context_length": contexts.shape[1]}
    return acc.result(sources, meta)
