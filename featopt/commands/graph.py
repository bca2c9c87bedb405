"""`featopt graph build|intervene|view`: attribution graphs over per-layer transcoders
(`featopt/attribution`), named as circuit-tracer's users would look for them.

- `graph build`: one prompt's graph, checked, pruned, scored and written (graph.safetensors, the
  frontend's graph.json, graph.graphml, summary.json, and the view: graph.html, graph.png);
- `graph intervene`: scale or zero some of a graph's features and set the logit changes the graph
  predicts beside those measured in the model (errors frozen and unfrozen): intervention.json;
- `graph view`: the HTML page and PNG of a graph folder again, linked to latent dashboards.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from featopt.commands.fields import check_at_least
from featopt.commands.loading import load_for
from featopt.commands.result import CommandResult
from featopt.commands.settings import FolderSettings, InputSettings, ModelSettings, OutputSettings
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.runs.outdir import out_folder

SUMMARY = "summary.json"


@dataclass
class DashboardSettings:
    dashboards: str | None = None
    """a folder holding `featopt sae dashboard` sites of these transcoders (searched recursively): each feature
    node links to its latent page"""


@dataclass
class BuildConfig(DashboardSettings, OutputSettings, InputSettings):
    """Settings of `featopt graph build`: the attribution graph of one prompt over per-layer transcoders."""

    bos: bool = True
    """start the prompt with the model's BOS token (default on, as circuit-tracer: the first position is an attention
    sink, whose features and errors --skip_first leaves out)"""
    skip_first: int = 1
    """leading positions whose features and errors are no nodes of the graph (transcoders are trained without
    position 0: `sae train --skip_first 1`)"""
    transcoders: str = ""
    """the folder of per-layer transcoders (one reading blocks.L.mlp_in and writing blocks.L.mlp_out per layer, as
    `sae train --site blocks.0-N.mlp_in --target_site mlp_out` writes them)"""
    prompt: str = ""
    """the text whose next token the graph explains"""
    target: str | None = None
    """explain this one next token (exactly one token, e.g. " Paris") instead of the most probable ones"""
    max_logits: int = 10
    """at most this many logit nodes: the most probable next tokens"""
    desired_prob: float = 0.95
    """logit nodes are added until their probabilities sum to this"""
    node_threshold: float = 0.8
    """keep the most influential nodes that make this share of the total influence on the logits (0, 1]"""
    edge_threshold: float = 0.98
    """keep the strongest edges that make this share of the total edge score (0, 1]"""
    batch_size: int = 32
    """targets per backward pass (copies of the prompt in one forward; shrunk to what fits)"""


@dataclass
class GraphRun(CommandResult):
    summary: dict
    out: Path = field(default_factory=Path)
    record_name: str | None = "graph.html"

    def table(self) -> str:
        s = self.summary
        logits = ", ".join(f"{d['token']!r} {d['probability']:.3f}" for d in s["logits"])
        lines = [f"prompt {s['prompt']!r} ({len(s['tokens'])} tokens) on {s['model']}",
                 f"logits: {logits}",
                 f"{s['nodes']['features']:,} active features; kept {s['nodes']['kept']:,} of {s['nodes']['all']:,} nodes "
                 f"and {s['edges']['kept']:,} of {s['edges']['nonzero']:,} edges",
                 f"replacement score {s['replacement_score']:.3f}, completeness score {s['completeness_score']:.3f}; "
                 f"replacement checked (logits within {s['check']:.1e}); {s['attribution_seconds']:.1f} s",
                 f"top path: {s['top_path']['words']}"]
        return "\n".join(lines)


def build(config: BuildConfig, adapter: ModelAdapter | None = None) -> GraphRun:
    """The attribution graph of `config.prompt` (see `featopt.attribution.build.build_graph`), with its
    HTML view and PNG."""
    from featopt.attribution.build import build_graph, load_transcoders

    check_at_least(config, ["max_logits", "batch_size"])
    check_at_least(config, ["skip_first"], low=0)
    if not 0 < config.desired_prob <= 1:
        raise FeatoptError(f"--desired_prob must be in (0, 1], got {config.desired_prob}.")
    if not config.transcoders:
        raise FeatoptError("--transcoders is missing: give the folder of per-layer transcoders `sae train` wrote.")
    if not config.prompt.strip():
        raise FeatoptError("--prompt is empty: give the text whose next token the graph explains.")
    check_dashboards(config.dashboards)
    adapter = load_for(config, adapter)
    transcoders = load_transcoders(config.transcoders)
    out = out_folder(config.out)
    summary = build_graph(adapter, transcoders, config.prompt, out, target=config.target, max_logits=config.max_logits,
                          desired_prob=config.desired_prob, node_threshold=config.node_threshold,
                          edge_threshold=config.edge_threshold, batch_size=config.batch_size, slug=out.name,
                          progress=_bar(config.progress), transcoder_folder=str(Path(config.transcoders).resolve()), skip_first=config.skip_first)
    write_view(out, config.dashboards)
    return GraphRun(summary, out)


def _bar(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(desc="attribution", unit="target", leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
    return update


# ----------------------------------------------------------------------------- view
@dataclass
class ViewConfig(DashboardSettings, FolderSettings):
    """Settings of `featopt graph view`: the HTML page and PNG of a graph `graph build` wrote."""

    out: str | None = None
    """output folder (default: the graph's own folder)"""
    graph: str = ""
    """the folder `featopt graph build` wrote"""


@dataclass
class ViewRun(CommandResult):
    summary: dict
    out: Path = field(default_factory=Path)
    record_name: str | None = "graph.html"

    def table(self) -> str:
        return f"graph of {self.summary['prompt']!r}: open {(self.out / 'graph.html').resolve().as_uri()}"


def view(config: ViewConfig, adapter: ModelAdapter | None = None) -> ViewRun:
    """Write `graph.html` and `graph.png` of the graph folder `config.graph` (into `--out`, by default
    the graph's own folder)."""
    folder, summary = read_graph_folder(config.graph)
    check_dashboards(config.dashboards)
    out = Path(config.out) if config.out else folder
    doc = json.loads((folder / "graph.json").read_text())
    write_view(out, config.dashboards, doc=doc, summary=summary)
    return ViewRun(summary, out)


def read_graph_folder(path: str) -> tuple[Path, dict]:
    """`(folder, summary)` of a folder `graph build` wrote; one sentence otherwise."""
    folder = Path(path)
    if not path or not (folder / SUMMARY).is_file() or not (folder / "graph.safetensors").is_file():
        raise FeatoptError(f"--graph {path!r} is not a folder `featopt graph build` wrote (no {SUMMARY} and "
                           "graph.safetensors in it).")
    try:
        return folder, json.loads((folder / SUMMARY).read_text())
    except ValueError as error:
        raise FeatoptError(f"--graph {path!r}: its {SUMMARY} is not JSON ({error}).") from None


def check_dashboards(dashboards: str | None) -> None:
    if dashboards and not Path(dashboards).is_dir():
        raise FeatoptError(f"--dashboards {dashboards!r} is not a folder: give the folder holding `sae dashboard` sites.")


def dashboard_links(dashboards: str | None, hashes: list[str], page_folder: Path) -> dict[int, str]:
    """`{layer: path of its dashboard, relative to page_folder}` for every transcoder (`hashes`: their
    sha256 by layer, as summary.json records them) whose dashboard lies under the folder `dashboards`."""
    if not dashboards:
        return {}
    check_dashboards(dashboards)
    root = Path(dashboards)
    by_hash = {}
    for marker in root.rglob("dashboard.json"):
        try:
            sae = json.loads(marker.read_text()).get("run", {}).get("sae") or {}
        except ValueError:
            continue
        if sae.get("sha256"):
            by_hash[sae["sha256"]] = marker.parent
    links = {}
    for layer, sha in enumerate(hashes):
        site = by_hash.get(sha)
        if site is not None:
            links[layer] = Path(os.path.relpath(site, page_folder)).as_posix()
    return links


def write_view(out: Path, dashboards: str | None, *, doc: dict | None = None, summary: dict | None = None) -> None:
    """graph.html and graph.png of the graph in `out` (or of `doc`, `summary`)."""
    from featopt.attribution.page import write_graph_page
    from featopt.attribution.plot import write_graph_png

    doc = doc if doc is not None else json.loads((out / "graph.json").read_text())
    summary = summary if summary is not None else json.loads((out / SUMMARY).read_text())
    out.mkdir(parents=True, exist_ok=True)
    links = dashboard_links(dashboards, [t["sha256"] for t in summary["transcoders"]], out)
    write_graph_page(doc, out / "graph.html", summary=summary, dashboards=links)
    write_graph_png(doc, out / "graph.png", summary=summary)


# ----------------------------------------------------------------------------- intervene
@dataclass
class InterveneConfig(FolderSettings, ModelSettings):
    """Settings of `featopt graph intervene`: scale or zero graph features at their positions; the
    logit changes the graph predicts beside those the model shows."""

    out: str | None = None
    """output folder (default: the graph's own folder)"""
    model: str | None = None
    """the model (default: the one the graph was built on; it runs the graph's own token ids)"""
    graph: str = ""
    """the folder `featopt graph build` wrote"""
    transcoders: str | None = None
    """the transcoder folder (default: the one the graph was built with)"""
    features: str = ""
    """the features: comma-separated node ids layer_latent_position, as graph.json names them (e.g. 12_345_5)"""
    top: int = 0
    """instead of --features: the N features with the largest total effect on the first logit node"""
    layers: str | None = None
    """with --top: only features of these layers count ("0-19", "3,5"; default all)"""
    factor: float = 0.0
    """multiply the features' activations by this (0 removes them, 2 doubles them)"""


@dataclass
class InterveneRun(CommandResult):
    record: dict
    out: Path = field(default_factory=Path)
    record_name: str | None = "intervention.json"

    def table(self) -> str:
        from featopt.commands.tables import aligned

        r = self.record
        head = [f"features x{r['factor']:g}: " + ", ".join(f"{f['node_id']} ({f['activation']:.3g})" for f in r["features"]),
                "demeaned logit changes: the graph's prediction (whole / pruned) beside the model's (errors and attention "
                "frozen / errors frozen / neither)"]
        rows = [["token", "p", "predicted", "pruned", "frozen attn+errors", "frozen errors", "unfrozen"]]
        for d in r["logits"]:
            pruned = "–" if d["predicted_pruned"] is None else f"{d['predicted_pruned']:+.3f}"
            rows.append([repr(d["token"]), f"{d['probability']:.3f}", f"{d['predicted']:+.3f}", pruned,
                         f"{d['frozen_attention']:+.3f}", f"{d['frozen_errors']:+.3f}", f"{d['unfrozen']:+.3f}"])
        return "\n".join(head) + "\n" + aligned(rows)


def intervene(config: InterveneConfig, adapter: ModelAdapter | None = None) -> InterveneRun:
    """Rescale the chosen features of the graph in `config.graph` and measure (see
    `featopt.attribution.intervene`); writes intervention.json."""
    import torch

    from featopt.atomic import atomic_write
    from featopt.attribution.build import load_transcoders
    from featopt.attribution.files import load_graph
    from featopt.attribution.intervene import feature_nodes, intervention_record, total_effects
    from featopt.attribution.pruning import prune
    from featopt.attribution.replacement import ReplacementModel
    from featopt.results import versions

    folder, summary = read_graph_folder(config.graph)
    if bool(config.features.strip()) == (config.top > 0):
        raise FeatoptError("give the features either by --features (node ids) or by --top N, not both and not neither.")
    check_at_least(config, ["top"], low=0)
    graph = load_graph(folder / "graph.safetensors")
    if config.features.strip():
        nodes = feature_nodes(graph, config.features)
    else:
        effects = total_effects(graph).abs()
        if config.layers is not None:
            from featopt.specs import parse_indices

            allowed = torch.tensor(parse_indices(config.layers, graph.n_layers, "--layers", "layer"))
            effects = torch.where(torch.isin(graph.features[:, 0], allowed), effects, torch.tensor(-1.0))
        candidates = int((effects >= 0).sum())
        if candidates == 0:
            raise FeatoptError(f"no active feature of the graph lies in --layers {config.layers}: give other layers.")
        nodes = effects.topk(min(config.top, candidates)).indices.sort().values
    settings = summary.get("settings", {})
    config = dataclasses.replace(config, model=config.model or summary["model"])
    adapter = load_for(config, adapter)
    folder_tc = config.transcoders or summary.get("transcoder_folder")
    if not folder_tc:
        raise FeatoptError("the graph does not record its transcoder folder: give it with --transcoders.")
    model = ReplacementModel(adapter, load_transcoders(folder_tc), skip_first=settings.get("skip_first", 0))
    if [tc.content_hash() for tc in model.transcoders] != [t["sha256"] for t in summary["transcoders"]]:
        raise FeatoptError(f"the transcoders in {folder_tc} are not the ones the graph was built with (their hashes "
                           "differ): give those with --transcoders, or rebuild the graph.")
    prompt = model.capture(graph.input_ids)
    if not torch.allclose(prompt.logits[-1].softmax(-1)[graph.logit_ids].cpu(), graph.logit_probs, atol=1e-4):
        raise FeatoptError(f"--model {config.model!r} does not give the graph's logit probabilities on its prompt: "
                           "give the model the graph was built on.")
    pruned = prune(graph, settings.get("node_threshold", 0.8), settings.get("edge_threshold", 0.98))
    record = intervention_record(model, prompt, graph, nodes, config.factor, pruned, lambda t: adapter.decode([t]))
    record = {"graph": str(folder), "prompt": summary["prompt"], "model": adapter.name, **record,
              "dtype": str(adapter.dtype).removeprefix("torch."), "versions": versions()}
    out = Path(config.out) if config.out else folder
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "intervention.json", lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return InterveneRun(record, out)
