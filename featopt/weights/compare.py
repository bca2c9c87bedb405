"""Checkpoint comparison of source document 004: the share of MLP neurons whose top decoded token
is the same in two models of the same shape (the paper: 75.4% between Llama 3.1 8B and its
Instruct version), per layer and overall. `run_compare(CompareConfig(...))` is the entry point of
`featopt neurons compare`; only the top token is needed, so no probabilities are computed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.results import atomic_write, versions
from featopt.weights.decode import ROW_CHUNK, VOCAB_CHUNK
from featopt.weights.neurons import check_config, decode_model, parse_layer_list


@dataclass
class CompareConfig:
    """Settings of `featopt neurons compare`."""

    model: str = "tiny-llama"
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    model_b: str | None = None  # default: the same name (then say --untrained_b to compare with a re-init)
    layers: str = "all"
    which: str = "up"
    norm: str = "none"
    untrained: bool = False
    untrained_b: bool = False
    seed: int = 0
    seed_b: int = 0
    row_chunk: int = ROW_CHUNK
    vocab_chunk: int = VOCAB_CHUNK
    dtype: str = "float32"
    device: str = "auto"
    out: str | None = None
    progress: bool = True


@dataclass
class LayerAgreement:
    layer: int
    same: int
    neurons: int

    @property
    def share(self) -> float:
        return self.same / self.neurons


@dataclass
class CompareRun:
    layers: list[LayerAgreement]
    model_a: str
    model_b: str
    out: Path | None

    @property
    def same(self) -> int:
        return sum(a.same for a in self.layers)

    @property
    def neurons(self) -> int:
        return sum(a.neurons for a in self.layers)

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


def run_compare(config: CompareConfig, a: ModelAdapter | None = None, b: ModelAdapter | None = None) -> CompareRun:
    """Load both models (or use the adapters given), compare them and write `compare.json`."""
    from dataclasses import replace

    from featopt.discrete.common import load, out_dir

    check_config(config)
    a = load(config, a)
    config_b = replace(config, model=config.model_b or config.model, untrained=config.untrained_b, seed=config.seed_b)
    b = load(config_b, b)
    agreement = compare(a, b, config.layers, which=config.which, norm=config.norm, row_chunk=config.row_chunk,
                        vocab_chunk=config.vocab_chunk, progress=config.progress)
    result = CompareRun(agreement, a.name, b.name, out_dir(config))
    document = {"config": asdict(config), "model_a": a.name, "model_b": b.name, "versions": versions(),
                "overall": {"same": result.same, "neurons": result.neurons, "share": result.share},
                "layers": [{**asdict(x), "share": x.share} for x in agreement]}
    result.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2)
    atomic_write(result.out / "compare.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return result


def format_compare(run: CompareRun) -> str:
    lines = [f"same top token: {run.model_a!r} vs {run.model_b!r}", "layer  same / neurons   share"]
    lines += [f"{x.layer:>5}  {x.same:>6} / {x.neurons:<7}  {100 * x.share:6.2f}%" for x in run.layers]
    lines.append(f"  all  {run.same:>6} / {run.neurons:<7}  {100 * run.share:6.2f}%")
    return "\n".join(lines)
