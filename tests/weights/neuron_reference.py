"""Independent references for the neuron tests: tiny models in float64 and the whole softmax at once.

Tiny models' random weights decode to nearly uniform distributions, so neighbouring logits are
close; float64 keeps the rounding of any matmul far below those gaps, so top-k orders can be
compared exactly.
"""

from __future__ import annotations

import torch

from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny


def tiny(name: str = "tiny-llama", seed: int = 0) -> ModelAdapter:
    model, tok = build_tiny(name, seed)
    return ModelAdapter(model.double().requires_grad_(False), tok, name=name)


def full_softmax(logits: torch.Tensor, k: int, mean_of: int = 100):
    """The whole `[N, V]` softmax at once: `(probs, top-k ids, top-k probs, mean of the top mean_of)`."""
    probs = torch.softmax(logits, dim=-1)
    top = probs.topk(k, dim=-1)
    return probs, top.indices, top.values, probs.topk(min(mean_of, probs.shape[-1]), dim=-1).values.mean(-1)


def up_rows(model, family: str, layer: int) -> torch.Tensor:
    """Block `layer`'s up-projection rows `[neurons, d_model]`, read from the HF modules by hand."""
    if family == "gpt2":
        return model.transformer.h[layer].mlp.c_fc.weight.T  # Conv1D stores [in, out]
    return model.model.layers[layer].mlp.up_proj.weight
