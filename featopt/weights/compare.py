"""Checkpoint comparison of source document 004: the share of MLP neurons whose top decoded token
is the same in two models of the same shape (the paper: 75.4% between Llama 3.1 8B and its
Instruct version), per layer and overall. `featopt neurons compare` (:mod:`featopt.commands.neurons`)
runs :func:`compare`; only the top token is needed, so no probabilities are computed."""

from __future__ import annotations

from dataclasses import dataclass

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.weights.decode import ROW_CHUNK, VOCAB_CHUNK
from featopt.weights.neurons import decode_model, parse_layer_list


@dataclass
class LayerAgreement:
    layer: int
    same: int
    neurons: int

    @property
    def share(self) -> float:
        return self.same / self.neurons


def shape(adapter: ModelAdapter) -> dict:
    """What must match for neurons to correspond one to one."""
    return {"layers": adapter.n_layers, "d_model": adapter.d_model, "vocabulary": adapter.lm_head.weight.shape[0],
            "neurons per layer": adapter.width(adapter.site("mlp_hidden", 0)), "gated MLP": adapter.family.mlp_gate is not None}


def compare(a: ModelAdapter, b: ModelAdapter, layers: list[int] | str = "all", *, which: str = "up",
            norm: str = "none", row_chunk: int = ROW_CHUNK, vocab_chunk: int = VOCAB_CHUNK,
            progress: bool = True) -> list[LayerAgreement]:
    """Per layer, how many neurons have the same top token in `a` and `b`."""
    sa, sb = shape(a), shape(b)
    if sa != sb:
        diff = "; ".join(f"{key} {sa[key]} vs {sb[key]}" for key in sa if sa[key] != sb[key])
        raise FeatoptError(f"models {a.name!r} and {b.name!r} differ in shape ({diff}): neurons can only be "
                           "compared between models of the same architecture and size.")
    layers = parse_layer_list(layers, a.n_layers) if isinstance(layers, str) else layers
    kw = dict(which=which, norm=norm, k=1, probabilities=False, row_chunk=row_chunk, vocab_chunk=vocab_chunk)
    top_a = decode_model(a, layers, progress=progress, desc="model A", **kw)
    top_b = decode_model(b, layers, progress=progress, desc="model B", **kw)
    return [LayerAgreement(layer, int((top_a[layer].ids[:, 0] == top_b[layer].ids[:, 0]).sum()), len(top_a[layer].ids))
            for layer in layers]
