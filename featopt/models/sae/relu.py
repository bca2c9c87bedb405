"""The relu SAE: `z = relu(pre)`, trained with an L1 penalty on the latents weighted by their decoder
rows' norms (document 002's kind; SAELens calls it "standard").

Its training loss runs through the hand-written gradient of :mod:`featopt.models.sae.relu_loss`
(five matmuls a step instead of autograd's six and a dozen passes), the same loss as
`sq / total_var + l1 * sum_i (sum_n z_ni) ||W_dec[i]|| / total_var`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from featopt.models.sae.model import SparseAutoencoder, register
from featopt.models.sae.training_parts import LossTerms
from featopt.models.sae.relu_loss import relu_loss


@register("relu")
class ReluSAE(SparseAutoencoder):
    #: each latent is its pre-activation where that is above `max(firing_bar, 0)`, else 0 (`sae.wide`)
    keeps_pre = True
    saelens_name = "standard"
    saelens_aliases = ("relu",)

    def activate(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def activate_columns(self, pre: Tensor, start: int) -> Tensor:
        """`activate` of the latents `start .. start + c` alone (`pre [..., c]`; `sae.wide`)."""
        return torch.relu(pre)

    def firing_bar_columns(self, pre: Tensor, start: int) -> Tensor:
        """`firing_bar` of the latents `start .. start + c` alone (`pre [..., c]`)."""
        return pre.new_zeros(())

    def sparsity_penalty(self, z: Tensor, terms: LossTerms) -> Tensor:
        return terms.l1 * (z * self.W_dec.norm(dim=1)).sum()

    def training_loss(self, x: Tensor, total_var: Tensor, terms: LossTerms, y: Tensor | None = None) -> tuple[Tensor, dict]:
        if not self.cfg.apply_b_dec_to_input or y is not None or self.cfg.skip:
            # the hand-written gradient assumes an SAE with the centring; transcoders take autograd's
            return super().training_loss(x, total_var, terms, y)
        loss, sq, l0, fired = relu_loss(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, total_var, terms.l1,
                                        count=terms.count)
        return loss, {"fvu": sq, "l0": l0.double(), "fired": fired}
