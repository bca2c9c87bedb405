"""MLP neurons decoded through the LM head, every layer (source document 004, "Flash Interpretability").

A neuron's input weights (its up-projection row: what it reads from the residual stream) are decoded
as a direction (:mod:`featopt.weights.decode`). For gated MLPs (Llama) the up-projection is the
paper's choice; `which="gate"` decodes the gate-projection rows instead.
`featopt neurons decode` (:mod:`featopt.commands.neurons`) runs :func:`decode_model`.
"""

from __future__ import annotations

from torch import Tensor
from tqdm.auto import tqdm

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.specs import parse_layers
from featopt.weights.decode import ROW_CHUNK, VOCAB_CHUNK, Decoded, Unembed, decode_directions

WHICH = ("up", "gate")


def neuron_weights(adapter: ModelAdapter, layer: int, which: str = "up") -> Tensor:
    """`[neurons, d_model]`: the input weights of block `layer`'s MLP neurons (a view, no copy)."""
    if which not in WHICH:
        raise FeatoptError(f"which {which!r} is not known: allowed are up (the up-projection) and gate.")
    return adapter.mlp_up_weight(layer) if which == "up" else adapter.mlp_gate_weight(layer)


def parse_layer_list(layers: int | str | list[int], n_layers: int) -> list[int]:
    """`"all"`, `3`, `"0,3,7"`, `"0-3"` or a list -> sorted layer indices."""
    return list(range(n_layers)) if str(layers).strip().lower() == "all" else parse_layers(layers, n_layers)


def decode_model(
    adapter: ModelAdapter, layers: list[int], *, which: str = "up", norm: str = "none", k: int = 10,
    mean_of: int = 100, watch: Tensor | None = None, probabilities: bool = True, row_chunk: int = ROW_CHUNK,
    vocab_chunk: int = VOCAB_CHUNK, progress: bool = True, desc: str = "neurons",
) -> dict[int, Decoded]:
    """`{layer: Decoded}` for every neuron of every layer in `layers`, one progress bar (neurons)."""
    unembed = Unembed.from_adapter(adapter, norm)
    weights = {layer: neuron_weights(adapter, layer, which) for layer in layers}
    total = sum(len(w) for w in weights.values())
    with tqdm(total=total, desc=desc, unit="neuron", disable=not progress, leave=False) as bar:
        return {layer: decode_directions(w, unembed, k=k, mean_of=mean_of, watch=watch, probabilities=probabilities,
                                         row_chunk=row_chunk, vocab_chunk=vocab_chunk, progress=bar.update)
                for layer, w in weights.items()}
