"""Reference helpers of the flow tests: tiny seeded SAEs for tiny-llama (3 layers, d_model 64) at
the residual stream after blocks 0-2 and the MLP and attention outputs of blocks 1-2, hidden states
read by plain HF forward hooks, and the topk encoding written out in float64 numpy."""

from __future__ import annotations

import numpy as np
import torch

from featopt.feature_flow.saes import MODULES
from featopt.models.sae.model import SAEConfig, SparseAutoencoder

D, D_SAE, K = 64, 48, 8
KEYS = [(0, "res"), (1, "res"), (2, "res"), (1, "mlp"), (2, "mlp"), (1, "att"), (2, "att")]


def make_sae(layer: int, module: str, *, d_sae: int = D_SAE, seed: int = 0, arch: str = "topk", k: int = K,
             W_dec: torch.Tensor | None = None) -> SparseAutoencoder:
    """A seeded SAE at `layer/module`; `W_dec` (rows unit-normed) overrides the random decoder and
    the encoder is its transpose, so planted directions are read back."""
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=d_sae, architecture=arch, k=k if arch == "topk" else None,
                                      hook_name=f"blocks.{layer}.{MODULES[module]}"))
    sae.init_weights(torch.Generator().manual_seed(seed + 100 * layer + {"res": 0, "mlp": 1, "att": 2}[module]))
    if W_dec is not None:
        with torch.no_grad():
            W = W_dec / W_dec.norm(dim=1, keepdim=True)
            sae.W_dec.copy_(W)
            sae.W_enc.copy_(W.T)
    return sae.eval().requires_grad_(False)


def _out(output):
    return output[0] if isinstance(output, tuple) else output


def hidden(llama, contexts) -> dict:
    """`{(layer, module): float64 [N, T, d]}` read by plain forward hooks on the HF modules."""
    got, handles = {}, []
    for L, layer in enumerate(llama.model.model.layers):
        for module, part in (("res", layer), ("mlp", layer.mlp), ("att", layer.self_attn)):
            handles.append(part.register_forward_hook(
                lambda mod, args, output, key=(L, module): got.__setitem__(key, _out(output).detach().double().numpy())))
    try:
        with torch.no_grad():
            llama.model(input_ids=contexts)
    finally:
        for h in handles:
            h.remove()
    return got


def encode64(sae, x: np.ndarray) -> np.ndarray:
    """topk SAE in float64: relu of the k largest of `(x - b_dec) W_enc + b_enc`, zeros elsewhere."""
    pre = (x - sae.b_dec.double().numpy()) @ sae.W_enc.double().numpy() + sae.b_enc.double().numpy()
    top = np.argsort(-pre, axis=-1)[..., :sae.cfg.k]
    z = np.zeros_like(pre)
    np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    return z
