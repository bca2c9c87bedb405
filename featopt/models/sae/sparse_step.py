"""The training step of topk-like SAEs over their active latents only (sparsify's fused path).

A topk, batchtopk or matryoshka SAE keeps a few latents per row; autograd's dense path pays for all
`d_sae` of them twice more after the forward: the `[n, d_sae]` gradient of the pre-activations and
the `[d_in, n] x [n, d_sae]` matmul that turns it into the encoder's gradient. Here the
pre-activations are computed once without a graph (into a reused buffer, :func:`preacts_buffer`),
the kept pairs are chosen from them (`selection.py`), and only those pairs get a graph:

- :func:`gather_pre`: the kept pre-activations, whose backward sums `grad * x[row]` per latent;
- :func:`decode_pairs`: the decoder over the kept rows of `W_dec`, whose backward gives each pair's
  `<W_dec[col], grad[row]>` and sums `value * grad[row]` per latent;
- :func:`squared_error`: the summed squared residual in three passes over `[n, d_out]` and its
  gradient in two (autograd's chain of add, sub, pow and sum takes about twice that).

Both backwards group the pairs by latent; :class:`KeptPairs` sorts them so once per step, and each
is one `embedding_bag` over the `m` pairs (`m * d` work instead of `n * d_sae * d`). The dense
autograd path stays the reference the tests compare with.
"""

from __future__ import annotations

import threading
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from featopt.models.sae.selection import row_topk_pairs

_BUFFERS = threading.local()


def preacts_buffer(n: int, d_sae: int, like: Tensor) -> Tensor:
    """An `[n, d_sae]` tensor to write a step's pre-activations into, reused from step to step (per
    thread, dtype and device; grown as needed). A fresh one would cost more than its matmul's
    fifth: above glibc's 32 MiB mmap threshold every allocation is new pages, faulted in one by one
    (measured 43 ms against 34 ms for `[4096, 576] x [576, 2304]`). Valid until the next call."""
    key = (like.dtype, like.device)
    store = getattr(_BUFFERS, "store", None)
    if store is None:
        store = _BUFFERS.store = {}
    buffer = store.get(key)
    if buffer is None or buffer.numel() < n * d_sae:
        buffer = store[key] = torch.empty(n * d_sae, dtype=like.dtype, device=like.device)
    return buffer[:n * d_sae].view(n, d_sae)


class KeptPairs:
    """The kept `(rows [m], cols [m])` of a batch of `n` rows and `d_sae` latents, rows ascending,
    and their pre-activations `values [m]` when the selection had them (else read from `pre`), with
    the groupings the sparse backwards read: by row (bag offsets for the decoder) and by latent (an
    order and offsets), each computed once."""

    def __init__(self, rows: Tensor, cols: Tensor, n: int, d_sae: int, values: Tensor | None = None):
        self.rows, self.cols, self.n, self.d_sae, self.values = rows, cols, n, d_sae, values

    def subset(self, keep: Tensor) -> KeptPairs:
        """The pairs where `keep [m]` (bool) holds, rows still ascending."""
        values = None if self.values is None else self.values[keep]
        return KeptPairs(self.rows[keep], self.cols[keep], self.n, self.d_sae, values)

    @cached_property
    def row_offsets(self) -> Tensor:
        """`[n]`: where each row's pairs start (a row without pairs: an empty bag)."""
        return torch.searchsorted(self.rows, torch.arange(self.n, device=self.rows.device))

    @cached_property
    def by_latent(self) -> tuple[Tensor, Tensor, Tensor]:
        """`(order [m], rows[order] [m], offsets [d_sae])`: the pairs grouped by latent. The sort is
        stable, so within a latent the rows stay ascending: the same order, hence the same float
        sums, on every run."""
        order = torch.sort(self.cols, stable=True).indices
        counts = torch.bincount(self.cols, minlength=self.d_sae)
        return order, self.rows[order], torch.cumsum(counts, 0) - counts

    def sum_by_latent(self, table: Tensor, weights: Tensor) -> Tensor:
        """`[d_sae, d]`: row j is `sum of weights[p] * table[rows[p]]` over the pairs p of latent j."""
        order, rows, offsets = self.by_latent
        return F.embedding_bag(rows, table, offsets, per_sample_weights=weights[order].to(table.dtype), mode="sum")


class _GatherPre(torch.autograd.Function):
    """`values[p] = x[rows[p]] @ W_enc[:, cols[p]] + c[cols[p]]`, with a backward over the pairs only."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, c: Tensor, pre: Tensor, pairs: KeptPairs) -> Tensor:
        ctx.save_for_backward(x)
        ctx.pairs, ctx.c_shape = pairs, c.shape
        return pre[pairs.rows, pairs.cols] if pairs.values is None else pairs.values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        pairs = ctx.pairs
        grad_w = grad_c = None
        if ctx.needs_input_grad[1]:  # [d_sae, d_in] by latent, then into W_enc's [d_in, d_sae] layout
            grad_w = pairs.sum_by_latent(x, grad).T.contiguous()
        if ctx.needs_input_grad[2]:
            grad_c = grad.new_zeros(ctx.c_shape).index_add_(0, pairs.cols, grad)
        return None, grad_w, grad_c, None, None


class _DecodePairs(torch.autograd.Function):
    """`out[r] = sum of values[p] * W_dec[cols[p]]` over the pairs p of row r; backward over the pairs only."""

    @staticmethod
    def forward(ctx, values: Tensor, W_dec: Tensor, pairs: KeptPairs) -> Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.pairs = pairs
        return F.embedding_bag(pairs.cols, W_dec, pairs.row_offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor):
        values, W_dec = ctx.saved_tensors
        pairs = ctx.pairs
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            # <W_dec[cols[p]], grad[rows[p]]> for every pair: embedding_bag's own backward for its
            # per-sample weights (mode 0: sum), which reads the pairs without gathering them
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad.contiguous(), W_dec, pairs.cols, pairs.row_offsets, pairs.rows, 0).to(values.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = pairs.sum_by_latent(grad, values)
        return grad_values, grad_w, None


class _SquaredError(torch.autograd.Function):
    """`(sum of (y - recon - base)^2, the residual e)`; differentiable in `recon` and `base`."""

    @staticmethod
    def forward(ctx, y: Tensor, recon: Tensor, base: Tensor):
        e = torch.sub(y, recon)
        e.sub_(base)
        ctx.save_for_backward(e)
        ctx.base_is_row = base.dim() < e.dim()
        ctx.mark_non_differentiable(e)
        return e.pow(2).sum(), e

    @staticmethod
    def backward(ctx, grad_sq: Tensor, grad_e):
        (e,) = ctx.saved_tensors
        grad_recon = e * (-2 * grad_sq)
        grad_base = None
        if ctx.needs_input_grad[2]:
            grad_base = grad_recon.sum(0) if ctx.base_is_row else grad_recon
        return None, grad_recon, grad_base


def squared_error(y: Tensor, recon: Tensor, base: Tensor) -> tuple[Tensor, Tensor]:
    """`(sum ||y - recon - base||^2, e = y - recon - base [n, d_out])` for targets `y [n, d_out]` (data,
    no gradient), a reconstruction `recon [n, d_out]` and `base` (`[d_out]`, or `[n, d_out]` with a
    skip connection); the sum is differentiable in `recon` and `base`, `e` is not."""
    return _SquaredError.apply(y, recon, torch.as_tensor(base, dtype=recon.dtype, device=recon.device))


def gather_pre(x: Tensor, W_enc: Tensor, c: Tensor, pre: Tensor, pairs: KeptPairs) -> Tensor:
    """The pre-activations `x W_enc + c` at the kept pairs, `[m]`, differentiable in `W_enc [d_in,
    d_sae]` and `c [d_sae]` (not in `x [n, d_in]`, the data). `pre [n, d_sae]` is the same product
    computed without a graph, from which the pairs were chosen."""
    return _GatherPre.apply(x, W_enc, c, pre, pairs)


def decode_pairs(pairs: KeptPairs, values: Tensor, W_dec: Tensor) -> Tensor:
    """`[n, d_out]`: row r is `sum_p values[p] W_dec[cols[p]]` over the kept pairs of row r (a row
    without pairs is zero); differentiable in `values [m]` and `W_dec [d_sae, d_out]`."""
    return _DecodePairs.apply(values, W_dec, pairs)


def auxk_loss(pre: Tensor, dead: Tensor, residual: Tensor, x: Tensor, W_enc: Tensor, c: Tensor, W_dec: Tensor) -> Tensor:
    """OpenAI's and sparsify's AuxK: the dead latents' top `d_out / 2` pre-activations per row
    reconstruct the residual `[n, d_out]` (detached); summed squared error, scaled down when fewer
    latents are dead than that (sparsify's rule)."""
    half = residual.shape[-1] // 2
    dead_ids = torch.nonzero(dead).flatten()
    k_aux = min(half, len(dead_ids))
    scale = min(len(dead_ids) / half, 1.0)
    rows, slots, top = row_topk_pairs(pre.index_select(1, dead_ids), k_aux)  # only the dead latents' columns
    pairs = KeptPairs(rows, dead_ids[slots], len(pre), pre.shape[1], top)
    values = torch.relu(gather_pre(x, W_enc, c, pre, pairs))
    e_hat = decode_pairs(pairs, values, W_dec)
    return scale * (e_hat - residual.detach()).pow(2).sum()
