"""Encodes of a wide SAE a chunk of latents at a time, or sparsely: never `[rows, d_sae]` at once.

Dictionaries of 1M latents make `encode(x)` of a batch a slab of gigabytes, and `activate` copies
it. Here the encoder runs over consecutive chunks of columns, `W_enc[:, start:stop]` (a view: BLAS
reads it in place), so at most a `[rows, chunk]` slab lives at a time:

- `encode_chunks(sae, x, chunk)`: `(start, z[..., start:stop])` for consecutive chunks, equal to
  the slices of `sae.encode(x)`.
- `encode_topk(sae, x, chunk)`: a topk SAE's kept latents `(indices, values)`, `[..., k]` each.
- `encode_sparse(sae, x, chunk)`: the nonzero latents of any SAE as COO `(rows, cols, values)`.
- `pre_act_chunks`, `firing_chunks`: the same for the readouts (`pre_acts`, `firing_score`).

Elementwise rules (relu, jumprelu, batchtopk and matryoshka at inference) are applied per chunk
by the architecture's `activate_columns(pre, start)`. Topk needs each row's k largest
pre-activations over all latents first: one chunked pass keeps a running top-k per row, and a
chunk of `z` is then scattered from it (no second matmul). Tie rule: among equal pre-activations
at the k-th place the lower latent index is kept. The dense `torch.topk` promises no rule (on CPU
it keeps some of the tied latents, not always the lower ones), so there the two may keep different
latents of the same value; everywhere else they are equal.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from featopt import memory
from featopt.errors import FeatoptError
from featopt.models.sae.topk import TopKSAE

#: A chunk's `[rows, chunk]` float32 slab stays below this: big enough for BLAS to run at full
#: speed, small enough that the copies of `activate` and the scoring stay near the caches.
CHUNK_BYTES = 64 << 20
#: float32 slabs a chunk needs at once (pre-activations, latents, a mask or scores)
COPIES = 4


def chunk_size(sae, rows: int, device: torch.device | str = "cpu", *, limit: int = CHUNK_BYTES) -> int:
    """Latents per chunk for `rows` input rows: `COPIES` slabs `[rows, chunk]` of float32 within
    `limit` bytes and within what is free on `device` (at least 1, at most d_sae)."""
    free = memory.available(device)
    budget = limit if free is None else min(limit, int(free * memory.HEADROOM))
    return max(1, min(sae.d_sae, budget // (COPIES * 4 * max(rows, 1))))


#: The dense `[rows, d_sae]` encode is used while its copies (`COPIES` slabs of float32) stay below
#: this and below half of what is free.
DENSE_BYTES = 2 << 30


def dense_fits(sae, rows: int, device: torch.device | str = "cpu") -> bool:
    """Whether the dense encode of `rows` rows (`[rows, d_sae]`, and activate's copies) fits."""
    free = memory.available(device)
    limit = DENSE_BYTES if free is None else min(DENSE_BYTES, free // 2)
    return rows * sae.d_sae * 4 * COPIES <= limit


def elementwise(sae) -> bool:
    """Whether each latent depends on its own pre-activation only (`activate_columns` exists)."""
    return getattr(sae, "activate_columns", None) is not None


def chunkable(sae) -> bool:
    """Whether this module can encode an SAE chunk by chunk (elementwise rules and topk)."""
    return elementwise(sae) or isinstance(sae, TopKSAE)


def _rows(sae, x: Tensor) -> Tensor:
    """`x [..., d_in]` -> the centred rows `[n, d_in]` that `pre_acts` multiplies, in the SAE's dtype."""
    x = x.reshape(-1, x.shape[-1]).to(sae.W_enc.dtype)
    return x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x


def _pre(sae, rows: Tensor, start: int, stop: int) -> Tensor:
    """Pre-activations `[n, stop - start]` of centred `rows [n, d_in]`, as `pre_acts` computes them."""
    return rows @ sae.W_enc[:, start:stop] + sae.b_enc[start:stop]


def _spans(d_sae: int, chunk: int) -> Iterator[tuple[int, int]]:
    if chunk < 1:
        raise FeatoptError(f"a chunk of latents must hold at least 1 latent, got {chunk}.")
    for start in range(0, d_sae, chunk):
        yield start, min(start + chunk, d_sae)


def _check(sae) -> None:
    if not chunkable(sae):
        raise FeatoptError(f"the {sae.name} SAE has no chunked encode: give it an `activate_columns` method.")


# ----------------------------------------------------------------------------- topk
def _lexi_best(values: Tensor, latents: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of `values [n, m]` per row, the lower latent (`latents [n, m]`) first among
    equals: `(values [n, k], latents [n, k])`, largest first."""
    order = torch.sort(latents, dim=1, stable=True).indices
    values, latents = values.gather(1, order), latents.gather(1, order)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), latents.gather(1, order)


def _chunk_top(pre: Tensor, start: int, k: int) -> tuple[Tensor, Tensor]:
    """A chunk's k largest per row (`pre [n, c]`, latents from `start`), ties to the lower latent."""
    k = min(k, pre.shape[1])
    top = pre.topk(k, dim=1)
    values, latents = top.values, top.indices
    # torch.topk may take any of several equal values at the k-th place: such rows are sorted
    tied = ((pre >= values[:, -1:]).sum(1) > k).nonzero().squeeze(1)
    if len(tied):
        sub = pre.index_select(0, tied)
        index = torch.arange(pre.shape[1], device=pre.device).expand_as(sub)
        values[tied], latents[tied] = _lexi_best(sub, index, k)
    return values, latents + start


def top_pre_acts(sae, x: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Each row's k largest pre-activations over all latents, by one chunked pass:
    `(values [n, k], latents [n, k])` for `x [..., d_in]` flattened to n rows, largest first, the
    lower latent first (and kept) among equals."""
    rows, k = _rows(sae, x), sae.cfg.k
    chunk = chunk or chunk_size(sae, len(rows), rows.device)
    best: tuple[Tensor, Tensor] | None = None
    for start, stop in _spans(sae.d_sae, chunk):
        values, latents = _chunk_top(_pre(sae, rows, start, stop), start, k)
        if best is not None:
            values, latents = _lexi_best(torch.cat([best[0], values], 1), torch.cat([best[1], latents], 1), k)
        best = (values, latents)
    return best


def encode_topk(sae, x: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """A topk SAE's kept latents of `x [..., d_in]`: `(indices [..., k], values [..., k])`, values
    `relu(pre)` (0 where a kept pre-activation is not positive), largest first."""
    if not isinstance(sae, TopKSAE) or elementwise(sae):
        raise FeatoptError(f"encode_topk needs a topk SAE, got a {sae.name} one: use encode_sparse.")
    values, latents = top_pre_acts(sae, x, chunk)
    shape = (*x.shape[:-1], values.shape[1])
    return latents.reshape(shape), torch.relu(values).reshape(shape)


def _scatter(latents: Tensor, values: Tensor, start: int, stop: int) -> Tensor:
    """`[n, stop - start]`: `values [n, k]` at their `latents [n, k]` that fall in the chunk, else 0."""
    z = values.new_zeros(len(values), stop - start)
    r, j = ((latents >= start) & (latents < stop)).nonzero().unbind(1)
    z[r, latents[r, j] - start] = values[r, j]
    return z


# ----------------------------------------------------------------------------- chunks
@torch.no_grad()
def encode_chunks(sae, x: Tensor, chunk: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """`(start, z [..., c])` for consecutive chunks of latents of `x [..., d_in]`: equal to
    `sae.encode(x)[..., start:start + c]` (topk ties: see the module docstring)."""
    _check(sae)
    rows = _rows(sae, x)
    chunk = chunk or chunk_size(sae, len(rows), rows.device)
    lead = x.shape[:-1]
    if elementwise(sae):
        for start, stop in _spans(sae.d_sae, chunk):
            yield start, sae.activate_columns(_pre(sae, rows, start, stop), start).reshape(*lead, stop - start)
        return
    values, latents = top_pre_acts(sae, x, chunk)
    values = torch.relu(values)
    for start, stop in _spans(sae.d_sae, chunk):
        yield start, _scatter(latents, values, start, stop).reshape(*lead, stop - start)


@torch.no_grad()
def pre_act_chunks(sae, x: Tensor, chunk: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """`(start, pre [..., c])`: the slices of `sae.pre_acts(x)`, chunk by chunk."""
    rows = _rows(sae, x)
    chunk = chunk or chunk_size(sae, len(rows), rows.device)
    for start, stop in _spans(sae.d_sae, chunk):
        yield start, _pre(sae, rows, start, stop).reshape(*x.shape[:-1], stop - start)


@torch.no_grad()
def firing_chunks(sae, x: Tensor, chunk: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """`(start, score [..., c])`: the slices of `sae.firing_score(x)`, chunk by chunk (topk: one
    pass for each row's k-th largest pre-activation, then a second over the chunks)."""
    _check(sae)
    rows = _rows(sae, x)
    chunk = chunk or chunk_size(sae, len(rows), rows.device)
    lead = x.shape[:-1]
    top = None if elementwise(sae) else top_pre_acts(sae, x, chunk)
    for start, stop in _spans(sae.d_sae, chunk):
        pre = _pre(sae, rows, start, stop)
        if top is None:
            z, bar = sae.activate_columns(pre, start), sae.firing_bar_columns(pre, start)
        else:
            z, bar = _scatter(top[1], torch.relu(top[0]), start, stop), top[0][:, -1:]
        yield start, torch.where(z > 0, z, pre - torch.clamp(bar, min=0)).reshape(*lead, stop - start)


@torch.no_grad()
def encode_sparse(sae, x: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The nonzero latents of `x [..., d_in]` (flattened to n rows) as COO `(rows [nnz], cols
    [nnz], values [nnz])`, sorted by row then latent; `[n, d_sae]` is never allocated."""
    _check(sae)
    if not elementwise(sae):
        latents, values = encode_topk(sae, x, chunk)
        latents, values = latents.reshape(-1, latents.shape[-1]), values.reshape(-1, values.shape[-1])
        r, j = (values > 0).nonzero().unbind(1)
        cols, vals = latents[r, j], values[r, j]
    else:
        rs, cs, vs = [], [], []
        for start, z in encode_chunks(sae, x, chunk):
            z = z.reshape(-1, z.shape[-1])
            r, c = z.nonzero().unbind(1)
            rs.append(r)
            cs.append(c + start)
            vs.append(z[r, c])
        r, cols, vals = torch.cat(rs), torch.cat(cs), torch.cat(vs)
    order = torch.argsort(r * sae.d_sae + cols)
    return r[order], cols[order], vals[order]
