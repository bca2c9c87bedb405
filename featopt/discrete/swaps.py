"""Candidate swaps from token gradients (GCG, Zou et al. 2023, as in nanoGCG): per position, the
top-k tokens by the negative gradient of the loss w.r.t. a one-hot input; each candidate replaces
`n_replace` random positions by random picks among their top-k."""

from __future__ import annotations

import torch
from torch import Tensor


def top_candidates(grad: Tensor, allowed: Tensor, topk: int, curvature: Tensor | None = None) -> Tensor:
    """`grad [R, N, V]` -> ids `[R, N, k]` of the k allowed tokens with the most negative
    gradient per position (the swaps a first-order model says lower the loss most).

    `curvature [R, N, V]`, when given, is added to the gradient: a second-order term such as
    `||E_v - e_current||^2` (see `step_penalty`) that keeps far-away tokens from winning on the
    linear term alone."""
    if curvature is not None:
        grad = grad + curvature
    masked = torch.full_like(grad, float("inf"))
    masked[..., allowed] = grad[..., allowed]
    return (-masked).topk(min(topk, len(allowed)), dim=-1).indices


def step_penalty(embedding: Tensor, current: Tensor) -> Tensor:
    """`||E_v - E_current[r, n]||^2` for every token v: `embedding [V, d]`, `current [R, N]` ids
    -> `[R, N, V]` float32 (the quadratic term of a loss whose Hessian in the input embedding is
    about 2I, as for a squared distance at an early residual site)."""
    E = embedding.float()
    e = E[current.to(E.device)]  # [R, N, d]
    return ((E * E).sum(1)[None, None, :] - 2 * e @ E.T + (e * e).sum(-1, keepdim=True)).cpu()


def sample_swaps(current: Tensor, top: Tensor, width: int, n_replace: int, generator: torch.Generator,
                 editable: Tensor | None = None, row_k: Tensor | None = None) -> Tensor:
    """`width` candidates per row: `current [R, N]` with `n_replace` positions (distinct, chosen
    among `editable [R, N]`, default all) replaced by random picks of `top [R, N, k]` (of its
    first `row_k[r]` columns for row r, default all k).

    Returns `[R, width, N]`. Everything random comes from `generator`, so a seed fixes it.
    """
    R, N = current.shape
    k = top.shape[-1]
    editable = torch.ones(R, N, dtype=torch.bool) if editable is None else editable.cpu()
    # Random keys, non-editable positions last: the first n_replace of the argsort are the swaps.
    keys = torch.rand(R, width, N, generator=generator) + (~editable)[:, None, :].float() * 2
    # n is the most swaps any row takes: a row with fewer editable positions gets its extras on
    # fixed positions, put back below (so each row swaps min(n_replace, its editable count)).
    n = max(1, min(n_replace, int(editable.sum(1).max())))
    positions = keys.argsort(dim=-1)[..., :n]  # [R, width, n]
    limit = torch.full((R,), k) if row_k is None else row_k.clamp(1, k)
    picks = (torch.rand(R, width, n, generator=generator) * limit[:, None, None]).long().clamp_max(k - 1)
    rows = torch.arange(R)[:, None, None]
    values = top.cpu()[rows, positions, picks]  # [R, width, n]
    out = current.cpu()[:, None, :].repeat(1, width, 1)
    out.scatter_(2, positions, values)
    if n == 1:  # where every single swap fits in the width, take each once instead of sampling
        for r in range(R):
            where = editable[r].nonzero()[:, 0]
            count = len(where) * int(limit[r])
            if count <= width:
                pos = where.repeat_interleave(int(limit[r]))
                tok = top.cpu()[r, where, :int(limit[r])].reshape(-1)
                out[r, :count] = current[r].cpu()
                out[r, torch.arange(count), pos] = tok
    # Where a row has fewer editable positions than n, its extra "swaps" land on fixed positions:
    # put those back.
    fixed = ~editable[:, None, :].expand_as(out)
    out[fixed] = current.cpu()[:, None, :].expand_as(out)[fixed]
    return out


def distinct(candidates: Tensor, keys: Tensor, across: bool = False) -> tuple[Tensor, Tensor]:
    """Drop repeats: `candidates [C, N]` with `keys [C]` (a row or a problem) -> the distinct
    `(candidates [C', N], keys [C'])` per key, in the order of first appearance (deterministic).
    With `across`, a sequence is kept once whatever its key (with the key of its first appearance)."""
    keyed = torch.cat([keys[:, None] * int(not across), candidates], dim=1)
    unique, inverse = torch.unique(keyed, dim=0, return_inverse=True)
    first = torch.full((len(unique),), len(keyed), dtype=torch.long).scatter_reduce(
        0, inverse, torch.arange(len(keyed)), reduce="amin")
    order = first.sort().values
    return candidates[order], keys[order]


class Seen:
    """Sequences already evaluated, per key, as 64-bit hashes: a search never pays twice for the
    same sequence (a stuck row re-samples the same swaps often). Collisions are possible in
    principle and harmless in practice (about C^2 / 2^64 for C sequences)."""

    def __init__(self, n_tokens: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed + 0x5EED)
        self.mult = torch.randint(1, 2**62, (n_tokens + 1,), generator=gen) | 1
        self.hashes = torch.zeros(0, dtype=torch.long)

    def _hash(self, candidates: Tensor, keys: Tensor) -> Tensor:
        keyed = torch.cat([keys[:, None], candidates], dim=1).long()
        return (keyed * self.mult).sum(dim=1)  # int64 arithmetic wraps: a fine hash

    def new(self, candidates: Tensor, keys: Tensor) -> Tensor:
        """Mask `[C]` of the candidates not seen before."""
        return ~torch.isin(self._hash(candidates, keys), self.hashes)

    def add(self, candidates: Tensor, keys: Tensor) -> None:
        self.hashes = torch.cat([self.hashes, self._hash(candidates, keys)]).unique()
