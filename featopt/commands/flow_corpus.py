"""`featopt flow groups|transition|deactivate`: the flow methods that read a corpus through the model.

Each reads `--tokens` tokens of `--corpus` in contexts of `--context_length`, runs the model once
per batch to the deepest SAE site it needs (early exit), and writes a JSON record and PNGs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from featopt.commands.fields import check_at_least, check_choice
from featopt.commands.flow_match import (FlowSettings, corpus_for, flow_out, load_flow, meta, model_for, parse_floats,
                                         parse_layers, write_json)
from featopt.commands.result import CommandResult
from featopt.commands.settings import CorpusSettings, ContextSettings, OutputSettings, SeedSettings
from featopt.errors import FeatoptError
from featopt.feature_flow import deactivate_report, groups as groups_method, transition as transition_method
from featopt.feature_flow.deactivate import deactivate as deactivate_events, r_sweep
from featopt.feature_flow.events import sample_events
from featopt.models import ModelAdapter


@dataclass
class FlowCorpusSettings(OutputSettings, SeedSettings, CorpusSettings, FlowSettings, ContextSettings):
    """The settings every corpus command of `featopt flow` shares (its own follow, after these)."""
    tokens: int = 100_000
    """corpus tokens to read (at most)"""
    batch_size: int = 8
    """contexts per forward"""
    layers: str | None = None
    """target layers L (of L/res), comma-separated (default: every layer whose predecessor SAEs are given)"""


def prepare(config, names, adapter: ModelAdapter | None):
    """Checks shared by the corpus commands, then `(out, flow, adapter, contexts)`."""
    check_at_least(config, [*names, "context_length"])
    out = flow_out(config.out)
    flow = load_flow(config.saes)
    adapter = model_for(config, flow, adapter)
    contexts = corpus_for(adapter, config.corpus, tokens=config.tokens, context_length=config.context_length,
                          split=config.split, eval_fraction=config.eval_fraction)
    if config.skip_first >= contexts.shape[1] or config.skip_first < 0:
        raise FeatoptError(f"--skip_first must be between 0 and {contexts.shape[1] - 1} (the context length minus 1), "
                           f"got {config.skip_first}.")
    return out, flow, adapter, contexts


# ----------------------------------------------------------------------------- groups
@dataclass
class GroupsConfig(FlowCorpusSettings):
    """Settings of `featopt flow groups`: document 003's predecessor groups over a corpus."""

    method: str = "top1"
    """top1 (document 003) or random (a random predecessor per feature: the baseline)"""
    min_score: float | None = None
    """a predecessor matched below this cosine counts as absent"""
    seed: int = 0
    """seed of --method random's predecessors"""


@dataclass
class GroupsRun(CommandResult):
    """The group counts (`GroupStats`) and the folder."""

    stats: object
    out: Path

    def table(self) -> str:
        return groups_method.format_groups(self.stats) + f"\nplots: {self.out / 'groups.png'}" + (
            f", {self.out / 'transitions.png'}" if self.stats.transitions else "")


def groups(config: GroupsConfig, adapter: ModelAdapter | None = None) -> GroupsRun:
    """Count every firing event of the target layers' residual features by which top-1
    predecessors fire with it; `out/groups.json`, `out/groups.png` and `out/transitions.png`."""
    check_choice(config, "method", groups_method.METHODS)
    out, flow, adapter, contexts = prepare(config, ["tokens", "batch_size"], adapter)
    with torch.inference_mode():
        stats = groups_method.group_counts(flow, adapter, contexts, method=config.method,
                                           layers=parse_layers(config.layers), batch_size=config.batch_size,
                                           seed=config.seed, skip_first=config.skip_first, min_score=config.min_score,
                                           progress=config.progress)
    out.mkdir(parents=True, exist_ok=True)
    groups_method.plot_group_shares(stats, out / "groups.png")
    if stats.transitions:
        groups_method.plot_transitions(stats, out / "transitions.png")
    write_json(out, "groups.json", {"run": meta("flow groups", config, flow, adapter), **stats.record()})
    return GroupsRun(stats, out)


# ----------------------------------------------------------------------------- transition
@dataclass
class TransitionConfig(FlowCorpusSettings):
    """Settings of `featopt flow transition`: layer L+1's latents predicted from layer L's through
    the top-1 decoder-cosine transition matrix (document 003, Figure 22), against a permutation."""

    layers: str | None = None
    """the layers L of the pairs L -> L+1, comma-separated (default: every consecutive res pair)"""
    seed: int = 0
    """seed of the permutation baseline"""


@dataclass
class TransitionRun(CommandResult):
    """The explained variances (`TransitionStats`) and the folder."""

    stats: object
    out: Path

    def table(self) -> str:
        return transition_method.format_transition(self.stats)


def transition(config: TransitionConfig, adapter: ModelAdapter | None = None) -> TransitionRun:
    """Explained variance of each layer L+1's latents from layer L's; `out/transition.json`."""
    out, flow, adapter, contexts = prepare(config, ["tokens", "batch_size"], adapter)
    if len(contexts) < 2:
        raise FeatoptError(f"--tokens {config.tokens} gives one context: the transition fit needs at least two "
                           f"({2 * config.context_length} tokens).")
    with torch.inference_mode():
        stats = transition_method.explained_variance(flow, adapter, contexts, layers=parse_layers(config.layers),
                                                     batch_size=config.batch_size, skip_first=config.skip_first,
                                                     seed=config.seed, progress=config.progress)
    write_json(out, "transition.json", {"run": meta("flow transition", config, flow, adapter), **stats.record()})
    return TransitionRun(stats, out)


# ----------------------------------------------------------------------------- deactivate
@dataclass
class DeactivateConfig(FlowCorpusSettings):
    """Settings of `featopt flow deactivate`: remove (or rescale by r) a feature's top-1
    predecessors and measure the feature (document 003, Figures 6-8), against random predecessors."""

    tokens: int = 20_000
    """corpus tokens to read (at most)"""
    seed: int = 0
    """seed of the event sample and of the random predecessors"""
    events: int = 300
    """active (feature, position) events sampled over the corpus"""
    r: float = 0.0
    """rescaling coefficient of the deactivation (0: remove)"""
    rs: str = "-1,-0.5,0,0.25,0.5,0.75,1"
    """r values, comma-separated, each applied to all active predecessors at once (the sweep; "": no sweep)"""


@dataclass
class DeactivateRun(CommandResult):
    """The sampled events (`Events`), each method's result, the r sweep (or None) and the folder."""

    events: object
    results: list
    sweep: object | None
    out: Path

    def table(self) -> str:
        plots = [self.out / "deactivation.png"] + ([self.out / "r_sweep.png"] if self.sweep is not None else [])
        return (deactivate_report.format_deactivation(self.results, self.sweep, self.events)
                + "\nplots: " + ", ".join(map(str, plots)))


def deactivate(config: DeactivateConfig, adapter: ModelAdapter | None = None) -> DeactivateRun:
    """Sample firing events, rescale their top-1 (and random) predecessors by `--r` one at a
    time, and sweep `--rs` over all at once; `out/deactivation.json`, `deactivation.png`, `r_sweep.png`."""
    rs = parse_floats(config.rs, "--rs") if str(config.rs or "").strip() else None
    out, flow, adapter, contexts = prepare(config, ["tokens", "batch_size", "events"], adapter)
    with torch.inference_mode():
        events = sample_events(flow, adapter, contexts, layers=parse_layers(config.layers), max_events=config.events,
                               skip_first=config.skip_first, seed=config.seed, batch_size=config.batch_size)
        results = [deactivate_events(flow, adapter, contexts, events, r=config.r, method=m,
                                     batch_size=2 * config.batch_size) for m in ("top1", "random")]
        sweep = r_sweep(flow, adapter, contexts, events, rs, batch_size=config.batch_size) if rs else None
    out.mkdir(parents=True, exist_ok=True)
    deactivate_report.plot_methods(results, out / "deactivation.png")
    if sweep is not None:
        deactivate_report.plot_sweep(sweep, out / "r_sweep.png")
    write_json(out, "deactivation.json", {"run": meta("flow deactivate", config, flow, adapter),
                                           **deactivate_report.record(events, results, sweep)})
    return DeactivateRun(events, results, sweep, out)
