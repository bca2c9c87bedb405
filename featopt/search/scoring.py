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

    def __call__(self, acts: Tensor) -> Tensor:
        acts = acts.to(SCORE_DTYPE)
        if len(self.single_at) == self.n:  # only single features, in problem order: one gather
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
            `sum_t weights[p, t] * reduced_act[p, t]`.
    """

    def __init__(self, features: Sequence[tuple[int, ...] | None], width: int, weights: Tensor):
        self.reduce = FeatureReduce(features, width)
        self.weights = weights.to(torch.float64)
        if (self.weights[:, -1] == 0).any():
            bad = int((self.weights[:, -1] == 0).nonzero()[0])
            raise FeatoptError(
                f"problem {bad} selects no position of the candidate token (position {weights.shape[1] - 1}), "
                "so every candidate scores the same: include that position."
            )
        self.const: Tensor | None = None  # [G, P], the prefixes' part of each score

    def set_prefix(self, prefix_acts: Tensor | None) -> None:
        """`prefix_acts [G, L, width]` of the G prefixes (None when there is no prefix)."""
        if prefix_acts is None or prefix_acts.shape[1] == 0:
            self.const = None
            return
        reduced = self.reduce(prefix_acts)  # [G, L, P]
        w = self.weights[:, :-1].T.to(reduced.device, reduced.dtype)  # [L, P]
        self.const = (reduced * w).sum(1)  # [G, P]

    def __call__(self, acts: Tensor, group: Tensor | None = None) -> Tensor:
        """`acts [B, 1, width]` of the new tokens (rows of prefix `group [B]`) -> scores `[B, P]`."""
        reduced = self.reduce(acts[:, -1])
        scores = reduced * self.weights[:, -1].to(reduced.device, reduced.dtype)
        if self.const is not None:
            scores = scores + self.const.to(scores.dtype)[group if group is not None else 0]
        return scores


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


def _best(values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of `values [N, P]` per column, the earlier row first among equals."""
    if values.shape[0] <= 4 * k:
        return _sorted_best(values, ids, k)
    # A partial selection is much cheaper than sorting every row, and exact unless a tie
    # straddles the k-th place (torch.topk may then pick either row): those columns are sorted.
    top = torch.topk(values, k, dim=0)
    rows = torch.sort(top.indices, dim=0).values  # the selected rows, in row order
    order = torch.sort(values.gather(0, rows), dim=0, descending=True, stable=True).indices
    rows = rows.gather(0, order)
    best, best_ids = values.gather(0, rows), ids.gather(0, rows)
    tied = ((values >= top.values[-1]).sum(0) > k).nonzero().squeeze(1)
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
