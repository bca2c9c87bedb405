"""MLP neurons decoded through the LM head, every layer (source document 004, "Flash Interpretability").

A neuron's input weights (its up-projection row: what it reads from the residual stream) are decoded
as a direction (:mod:`featopt.weights.decode`). For gated MLPs (Llama) the up-projection is the
paper's choice; `which="gate"` decodes the gate-projection rows instead.
`run_decode(DecodeConfig(...))` is the entry point of `featopt neurons decode`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.weights.decode import NORMS, ROW_CHUNK, VOCAB_CHUNK, Decoded, Unembed, decode_directions

WHICH = ("up", "gate")


def neuron_weights(adapter: ModelAdapter, layer: int, which: str = "up") -> Tensor:
    """`[neurons, d_model]`: the input weights of block `layer`'s MLP neurons (a view, no copy)."""
    if which not in WHICH:
        raise FeatoptError(f"which {which!r} is not known: allowed are up (the up-projection) and gate.")
    return adapter.mlp_up_weight(layer) if which == "up" else adapter.mlp_gate_weight(layer)


def parse_layer_list(layers: int | str | list[int], n_layers: int) -> list[int]:
    """`"all"`, `3`, `"0,3,7"`, `"0-3"` or a list -> sorted layer indices."""
    from featopt.discrete.common import parse_layers

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


@dataclass
class DecodeConfig:
    """Settings of `featopt neurons decode`."""

    model: str = "tiny-llama"
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    layers: str = "all"  # "all", "3", "0,3,7" or "0-3"
    which: str = "up"  # up (the paper) or gate (gated MLPs)
    norm: str = "none"  # none (the paper: LM head only), weight (final norm's gain), apply (the norm module)
    top_k: int = 10  # tokens kept per neuron
    mean_of: int = 100  # the finder's normalizer: mean of this many top probabilities
    row_chunk: int = ROW_CHUNK  # neurons per step
    vocab_chunk: int = VOCAB_CHUNK  # tokens per step
    untrained: bool = False
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    out: str | None = None  # default: featopt-runs/<time>
    progress: bool = True


@dataclass
class DecodeRun:
    decoded: dict[int, Decoded]
    adapter: ModelAdapter
    out: Path | None
    seconds: float


def check_config(config) -> None:
    """The settings every `neurons` command shares (each checked only where the config has it)."""
    from featopt.discrete.common import DTYPES

    if getattr(config, "which", "up") not in WHICH:
        raise FeatoptError(f"--which {config.which!r} is not known: allowed are {', '.join(WHICH)}.")
    if getattr(config, "norm", "none") not in NORMS:
        raise FeatoptError(f"--norm {config.norm!r} is not known: allowed are {', '.join(NORMS)}.")
    if config.dtype not in DTYPES:
        raise FeatoptError(f"--dtype {config.dtype!r} is not known: allowed are {', '.join(DTYPES)}.")
    for name in ("top_k", "mean_of", "row_chunk", "vocab_chunk"):
        if getattr(config, name, 1) < 1:
            raise FeatoptError(f"--{name} must be at least 1, got {getattr(config, name)}.")


def settings(config, adapter: ModelAdapter, layers: list[int]) -> dict:
    return {**asdict(config), "model": adapter.name, "layers": layers, "vocab_size": adapter.lm_head.weight.shape[0],
            "d_model": adapter.d_model, "neurons_per_layer": adapter.width(adapter.site("mlp_hidden", 0))}


def run_decode(config: DecodeConfig, adapter: ModelAdapter | None = None) -> DecodeRun:
    """Decode every neuron of the chosen layers; write the results into `config.out`."""
    from featopt.discrete.common import load, out_dir

    check_config(config)
    adapter = load(config, adapter)
    layers = parse_layer_list(config.layers, adapter.n_layers)
    start = time.perf_counter()
    decoded = decode_model(adapter, layers, which=config.which, norm=config.norm, k=config.top_k,
                           mean_of=config.mean_of, row_chunk=config.row_chunk, vocab_chunk=config.vocab_chunk,
                           progress=config.progress, desc="decode")
    seconds = time.perf_counter() - start
    from featopt.weights.store import save_decoded

    out = out_dir(config)
    save_decoded(out, decoded, {**settings(config, adapter, layers), "seconds": seconds}, adapter)
    return DecodeRun(decoded, adapter, out, seconds)


def format_decode(run: DecodeRun, per_layer: int = 3, tokens: int = 5) -> str:
    """Per layer, the neurons whose top token is most probable, with their top tokens."""
    lines = []
    for layer, d in run.decoded.items():
        for n in d.probs[:, 0].argsort(descending=True)[:per_layer].tolist():
            shown = ", ".join(f"{run.adapter.decode([t])!r} {p:.3g}"
                              for t, p in zip(d.ids[n, :tokens].tolist(), d.probs[n, :tokens].tolist()))
            lines.append(f"layer {layer:>3} neuron {n:>6}  {shown}")
    neurons = sum(len(d.ids) for d in run.decoded.values())
    lines.append(f"{neurons} neurons decoded in {run.seconds:.1f} s" + (f"; results: {run.out}" if run.out else ""))
    return "\n".join(lines)
