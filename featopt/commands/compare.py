"""`featopt compare`: is gradient-based feature visualization accurate? (source document 000,
"Complete Search Features"). For one-token inputs the exhaustive sweep gives the exact optimum of
every problem's objective over the vocabulary; the gradient methods and GCG run on the same
problems, and each reports how much of that optimum its token reaches.

Methods: "embedding-pinv" and "embedding-nearest" are ONE embedding-ascent run (tokens = 1) read
through its two decoders; "simplex-argmax" is a softmax-simplex run decoded by its argmax; "gcg" is
the discrete GCG search over one real token. Every method's token is scored the same way, by a
plain forward under the objective (`--objective`, default maximize: the activation); the gradient
methods train on the documents' `||C - O_f(e)||_1` (C = `--target`) when the objective is the
default maximize, and on the objective itself otherwise.

`fraction = score / optimum` when the optimum is positive: at most 1, 1 when the method found it.
When the optimum is <= 0 a ratio has no meaning, so `fraction` is None; `gap = optimum - score`
(>= 0 up to rounding) is given for every problem.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from featopt.commands.fields import check_at_least, check_choice, record_of
from featopt.commands.loading import load_for, site_list
from featopt.commands.optimize import AscentConfig, build, optimize
from featopt.commands.result import CommandResult
from featopt.commands.search import ExhaustiveConfig, exhaustive
from featopt.commands.settings import InputSettings, OutputSettings, TargetSettings, UntrainedSettings
from featopt.commands.swaps import GCGConfig, gcg
from featopt.commands.tables import aligned
from featopt.commands.targets import objective_for
from featopt.discrete.measure import remeasure
from featopt.errors import FeatoptError
from featopt.gradient.ascent import train, trainer_for
from featopt.gradient.readout import evaluate
from featopt.models import ModelAdapter, Site
from featopt.objectives import Objective
from featopt.objectives.problems import primary
from featopt.results import FeatureResult, atomic_write, versions, write_results
from featopt.runs.outdir import out_folder
from featopt.specs import parse_features

METHODS = ("embedding-pinv", "embedding-nearest", "simplex-argmax", "gcg")
DEVICES = {"auto": "auto", "cpu": "cpu", "cuda": "gpu"}  # -> Lightning's accelerator
TIE = 1e-6  # a different token within TIE * max(1, |optimum|) of the optimum counts as optimal


@dataclass
class CompareConfig(OutputSettings, TargetSettings, UntrainedSettings, InputSettings):
    """Settings of one comparison (the flags of `featopt compare`)."""

    model: str = "tiny-gpt2"
    """built-in tiny-gpt2/tiny-llama/tiny-neox, a name under FEATOPT_MODEL_PATH, a folder, a .gguf file or a hub id"""
    features: str = "[:, :, 0-4]"
    """feature spec; positions, if given, can only be 0: inputs are one token"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """the methods compared with the exhaustive optimum"""
    steps: int = 200
    """gradient steps"""
    lr: float = 0.05
    """Adam learning rate of the gradient methods"""
    temperature: float = 1.0
    """simplex only: softmax temperature at the start"""
    temperature_end: float | None = None
    """simplex only: temperature at the end (default: constant)"""
    simplex_mode: str = "softmax"
    """softmax (free logits) or projected (the document's softmax after every step)"""
    top_k: int = 10
    """the sweep's best tokens kept, to rank the methods' tokens"""
    gcg_steps: int = 16
    """gcg: steps"""
    gcg_width: int = 512
    """gcg: candidates per step"""
    gcg_topk: int = 4096
    """gcg: tokens drawn from per step (the gradient's best)"""
    isolated: bool = False
    """the site's block alone, without the blocks before it"""
    device: str = "auto"
    """auto, cpu or cuda"""


@dataclass
class MethodResult:
    method: str
    token_id: int
    token: str
    activation: float  # the token's score under the objective (for maximize: its activation), re-measured
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
class CompareRun(CommandResult):
    features: list[FeatureComparison]  # site-major, then spec order
    summary: list[dict]  # per site and method (and site "all" with several sites)
    out: Path

    def table(self) -> str:
        return format_table(self)


def fraction_of(activation: float, optimum: float) -> float | None:
    return activation / optimum if optimum > 0 else None


def _check(config: CompareConfig) -> None:
    methods = config.methods
    if not methods or len(set(methods)) != len(methods) or set(methods) - set(METHODS):
        raise FeatoptError(f"--methods {methods!r} is not valid: give distinct methods among {', '.join(METHODS)}.")
    check_at_least(config, ["steps", "top_k", "gcg_steps", "gcg_width", "gcg_topk"])
    if config.lr <= 0 or config.temperature <= 0 or (config.temperature_end or 1) <= 0:
        raise FeatoptError("--lr, --temperature and --temperature_end must be positive.")
    check_choice(config, "simplex_mode", ("softmax", "projected"))
    check_choice(config, "device", tuple(DEVICES))
    if "," in config.site:
        raise FeatoptError(f"--site {config.site!r} names several kinds: compare takes one (run it once per kind).")
    for problem in parse_features(config.features):
        if problem.positions not in (None, (0,)):
            raise FeatoptError(f"{problem.spec} selects position {max(problem.positions)}, but compare searches "
                               "one-token inputs: use position 0 or \":\".")


def _one_position(spec: str, position: str = ":") -> str:
    """The spec's problems with the position field `position` (default ":": one-token inputs have
    position 0 only, and GCG takes the position from its variant), in the same order."""
    items = []
    for problem in parse_features(spec):
        f = problem.features
        items.append(":" if f is None else str(f[0]) if len(f) == 1 else f"{f[0]}:{f[-1] + 1}")
    return f"[:, {position}, [" + ", ".join(items) + "]]"


def _ascent_settings(config: CompareConfig, site: Site, out: Path, name: str, **more) -> AscentConfig:
    plain = isinstance(config.objective, str) and config.objective.strip() == "maximize"
    return AscentConfig(
        model=config.model, bos=config.bos, layer=site.layer, site=site.kind, features=config.features, tokens=1,
        steps=config.steps, lr=config.lr, target=config.target, objective="l1" if plain else config.objective,
        isolated=config.isolated, untrained=config.untrained, seed=config.seed, accelerator=DEVICES[config.device],
        decode_every=config.steps, progress=config.progress, out=str(out / name / site.name), **more)


def _simplex(config: CompareConfig, adapter: ModelAdapter, site: Site, out: Path) -> list[FeatureResult]:
    """The softmax-simplex prior on the same problems, objective and trainer settings."""
    settings = _ascent_settings(config, site, out, "simplex", prior="simplex", simplex_mode=config.simplex_mode,
                                temperature=config.temperature, temperature_end=config.temperature_end)
    module = build(settings, adapter)
    train(module, trainer_for(settings, Path(settings.out)), steps=config.steps, seed=config.seed, out=Path(settings.out))
    results = evaluate(module, "simplex-argmax", seed=config.seed)[0]
    meta = {"method": "simplex-argmax", "config": record_of(config), "model": adapter.name, "site": str(site),
            "objective": module.objective.description}
    write_results(settings.out, results, meta)
    return results


def _picks(config: CompareConfig, adapter: ModelAdapter, site: Site, out: Path) -> dict[str, list[int]]:
    """Per method, its token per problem of `site`, in spec order."""
    picks = {}
    if {"embedding-pinv", "embedding-nearest"} & set(config.methods):
        results = optimize(_ascent_settings(config, site, out, "embedding-ascent"), adapter).results  # both decoders
        picks["embedding-pinv"] = [r.extra["pinv_token_ids"][0] for r in results]
        picks["embedding-nearest"] = [r.nearest_token_ids[0] for r in results]
    if "simplex-argmax" in config.methods:
        picks["simplex-argmax"] = [r.token_ids[0] for r in _simplex(config, adapter, site, out)]
    if "gcg" in config.methods:
        found = gcg(GCGConfig(
            model=config.model, bos=config.bos, layer=site.layer, site=site.kind, features=_one_position(config.features),
            objective=config.objective, target=config.target, tokens=1, steps=config.gcg_steps,
            search_width=config.gcg_width, topk=config.gcg_topk, allow="all", isolated=config.isolated,
            untrained=config.untrained, seed=config.seed, device="cpu" if config.device == "cpu" else "auto",
            out=str(out / "gcg" / site.name), progress=config.progress), adapter).results
        picks["gcg"] = [r.token_ids[-1] for r in found]  # after a --bos prefix
    return picks


def compare(config: CompareConfig, adapter: ModelAdapter | None = None) -> CompareRun:
    """Sweep once for the optimum of every problem, run the other methods, compare; writes
    `out/compare.json` (and each method's own run under `out/exhaustive`, `out/embedding-ascent`,
    `out/simplex`, `out/gcg`)."""
    _check(config)
    adapter = load_for(config, adapter, move=False)  # every method below reads the run's --bos from the adapter
    value = isinstance(config.objective, Objective)  # given from Python: its own selection names the problems
    if value:
        selection = primary(config.objective.bind(adapter))
        if selection is None:
            raise FeatoptError("compare needs an objective over a selection of features (its problems): "
                               "give the objective a `selection` or use a built-in one.")
        sites = [selection.site]
    else:
        sites = site_list(adapter, config)
    for site in sites if not value else ():  # features out of range fail here, before any sweep
        parse_features(config.features, n_tokens=1, width=adapter.width(site), site=str(site))
    out = out_folder(config.out)
    prefix = adapter.encode("")  # [BOS] with --bos: the searched token is position 1 after it
    sweep_features = _one_position(config.features, "1") if config.bos else config.features
    # An isolated block is swept alone; otherwise one sweep reads every layer.
    optima: list[FeatureResult] = []
    for group in [[s] for s in sites] if config.isolated else [sites]:
        optima += exhaustive(ExhaustiveConfig(
            model=config.model, layer=",".join(str(s.layer) for s in group), site=sites[0].kind, features=sweep_features,
            objective=config.objective, target=config.target, bos=config.bos, top_k=config.top_k,
            isolated=config.isolated, untrained=config.untrained, seed=config.seed, device=config.device,
            out=str(out / "exhaustive" / (group[0].name if config.isolated else "")), progress=config.progress,
        ), adapter).results
    features = []
    for site in sites:
        best = [r for r in optima if r.site == str(site)]
        picks = _picks(config, adapter, site, out)
        scoring = dataclasses.replace(config, features=sweep_features)
        objective = config.objective if value else objective_for(scoring, adapter, [site], n_tokens=len(prefix) + 1)
        tokens = torch.tensor([[b.token_ids[-1] for b in best]] + [picks[m] for m in config.methods])  # [1 + M, P]
        ids = torch.cat([prefix.expand(tokens.numel(), -1), tokens.reshape(-1, 1)], dim=1)
        scores = remeasure(adapter, objective, ids, torch.arange(len(best)).repeat(len(tokens)),
                           isolated=config.isolated).score.view(len(tokens), -1).tolist()
        specs = [b.spec for b in best] if value else \
            [q.spec for q in parse_features(config.features, n_tokens=1, width=adapter.width(site), site=str(site))]
        for p, b in enumerate(best):  # the searched token is the last (a --bos sweep's ids are [BOS, t])
            features.append(FeatureComparison(str(site), specs[p], b.token_ids[-1], b.tokens[-1], scores[0][p], {
                m: _outcome(m, picks[m][p], scores[i + 1][p], scores[0][p], b, adapter)
                for i, m in enumerate(config.methods)}))
    summary = summarize(features, config.methods)
    document = {"run": {"method": "compare", "config": record_of(config), "model": adapter.name,
                        "sites": [str(s) for s in sites], "versions": versions(),
                        "feature_map": adapter.describe_features(sites[0])},
                "summary": summary, "features": [asdict(f) for f in features]}
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, ensure_ascii=False)
    atomic_write(out / "compare.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return CompareRun(features, summary, out)


def _outcome(method: str, token: int, score: float, optimum: float, best: FeatureResult,
             adapter: ModelAdapter) -> MethodResult:
    top = best.extra["top_k"]["token_ids"]
    gap = optimum - score
    return MethodResult(method, int(token), adapter.decode([token]), float(score), fraction_of(score, optimum), gap,
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


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(result: CompareRun) -> str:
    """Per site, the documents' table (one column per feature): the optimum's token and score,
    then each method's token, score and fraction (`*`: found the optimum); then the summary."""
    blocks = []
    for site in dict.fromkeys(f.site for f in result.features):
        feats = [f for f in result.features if f.site == site]
        rows = [[site] + [f.spec for f in feats],
                ["exhaustive"] + [f"{f.optimum_token!r} {f.optimum_activation:.4g}" for f in feats]]
        for m in feats[0].methods:
            rows.append([m] + [f"{o.token!r} {o.activation:.4g} ({_num(o.fraction)}){' *' if o.optimal else ''}"
                               for o in (f.methods[m] for f in feats)])
        blocks.append(rows)
    blocks.append([["site", "method", "mean fraction", "min fraction", "optimal"]] + [
        [s["site"], s["method"], _num(s["mean_fraction"]), _num(s["min_fraction"]),
         f"{round(s['optimal_share'] * s['features'])}/{s['features']}"] for s in result.summary])
    return "\n\n".join(aligned(rows) for rows in blocks) + \
        "\n(fraction: activation / optimum, n/a when the optimum is <= 0; *: found the optimum)"
