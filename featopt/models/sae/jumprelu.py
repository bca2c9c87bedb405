"""The jumprelu SAE: `z = relu(pre) * (pre > threshold)` with a learned threshold per latent
(Gemma Scope, document 003). featopt loads and runs these; it does not train them (their
threshold needs a straight-through estimator featopt does not implement)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from featopt.models.sae.model import SAEConfig, SparseAutoencoder, register


@register("jumprelu")
class JumpReluSAE(SparseAutoencoder):
    saved_names = SparseAutoencoder.saved_names + ("threshold",)
    trainable = False
    unit_decoder = False

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    def activate(self, pre: Tensor) -> Tensor:
        # relu too, as SAELens and Gemma Scope do: a negative threshold must not pass negative values.
        return torch.relu(pre) * (pre > self.threshold)

    def firing_bar(self, pre: Tensor) -> Tensor:
        return self.threshold.to(pre.dtype)

    @classmethod
    def tensors_from_saelens(cls, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        if "log_threshold" in tensors:  # older sae-lens jumprelu checkpoints
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        return tensors
