"""What a discrete search scores, and the running top-k it keeps.

A candidate is a prefix (possibly empty) plus one new token. Causal attention means the prefix's
activations are the same for every candidate, so a problem's score is a constant known from the
prefix forward plus a weight times the new token's activation: nothing at earlier positions is
recomputed. Scores are reduced per problem (one feature, or the mean of a feature slice) and
weighted per position (the mean over selected positions for exhaustive sweeps, the last position
or the sum over all positions for greedy search).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from featopt.errors import FeatoptError


#: Scores are float64 whatever the model's dtype: adding a prefix's constant to activations of a
#: lower precision then never reorders candidates, and `[batch, problems]` is small.
SCORE_DTYPE = torch.float64


class FeatureReduce:
    """Per problem, one feature or the mean of several: `acts [..., width]` -> `[..., P]`.

    Single features are gathered (the common case, e.g. every feature of a site); multi-feature
    problems go through one `[width, P_multi]` averaging matrix.
    """

    def __init__(self, features: Sequence[tuple[int, ...] | None], width: int):
        self.n = len(features)
        chosen = [tuple(range(width)) if f is None else tuple(f) for f in features]
        single = [p for p, f in enumerate(chosen) if len(f) == 1]
        multi = [p for p, f in enumerate(chosen) if len(f) > 1]
        self.single_at = torch.tensor(single, dtype=torch.long)
        self.single_idx = torch.tensor([chosen[p][0] for p in single], dtype=torch.long)
        self.multi_at = torch.tensor(multi, dtype=torch.long)
        self.matrix = torch.zeros(width, len(multi), dtype=torch.float64)
        for j, p in enumerate(multi):
            self.matrix[list(chosen[p]), j] = 1.0 / len(chosen[p])
        #: every problem one feature (then a problem's score is monotone in one activation)
        self.all_single = len(single) == self.n
        #: ... and problem p is feature p of every feature: the activations need no gather
        self.identity = self.all_single and self.n == width and bool((self.single_idx == torch.arange(width)).all())

    def __call__(self, acts: Tensor) -> Tensor:
        acts = acts.to(SCORE_DTYPE)
        if self.identity:
            return acts
        if self.all_single:  # only single features, in problem order: one gather
            return acts[..., self.single_idx.to(acts.device)]
        out = acts.new_empty(*acts.shape[:-1], self.n)
        if len(self.single_at):
            out[..., self.single_at.to(acts.device)] = acts[..., self.single_idx.to(acts.device)]
        if len(self.multi_at):
            out[..., self.multi_at.to(acts.device)] = acts @ self.matrix.to(acts.device, acts.dtype)
        return out


class Scorer:
    """Scores candidates for the problems at one site.

    Args:
        features: per problem, its feature choice (None: all features).
        width: the site's number of features.
        weights: `[P, L + 1]` per problem, the weight of each position of a candidate sequence
            (prefix positions `0..L-1`, the new token at `L`); the score is
            `sum_t weights[p, t] * reduced_act[p, t]`. Or, instead:
        positions: a `Selection` whose position weights (times `scale`) give them, for the
            length set by :meth:`set_length` (greedy search grows it every step).
        feature_map: read the site's activations through it first (a selection's own map).
    """

    def __init__(self, features: Sequence[tuple[int, ...] | None], width: int, weights: Tensor | None = None, *,
                 positions=None, scale: float = 1.0, feature_map=None):
        self.reduce = FeatureReduce(features, width)
        self.positions, self.scale, self.feature_map = positions, float(scale), feature_map
        self.const: Tensor | None = None  # [G, P], the prefixes' part of each score
        self._parts: tuple[Tensor, Tensor | None, Tensor | None] | None = None  # see `_last`
        if weights is not None:
            self.set_weights(weights)

    @property
    def n(self) -> int:
        return self.reduce.n

    def set_weights(self, weights: Tensor) -> None:
        self.weights = weights.to(torch.float64)
        self._parts = None
        if (self.weights[:, -1] == 0).any():
            bad = int((self.weights[:, -1] == 0).nonzero()[0])
            raise FeatoptError(
                f"problem {bad} selects no position of the candidate token (position {weights.shape[1] - 1}), "
                "so every candidate scores the same: include that position."
            )

    def set_length(self, n_tokens: int) -> None:
        """Weights for sequences of `n_tokens` positions, from the `positions` selection."""
        self.set_weights(self.scale * self.positions.position_weights(n_tokens, dtype=torch.float64))

    def _read(self, acts: Tensor) -> Tensor:
        return acts if self.feature_map is None else self.feature_map.features(acts)

    def set_prefix(self, prefix_acts: Tensor | None) -> None:
        """`prefix_acts [G, L, width]` of the G prefixes (None when there is no prefix)."""
        self._parts = None
        if prefix_acts is None or prefix_acts.shape[1] == 0:
            self.const = None
            return
        reduced = self.reduce(self._read(prefix_acts))  # [G, L, P]
        w = self.weights[:, :-1].T.to(reduced.device, reduced.dtype)  # [L, P]
        self.const = (reduced * w).sum(1)  # [G, P]

    def __call__(self, acts: Tensor, group: Tensor | None = None) -> Tensor:
        """`acts [B, 1, width]` of the new tokens (rows of prefix `group [B]`) -> scores `[B, P]`."""
        reduced = self.reduce(self._read(acts)[:, -1])
        scores = reduced * self.weights[:, -1].to(reduced.device, reduced.dtype)
        if self.const is not None:
            scores = scores + self.const.to(scores.dtype)[group if group is not None else 0]
        return scores

    # ----------------------------------------------------------------- the sweep's shortcut
    # A later candidate enters a running top-k only with a score above its k-th (an equal one
    # loses the tie to the earlier), and when every problem is one feature its score
    # `w * float64(a) + c` is monotone in that one activation `a` (non-increasing for `w < 0`:
    # the key is then `-a`). So a threshold `u` per problem in the activations' own dtype, with
    # `score(u) <= kth` checked in float64, rules out every row with `key <= u` by one comparison
    # in that dtype, and only the few rows above it are scored in float64: exactly as `self(acts)`
    # scores them, so the top-k is the same, ties included.

    def shortcut(self) -> bool:
        """Whether `threshold`/`above` apply: every problem one feature, at most one prefix."""
        return self.reduce.all_single and (self.const is None or self.const.shape[0] == 1)

    def _last(self, device) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """`(w [P], c [P] or None, sign [P] or None)`: the candidate's weight, the prefix constant
        and -1 where the weight is negative (None when none is); kept until the prefix changes."""
        if self._parts is None or self._parts[0].device != torch.device(device):
            w = self.weights[:, -1].to(device)
            c = None if self.const is None else self.const[0].to(device, w.dtype)
            sign = None if not bool((w < 0).any()) else torch.where(w < 0, -1.0, 1.0).to(device)
            self._parts = (w, c, sign)
        return self._parts

    def _score(self, x: Tensor, w: Tensor, c: Tensor | None, sign: Tensor | None) -> Tensor:
        """The float64 score of key `x` (activation `sign * x`), computed as `self(acts)` does."""
        s = (x if sign is None else x * sign.to(x.dtype)).to(w.dtype) * w
        return s if c is None else s + c

    def threshold(self, kth: Tensor, dtype: torch.dtype) -> Tensor:
        """Per problem, a key `u` (in `dtype`, float32 for half types) such that no row with
        `key <= u` can enter a top-k whose k-th score is `kth [P]`; -inf where none is found."""
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        w, c, sign = self._last(kth.device)
        kth = kth.to(w.dtype)
        u = ((kth if c is None else kth - c) / w.abs()).to(dtype)  # near the k-th score: refined, then checked
        low = u.new_tensor(-torch.inf)
        u = torch.where(self._score(u, w, c, sign) > kth, torch.nextafter(u, low), u)
        return torch.where(self._score(u, w, c, sign) <= kth, u, low)

    def blocks(self, acts: Tensor) -> tuple[Tensor, Tensor]:
        """What `above` needs of a batch `acts [B, 1, width]`, taken while it is in cache:
        `(a [B, P], top [blocks, P])`, the activations of the problems' features (float32 for half
        types) and, per block of 16 rows, each problem's largest key (NaN if any is)."""
        a = self._read(acts)[:, -1]
        if a.dtype in (torch.float16, torch.bfloat16):
            a = a.float()  # exact
        if not self.reduce.identity:
            a = a.index_select(1, self.reduce.single_idx.to(a.device))  # [B, P]
        _, _, sign = self._last(a.device)
        keys = a if sign is None else a * sign.to(a.dtype)
        B, P = keys.shape
        size = min(B, _BLOCK)
        whole = B // size * size
        top = keys[:whole].view(-1, size, P).amax(1)
        if whole < B:
            top = torch.cat([top, keys[whole:].amax(0, keepdim=True)])
        return a, top

    def above(self, batches: Sequence[tuple[Tensor, Tensor]], u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The rows of `batches` (`blocks` of consecutive batches) whose key is above threshold
        `u [P]` (or NaN, which sorts first), scored in float64 exactly as `self(acts)` scores them:
        `(scores [n], rows [n], problems [n])`, rows counted across the batches, each problem's
        in row order. Only the blocks whose largest key is above u are read."""
        w, c, sign = self._last(u.device)
        P = len(w)
        tops = torch.cat([top for _, top in batches]) if len(batches) > 1 else batches[0][1]
        pair = (~(tops <= u)).view(-1).nonzero().squeeze(1)  # block * P + problem, blocks ascending
        starts, row = [0], 0  # each batch's first block and first row
        for _, top in batches:
            starts.append(starts[-1] + len(top))
        bounds = torch.searchsorted(pair, torch.tensor(starts, device=pair.device) * P).tolist()
        values, places = [], []
        # `index_select` rather than advanced indexing: on CPU the latter goes parallel from a few
        # thousand elements, and a parallel region stalls whenever another process holds a core
        for (a, top), first_block, lo, hi in zip(batches, starts, bounds, bounds[1:]):
            B = len(a)
            size = min(B, _BLOCK)
            if hi > lo:
                local = pair[lo:hi] - first_block * P  # block * P + problem within the batch
                first = local + local.div(P, rounding_mode="floor") * ((size - 1) * P)  # its first row
                at = (first[:, None] + torch.arange(0, size * P, P, device=a.device)).view(-1)
                inside = at < B * P  # (the last block may be short)
                values.append(a.reshape(-1).index_select(0, at.clamp(max=B * P - 1)))
                places.append(torch.where(inside, at + row * P, -1))
            row += B
        if not values:
            empty = torch.empty(0, dtype=torch.long, device=u.device)
            return empty.to(w.dtype), empty, empty
        values, at = (torch.cat(values), torch.cat(places)) if len(values) > 1 else (values[0], places[0])
        problems = at.remainder(P)
        keys = values if sign is None else values * sign.index_select(0, problems).to(values.dtype)
        hit = (~(keys <= u.index_select(0, problems)) & (at >= 0)).nonzero().squeeze(1)
        at, problems = at.index_select(0, hit), problems.index_select(0, hit)
        scores = values.index_select(0, hit).to(w.dtype) * w.index_select(0, problems)
        scores = scores if c is None else scores + c.index_select(0, problems)
        return scores, at.div(P, rounding_mode="floor"), problems


#: Rows per block in `Scorer.blocks`.
_BLOCK = 16


class TopK:
    """The k best candidates per problem seen so far, merged batch by batch.

    `values [k, P]` best first, `ids [k, P]` the candidate token ids (-1 while fewer than k were
    seen). Ties go to the candidate seen first, which is the lower token id when candidates come
    in order: the merge sorts stably and earlier candidates always come first.
    """

    def __init__(self, k: int, n_problems: int, dtype: torch.dtype = SCORE_DTYPE, device=None):
        self.values = torch.full((k, n_problems), float("-inf"), dtype=dtype, device=device)
        self.ids = torch.full((k, n_problems), -1, dtype=torch.long, device=device)

    @property
    def k(self) -> int:
        return self.values.shape[0]

    def update(self, scores: Tensor, ids: Tensor, columns: Tensor | None = None) -> None:
        """Merge a batch: `scores [B, P']` of candidates `ids [B]`, for the problems `columns [P']`
        (default: all P; a batch that concerns few problems sorts only theirs)."""
        scores = scores.to(self.values.dtype)
        ids = ids.to(self.ids.device)[:, None].expand_as(scores)
        if columns is None:
            self.values, self.ids = _best(torch.cat([self.values, scores]), torch.cat([self.ids, ids]), self.k)
            return
        values, kept = _best(torch.cat([self.values[:, columns], scores]), torch.cat([self.ids[:, columns], ids]), self.k)
        self.values[:, columns], self.ids[:, columns] = values, kept

    def add(self, scores: Tensor, ids: Tensor, columns: Tensor) -> None:
        """Merge candidates given one by one: `scores [n]` of candidate `ids [n]` for the problems
        `columns [n]`, every problem's candidates in candidate order (all after those merged).

        The same top-k as sorting each problem's running entries and candidates stably (best
        first, NaN first, an earlier entry first among equals), without sorting the running
        entries: the candidates are sorted, each one's place is its rank among its problem's
        candidates plus the running entries that stay ahead of it, and the running entries fill
        the other places in their order.
        """
        if len(scores) == 0:
            return
        k = self.k
        scores, ids = scores.to(self.values.dtype), ids.to(self.ids.device)
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order.index_select(0, torch.sort(columns.index_select(0, order), stable=True).indices)
        scores, ids, columns = scores.index_select(0, order), ids.index_select(0, order), columns.index_select(0, order)
        cols, at, counts = torch.unique_consecutive(columns, return_inverse=True, return_counts=True)
        n = torch.arange(len(scores), device=scores.device)
        rank = n - (torch.cumsum(counts, 0) - counts).index_select(0, at)  # among its problem's candidates
        running = self.values.index_select(1, columns)  # [k, n]: each candidate's problem's entries
        place = rank + (~_before(scores, running)).sum(0)  # ties: the running entry stays ahead
        keep = (place < k).nonzero().squeeze(1)
        place, at, n = place.index_select(0, keep), at.index_select(0, keep), n.index_select(0, keep)
        taken = torch.zeros(k, len(cols), dtype=torch.bool, device=scores.device)
        which = torch.zeros(k, len(cols), dtype=torch.long, device=scores.device)
        taken[place, at] = True
        which[place, at] = n
        # place t not taken by a candidate holds running entry t - (candidates placed before t)
        slot = torch.arange(k, device=scores.device)[:, None] - torch.cumsum(taken, 0) + taken.long()
        slot = slot.masked_fill(taken, 0)
        which = which.view(-1)
        values = torch.where(taken, scores.index_select(0, which).view(k, -1),
                             self.values.index_select(1, cols).gather(0, slot))
        kept = torch.where(taken, ids.index_select(0, which).view(k, -1),
                           self.ids.index_select(1, cols).gather(0, slot))
        self.values.index_copy_(1, cols, values)
        self.ids.index_copy_(1, cols, kept)


def _before(a: Tensor, b: Tensor) -> Tensor:
    """Where `a` comes strictly before `b` in a descending `torch.sort` (which puts NaN first)."""
    return (a > b) | (a.isnan() & ~b.isnan())


def _best(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of `values [N, P]` per column, the earlier row first among equals."""
    if values.shape[0] <= 4 * k:
        return _sorted_best(values, ids, k)
    # A partial selection is much cheaper than sorting every row, and exact unless a tie
    # straddles the k-th place (torch.topk may then pick either row): those columns are sorted.
    # NaN, which topk and sort rank first, counts as tied, so ties among NaN are sorted too.
    top = torch.topk(values, k, dim=0)
    rows = torch.sort(top.indices, dim=0).values  # the selected rows, in row order
    order = torch.sort(values.gather(0, rows), dim=0, descending=True, stable=True).indices
    rows = rows.gather(0, order)
    best, best_ids = values.gather(0, rows), ids.gather(0, rows)
    tied = ((~(values < top.values[-1])).sum(0) > k).nonzero().squeeze(1)
    if len(tied):
        best[:, tied], best_ids[:, tied] = _sorted_best(values[:, tied], ids[:, tied], k)
    return best, best_ids


def _sorted_best(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    order = torch.sort(values, dim=0, descending=True, stable=True).indices[:k]
    return values.gather(0, order), ids.gather(0, order)


def merge_topk(parts: Sequence[TopK]) -> TopK:
    """One top-k from the top-k of disjoint shards, given in candidate order (shard 0 first)."""
    merged = TopK(parts[0].k, parts[0].values.shape[1], parts[0].values.dtype, parts[0].values.device)
    merged.values, merged.ids = _best(torch.cat([p.values for p in parts]), torch.cat([p.ids for p in parts]), merged.k)
    return merged
