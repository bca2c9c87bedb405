"""Flow graphs (document 003, Figures 2, 19, 20 and Table 4): a feature and the features it comes
from and goes to, found by following decoder-cosine matches layer by layer.

From a start feature, a **backward** step asks every predecessor SAE (`flow.predecessors`: for
`L/res`, `L-1/res`, `L/mlp` and `L/att`; for `L/mlp` and `L/att`, `L-1/res`) for the `k` rows
of largest cosine with the feature's decoder row; those scoring at least the threshold become
nodes, with an edge from the match (earlier) to the feature (later), and are stepped backwards in
turn. A **forward** step does the same through the successor SAEs. Nodes found backwards are only
stepped backwards and nodes found forwards only forwards: a zig-zag (back down from a successor)
would pull in the successor's other sources, which are not part of the start's flow. Each node is
stepped once per direction (breadth first); an edge found twice is kept once.

Thresholds may differ per module (Table 4 drops MLP matches under 0.25): a threshold is that of
the module of the node being added.
"""

from __future__ import annotations

import json
import math
import numbers
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featopt.errors import FeatoptError
from featopt.feature_flow.match import top_matches
from featopt.feature_flow.saes import MODULES, FlowSet, Node, parse_node

DIRECTIONS = ("backward", "forward", "both")
#: block order, for sorting and drawing: attention, then MLP, then the residual after the block.
MODULE_ORDER = {"att": 0, "mlp": 1, "res": 2}


@dataclass
class FlowGraph:
    """`nodes`: `{Node: {"layer", "module", "index", "label" (str, "" before labelling),
    "start" (bool)}}` in the order found; `edges`: `(src, dst, score)` with `src` the earlier
    feature (the predecessor) and `score` their decoder cosine; `settings`: how it was built."""

    nodes: dict[Node, dict]
    edges: list[tuple[Node, Node, float]]
    settings: dict = field(default_factory=dict)

    def to_networkx(self):
        """A `networkx.DiGraph` on the `"L/mod/i"` strings; node attributes as in `nodes`, edge
        attribute `score`, graph attribute `settings` (a JSON string: GraphML takes scalars only)."""
        import networkx as nx

        G = nx.DiGraph(settings=json.dumps(self.settings, sort_keys=True))
        for node, attrs in self.nodes.items():
            G.add_node(str(node), **attrs)
        for src, dst, score in self.edges:
            G.add_edge(str(src), str(dst), score=float(score))
        return G

    def record(self) -> dict:
        """JSON-able: `{"nodes": [{"id", ...attributes}], "edges": [{"source", "target",
        "score"}], "settings", "versions"}`."""
        from featopt.results import versions

        return {"nodes": [{"id": str(node), **attrs} for node, attrs in self.nodes.items()],
                "edges": [{"source": str(s), "target": str(d), "score": float(score)} for s, d, score in self.edges],
                "settings": self.settings, "versions": versions()}

    @classmethod
    def from_record(cls, record: dict) -> "FlowGraph":
        """The inverse of :meth:`record`."""
        nodes = {parse_node(n["id"]): {key: value for key, value in n.items() if key != "id"}
                 for n in record["nodes"]}
        edges = [(parse_node(e["source"]), parse_node(e["target"]), float(e["score"])) for e in record["edges"]]
        return cls(nodes, edges, dict(record.get("settings", {})))

    @classmethod
    def load(cls, path: str | Path) -> "FlowGraph":
        """A graph saved by :meth:`save` (its `graph.json`, or the folder holding it)."""
        path = Path(path)
        path = path / "graph.json" if path.is_dir() else path
        if not path.is_file():
            raise FeatoptError(f"flow graph {str(path)!r} does not exist: give a graph.json written by "
                               "`featopt flow graph` or its folder.")
        try:
            return cls.from_record(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as e:  # not JSON, or JSON of something else
            raise FeatoptError(f"flow graph {str(path)!r} is not a graph.json written by `featopt flow graph` "
                               f"({type(e).__name__}): give one, or its folder.") from e

    def save(self, out_dir: str | Path, stem: str = "graph", *, title: str = "") -> dict[str, Path]:
        """Writes `{stem}.json`, `{stem}.graphml` and `{stem}.png` in `out_dir`, each atomically;
        returns `{"json", "graphml", "png"}` paths."""
        import networkx as nx

        from featopt.results import atomic_write

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "graphml": out / f"{stem}.graphml", "png": out / f"{stem}.png"}
        text = json.dumps(self.record(), indent=1)
        atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(text))
        G = self.to_networkx()
        atomic_write(paths["graphml"], lambda tmp: nx.write_graphml(G, tmp))
        plot_graph(self, paths["png"], title=title)
        return paths


def _thresholds(threshold: float | dict[str, float]) -> dict[str, float]:
    """`{module: threshold}` for res, mlp and att; a module missing from a dict gets 0."""
    given = threshold if isinstance(threshold, dict) else {module: threshold for module in MODULES}
    for module, value in given.items():
        if module not in MODULES:
            raise FeatoptError(f"threshold given for module {module!r}: allowed modules are res, mlp and att.")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or not -1 <= value <= 1:
            which = f" for {module}" if isinstance(threshold, dict) else ""
            raise FeatoptError(f"threshold {value!r}{which} is not allowed: a cosine threshold must be a finite "
                               "number between -1 and 1.")
    return {module: float(given.get(module, 0.0)) for module in MODULES}


@torch.no_grad()
def flow_graph(flow: FlowSet, starts: list[Node | str] | Node | str, *, k: int = 1,
               threshold: float | dict[str, float] = 0.0, direction: str = "both", chunk: int = 1024,
               max_nodes: int = 10000) -> FlowGraph:
    """The flow graph of `starts` through the SAEs of `flow`.

    `k`: matches taken per (node, neighbouring SAE); `threshold`: the least cosine kept, one
    number or `{"res": .., "mlp": .., "att": ..}` (missing modules: 0); `direction`: "backward"
    (predecessors only), "forward" or "both"; `max_nodes`: a FeatoptError when the graph would grow
    past it. Each frontier's nodes of one SAE go against each neighbouring SAE in one
    `[n, d] @ [d, d_sae]` :func:`top_matches` call.
    """
    if isinstance(starts, (str, Node)):
        starts = [starts]
    if not starts:
        raise FeatoptError("no start feature given: give one or more features like 6/res/123.")
    start_nodes = list(dict.fromkeys(flow.check_node(s) for s in starts))
    if direction not in DIRECTIONS:
        raise FeatoptError(f"direction {direction!r} is not known: allowed are {', '.join(DIRECTIONS)}.")
    smallest = min(flow[key].d_sae for key in flow.keys())
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= smallest:
        raise FeatoptError(f"k must be an integer from 1 to {smallest} (the smallest SAE's latents), got {k!r}.")
    if chunk < 1:
        raise FeatoptError(f"chunk must be at least 1, got {chunk}.")
    if max_nodes < len(start_nodes):
        raise FeatoptError(f"max_nodes must be at least the {len(start_nodes)} start features, got {max_nodes}.")
    thresholds = _thresholds(threshold)

    nodes = {n: {"layer": n.layer, "module": n.module, "index": n.index, "label": "", "start": True}
             for n in start_nodes}
    edges: dict[tuple[Node, Node], float] = {}
    ways = {"backward": ["backward"], "forward": ["forward"], "both": ["backward", "forward"]}[direction]
    for way in ways:
        neighbours = flow.predecessors if way == "backward" else flow.successors
        expanded, frontier = set(start_nodes), list(start_nodes)
        while frontier:
            found: list[Node] = []
            by_key: dict[tuple[int, str], list[Node]] = defaultdict(list)
            for node in frontier:
                by_key[node.key].append(node)
            for key, group in by_key.items():
                rows = flow[key].W_dec[torch.tensor([n.index for n in group], device=flow[key].W_dec.device)]
                for other in neighbours(key):
                    scores, indices = top_matches(rows, flow[other].W_dec, k, chunk=chunk)  # [n, k] each
                    least = thresholds[other[1]]
                    for node, row_scores, row_indices in zip(group, scores.tolist(), indices.tolist()):
                        for score, index in zip(row_scores, row_indices):
                            if score < least:
                                continue
                            match = Node(other[0], other[1], index)
                            if match not in nodes:
                                if len(nodes) >= max_nodes:
                                    raise FeatoptError(
                                        f"the flow graph grew past max_nodes={max_nodes} nodes: raise the threshold, "
                                        "lower k, or raise max_nodes.")
                                nodes[match] = {"layer": match.layer, "module": match.module, "index": match.index,
                                                "label": "", "start": False}
                            edge = (match, node) if way == "backward" else (node, match)
                            edges.setdefault(edge, float(score))
                            if match not in expanded:
                                expanded.add(match)
                                found.append(match)
            frontier = found
    settings = {"starts": [str(n) for n in start_nodes], "k": k, "threshold": thresholds, "direction": direction,
                "max_nodes": max_nodes, "saes": {f"{layer}/{module}": flow.paths.get((layer, module))
                                                 for layer, module in flow.keys()}}
    return FlowGraph(nodes, [(s, d, score) for (s, d), score in edges.items()], settings)


def label_nodes(graph: FlowGraph, flow: FlowSet, adapter, *, k: int = 3, norm: str = "weight") -> FlowGraph:
    """Sets each node's `label` to its decoder row's top-`k` logit-lens tokens
    (:func:`featopt.dictionaries.lens.logit_lens`, high-norm tokens left out), each token's text in Python
    quotes, space-separated: `"' Paris' ' France' 'French'"`. One lens call per SAE. Returns `graph`."""
    from featopt.dictionaries.lens import logit_lens

    by_key: dict[tuple[int, str], list[Node]] = defaultdict(list)
    for node in graph.nodes:
        by_key[node.key].append(node)
    for key, group in by_key.items():
        lens = logit_lens(adapter, flow[key], [n.index for n in group], k=k, norm=norm)
        for node, ids in zip(group, lens.top_ids.tolist()):
            graph.nodes[node]["label"] = " ".join(repr(adapter.decode([t])) for t in ids)
    graph.settings["labels"] = {"k": k, "norm": norm, "model": getattr(adapter, "name", "")}
    return graph


COLOURS = {"res": "#4C72B0", "mlp": "#55A868", "att": "#C44E52"}


def plot_graph(graph: FlowGraph, path: str | Path, title: str = "", *, scores: bool = True) -> Path:
    """A PNG of `graph` drawn by layer: one column per SAE, left to right in block order (within a
    layer att, mlp, res), the column's nodes spread evenly and ordered by the mean height of their
    earlier neighbours (so chains run straight); colour by module; edge width and opacity by
    score, the score written at the edge's middle when `scores`; `L/mod/i` and the label under
    each node."""
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    columns: dict[tuple[int, str], list[Node]] = defaultdict(list)
    for node in graph.nodes:
        columns[node.key].append(node)
    keys = sorted(columns, key=lambda key: (key[0], MODULE_ORDER[key[1]]))
    x_of, x, previous = {}, 0.0, None
    for key in keys:
        x += 0.0 if previous is None else (1.0 if key[0] == previous else 1.6)  # a gap between layers
        x_of[key], previous = x, key[0]
    # Heights: columns spread evenly, then ordered by the mean height of their neighbours in a few
    # sweeps left to right and back (the usual layered-drawing heuristic), so chains run straight.
    near: dict[str, dict[Node, list[Node]]] = {"earlier": defaultdict(list), "later": defaultdict(list)}
    for src, dst, _ in graph.edges:
        near["earlier"][dst].append(src)
        near["later"][src].append(dst)
    y_of: dict[Node, float] = {}
    for key in keys:
        columns[key].sort(key=lambda n: n.index)
        y_of.update({n: (len(columns[key]) - 1) / 2 - i for i, n in enumerate(columns[key])})
    for sweep in range(4):
        side = near["earlier" if sweep % 2 == 0 else "later"]
        for key in (keys if sweep % 2 == 0 else keys[::-1]):
            def height(n: Node) -> float:
                ys = [y_of[m] for m in side[n]]
                return sum(ys) / len(ys) if ys else y_of[n]
            columns[key].sort(key=lambda n: -height(n))
            y_of.update({n: (len(columns[key]) - 1) / 2 - i for i, n in enumerate(columns[key])})

    tallest = max(len(group) for group in columns.values())
    fig, ax = plt.subplots(figsize=(min(80.0, max(6.0, 1.5 * x + 2.5)), min(60.0, max(3.5, 1.0 * tallest + 1.5))))
    for src, dst, score in graph.edges:
        (x0, y0), (x1, y1) = (x_of[src.key], y_of[src]), (x_of[dst.key], y_of[dst])
        weight = min(max(score, 0.0), 1.0)
        # An edge over another column (L-1/res -> L/res past L/att and L/mlp) bows up, half a row at
        # its middle, so it neither runs through that column's nodes nor hides a shorter edge.
        bow = 0.9 if any(x0 < other < x1 for other in x_of.values()) else 0.0
        t = torch.linspace(0, 1, 25)
        xs, ys = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + 2 * bow * t * (1 - t)  # quadratic Bezier
        ax.plot(xs.numpy(), ys.numpy(), color="0.3", lw=0.4 + 2.6 * weight, alpha=0.25 + 0.65 * weight, zorder=1)
        if scores:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + bow / 2, f"{score:.2f}", fontsize=6, ha="center", va="center", color="0.2",
                    zorder=3, bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
    for node, attrs in graph.nodes.items():
        xy = (x_of[node.key], y_of[node])
        ax.scatter(*xy, s=140, color=COLOURS[node.module], zorder=2,
                   edgecolors="black" if attrs.get("start") else "white", linewidths=2.0 if attrs.get("start") else 0.8)
        label = attrs.get("label", "")
        text = str(node) + (f"\n{label if len(label) <= 26 else label[:25] + '…'}" if label else "")
        ax.annotate(text, xy, xytext=(0, -9), textcoords="offset points", ha="center", va="top", fontsize=6.5,
                    zorder=4)
    handles = [plt.Line2D([], [], ls="", marker="o", ms=8, color=c, label=m) for m, c in COLOURS.items()]
    handles.append(plt.Line2D([], [], ls="", marker="o", ms=8, mfc="white", mec="black", mew=2, label="start"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    layers = sorted({key[0] for key in keys})
    ax.set_xticks([sum(x_of[k] for k in keys if k[0] == layer) / sum(k[0] == layer for k in keys) for layer in layers],
                  [str(layer) for layer in layers])
    ax.set_xlim(-0.8, x + 0.8)
    ax.set_ylim(-tallest / 2 - 0.6, tallest / 2 + 0.5)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("layer (att, mlp, res within a layer)")
    ax.set_title(title or f"flow graph of {', '.join(graph.settings.get('starts', []))}", fontsize=10)
    return save_figure(fig, plt, path)
