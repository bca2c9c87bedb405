"""The neuron finder of source document 004: which MLP neurons decode to a given token?

For a token t and a neuron n, the paper's normalized probability is `p_n(t) / mean(top-100 p_n)`:
the probability the neuron's decoded weights give t, over the mean of that neuron's 100 largest
probabilities (the paper's Figure 2). A word of several tokens says so and uses its first token
(`multi="first"`) or all of them (`multi="all"`: the summed probability of its tokens).
`featopt neurons find` (:mod:`featopt.commands.neurons`) runs these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.interventions.clamp import MULTI, target_ids
from featopt.models import ModelAdapter
from featopt.weights.decode import Decoded, Unembed, token_probs
from featopt.weights.neurons import neuron_weights
from featopt.weights.store import load_decoded


@dataclass
class Hit:
    layer: int
    neuron: int
    normalized: float
    prob: float
    tokens: list[str]  # the neuron's top tokens, best first
    probs: list[float]


def resolve_tokens(adapter: ModelAdapter, token: str | None, token_id: int | None, multi: str) -> tuple[list[int], str]:
    """The token ids to score and a note saying how a multi-token word was handled."""
    if multi not in MULTI:
        raise FeatoptError(f"--multi {multi!r} is not known: allowed are first and all.")
    vocab = adapter.lm_head.weight.shape[0]
    if token_id is not None:
        if not 0 <= token_id < vocab:
            raise FeatoptError(f"--token_id {token_id} is out of range: this model has token ids 0-{vocab - 1}.")
        return [token_id], ""
    if not token:
        raise FeatoptError("give a word or token (--token \" dog\") or a token id (--token_id 123).")
    return target_ids(adapter, token, multi)


def from_saved(path: str, adapter: ModelAdapter, layers: list[int] | None, ids: list[int], *, which: str, norm: str,
               mean_of: int) -> dict[int, Decoded]:
    """Reuse a decode run (`--decoded`): its top tokens and softmax denominators; the token's
    logits are one matmul. `layers` None: every layer it holds."""
    saved, decoded = load_decoded(path)
    for key, value in (("which", which), ("norm", norm), ("mean_of", mean_of)):
        if saved.get(key) != value:
            raise FeatoptError(f"--decoded was made with {key}={saved.get(key)!r}, not {value!r}: "
                               f"decode again or use the same --{key}.")
    if saved.get("model") != adapter.name:
        raise FeatoptError(f"--decoded was made for model {saved.get('model')!r}, not {adapter.name!r}.")
    missing = sorted(set(layers or []) - set(decoded))
    if missing:
        raise FeatoptError(f"--decoded holds layers {sorted(decoded)}, not {missing}: decode them or drop --layers.")
    unembed = Unembed.from_adapter(adapter, norm)
    for layer in (layers or sorted(decoded)):
        d = decoded[layer]
        d.watch_probs = token_probs(neuron_weights(adapter, layer, which), unembed, torch.tensor(ids), d.logsumexp).cpu()
    return {layer: decoded[layer] for layer in (layers or sorted(decoded))}


def best_neurons(adapter: ModelAdapter, decoded: dict[int, Decoded], top: int,
                 top_k: int) -> tuple[dict[int, Tensor], list[Hit]]:
    """`({layer: normalized [neurons]}, hits)`: every neuron's normalized probability of the watched
    tokens (decoded with `watch=`) and the best `top` over all layers, with their `top_k` tokens."""
    normalized = {layer: d.watch_probs.sum(1) / d.top_mean for layer, d in decoded.items()}
    flat = torch.cat(list(normalized.values()))
    owners = [(layer, n) for layer, v in normalized.items() for n in range(len(v))]
    hits = []
    for j in flat.topk(min(top, len(flat))).indices.tolist():
        layer, n = owners[j]
        d = decoded[layer]
        hits.append(Hit(layer, n, float(flat[j]), float(d.watch_probs[n].sum()),
                        [adapter.decode([t]) for t in d.ids[n, :top_k].tolist()],
                        [round(float(p), 6) for p in d.probs[n, :top_k]]))
    return normalized, hits
