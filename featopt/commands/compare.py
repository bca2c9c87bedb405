"""Is gradient-based feature visualization accurate? (source document 000, "Complete Search
Features"). For one-token inputs the exhaustive sweep gives the exact optimum of every feature,
`max_a O_f(a)` over the vocabulary; the gradient methods run on the same problems, and each
feature reports how much of that optimum their decoded token reaches.

Methods: "embedding-pinv" and "embedding-nearest" are ONE embedding-ascent run (tokens = 1) read
through its two decoders; "simplex-argmax" is a softmax-simplex run decoded by its argmax; "gcg" is
the discrete GCG search over one real token (`gcg_steps` steps of `gcg_width` candidates). Every
activation is the decoded token's, re-measured by a forward pass (never the continuous input's).

`fraction = activation / optimum` when the optimum is positive: at most 1 (the optimum is the
maximum over every single token), 1 when the method found it, below 0 when its token pushes the
feature negative. When the optimum is <= 0 a ratio has no meaning (dividing by a negative flips
the order), so `fraction` is None; `gap = optimum - activation` (>= 0 up to rounding) is given for every feature.
`run(CompareConfig(...))` is the one entry point.
"""

from __future__ import annotations


import dataclasses
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L

from featopt.errors import FeatoptError
from featopt.specs import parse_features
from featopt.models import ModelAdapter, Site, load_model, model_options
from featopt.gradient import ascent
from featopt.gradient.module import FeatureOptimization
from featopt.runs.lightning import StepsDataModule
from featopt.gradient.readout import evaluate
from featopt.objectives.targets import Selection, l1_target
from featopt.results import FeatureResult, atomic_write, versions, write_results
from featopt.discrete import exhaustive
from featopt.models.sae.attach import attach_path
from featopt.discrete.common import parse_sites

METHODS = ("embedding-pinv", "embedding-nearest", "simplex-argmax", "gcg")
SIMPLEX_MODES = ("softmax", "projected")
DEVICES = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}  # -> Lightning's accelerator
TIE = 1e-6  # a different token within TIE * max(1, |optimum|) of the optimum counts as optimal


@dataclass
class CompareConfig:
    """Settings of one comparison (the flags of `featopt compare`)."""

    model: str = "tiny-gpt2"
    bos: bool = False  # every one-token input follows the model's BOS token (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    layer: int | str = 0  # one layer or several ("0,4,8"): one sweep, one gradient run per layer
    site: str = "resid_post"  # one kind
    features: str = "[:, :, 0-4]"  # positions, if given, can only be 0: inputs are one token
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    steps: int = 200
    lr: float = 0.05
    target: float = 100.0  # C in ||C - O_f(e)||_1, for every gradient method
    temperature: float = 1.0  # simplex only: softmax temperature at the start ...
    temperature_end: float | None = None  # ... and at the end (None: constant)
    simplex_mode: str = "softmax"  # or "projected" (the document's softmax after every step)
    top_k: int = 10  # the sweep's best tokens kept, to rank the methods' tokens
    gcg_steps: int = 16  # gcg: steps ...
    gcg_width: int = 512  # ... of this many candidates each
    gcg_topk: int = 4096  # gcg: tokens drawn from per step (the gradient's best)
    isolated: bool = False
    untrained: bool = False
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    out: str | None = None  # default: featopt-runs/<time>
    progress: bool = True
    sae: str | None = None  # an SAE folder: its latents are the features, at its own site


@dataclass
class MethodResult:
    method: str
    token_id: int
    token: str
    activation: float  # the decoded token's, re-measured
    fraction: float | None  # activation / optimum; None when the optimum is <= 0
    gap: float  # optimum - activation
    optimal: bool  # the optimum's token, or a token tied with it
    rank: int | None  # 1-based place in the sweep's top_k; None below it


@dataclass
class FeatureComparison:
    site: str
    spec: str
    optimum_token_id: int
    optimum_token: str
    optimum_activation: float
    methods: dict[str, MethodResult]


@dataclass
class CompareRun:
    features: list[FeatureComparison]  # site-major, then spec order
    summary: list[dict]  # per site and method (and site "all" with several sites)
    out: Path


def fraction_of(activation: float, optimum: float) -> float | None:
    return activation / optimum if optimum > 0 else None


def _check(config: CompareConfig) -> None:
    methods = config.methods
    if not methods or len(set(methods)) != len(methods) or set(methods) - set(METHODS):
        raise FeatoptError(f"--methods {methods!r} is not valid: give distinct methods among {', '.join(METHODS)}.")
    for name in ("steps", "top_k", "gcg_steps", "gcg_width", "gcg_topk"):
        if getattr(config, name) < 1:
            raise FeatoptError(f"--{name} must be at least 1, got {getattr(config, name)}.")
    if config.lr <= 0 or config.temperature <= 0 or (config.temperature_end or 1) <= 0:
        raise FeatoptError("--lr, --temperature and --temperature_end must be positive.")
    for name, allowed in (("simplex_mode", SIMPLEX_MODES), ("device", tuple(DEVICES))):
        if getattr(config, name) not in allowed:
            raise FeatoptError(f"--{name} {getattr(config, name)!r} is not known: allowed are {', '.join(allowed)}.")
    if "," in config.site:
        raise FeatoptError(f"--site {config.site!r} names several kinds: compare takes one (run it once per kind).")
    for problem in parse_features(config.features):
        if problem.positions not in (None, (0,)):
            raise FeatoptError(f"{problem.spec} selects position {max(problem.positions)}, but compare searches "
                               "one-token inputs: use position 0 or \":\".")


def _simplex(config: CompareConfig, adapter: ModelAdapter, settings: ascent.AscentConfig, site: Site):
    """The softmax-simplex prior on the same problems, the same objective and trainer settings."""
    from featopt.gradient.simplex import SimplexEmbeddings

    problems = parse_features(config.features, n_tokens=1, width=adapter.width(site), site=str(site))
    selection = Selection(site, problems, 1, adapter.width(site))
    prior = SimplexEmbeddings.uniform(len(problems), 1, adapter.vocab_size, config.seed, mode=config.simplex_mode,
                                      temperature=config.temperature, temperature_end=config.temperature_end)
    module = FeatureOptimization(prior, l1_target(selection, config.target), selection, adapter,
                                 isolated=config.isolated, lr=config.lr)
    L.seed_everything(config.seed, verbose=False)
    ascent.trainer_for(settings, Path(settings.out)).fit(module, datamodule=StepsDataModule(config.steps))
    results = evaluate(module, "simplex-argmax", seed=config.seed)[0]
    meta = {"method": "simplex-argmax", "config": asdict(config), "model": adapter.name, "site": str(site),
            "objective": module.objective.description}
    write_results(settings.out, results, meta)
    return results


def _gradient(config: CompareConfig, adapter: ModelAdapter, site: Site, out: Path) -> dict[str, list[tuple]]:
    """Per method, `(token id, re-measured activation)` per problem of `site`, in spec order."""
    settings = ascent.AscentConfig(
        model=config.model, bos=config.bos, layer=site.layer, site=site.kind, features=config.features, tokens=1, steps=config.steps,
        lr=config.lr, target=config.target, isolated=config.isolated, untrained=config.untrained, seed=config.seed,
        accelerator=DEVICES[config.device], decode_every=config.steps, progress=config.progress,
        out=str(out / "embedding-ascent" / site.name))
    picks = {}
    if {"embedding-pinv", "embedding-nearest"} & set(config.methods):
        results = ascent.run(settings, adapter).results  # both decoders are re-measured on the one run
        picks["embedding-pinv"] = [(r.extra["pinv_token_ids"][0], r.extra["pinv_activation"]) for r in results]
        picks["embedding-nearest"] = [(r.nearest_token_ids[0], r.extra["nearest_activation"]) for r in results]
    if "simplex-argmax" in config.methods:
        settings = dataclasses.replace(settings, out=str(out / "simplex" / site.name))
        picks["simplex-argmax"] = [(r.token_ids[0], r.activation) for r in _simplex(config, adapter, settings, site)]
    if "gcg" in config.methods:
        from featopt.discrete import gcg

        found = gcg.run(gcg.GCGConfig(
            model=config.model, bos=config.bos, layer=site.layer, site=site.kind, features=_one_position(config.features), tokens=1,
            steps=config.gcg_steps, search_width=config.gcg_width, topk=config.gcg_topk, allow="all",
            isolated=config.isolated, untrained=config.untrained, seed=config.seed,
            device="cpu" if config.device == "cpu" else "auto", out=str(out / "gcg" / site.name),
            progress=config.progress, sae=None), adapter).results
        picks["gcg"] = [(r.token_ids[-1], r.activation) for r in found]  # after a --bos prefix
    return picks


def _one_position(spec: str, position: str = ":") -> str:
    """The spec's problems with the position field `position` (default ":": one-token inputs have
    position 0 only, and GCG takes the position from its variant), in the same order."""
    items = []
    for problem in parse_features(spec):
        f = problem.features
        items.append(":" if f is None else str(f[0]) if len(f) == 1 else f"{f[0]}:{f[-1] + 1}")
    return f"[:, {position}, [" + ", ".join(items) + "]]"


def _outcome(method: str, token: int, activation: float, best: FeatureResult, adapter: ModelAdapter) -> MethodResult:
    optimum, top = best.activation, best.extra["top_k"]["token_ids"]
    gap = optimum - activation
    return MethodResult(method, int(token), adapter.decode([token]), float(activation),
                        fraction_of(activation, optimum), gap,
                        optimal=token == best.token_ids[-1] or gap <= TIE * max(1.0, abs(optimum)),
                        rank=top.index(token) + 1 if token in top else None)


def summarize(features: list[FeatureComparison], methods: list[str]) -> list[dict]:
    """Per site (and over all sites when there are several) and method: the mean and smallest
    fraction over the features that have one, the share of features whose optimum was found."""
    sites = list(dict.fromkeys(f.site for f in features))
    groups = [(s, [f for f in features if f.site == s]) for s in sites]
    groups += [("all", features)] if len(sites) > 1 else []
    rows = []
    for label, group in groups:
        for m in methods:
            outs = [f.methods[m] for f in group]
            fractions = [o.fraction for o in outs if o.fraction is not None]
            rows.append({"site": label, "method": m, "features": len(outs), "with_fraction": len(fractions),
                         "mean_fraction": statistics.fmean(fractions) if fractions else None,
                         "min_fraction": min(fractions) if fractions else None,
                         "optimal_share": sum(o.optimal for o in outs) / len(outs)})
    return rows


def run(config: CompareConfig, adapter: ModelAdapter | None = None) -> CompareRun:
    """Sweep once for the optimum of every feature, run the gradient methods, compare; writes
    `out/compare.json` (and each method's own run under `out/exhaustive`, `out/embedding-ascent`,
    `out/simplex`)."""
    _check(config)
    if adapter is None:
        adapter = load_model(config.model, untrained=config.untrained, seed=config.seed, **model_options(config))
    else:  # every method below reads the run's --bos from the adapter
        adapter = adapter.with_bos(config.bos)
    if config.sae:
        adapter, sae_site = attach_path(adapter, config.sae)
        sites = [sae_site]
    else:
        sites = parse_sites(adapter, config.site, config.layer)
    for site in sites:  # features out of range fail here, before any sweep
        parse_features(config.features, n_tokens=1, width=adapter.width(site), site=str(site))
    out = Path(config.out or Path("featopt-runs") / time.strftime("%Y%m%d-%H%M%S"))
    # An isolated block is swept alone; otherwise one sweep reads every layer.
    sweeps = [[s] for s in sites] if config.isolated else [sites]
    optima: list[FeatureResult] = []
    for group in sweeps:
        optima += exhaustive.run(exhaustive.ExhaustiveConfig(
            model=config.model, layer=",".join(str(s.layer) for s in group), site=sites[0].kind,
            # The sweep's positions count its [BOS] prefix: the searched token is position 1 after it.
            features=_one_position(config.features, "1") if config.bos else config.features, bos=config.bos,
            top_k=config.top_k, isolated=config.isolated, untrained=config.untrained,
            seed=config.seed, device=config.device,
            out=str(out / "exhaustive" / (group[0].name if config.isolated else "")), progress=config.progress,
        ), adapter).results
    features = []
    for site in sites:
        best = [r for r in optima if r.site == str(site)]
        picks = _gradient(config, adapter, site, out)
        specs = [q.spec for q in parse_features(config.features, n_tokens=1, width=adapter.width(site), site=str(site))]
        for p, b in enumerate(best):  # the searched token is the last (a --bos sweep's ids are [BOS, t])
            features.append(FeatureComparison(str(site), specs[p], b.token_ids[-1], b.tokens[-1], b.activation, {
                m: _outcome(m, *picks[m][p], b, adapter) for m in config.methods}))
    summary = summarize(features, config.methods)
    document = {"run": {"method": "compare", "config": asdict(config), "model": adapter.name,
                        "sites": [str(s) for s in sites], "versions": versions(),
                        "feature_map": adapter.describe_features(sites[0])},
                "summary": summary, "features": [asdict(f) for f in features]}
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, ensure_ascii=False)
    atomic_write(out / "compare.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return CompareRun(features, summary, out)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(result: CompareRun) -> str:
    """Per site, the documents' table (one column per feature): the optimum's token and
    activation, then each method's token, activation and fraction (`*`: found the optimum);
    then the summary."""
    blocks = []
    for site in dict.fromkeys(f.site for f in result.features):
        feats = [f for f in result.features if f.site == site]
        rows = [[site] + [f.spec for f in feats],
                ["exhaustive"] + [f"{f.optimum_token!r} {f.optimum_activation:.4g}" for f in feats]]
        for m in feats[0].methods:
            outs = [f.methods[m] for f in feats]
            rows.append([m] + [f"{o.token!r} {o.activation:.4g} ({_num(o.fraction)}){' *' if o.optimal else ''}"
                               for o in outs])
        blocks.append(rows)
    blocks.append([["site", "method", "mean fraction", "min fraction", "optimal"]] + [
        [s["site"], s["method"], _num(s["mean_fraction"]), _num(s["min_fraction"]),
         f"{round(s['optimal_share'] * s['features'])}/{s['features']}"] for s in result.summary])
    text = []
    for rows in blocks:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        text.append("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    return "\n\n".join(text) + "\n(fraction: activation / optimum, n/a when the optimum is <= 0; *: found the optimum)"
