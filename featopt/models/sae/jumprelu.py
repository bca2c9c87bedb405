"""The jumprelu SAE: `z = relu(pre) * (pre > threshold)` with a learned threshold per latent
(Gemma Scope, document 003), loaded from any of the formats and trained here.

Training (Rajamanoharan et al. 2024, Gemma Scope's recipe): the loss is the squared error plus
`l0_coef * L0` (on the scale of a fraction of variance, as every featopt loss), and the threshold,
which gets no gradient through a step, learns by the straight-through estimator: with the
rectangle kernel `K(u) = 1[|u| < 1/2]` of bandwidth `eps`,

- `d z_i / d theta_i = -(theta_i / eps) K((pre_i - theta_i) / eps)`,
- `d H(pre_i - theta_i) / d theta_i = -(1 / eps) K((pre_i - theta_i) / eps)` (H: the step in L0),

and the pre-activations get the plain gradient of `z` (`1[pre > theta]`) and none through L0.
Thresholds start at `INIT_THRESHOLD` and are kept at 0 or above after each step; decoder rows stay
at unit norm, as in Gemma Scope.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from featopt.models.sae.model import SAEConfig, SparseAutoencoder, register
from featopt.models.sae.training_parts import LossTerms

#: the thresholds' start, in the units of inputs scaled to mean squared norm d_in (SAELens' default)
INIT_THRESHOLD = 0.01


def _kernel(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold)
        grad_threshold = -(threshold * _kernel(pre, threshold, ctx.bandwidth) * grad).sum(0)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        return None, -(_kernel(pre, threshold, ctx.bandwidth) * grad).sum(0), None


def jumprelu_ste(pre: Tensor, threshold: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
    """`(z [n, d_sae], step [n, d_sae])` of pre-activations `pre [n, d_sae]` with the
    straight-through gradients to `threshold [d_sae]` written in the module docstring."""
    return _JumpReLU.apply(pre, threshold, bandwidth), _Step.apply(pre, threshold, bandwidth)


@register("jumprelu")
class JumpReluSAE(SparseAutoencoder):
    #: each latent is its pre-activation where that is above `max(firing_bar, 0)`, else 0 (`sae.wide`)
    keeps_pre = True
    saved_names = SparseAutoencoder.saved_names + ("threshold",)

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    def activate(self, pre: Tensor) -> Tensor:
        # relu too, as SAELens and Gemma Scope do: a negative threshold must not pass negative values.
        return torch.relu(pre) * (pre > self.threshold)

    def firing_bar(self, pre: Tensor) -> Tensor:
        return self.threshold.to(pre.dtype)

    def activate_columns(self, pre: Tensor, start: int) -> Tensor:
        """`activate` of the latents `start .. start + c` alone (`pre [..., c]`; `sae.wide`)."""
        return torch.relu(pre) * (pre > self.threshold[start:start + pre.shape[-1]])

    def firing_bar_columns(self, pre: Tensor, start: int) -> Tensor:
        """`firing_bar` of the latents `start .. start + c` alone (`pre [..., c]`)."""
        return self.threshold[start:start + pre.shape[-1]].to(pre.dtype)

    @classmethod
    def tensors_from_saelens(cls, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        if "log_threshold" in tensors:  # older sae-lens jumprelu checkpoints
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        return tensors

    # ----------------------------------------------------------------- training
    @torch.no_grad()
    def init_weights(self, generator=None, data_mean=None, input_mean=None) -> None:
        super().init_weights(generator, data_mean, input_mean)
        self.threshold.fill_(INIT_THRESHOLD)

    def training_loss(self, x: Tensor, total_var: Tensor, terms: LossTerms, y: Tensor | None = None) -> tuple[Tensor, dict]:
        y = x if y is None else y
        z, step = jumprelu_ste(self.training_pre_acts(x), self.threshold, terms.bandwidth)
        e = y - (self.decode(z) + self.skip_out(x))
        sq = e.pow(2).sum()
        l0 = step.sum()
        loss = (sq + terms.l0_coef * l0) / total_var
        fired = (z > 0).any(0)
        return loss, {"fvu": sq.detach(), "l0": l0.detach().double(), "fired": fired}

    @torch.no_grad()
    def after_step(self) -> None:
        self.threshold.clamp_(min=0)
