"""`featopt flow groups|transition|deactivate`: the flow methods that read a corpus through the model.

Each reads `--tokens` tokens of `--corpus` in contexts of `--context_length`, runs the model once
per batch to the deepest SAE site it needs (early exit), and writes a JSON record and PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from featopt.errors import FeatoptError
from featopt.commands.flow_match import (
    check_at_least, check_finite, corpus_for, load_flow, load_model_for, meta, out_dir, parse_floats, parse_layers,
    write_json,
)


def _prepare(config, names):
    """Checks shared by the corpus commands, then (out, flow, adapter, contexts)."""
    check_at_least(config, [*names, "context_length"])
    out = out_dir(config.out)
    flow = load_flow(config.saes)
    adapter = load_model_for(config, flow)
    contexts = corpus_for(adapter, config.corpus, tokens=config.tokens, context_length=config.context_length,
                          split=config.split)
    if config.skip_first >= contexts.shape[1] or config.skip_first < 0:
        raise FeatoptError(f"--skip_first must be between 0 and {contexts.shape[1] - 1} (the context length minus 1), "
                           f"got {config.skip_first}.")
    return out, flow, adapter, contexts


# ----------------------------------------------------------------------------- shared settings
@dataclass
class CorpusSettings:
    """The settings every corpus command shares (its own follow, after these)."""

    model: str = "tiny-llama"
    bos: bool = False  # start every context with the model's BOS token, counted in --context_length (off: as the source documents encode)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    saes: str = ""
    corpus: str = ""
    split: str = "all"
    tokens: int = 100_000
    context_length: int = 128
    batch_size: int = 8  # contexts per forward
    layers: str | None = None  # target layers L (of L/res), comma-separated (default: all that can be)
    skip_first: int = 1  # leading positions of each context left out (position 0: the attention sink)
    seed: int = 0
    dtype: str = "float32"
    progress: bool = True
    out: str | None = None


# ----------------------------------------------------------------------------- groups
@dataclass
class GroupsConfig(CorpusSettings):
    """Settings of `featopt flow groups`: document 003's predecessor groups over a corpus."""

    method: str = "top1"  # top1, or random (a random predecessor per feature: the baseline)
    min_score: float | None = None  # a predecessor matched below this cosine counts as absent


@dataclass
class GroupsRun:
    stats: object
    baseline: object | None
    out: Path


def run_groups(config: GroupsConfig) -> GroupsRun:
    from featopt.feature_flow.groups import METHODS, group_counts, plot_group_shares, plot_transitions

    if config.method not in METHODS:
        raise FeatoptError(f"--method {config.method!r} is not known: allowed are {', '.join(METHODS)}.")
    check_finite(config, ["min_score"])
    out, flow, adapter, contexts = _prepare(config, ["tokens", "batch_size"])
    kwargs = dict(layers=parse_layers(config.layers), batch_size=config.batch_size, seed=config.seed,
                  skip_first=config.skip_first, min_score=config.min_score, progress=config.progress)
    with torch.inference_mode():
        stats = group_counts(flow, adapter, contexts, method=config.method, **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    plot_group_shares(stats, out / "groups.png")
    if stats.transitions:
        plot_transitions(stats, out / "transitions.png")
    write_json(out, "groups.json", {"run": meta("flow groups", config, flow, adapter), **stats.record()})
    return GroupsRun(stats, None, out)


def format_groups(run: GroupsRun) -> str:
    from featopt.feature_flow.groups import format_groups as table

    return table(run.stats) + f"\nplots: {run.out / 'groups.png'}" + (
        f", {run.out / 'transitions.png'}" if run.stats.transitions else "")


# ----------------------------------------------------------------------------- transition
@dataclass
class TransitionConfig(CorpusSettings):
    """Settings of `featopt flow transition`: layer L+1's latents predicted from layer L's through
    the top-1 decoder-cosine transition matrix (document 003, Figure 22), against a permutation.
    `--layers`: the layers L of the pairs L -> L+1 (default: every consecutive res pair)."""


@dataclass
class TransitionRun:
    stats: object
    out: Path


def run_transition(config: TransitionConfig) -> TransitionRun:
    from featopt.feature_flow.transition import explained_variance

    out, flow, adapter, contexts = _prepare(config, ["tokens", "batch_size"])
    if len(contexts) < 2:
        raise FeatoptError(f"--tokens {config.tokens} gives one context: the transition fit needs at least two "
                           f"({2 * config.context_length} tokens).")
    with torch.inference_mode():
        stats = explained_variance(flow, adapter, contexts, layers=parse_layers(config.layers), batch_size=config.batch_size,
                                   skip_first=config.skip_first, seed=config.seed, progress=config.progress)
    write_json(out, "transition.json", {"run": meta("flow transition", config, flow, adapter), **stats.record()})
    return TransitionRun(stats, out)


def format_transition(run: TransitionRun) -> str:
    from featopt.feature_flow.transition import format_transition as table

    return table(run.stats)


# ----------------------------------------------------------------------------- deactivate
@dataclass
class DeactivateConfig(CorpusSettings):
    """Settings of `featopt flow deactivate`: remove (or rescale by r) a feature's top-1
    predecessors and measure the feature (document 003, Figures 6-8), against random predecessors."""

    tokens: int = 20_000
    events: int = 300  # active (feature, position) events sampled over the corpus
    r: float = 0.0  # the deactivation's rescaling coefficient (0: remove)
    rs: str = "-1,-0.5,0,0.25,0.5,0.75,1"  # the sweep of r over all active predecessors at once ("": no sweep)


@dataclass
class DeactivateRun:
    events: object
    results: list
    sweep: object | None
    out: Path


def run_deactivate(config: DeactivateConfig) -> DeactivateRun:
    from featopt.feature_flow.deactivate import deactivate, r_sweep, sample_events
    from featopt.feature_flow.deactivate_report import plot_methods, plot_sweep, record

    check_finite(config, ["r"])
    rs = parse_floats(config.rs, "--rs") if str(config.rs or "").strip() else None
    out, flow, adapter, contexts = _prepare(config, ["tokens", "batch_size", "events"])
    with torch.inference_mode():
        events = sample_events(flow, adapter, contexts, layers=parse_layers(config.layers), max_events=config.events,
                               skip_first=config.skip_first, seed=config.seed, batch_size=config.batch_size)
        results = [deactivate(flow, adapter, contexts, events, r=config.r, method=m, batch_size=2 * config.batch_size)
                   for m in ("top1", "random")]
        sweep = r_sweep(flow, adapter, contexts, events, rs, batch_size=config.batch_size) if rs else None
    out.mkdir(parents=True, exist_ok=True)
    plot_methods(results, out / "deactivation.png")
    if sweep is not None:
        plot_sweep(sweep, out / "r_sweep.png")
    write_json(out, "deactivation.json", {"run": meta("flow deactivate", config, flow, adapter),
                                           **record(events, results, sweep)})
    return DeactivateRun(events, results, sweep, out)


def format_deactivate(run: DeactivateRun) -> str:
    from featopt.feature_flow.deactivate_report import format_deactivation

    plots = [run.out / "deactivation.png"] + ([run.out / "r_sweep.png"] if run.sweep is not None else [])
    return format_deactivation(run.results, run.sweep, run.events) + "\nplots: " + ", ".join(map(str, plots))
