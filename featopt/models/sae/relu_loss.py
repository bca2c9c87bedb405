"""The relu SAE's training loss with its gradient written out by hand.

Autograd on `relu((x - b_dec) W_enc + b_enc) W_dec + b_dec` runs six `[n, d_sae]`-sized matmuls
per step and a dozen passes over `[n, d_sae]` tensors. Two of them are waste: the gradient with
respect to the centred input `x - b_dec` is a full `[n, d_in]` matmul, although only its row sum
reaches `b_dec`; and the L1 term, relu mask and statistics each re-read the latents. Written out,
a step is five matmuls (two forward, three backward) and three elementwise passes; for the four
dictionaries of document 002 (1x, 2x, 4x, 8x) trained from one pass this is the difference between
the SAE steps costing more than the model's forward and costing less.

The loss is the one in `train.py`'s docstring, for rows `x [n, d_in]` (not requiring grad):

    loss = (sum ||x_hat - x||^2 + l1 * sum_i (sum_n z_ni) ||W_dec[i]||) / total_var

with `z = relu(pre)`, `pre = x W_enc + (b_enc - b_dec W_enc)` (the same pre-activations as
`SparseAutoencoder.pre_acts`, the centring moved onto the bias) and `x_hat = z W_dec + b_dec`.
Under autocast the matmuls run in the autocast dtype and the gradients come back in the weights'.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ReluLoss(torch.autograd.Function):
    """`apply(x, W_enc, b_enc, W_dec, b_dec, total_var, l1, count) -> (loss, sq, l0, fired)`.

    Shapes: `x [n, d_in]`, `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`,
    `b_dec [d_in]`, `total_var []`. Outputs: the scalar loss (differentiable), the summed squared
    error `sq []`, the number of nonzero latents `l0 []` and `fired [d_sae]` (bool, latent nonzero
    on some row); the last three carry no gradient. `count=False` skips counting `l0` (a pass over
    `[n, d_sae]`; training needs it only on logging steps) and returns 0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, total_var: Tensor, l1: float,
                count: bool = True):
        bias = b_enc - b_dec @ W_enc  # [d_sae]
        z = torch.addmm(bias, x.to(W_enc.dtype), W_enc).relu_()  # [n, d_sae]
        e = torch.addmm(b_dec, z, W_dec).sub_(x)  # x_hat - x, [n, d_in]
        acc = torch.promote_types(W_enc.dtype, torch.float32)  # sums in at least float32
        norms = W_dec.detach().to(acc).norm(dim=1)  # [d_sae]
        zsum = z.to(acc).sum(0)  # [d_sae]; z >= 0, so a latent fired iff its sum is positive
        sq = e.to(acc).pow(2).sum()
        loss = (sq + l1 * (zsum @ norms)) / total_var
        l0 = torch.count_nonzero(z) if count else torch.zeros((), dtype=torch.long, device=z.device)
        ctx.save_for_backward(x, z, e, W_enc, W_dec, b_dec, norms, zsum, total_var)
        ctx.l1 = l1
        fired = zsum > 0
        ctx.mark_non_differentiable(sq, l0, fired)
        return loss, sq.detach(), l0, fired

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_):
        x, z, e, W_enc, W_dec, b_dec, norms, zsum, total_var = ctx.saved_tensors
        acc = zsum.dtype
        c = (grad_loss / total_var).to(acc)
        dt = z.dtype  # the matmuls' dtype (bf16 under autocast)
        g_xhat = e * (2 * c).to(e.dtype)  # d loss / d x_hat, [n, d_in]
        # d loss / d z = g_xhat W_dec^T + l1 ||W_dec[i]|| c, kept only where relu passed.
        g_pre = torch.addmm((c * ctx.l1 * norms).to(dt), g_xhat.to(dt), W_dec.to(dt).T)  # [n, d_sae]
        g_pre = torch.ops.aten.threshold_backward(g_pre, z, 0)  # relu's own backward: one pass
        gsum = g_pre.to(acc).sum(0)  # [d_sae]
        grads = [None] * 8
        if ctx.needs_input_grad[1]:  # W_enc: x^T g_pre - b_dec (x) gsum
            grads[1] = (x.to(dt).T @ g_pre).to(acc).addr_(b_dec.to(acc), gsum, alpha=-1).to(W_enc.dtype)
        if ctx.needs_input_grad[2]:
            grads[2] = gsum.to(W_enc.dtype)
        if ctx.needs_input_grad[3]:  # W_dec: z^T g_xhat + l1 c (sum_n z_ni) W_dec[i] / ||W_dec[i]||
            scale = (c * ctx.l1) * zsum / norms.clamp_min(1e-12)
            grads[3] = (z.T @ g_xhat.to(dt)).to(acc).addcmul_(scale[:, None], W_dec.to(acc)).to(W_dec.dtype)
        if ctx.needs_input_grad[4]:  # b_dec: from the reconstruction, minus through the centring
            grads[4] = (g_xhat.to(acc).sum(0) - W_enc.to(acc) @ gsum).to(b_dec.dtype)
        return tuple(grads)


def relu_loss(x: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, total_var: Tensor,
              l1: float, count: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See :class:`ReluLoss`."""
    return ReluLoss.apply(x, W_enc, b_enc, W_dec, b_dec, total_var, l1, count)
