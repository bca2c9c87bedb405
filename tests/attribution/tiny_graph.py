"""Random transcoders for tiny-llama, shared by the graph tests."""

from __future__ import annotations

import torch

from featopt.models.sae import SAEConfig, SparseAutoencoder

D_SAE, K = 96, 6


def transcoder(layer, seed, skip=False, d=64, kind="mlp_in"):
    tc = SparseAutoencoder(SAEConfig(d_in=d, d_sae=D_SAE, architecture="topk", k=K, hook_name=f"blocks.{layer}.{kind}",
                                     target_hook_name=f"blocks.{layer}.mlp_out", d_out=d, skip=skip, apply_b_dec_to_input=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # outputs near the MLPs' scale, so the errors cancel without losing float32 digits
        for name, p in tc.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name in ("W_enc", "b_enc") else 0.01))
    return tc
