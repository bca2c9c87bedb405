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

from featopt.errors import FeatoptError
from featopt.commands.flow_match import (
    check_at_least, corpus_for, load_flow, load_model_for, meta, out_dir, parse_floats, parse_layers, parse_nodes,
    parse_threshold, write_json,
)

DEFAULT_PROMPTS = ["I think that", "The most important thing is", "Yesterday, my friend and I", "In this article, we"]


@dataclass
class SteerConfig:
    """Settings of `featopt flow steer`."""

    model: str = "tiny-llama"
    bos: bool = False  # start every prompt and --corpus context with the model's BOS token (off: the tokenizer's own special tokens)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    saes: str = ""
    feature: str = ""  # the initially chosen features (single-layer set), e.g. "6/res/123,6/res/7"
    graph: str | None = None  # a `flow graph` folder or graph.json for the multi-layer set (default: built here)
    k: int = 1  # the graph built here: matches per step,
    threshold: str = "0.3"  # least cosine (a number or res=..,mlp=..,att=..),
    direction: str = "backward"  # and direction (backward: the features' sources)
    layers: str | None = None  # keep only these layers of the graph for multi-layer steering
    targets: str | None = None  # features whose activation is the theme score (default: --feature)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    mode: str = "add"  # add: x + r * a_max * W_dec[i]; scale: each feature's contribution times r
    rs: str = "1,2,4,8"
    tokens: int = 32  # new tokens per generation
    theme_words: str = ""  # comma-separated words whose log-prob is also scored
    temperature: float = 0.0  # 0: greedy
    corpus: str | None = None  # add mode: reference activations (max over this text); default: the prompts
    corpus_tokens: int = 20_000
    context_length: int = 128
    seed: int = 0
    dtype: str = "float32"
    progress: bool = True
    out: str | None = None


@dataclass
class SteerRun:
    result: object
    single: list
    multi: list
    out: Path
    png: Path | None = None


def _multi_nodes(config: SteerConfig, flow, single: list) -> tuple[list, object]:
    from featopt.feature_flow.graph import FlowGraph, flow_graph

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


def run_steer(config: SteerConfig) -> SteerRun:
    from featopt.feature_flow.steer import prompt_ids, compare_single_multi, plot_steering, reference_activations, save_steering

    check_at_least(config, ["tokens", "corpus_tokens", "context_length"])
    rs = parse_floats(config.rs, "--rs")
    prompts = [p for p in (config.prompts or [])]
    if not prompts or any(not str(p).strip() for p in prompts):
        raise FeatoptError("--prompts must hold one or more non-empty texts.")
    out = out_dir(config.out)
    flow = load_flow(config.saes)
    single = parse_nodes(config.feature, flow)
    targets = parse_nodes(config.targets, flow, "--targets") if config.targets else single
    multi, graph = _multi_nodes(config, flow, single)
    adapter = load_model_for(config, flow)
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


def format_steer(run: SteerRun) -> str:
    from featopt.feature_flow.steer import format_steering

    layers = sorted({n.layer for n in run.multi})
    lines = [f"single-layer: {len(run.single)} features; multi-layer: {len(run.multi)} features on layers "
             f"{', '.join(map(str, layers))}", format_steering(run.result)]
    lines += [f"note: {n}" for n in run.result.notes]
    best = {}
    for o in run.result.outcomes:
        best.setdefault(o.setting.strategy, []).append(o)
    for strategy, outcomes in best.items():
        top = max(outcomes, key=lambda o: o.mean("theme"))
        lines.append(f"{strategy}: highest theme {top.mean('theme'):.4g} at r={top.setting.r:g}: "
                     f"{top.generations[0].text!r}")
    lines.append(f"plot: {run.png}")
    return "\n".join(lines)
