"""`featopt flow match|graph`, and what every `featopt flow ...` command shares.

Each flow command is a config dataclass and a run function returning a result object (its
`table()` is what the command line prints); each writes a JSON record (settings, the SAEs'
hashes, the model, versions) and a PNG where a picture explains better, atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from featopt.commands.fields import check_at_least, check_choice, record_of
from featopt.commands.loading import bos_id, check_context, load_for
from featopt.commands.result import CommandResult
from featopt.commands.settings import ModelSettings, OutputSettings, SeedSettings
from featopt.errors import FeatoptError
from featopt.feature_flow import graph as graph_method
from featopt.feature_flow import match as match_method
from featopt.feature_flow.saes import FlowSet, Node, parse_node
from featopt.models import ModelAdapter
from featopt.results import atomic_write, versions
from featopt.runs.outdir import out_folder


# ----------------------------------------------------------------------------- shared
@dataclass
class FlowSettings:
    """The SAEs every flow command reads."""

    saes: str = ""
    """SAE folders, comma-separated, or a folder holding them (one SAE per site)"""


def flow_out(out: str | None) -> Path:
    """The folder a flow command writes into (:func:`featopt.runs.outdir.out_folder`); one
    sentence when `--out` is a file."""
    path = out_folder(out)
    if path.exists() and not path.is_dir():
        raise FeatoptError(f"--out {str(path)!r} is a file: give a folder (new or featopt's own).")
    return path


def write_json(out: Path, name: str, document: dict) -> Path:
    """`document` as `out/name`, indented, written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    atomic_write(out / name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out / name


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
    """`"5,6"` -> `[5, 6]`; None (every layer) for nothing given."""
    if text is None or not str(text).strip():
        return None
    try:
        return [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        raise FeatoptError(f"--layers {text!r} is malformed: give layer numbers, comma-separated, like 5,6.") from None


def parse_floats(text, flag: str) -> list[float]:
    """`"0,0.5,1"` -> finite numbers; one sentence naming `flag` otherwise."""
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


def parse_nodes(text, flow: FlowSet, flag: str = "--feature") -> list[Node]:
    """`"6/res/123,6/res/7"` -> features of SAEs in `flow`; one sentence for none."""
    nodes = [p.strip() for p in str(text or "").split(",") if p.strip()]
    if not nodes:
        raise FeatoptError(f"{flag} is required: give features like 6/res/123 (comma-separated).")
    return [flow.check_node(n) for n in nodes]


def load_flow(saes: str) -> FlowSet:
    """The SAEs `--saes` names."""
    if not str(saes or "").strip():
        raise FeatoptError("--saes is required: give SAE folders (comma-separated) or a folder holding them.")
    return FlowSet.load(saes)


def model_for(config, flow: FlowSet, adapter: ModelAdapter | None = None) -> ModelAdapter:
    """The config's model (:func:`featopt.commands.loading.load_for`: a caller's `adapter` is seen
    with the config's `--bos`), checked to be the one the SAEs read."""
    adapter = load_for(config, adapter)
    flow.check_model(adapter)
    return adapter


def corpus_for(adapter: ModelAdapter, corpus: str | None, *, tokens: int, context_length: int, split: str = "all",
               eval_fraction: float = 0.05) -> torch.Tensor:
    """`[N, context_length]` token contexts of `corpus`, at most `tokens` tokens; with the run's
    `--bos` each starts with the BOS token (counted in `context_length`)."""
    from featopt.data import corpus_contexts

    if not str(corpus or "").strip():
        raise FeatoptError("--corpus is required: give a folder of .txt files or one .txt file.")
    if not Path(corpus).exists():
        raise FeatoptError(f"--corpus {corpus!r} does not exist: give a folder of .txt files or one .txt file.")
    check_context(adapter, context_length)
    return corpus_contexts(adapter.tokenizer, corpus, context_length, split=split, eval_fraction=eval_fraction,
                           max_tokens=tokens, bos=bos_id(adapter))


def meta(command: str, config, flow: FlowSet, adapter: ModelAdapter | None = None) -> dict:
    """The `run` block of a flow record: the command, its settings, the SAEs, the model."""
    out = {"command": command, "config": record_of(config), "saes": flow.describe(), "versions": versions()}
    if adapter is not None:
        out.update(model=adapter.name, dtype=str(adapter.dtype).replace("torch.", ""))
    return out


# ----------------------------------------------------------------------------- match
@dataclass
class MatchConfig(OutputSettings, SeedSettings, FlowSettings):
    """Settings of `featopt flow match`: every feature's top-k matches by decoder cosine."""

    target: str | None = None
    """SAEs to match, as LAYER/MODULE, comma-separated (e.g. 6/res; default: every SAE with predecessors)"""
    candidates: str | None = None
    """SAEs to match against (default: each target's predecessors L-1/res, L/mlp, L/att)"""
    k: int = 1
    """matches kept per feature"""
    threshold: float = 0.5
    """count matches scoring at least this"""
    baseline: str = "permutation"
    """none, random (Gaussian rows) or permutation (the candidate's coordinates shuffled)"""
    chunk: int = 1024
    """target rows per block (memory: chunk x d_sae cosines)"""
    seed: int = 0
    """seed of the baseline"""
    plot: bool = True
    """write a PNG"""


@dataclass
class MatchRun(CommandResult):
    """The matched pairs of SAEs (`Matches`), their summaries, and the folder."""

    pairs: list
    summaries: list[dict]
    out: Path
    png: Path | None = None

    def table(self) -> str:
        lines = [f"{'target':<8} {'candidate':<10} {'mean top-1':>10} {'>= thr':>8} {'baseline':>12} {'base >= thr':>12}"]
        for s in self.summaries:
            base = f"{s['baseline_mean_top1']:.3f}" if "baseline_mean_top1" in s else "-"
            base_above = str(s.get("baseline_above", "-"))
            lines.append(f"{s['target']:<8} {s['candidate']:<10} {s['mean_top1']:>10.3f} {s['above']:>8} {base:>12} "
                         f"{base_above:>12}")
        lines.append(f"threshold {self.summaries[0]['threshold']}; baseline: {self.summaries[0].get('baseline', 'none')}")
        if self.png:
            lines.append(f"plot: {self.png}")
        return "\n".join(lines)


def match(config: MatchConfig) -> MatchRun:
    """Match every target SAE's features against each candidate SAE (default: its predecessors);
    `out/matches.json` (summaries), `out/matches.safetensors` (scores and indices), `out/matches.png`."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    check_at_least(config, ["k", "chunk"])
    check_choice(config, "baseline", match_method.BASELINES)
    out = flow_out(config.out)
    flow = load_flow(config.saes)
    targets = parse_keys(config.target, flow) if config.target else [k for k in flow.keys() if flow.predecessors(k)]
    candidates = parse_keys(config.candidates, flow) if config.candidates else None
    todo = [(target, cand) for target in targets for cand in candidates or flow.predecessors(target) if cand != target]
    for _, cand in todo:
        if config.k > flow[cand].d_sae:
            raise FeatoptError(f"--k {config.k} is larger than the {flow[cand].d_sae} latents of {cand[0]}/{cand[1]}: "
                               "give at most that.")
    if not todo:
        raise FeatoptError(f"nothing to match: the SAEs given ({flow.describe_keys()}) hold no target with a predecessor; "
                           "give --target and --candidates.")
    pairs = [match_method.match(flow, target, cand, config.k, chunk=config.chunk, baseline=config.baseline,
                                seed=config.seed)
             for target, cand in tqdm(todo, desc="match", disable=not config.progress, leave=False)]
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
        run.png = match_method.plot_matches(pairs, out / "matches.png")
    write_json(out, "matches.json", {"run": meta("flow match", config, flow), "pairs": summaries,
                                      "tensors": "matches.safetensors: <target>-<candidate>.scores/.indices [d_sae, k]"})
    return run


# ----------------------------------------------------------------------------- graph
@dataclass
class GraphConfig(OutputSettings, FlowSettings, ModelSettings):
    """Settings of `featopt flow graph`: a feature's flow graph through all SAEs given."""

    model: str | None = None
    """a model whose logit lens labels the nodes (default none: no labels)"""
    feature: str = ""
    """start feature(s) as LAYER/MODULE/INDEX, e.g. 6/res/123 (comma-separated: one graph from several)"""
    k: int = 1
    """matches followed per feature and neighbouring SAE"""
    threshold: str = "0.3"
    """the least decoder cosine of a link: a number, or per module: res=0.3,mlp=0.25,att=0.25"""
    direction: str = "both"
    """backward (where it comes from), forward (where it goes) or both"""
    label_k: int = 3
    """logit-lens tokens per node label"""
    norm: str = "weight"
    """logit lens: none, weight (final norm's gain) or apply"""
    max_nodes: int = 500
    """stop with an error when the graph grows past this"""
    chunk: int = 1024
    """rows per block of cosines (memory: chunk x d_sae)"""


@dataclass
class GraphRun(CommandResult):
    """The graph (`FlowGraph`), the files it was saved to, and the folder."""

    graph: object
    paths: dict
    out: Path

    def table(self) -> str:
        by_layer: dict = {}
        for node, attrs in self.graph.nodes.items():
            by_layer.setdefault(node.layer, []).append(f"{node}{' ' + attrs['label'] if attrs.get('label') else ''}")
        lines = [f"{len(self.graph.nodes)} features, {len(self.graph.edges)} links"]
        lines += [f"layer {layer}: " + "; ".join(sorted(items)) for layer, items in sorted(by_layer.items())]
        lines += [f"{kind}: {path}" for kind, path in self.paths.items()]
        return "\n".join(lines)


def graph(config: GraphConfig, adapter: ModelAdapter | None = None) -> GraphRun:
    """The flow graph of `--feature` through the SAEs, labelled by `--model`'s logit lens when a
    model is given (or `adapter`); `out/graph.json`, `.graphml` and `.png`."""
    check_at_least(config, ["k", "label_k", "max_nodes", "chunk"])
    threshold = parse_threshold(config.threshold)
    out = flow_out(config.out)
    flow = load_flow(config.saes)
    starts = parse_nodes(config.feature, flow)
    found = graph_method.flow_graph(flow, starts, k=config.k, threshold=threshold, direction=config.direction,
                                    chunk=config.chunk, max_nodes=config.max_nodes)
    if config.model or adapter is not None:
        adapter = model_for(config, flow, adapter)
        graph_method.label_nodes(found, flow, adapter, k=config.label_k, norm=config.norm)
    found.settings["run"] = meta("flow graph", config, flow, adapter)
    title = f"flow graph of {', '.join(map(str, starts))}" + (f" ({adapter.name})" if adapter else "")
    return GraphRun(found, found.save(out, title=title), out)
