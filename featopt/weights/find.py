"""The neuron finder of source document 004: which MLP neurons decode to a given token?

For a token t and a neuron n, the paper's normalized probability is `p_n(t) / mean(top-100 p_n)`:
the probability the neuron's decoded weights give t, over the mean of that neuron's 100 largest
probabilities (the paper's Figure 2). A word of several tokens says so and uses its first token
(`multi="first"`) or all of them (`multi="all"`: the summed probability of its tokens).
`run_find(FindConfig(...))` is the entry point of `featopt neurons find`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.results import atomic_write
from featopt.weights.decode import ROW_CHUNK, VOCAB_CHUNK, Unembed, token_probs
from featopt.weights.neurons import check_config, decode_model, neuron_weights, parse_layer_list

MULTI = ("first", "all")


@dataclass
class FindConfig:
    """Settings of `featopt neurons find`."""

    model: str = "tiny-llama"
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    token: str | None = " the"  # a word or token, as the model would see it (mind the leading space)
    token_id: int | None = None  # or a token id
    multi: str = "first"  # a word of several tokens: first (its first token) or all (their summed probability)
    layers: str = "all"
    which: str = "up"
    norm: str = "none"
    top: int = 10  # neurons listed
    top_k: int = 5  # other top tokens shown per neuron
    mean_of: int = 100
    decoded: str | None = None  # a `neurons decode` result to reuse (its settings must match)
    plot: bool = True  # write find.png (the paper's Figure 2)
    row_chunk: int = ROW_CHUNK
    vocab_chunk: int = VOCAB_CHUNK
    untrained: bool = False
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    out: str | None = None
    progress: bool = True


@dataclass
class Hit:
    layer: int
    neuron: int
    normalized: float
    prob: float
    tokens: list[str]  # the neuron's top tokens, best first
    probs: list[float]


@dataclass
class FindRun:
    token_ids: list[int]
    tokens: list[str]
    note: str  # how a multi-token word was handled ("" for one token)
    normalized: dict[int, Tensor]  # {layer: [neurons]}
    hits: list[Hit]
    out: Path | None
    png: Path | None = None
    extra: dict = field(default_factory=dict)


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
    ids = adapter.encode(token, bos=False).tolist()
    if not ids:
        raise FeatoptError(f"{token!r} encodes to no token: give a non-empty word.")
    if len(ids) == 1:
        return ids, ""
    pieces = ", ".join(repr(adapter.decode([i])) for i in ids)
    if multi == "first":
        return ids[:1], f"{token!r} is {len(ids)} tokens ({pieces}): using the first, {adapter.decode(ids[:1])!r} (--multi all uses all)."
    return ids, f"{token!r} is {len(ids)} tokens ({pieces}): using all of them (their summed probability)."


def _from_saved(config: FindConfig, adapter: ModelAdapter, layers: list[int] | None, ids: list[int]):
    """Reuse a decode run: its top tokens and softmax denominators; the token's logits are one matmul."""
    from featopt.weights.store import load_decoded

    saved, decoded = load_decoded(config.decoded)
    for key in ("which", "norm", "mean_of"):
        if saved.get(key) != getattr(config, key):
            raise FeatoptError(f"--decoded was made with {key}={saved.get(key)!r}, not {getattr(config, key)!r}: "
                               f"decode again or use the same --{key}.")
    if saved.get("model") != adapter.name:
        raise FeatoptError(f"--decoded was made for model {saved.get('model')!r}, not {adapter.name!r}.")
    missing = sorted(set(layers or []) - set(decoded))
    if missing:
        raise FeatoptError(f"--decoded holds layers {sorted(decoded)}, not {missing}: decode them or drop --layers.")
    unembed = Unembed.from_adapter(adapter, config.norm)
    for layer in (layers or sorted(decoded)):
        d = decoded[layer]
        d.watch_probs = token_probs(neuron_weights(adapter, layer, config.which), unembed, torch.tensor(ids), d.logsumexp).cpu()
    return {layer: decoded[layer] for layer in (layers or sorted(decoded))}


def run_find(config: FindConfig, adapter: ModelAdapter | None = None) -> FindRun:
    """Score every neuron of the chosen layers for the token; the best `top` over the whole model."""
    from featopt.discrete.common import load, out_dir

    check_config(config)
    if config.top < 1:
        raise FeatoptError(f"--top must be at least 1, got {config.top}.")
    adapter = load(config, adapter)
    ids, note = resolve_tokens(adapter, config.token, config.token_id, config.multi)
    if config.decoded:
        layers = None if str(config.layers) == "all" else parse_layer_list(config.layers, adapter.n_layers)
        decoded = _from_saved(config, adapter, layers, ids)
    else:
        layers = parse_layer_list(config.layers, adapter.n_layers)
        decoded = decode_model(adapter, layers, which=config.which, norm=config.norm, k=config.top_k,
                               mean_of=config.mean_of, watch=torch.tensor(ids), row_chunk=config.row_chunk,
                               vocab_chunk=config.vocab_chunk, progress=config.progress, desc="find")
    normalized = {layer: d.watch_probs.sum(1) / d.top_mean for layer, d in decoded.items()}
    flat = torch.cat(list(normalized.values()))
    owners = [(layer, n) for layer, v in normalized.items() for n in range(len(v))]
    hits = []
    for j in flat.topk(min(config.top, len(flat))).indices.tolist():
        layer, n = owners[j]
        d = decoded[layer]
        hits.append(Hit(layer, n, float(flat[j]), float(d.watch_probs[n].sum()),
                        [adapter.decode([t]) for t in d.ids[n, :config.top_k].tolist()],
                        [round(float(p), 6) for p in d.probs[n, :config.top_k]]))
    label = adapter.decode(ids)
    out = out_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    png = None
    if config.plot:
        from featopt.plots import plot_normalized

        png = plot_normalized(normalized, label, out / "find.png", hits=hits[:3], model=adapter.name)
    document = {"model": adapter.name, "token": config.token, "token_ids": ids, "note": note,
                "which": config.which, "norm": config.norm, "mean_of": config.mean_of,
                "hits": [h.__dict__ for h in hits]}
    text = json.dumps(document, indent=2, ensure_ascii=False)
    atomic_write(out / "find.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return FindRun(ids, [adapter.decode([i]) for i in ids], note, normalized, hits, out, png)


def format_find(run: FindRun) -> str:
    lines = [run.note] if run.note else []
    lines.append(f"top neurons for {''.join(run.tokens)!r} (normalized probability = p(token) / mean of the top probabilities):")
    for h in run.hits:
        others = ", ".join(f"{t!r} {p:.3g}" for t, p in zip(h.tokens, h.probs))
        lines.append(f"layer {h.layer:>3} neuron {h.neuron:>6}  normalized {h.normalized:7.3f}  p {h.prob:.4f}  top: {others}")
    if run.png:
        lines.append(f"plot: {run.png}")
    return "\n".join(lines)
