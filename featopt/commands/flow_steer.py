"""`featopt flow steer`: single-layer against multi-layer steering in one command (document 003,
Figures 9-11). The single-layer set is the chosen features; the multi-layer set is every feature of
their flow graph (built here from the same SAEs, or read from a `flow graph` folder), optionally
only on some layers. Every setting is scored for theme (the chosen features' activation over the
generation, and optionally the log-prob of theme words) and coherence (perplexity under the
unsteered model); `steering.json`, `steering.png` and the graph used are written into `--out`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from featopt.commands.fields import check_at_least
from featopt.commands.flow_match import (FlowSettings, corpus_for, flow_out, load_flow, meta, model_for, parse_floats,
                                         parse_layers, parse_nodes, parse_threshold, write_json)
from featopt.commands.result import CommandResult
from featopt.commands.settings import InputSettings, OutputSettings, SeedSettings
from featopt.errors import FeatoptError
from featopt.feature_flow.graph import FlowGraph, flow_graph
from featopt.feature_flow.saes import FlowSet, Node
from featopt.feature_flow.steer import compare_single_multi, prompt_ids
from featopt.feature_flow.steer_edits import reference_activations
from featopt.feature_flow.steer_report import format_steering, plot_steering, save_steering
from featopt.models import ModelAdapter

DEFAULT_PROMPTS = ["I think that", "The most important thing is", "Yesterday, my friend and I", "In this article, we"]


@dataclass
class SteerConfig(OutputSettings, SeedSettings, FlowSettings, InputSettings):
    """Settings of `featopt flow steer`."""

    bos: bool = False
    """start every prompt and --corpus context with the model's BOS token (off: the tokenizer's own special tokens)"""
    feature: str = ""
    """the initially chosen features (the single-layer set) as LAYER/MODULE/INDEX, e.g. 6/res/123,6/res/7"""
    graph: str | None = None
    """a flow graph folder or graph.json: its features are the multi-layer set (default: built from --feature)"""
    k: int = 1
    """the graph built here: matches followed per feature and neighbouring SAE"""
    threshold: str = "0.3"
    """the graph built here: the least decoder cosine of a link (a number, or res=..,mlp=..,att=..)"""
    direction: str = "backward"
    """the graph built here: backward (the features' sources), forward or both"""
    layers: str | None = None
    """keep only these layers of the graph for multi-layer steering, comma-separated"""
    targets: str | None = None
    """features whose activation is the theme score (default: --feature)"""
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """prompts to continue (a list)"""
    mode: str = "add"
    """add (x + r a_max W_dec[i]) or scale (each feature's share times r)"""
    rs: str = "1,2,4,8"
    """r values, comma-separated: one setting of each strategy per value"""
    tokens: int = 32
    """new tokens per generation"""
    theme_words: str = ""
    """words whose log-prob is scored too, comma-separated"""
    temperature: float = 0.0
    """sampling temperature (0: greedy)"""
    corpus: str | None = None
    """add mode: a folder of .txt files or one .txt file whose max activations are the reference (default: the prompts)"""
    corpus_tokens: int = 20_000
    """add mode: corpus tokens for the reference (max) activations"""
    context_length: int = 128
    """tokens per --corpus context (the BOS token of --bos counted)"""
    seed: int = 0
    """seed of the sampling (with --temperature above 0)"""


@dataclass
class SteerRun(CommandResult):
    """The steering result (`SteeringResult`), the single- and multi-layer feature sets, the folder
    and the picture."""

    result: object
    single: list
    multi: list
    out: Path
    png: Path | None = None

    def table(self) -> str:
        layers = sorted({n.layer for n in self.multi})
        lines = [f"single-layer: {len(self.single)} features; multi-layer: {len(self.multi)} features on layers "
                 f"{', '.join(map(str, layers))}", format_steering(self.result)]
        lines += [f"note: {n}" for n in self.result.notes]
        best = {}
        for o in self.result.outcomes:
            best.setdefault(o.setting.strategy, []).append(o)
        for strategy, outcomes in best.items():
            top = max(outcomes, key=lambda o: o.mean("theme"))
            lines.append(f"{strategy}: highest theme {top.mean('theme'):.4g} at r={top.setting.r:g}: "
                         f"{top.generations[0].text!r}")
        lines.append(f"plot: {self.png}")
        return "\n".join(lines)


def multi_nodes(config: SteerConfig, flow: FlowSet, single: list[Node]) -> tuple[list[Node], FlowGraph]:
    """The multi-layer set (the features of `--graph`, or of the graph of `single` built here,
    kept on `--layers`) and that graph."""
    if config.graph:
        path = Path(config.graph)
        if not path.exists():
            raise FeatoptError(f"--graph {config.graph!r} does not exist: give a `featopt flow graph` folder or graph.json.")
        graph = FlowGraph.load(path)
        for node in graph.nodes:
            flow.check_node(node)
    else:
        check_at_least(config, ["k"])
        graph = flow_graph(flow, single, k=config.k, threshold=parse_threshold(config.threshold),
                           direction=config.direction)
    nodes = list(graph.nodes)
    keep = parse_layers(config.layers)
    if keep is not None:
        nodes = [n for n in nodes if n.layer in keep]
        if not nodes:
            raise FeatoptError(f"--layers {config.layers} keeps no feature of the graph, whose layers are "
                               f"{sorted({n.layer for n in graph.nodes})}: give some of those.")
    return nodes, graph


def steer(config: SteerConfig, adapter: ModelAdapter | None = None) -> SteerRun:
    """Generate from every prompt unsteered, and steered on the single- and on the multi-layer set
    at every `--rs`; `out/steering.json`, `out/steering.png`, `out/run.json` and `out/graph/`."""
    check_at_least(config, ["tokens", "corpus_tokens", "context_length"])
    rs = parse_floats(config.rs, "--rs")
    prompts = [p for p in (config.prompts or [])]
    if not prompts or any(not str(p).strip() for p in prompts):
        raise FeatoptError("--prompts must hold one or more non-empty texts.")
    out = flow_out(config.out)
    flow = load_flow(config.saes)
    single = parse_nodes(config.feature, flow)
    targets = parse_nodes(config.targets, flow, "--targets") if config.targets else single
    multi, graph = multi_nodes(config, flow, single)
    adapter = model_for(config, flow, adapter)
    longest = max(len(prompt_ids(adapter, p)) for p in prompts)  # the ids generation starts from, BOS included
    adapter.check_positions(longest + config.tokens, f"--tokens {config.tokens} after a {longest}-token prompt",
                            f"use at most {max(0, (adapter.context_limit or 0) - longest)}")
    reference = None
    if config.mode == "add" and config.corpus:
        contexts = corpus_for(adapter, config.corpus, tokens=config.corpus_tokens, context_length=config.context_length)
        with torch.inference_mode():
            reference = reference_activations(flow, adapter, list(dict.fromkeys(single + multi)), contexts)
    words = [w.strip() for w in config.theme_words.split(",") if w.strip()]
    result = compare_single_multi(flow, adapter, prompts, single=single, multi=multi, rs=rs, mode=config.mode,
                                  targets=targets, max_new_tokens=config.tokens, theme_words=words,
                                  temperature=config.temperature, seed=config.seed, reference=reference,
                                  progress=config.progress)
    out.mkdir(parents=True, exist_ok=True)
    graph.save(out / "graph")
    run = SteerRun(result, single, multi, out, plot_steering(result, out / "steering.png"))
    save_steering(result, out / "steering.json")
    write_json(out, "run.json", meta("flow steer", config, flow, adapter))
    return run
