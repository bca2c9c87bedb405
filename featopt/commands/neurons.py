"""`featopt neurons decode|find|compare`: MLP neurons read through the LM head (source document 004,
"Flash Interpretability"). `decode` writes every neuron's top tokens (:mod:`featopt.weights.store`),
`find` the neurons most specialised for a token (`find.json`, `find.png`), `compare` the share of
neurons whose top token two models of the same shape share (`compare.json`). The algorithms are
:mod:`featopt.weights`; `featopt neurons clamp` is :mod:`featopt.commands.clamp`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from featopt.commands.fields import check_at_least, check_choice, record_of
from featopt.commands.loading import load_for
from featopt.commands.result import CommandResult
from featopt.commands.settings import ModelSettings, OutputSettings, UntrainedSettings
from featopt.models import ModelAdapter, dtype_of
from featopt.results import atomic_write, versions
from featopt.runs.outdir import out_folder
from featopt.weights.compare import LayerAgreement
from featopt.weights.compare import compare as agreement
from featopt.weights.decode import NORMS, ROW_CHUNK, VOCAB_CHUNK, Decoded
from featopt.weights.find import Hit, best_neurons, from_saved, resolve_tokens
from featopt.weights.neurons import WHICH, decode_model, parse_layer_list
from featopt.weights.store import save_decoded


@dataclass
class NeuronSettings:
    """Which neurons are read, and how they pass the LM head (decode, find and compare alike)."""

    layers: str = "all"
    """layers: "all", "3", "0,3,7" or "0-3" (the blocks whose MLP neurons are read)"""
    which: str = "up"
    """up (the up-projection: the paper's choice) or gate (the gate-projection of gated MLPs)"""
    norm: str = "none"
    """none (the paper: the LM head only), weight (the final norm's gain first) or apply (the final norm module)"""
    row_chunk: int = ROW_CHUNK
    """neurons per step"""
    vocab_chunk: int = VOCAB_CHUNK
    """tokens per step"""
    device: str = "auto"
    """auto (cuda when there is one), cpu, cuda, cuda:N or mps"""


def check_neuron_settings(config, counts: list[str]) -> None:
    """The settings every `neurons` command shares (--which, --norm where the config has them,
    --dtype), then each of `counts` at least 1."""
    if hasattr(config, "which"):
        check_choice(config, "which", WHICH)
    if hasattr(config, "norm"):
        check_choice(config, "norm", NORMS)
    dtype_of(config.dtype)
    check_at_least(config, counts)


# ----------------------------------------------------------------------------- decode
@dataclass
class DecodeConfig(OutputSettings, NeuronSettings, UntrainedSettings, ModelSettings):
    """Settings of `featopt neurons decode`."""

    top_k: int = 10
    """tokens kept per neuron"""
    mean_of: int = 100
    """the finder's normalizer: the mean of this many top probabilities"""


@dataclass
class DecodeRun(CommandResult):
    decoded: dict[int, Decoded]
    adapter: ModelAdapter
    out: Path | None
    seconds: float

    def table(self, per_layer: int = 3, tokens: int = 5) -> str:
        """Per layer, the neurons whose top token is most probable, with their top tokens."""
        lines = []
        for layer, d in self.decoded.items():
            for n in d.probs[:, 0].argsort(descending=True)[:per_layer].tolist():
                shown = ", ".join(f"{self.adapter.decode([t])!r} {p:.3g}"
                                  for t, p in zip(d.ids[n, :tokens].tolist(), d.probs[n, :tokens].tolist()))
                lines.append(f"layer {layer:>3} neuron {n:>6}  {shown}")
        neurons = sum(len(d.ids) for d in self.decoded.values())
        lines.append(f"{neurons} neurons decoded in {self.seconds:.1f} s" + (f"; results: {self.out}" if self.out else ""))
        return "\n".join(lines)


def decode(config: DecodeConfig, adapter: ModelAdapter | None = None) -> DecodeRun:
    """Decode every neuron of the chosen layers; write the results into `config.out`."""
    check_neuron_settings(config, ["top_k", "mean_of", "row_chunk", "vocab_chunk"])
    adapter = load_for(config, adapter)
    layers = parse_layer_list(config.layers, adapter.n_layers)
    start = time.perf_counter()
    decoded = decode_model(adapter, layers, which=config.which, norm=config.norm, k=config.top_k,
                           mean_of=config.mean_of, row_chunk=config.row_chunk, vocab_chunk=config.vocab_chunk,
                           progress=config.progress, desc="decode")
    seconds = time.perf_counter() - start
    out = out_folder(config.out)
    settings = {**record_of(config), "model": adapter.name, "layers": layers, "vocab_size": adapter.lm_head.weight.shape[0],
                "d_model": adapter.d_model, "neurons_per_layer": adapter.width(adapter.site("mlp_hidden", 0)),
                "seconds": seconds}
    save_decoded(out, decoded, settings, adapter)
    return DecodeRun(decoded, adapter, out, seconds)


# ----------------------------------------------------------------------------- find
@dataclass
class FindConfig(OutputSettings, NeuronSettings, UntrainedSettings, ModelSettings):
    """Settings of `featopt neurons find`."""

    token: str | None = " the"
    """a word or token, as the model would see it (mind the leading space)"""
    token_id: int | None = None
    """or a token id"""
    multi: str = "first"
    """a word of several tokens: first (its first token) or all (their summed probability)"""
    top: int = 10
    """neurons listed"""
    top_k: int = 5
    """other top tokens shown per neuron"""
    mean_of: int = 100
    """the normalizer: the mean of this many top probabilities of the neuron"""
    decoded: str | None = None
    """a `neurons decode` result to reuse (its settings must match)"""
    plot: bool = True
    """write find.png (the paper's Figure 2)"""


@dataclass
class FindRun(CommandResult):
    token_ids: list[int]
    tokens: list[str]
    note: str  # how a multi-token word was handled ("" for one token)
    normalized: dict[int, Tensor]  # {layer: [neurons]}
    hits: list[Hit]
    out: Path | None
    png: Path | None = None
    extra: dict = field(default_factory=dict)

    def table(self) -> str:
        lines = [self.note] if self.note else []
        lines.append(f"top neurons for {''.join(self.tokens)!r} (normalized probability = p(token) / mean of the top "
                     "probabilities):")
        for h in self.hits:
            others = ", ".join(f"{t!r} {p:.3g}" for t, p in zip(h.tokens, h.probs))
            lines.append(f"layer {h.layer:>3} neuron {h.neuron:>6}  normalized {h.normalized:7.3f}  p {h.prob:.4f}  "
                         f"top: {others}")
        if self.png:
            lines.append(f"plot: {self.png}")
        return "\n".join(lines)


def find(config: FindConfig, adapter: ModelAdapter | None = None) -> FindRun:
    """Score every neuron of the chosen layers for the token; the best `top` over the whole model."""
    check_neuron_settings(config, ["top_k", "mean_of", "row_chunk", "vocab_chunk", "top"])
    adapter = load_for(config, adapter)
    ids, note = resolve_tokens(adapter, config.token, config.token_id, config.multi)
    if config.decoded:
        layers = None if str(config.layers) == "all" else parse_layer_list(config.layers, adapter.n_layers)
        decoded = from_saved(config.decoded, adapter, layers, ids, which=config.which, norm=config.norm,
                             mean_of=config.mean_of)
    else:
        layers = parse_layer_list(config.layers, adapter.n_layers)
        decoded = decode_model(adapter, layers, which=config.which, norm=config.norm, k=config.top_k,
                               mean_of=config.mean_of, watch=torch.tensor(ids), row_chunk=config.row_chunk,
                               vocab_chunk=config.vocab_chunk, progress=config.progress, desc="find")
    normalized, hits = best_neurons(adapter, decoded, config.top, config.top_k)
    out = out_folder(config.out)
    out.mkdir(parents=True, exist_ok=True)
    png = None
    if config.plot:
        from featopt.plots import plot_normalized

        png = plot_normalized(normalized, adapter.decode(ids), out / "find.png", hits=hits[:3], model=adapter.name)
    document = {"model": adapter.name, "token": config.token, "token_ids": ids, "note": note,
                "which": config.which, "norm": config.norm, "mean_of": config.mean_of,
                "hits": [asdict(h) for h in hits]}
    text = json.dumps(document, indent=2, ensure_ascii=False)
    atomic_write(out / "find.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return FindRun(ids, [adapter.decode([i]) for i in ids], note, normalized, hits, out, png)


# ----------------------------------------------------------------------------- compare
@dataclass
class CompareConfig(OutputSettings, NeuronSettings, UntrainedSettings, ModelSettings):
    """Settings of `featopt neurons compare`: --model (A) against --model_b (B)."""

    untrained: bool = False
    """re-initialize model A from its config under --seed"""
    seed: int = 0
    """random seed of model A's re-initialization (--untrained)"""
    model_b: str | None = None
    """the second model (default: the same name; then say --untrained_b to compare with a re-initialization)"""
    untrained_b: bool = False
    """re-initialize model B from its config under --seed_b"""
    seed_b: int = 0
    """random seed of model B's re-initialization (--untrained_b)"""


@dataclass
class CompareRun(CommandResult):
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

    def table(self) -> str:
        lines = [f"same top token: {self.model_a!r} vs {self.model_b!r}", "layer  same / neurons   share"]
        lines += [f"{x.layer:>5}  {x.same:>6} / {x.neurons:<7}  {100 * x.share:6.2f}%" for x in self.layers]
        lines.append(f"  all  {self.same:>6} / {self.neurons:<7}  {100 * self.share:6.2f}%")
        return "\n".join(lines)


def compare(config: CompareConfig, adapter: ModelAdapter | None = None, adapter_b: ModelAdapter | None = None) -> CompareRun:
    """Load both models (or use the adapters given: `adapter` is A, `adapter_b` B), compare them
    and write `compare.json`."""
    check_neuron_settings(config, ["row_chunk", "vocab_chunk"])
    a = load_for(config, adapter)
    b = load_for(replace(config, model=config.model_b or config.model, untrained=config.untrained_b, seed=config.seed_b),
                 adapter_b)
    layers = agreement(a, b, config.layers, which=config.which, norm=config.norm, row_chunk=config.row_chunk,
                       vocab_chunk=config.vocab_chunk, progress=config.progress)
    result = CompareRun(layers, a.name, b.name, out_folder(config.out))
    document = {"config": record_of(config), "model_a": a.name, "model_b": b.name, "versions": versions(),
                "overall": {"same": result.same, "neurons": result.neurons, "share": result.share},
                "layers": [{**asdict(x), "share": x.share} for x in layers]}
    result.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2)
    atomic_write(result.out / "compare.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return result
