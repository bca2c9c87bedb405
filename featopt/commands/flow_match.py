"""Shared pieces of the `featopt flow ...` commands, and `flow match`.

Each command is a flat config dataclass and a `run_*` function returning a small run object, with
a `format_*` for the terminal; each writes a JSON record (settings, the SAEs' hashes, the model,
versions) and a PNG where a picture explains better, atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from featopt.errors import FeatoptError
from featopt.feature_flow.saes import FlowSet, parse_node
from featopt.results import atomic_write, versions


# ----------------------------------------------------------------------------- shared
def out_dir(out: str | None) -> Path:
    from featopt.commands.sae_train import _out

    path = _out(out)
    if path.exists() and not path.is_dir():
        raise FeatoptError(f"--out {str(path)!r} is a file: give a folder (new or featopt's own).")
    return path


def write_json(out: Path, name: str, document: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write(out / name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out / name


def check_finite(config, names) -> None:
    for name in names:
        value = getattr(config, name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and not math.isfinite(float(v)):
                raise FeatoptError(f"--{name} must be a finite number, got {v}.")


def check_at_least(config, names, low: int = 1) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None or value < low:
            raise FeatoptError(f"--{name} must be at least {low}, got {value}.")


def parse_keys(text: str | None, flow: FlowSet) -> list[tuple[int, str]]:
    """`"6/res,6/mlp"` -> SAE keys of `flow`."""
    keys = []
    for part in (p.strip() for p in str(text or "").split(",")):
        if not part:
            continue
        try:
            node = parse_node(f"{part}/0")
        except FeatoptError:
            raise FeatoptError(f"SAE {part!r} is malformed: write LAYER/MODULE with MODULE res, mlp or att, like 6/res.") from None
        flow[node.key]  # raises with the keys that exist
        keys.append(node.key)
    return keys


def parse_layers(text: str | None) -> list[int] | None:
    if text is None or not str(text).strip():
        return None
    try:
        return [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise FeatoptError(f"--layers {text!r} is malformed: give layer numbers, comma-separated, like 5,6.") from None


def parse_floats(text, flag: str) -> list[float]:
    try:
        values = [float(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise FeatoptError(f"{flag} {text!r} is malformed: give numbers, comma-separated, like 0,0.5,1.") from None
    if not values:
        raise FeatoptError(f"{flag} names no value: give numbers, comma-separated, like 0,0.5,1.")
    for v in values:
        if v != v or v in (float("inf"), float("-inf")):
            raise FeatoptError(f"{flag} must hold finite numbers, got {v}.")
    return values


def load_flow(saes: str) -> FlowSet:
    if not str(saes or "").strip():
        raise FeatoptError("--saes is required: give SAE folders (comma-separated) or a folder holding them.")
    return FlowSet.load(saes)


def load_model_for(config, flow: FlowSet):
    from featopt.models import load_model, model_options
    from featopt.discrete.common import DTYPES

    if config.dtype not in DTYPES:
        raise FeatoptError(f"--dtype {config.dtype!r} is not known: allowed are {', '.join(DTYPES)}.")
    adapter = load_model(config.model, dtype=DTYPES[config.dtype], **model_options(config))
    flow.check_model(adapter)
    return adapter


def corpus_for(adapter, corpus: str | None, *, tokens: int, context_length: int, split: str = "all") -> torch.Tensor:
    """`[N, context_length]` token contexts of `corpus`, at most `tokens` tokens; with the run's
    `--bos` each starts with the BOS token (counted in `context_length`)."""
    from featopt.data import corpus_contexts
    from featopt.commands.sae_train import _check_context, bos_id

    if not str(corpus or "").strip():
        raise FeatoptError("--corpus is required: give a folder of .txt files or one .txt file.")
    if not Path(corpus).exists():
        raise FeatoptError(f"--corpus {corpus!r} does not exist: give a folder of .txt files or one .txt file.")
    _check_context(adapter, context_length)
    return corpus_contexts(adapter.tokenizer, corpus, context_length, split=split, eval_fraction=0.05, max_tokens=tokens,
                           bos=bos_id(adapter))


def meta(command: str, config, flow: FlowSet, adapter=None) -> dict:
    out = {"command": command, "config": asdict(config), "saes": flow.describe(), "versions": versions()}
    if adapter is not None:
        out.update(model=adapter.name, dtype=str(adapter.dtype).replace("torch.", ""))
    return out


# ----------------------------------------------------------------------------- match
@dataclass
class MatchConfig:
    """Settings of `featopt flow match`: every feature's top-k matches by decoder cosine."""

    saes: str = ""  # SAE folders, comma-separated, or a folder holding them
    target: str | None = None  # SAEs to match, e.g. "6/res" (default: every SAE with predecessors)
    candidates: str | None = None  # SAEs to match against (default: each target's predecessors)
    k: int = 1
    threshold: float = 0.5  # count matches scoring at least this
    baseline: str = "permutation"  # none, random or permutation
    chunk: int = 1024  # target rows per block: at most [chunk, d_sae] cosines at once
    seed: int = 0
    plot: bool = True
    out: str | None = None


@dataclass
class MatchRun:
    pairs: list  # Matches
    summaries: list[dict]
    out: Path
    png: Path | None = None


def run_match(config: MatchConfig) -> MatchRun:
    from safetensors.torch import save_file

    from featopt.feature_flow.match import BASELINES, match

    check_at_least(config, ["k", "chunk"])
    check_finite(config, ["threshold"])
    if config.baseline not in BASELINES:
        raise FeatoptError(f"--baseline {config.baseline!r} is not known: allowed are {', '.join(BASELINES)}.")
    out = out_dir(config.out)
    flow = load_flow(config.saes)
    targets = parse_keys(config.target, flow) if config.target else [k for k in flow.keys() if flow.predecessors(k)]
    candidates = parse_keys(config.candidates, flow) if config.candidates else None
    pairs = []
    for target in targets:
        for cand in candidates or flow.predecessors(target):
            if cand == target:
                continue
            if config.k > flow[cand].d_sae:
                raise FeatoptError(f"--k {config.k} is larger than the {flow[cand].d_sae} latents of {cand[0]}/{cand[1]}: "
                                   "give at most that.")
            pairs.append(match(flow, target, cand, config.k, chunk=config.chunk, baseline=config.baseline, seed=config.seed))
    if not pairs:
        raise FeatoptError(f"nothing to match: the SAEs given ({flow.describe_keys()}) hold no target with a predecessor; "
                           "give --target and --candidates.")
    summaries = [p.summary(config.threshold) for p in pairs]
    tensors = {}
    for p in pairs:
        name = f"{p.target[0]}.{p.target[1]}-{p.candidate[0]}.{p.candidate[1]}"
        tensors[f"{name}.scores"], tensors[f"{name}.indices"] = p.scores.float().contiguous(), p.indices.contiguous()
        if p.baseline_scores is not None:
            tensors[f"{name}.baseline_scores"] = p.baseline_scores.float().contiguous()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "matches.safetensors", lambda tmp: save_file({k: v.cpu() for k, v in tensors.items()}, tmp))
    run = MatchRun(pairs, summaries, out)
    if config.plot:
        run.png = _match_png(out / "matches.png", pairs)
    write_json(out, "matches.json", {"run": meta("flow match", config, flow), "pairs": summaries,
                                      "tensors": "matches.safetensors: <target>-<candidate>.scores/.indices [d_sae, k]"})
    return run


def _match_png(path: Path, pairs) -> Path:
    from featopt.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 2.8), squeeze=False)
    bins = torch.linspace(-0.2, 1.0, 49)
    for ax, p in zip(axes[0], pairs):
        ax.hist(p.scores[:, 0].float().cpu().numpy(), bins=bins.numpy(), alpha=0.8, label="top-1")
        if p.baseline_scores is not None:
            ax.hist(p.baseline_scores[:, 0].float().cpu().numpy(), bins=bins.numpy(), alpha=0.6, label=p.baseline)
        ax.set_title(f"{p.target[0]}/{p.target[1]} <- {p.candidate[0]}/{p.candidate[1]}", fontsize=9)
        ax.set_xlabel("decoder cosine")
    axes[0][0].set_ylabel("features")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def format_match(run: MatchRun) -> str:
    lines = [f"{'target':<8} {'candidate':<10} {'mean top-1':>10} {'>= thr':>8} {'baseline':>12} {'base >= thr':>12}"]
    for s in run.summaries:
        base = f"{s['baseline_mean_top1']:.3f}" if "baseline_mean_top1" in s else "-"
        base_above = str(s.get("baseline_above", "-"))
        lines.append(f"{s['target']:<8} {s['candidate']:<10} {s['mean_top1']:>10.3f} {s['above']:>8} {base:>12} {base_above:>12}")
    lines.append(f"threshold {run.summaries[0]['threshold']}; baseline: {run.summaries[0].get('baseline', 'none')}")
    if run.png:
        lines.append(f"plot: {run.png}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- graph
def parse_threshold(text) -> float | dict[str, float]:
    """`"0.3"` (every module) or `"res=0.3,mlp=0.25,att=0.25"` (per module, missing ones 0)."""
    value = str(text).strip()
    try:
        if "=" not in value:
            return float(value)
        pairs = [p.split("=") for p in value.split(",") if p.strip()]
        return {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        raise FeatoptError(f"--threshold {text!r} is malformed: write a number (0.3) or per module "
                           "(res=0.3,mlp=0.25,att=0.25).") from None


def parse_nodes(text, flow: FlowSet, flag: str = "--feature") -> list:
    nodes = [p.strip() for p in str(text or "").split(",") if p.strip()]
    if not nodes:
        raise FeatoptError(f"{flag} is required: give features like 6/res/123 (comma-separated).")
    return [flow.check_node(n) for n in nodes]


@dataclass
class GraphConfig:
    """Settings of `featopt flow graph`: a feature's flow graph through all SAEs given."""

    saes: str = ""
    feature: str = ""  # start features, e.g. "6/res/123" (comma-separated: one graph from several)
    k: int = 1
    threshold: str = "0.3"  # a number, or per module: res=0.3,mlp=0.25,att=0.25
    direction: str = "both"  # backward, forward or both
    model: str | None = None  # label nodes by their logit-lens tokens (none: no labels)
    trust_remote_code: bool = False  # let a model folder or hub id run its own Python code
    label_k: int = 3
    norm: str = "weight"
    dtype: str = "float32"
    max_nodes: int = 500
    chunk: int = 1024
    out: str | None = None


@dataclass
class GraphRun:
    graph: object
    paths: dict
    out: Path


def run_graph(config: GraphConfig) -> GraphRun:
    from featopt.feature_flow.graph import flow_graph, label_nodes

    check_at_least(config, ["k", "label_k", "max_nodes", "chunk"])
    threshold = parse_threshold(config.threshold)
    out = out_dir(config.out)
    flow = load_flow(config.saes)
    starts = parse_nodes(config.feature, flow)
    graph = flow_graph(flow, starts, k=config.k, threshold=threshold, direction=config.direction, chunk=config.chunk,
                       max_nodes=config.max_nodes)
    adapter = None
    if config.model:
        adapter = load_model_for(config, flow)
        label_nodes(graph, flow, adapter, k=config.label_k, norm=config.norm)
    graph.settings["run"] = meta("flow graph", config, flow, adapter)
    title = f"flow graph of {', '.join(map(str, starts))}" + (f" ({adapter.name})" if adapter else "")
    paths = graph.save(out, title=title)
    return GraphRun(graph, paths, out)


def format_graph(run: GraphRun) -> str:
    graph = run.graph
    by_layer: dict = {}
    for node, attrs in graph.nodes.items():
        by_layer.setdefault(node.layer, []).append(f"{node}{' ' + attrs['label'] if attrs.get('label') else ''}")
    lines = [f"{len(graph.nodes)} features, {len(graph.edges)} links"]
    lines += [f"layer {layer}: " + "; ".join(sorted(items)) for layer, items in sorted(by_layer.items())]
    lines += [f"{kind}: {path}" for kind, path in run.paths.items()]
    return "\n".join(lines)
