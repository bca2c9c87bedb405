"""The training step of topk-like SAEs over their active latents only (sparsify's fused path).

A topk, batchtopk or matryoshka SAE keeps a few latents per row; autograd's dense path pays for all
`d_sae` of them twice more after the forward: the `[n, d_sae]` gradient of the pre-activations and
the `[d_in, n] x [n, d_sae]` matmul that turns it into the encoder's gradient. Here the
pre-activations are computed once without a graph, the kept `(row, latent)` pairs are chosen from
them, and only those entries get a graph (:func:`gather_pre`), whose backward reads the `m` kept
pairs: `m * d_in` work instead of `n * d_sae * d_in`. The decoder reads the kept rows of `W_dec`
(:func:`decode_pairs`, one `embedding_bag`). The dense autograd path stays the reference the
tests compare with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _GatherPre(torch.autograd.Function):
    """`values[j] = x[rows[j]] @ W_enc[:, cols[j]] + c[cols[j]]`, with a backward over the pairs only."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, c: Tensor, pre: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        ctx.save_for_backward(x, rows, cols)
        ctx.shapes = (W_enc.shape, c.shape)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, rows, cols = ctx.saved_tensors
        (d_in, d_sae), c_shape = ctx.shapes
        grad_w = grad_c = None
        if ctx.needs_input_grad[1]:
            # Row j of the [d_sae, d_in] gradient sums grad * x[row] over the pairs of latent j: one
            # embedding_bag over the pairs grouped by latent (no [m, d_in] intermediate), then
            # transposed back to W_enc's [d_in, d_sae].
            # sorted by (latent, row): unique keys, so the order (hence the rounding) is the same on every run
            order = torch.sort(cols * len(x) + rows).indices
            offsets = torch.searchsorted(cols[order], torch.arange(d_sae, device=cols.device))
            grad_w = F.embedding_bag(rows[order], x, offsets, per_sample_weights=grad[order].to(x.dtype), mode="sum").T
        if ctx.needs_input_grad[2]:
            grad_c = grad.new_zeros(c_shape).index_add_(0, cols, grad)
        return None, grad_w, grad_c, None, None, None


def gather_pre(x: Tensor, W_enc: Tensor, c: Tensor, pre: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The pre-activations `x W_enc + c` at the pairs `(rows [m], cols [m])`, `[m]`, differentiable
    in `W_enc [d_in, d_sae]` and `c [d_sae]` (not in `x [n, d_in]`, the data). `pre [n, d_sae]`
    is the same product computed without a graph, from which the pairs were chosen."""
    return _GatherPre.apply(x, W_enc, c, pre, rows, cols)


def decode_pairs(rows: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor, n: int) -> Tensor:
    """`[n, d_out]`: row r is `sum_j values[j] W_dec[cols[j]]` over the pairs with `rows[j] = r`
    (`rows` sorted ascending; a row without pairs is zero)."""
    offsets = torch.searchsorted(rows, torch.arange(n, device=rows.device))
    return F.embedding_bag(cols, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def row_topk_pairs(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row of `pre [n, d_sae]` as sorted `(rows [n*k], cols [n*k])`."""
    cols = pre.topk(k, dim=-1, sorted=False).indices
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, cols.reshape(-1)


def batch_topk_pairs(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The `n * k` largest entries of all of `pre [n, d_sae]` (BatchTopK), as `(rows, cols)` sorted by row.

    A top-k over all `n * d_sae` entries is slow on a CPU, so the cut (the `n * k`-th largest
    value) is looked for among each row's `4k` largest. A row's other entries are below its
    `4k`-th, so they matter only for rows whose `4k`-th reaches that cut ("full" rows, typically a
    few high-norm tokens): those rows join the search whole, which keeps the answer exact. Ties at
    the cut are all kept."""
    n, d_sae = pre.shape
    wide = min(d_sae, 4 * k)
    if wide == d_sae:
        flat = pre.reshape(-1).topk(n * k, sorted=False).indices.sort().values
        return flat // d_sae, flat % d_sae
    top = pre.topk(wide, dim=-1, sorted=False)
    floor = top.values.min(dim=-1).values  # [n]: each row's 4k-th largest

    def nth(values: Tensor) -> Tensor:
        return values.kthvalue(len(values) - n * k + 1).values

    cut = nth(top.values.reshape(-1))
    full = floor >= cut
    if not bool(full.any()):
        rows, slots = torch.nonzero(top.values >= cut, as_tuple=True)
        return rows, top.indices[rows, slots]
    cut = nth(torch.cat([top.values[~full].reshape(-1), pre[full].reshape(-1)]))
    rows, slots = torch.nonzero((top.values >= cut) & ~full[:, None], as_tuple=True)
    cols = top.indices[rows, slots]
    full_rows = torch.nonzero(full).flatten()
    extra, extra_cols = torch.nonzero(pre[full_rows] >= cut, as_tuple=True)
    rows, cols = torch.cat([rows, full_rows[extra]]), torch.cat([cols, extra_cols])
    order = torch.sort(rows * d_sae + cols).indices
    return rows[order], cols[order]


def auxk_loss(pre: Tensor, dead: Tensor, residual: Tensor, x: Tensor, W_enc: Tensor, c: Tensor, W_dec: Tensor) -> Tensor:
    """OpenAI's and sparsify's AuxK: the dead latents' top `d_out / 2` pre-activations per row
    reconstruct the residual `[n, d_out]` (detached); summed squared error, scaled down when fewer
    latents are dead than that (sparsify's rule)."""
    half = residual.shape[-1] // 2
    k_aux = min(half, int(dead.sum()))
    scale = min(int(dead.sum()) / half, 1.0)
    rows, cols = row_topk_pairs(torch.where(dead[None], pre, torch.full_like(pre, -torch.inf)), k_aux)
    values = torch.relu(gather_pre(x, W_enc, c, pre, rows, cols))
    e_hat = decode_pairs(rows, cols, values, W_dec, len(pre))
    return scale * (e_hat - residual.detach()).pow(2).sum()
