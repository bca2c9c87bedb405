"""An attribution graph on disk: the whole graph as safetensors (`save_graph` / `load_graph`, exact),
the pruned graph as the JSON the circuit-tracer frontend and Neuronpedia read (`graph_json`), and
the same pruned graph as GraphML (`write_graphml`).

The JSON follows circuit-tracer's `frontend/graph_models.py` (schema_version 1, as of circuit-tracer
0.5): `metadata` (slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold,
schema_version), `qParams` (pinnedIds, supernodes, linkType, clickedId, sg_pos), `nodes` and
`links` (`{source, target, weight}` by `node_id`). Node ids:

- feature: `"{layer}_{latent}_{position}"`, `feature` = the Cantor pairing of (layer, latent), type
  "cross layer transcoder" (the frontend's name for every transcoder feature);
- error: `"{layer}_-1_{position}"`, type "mlp reconstruction error";
- token: `"E_{token id}_{position}"`, layer "E", type "embedding";
- logit: `"{n_layers + 1}_{token id}_{T - 1}"`, type "logit", with its probability, the most probable
  one marked `is_target_logit`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from featopt.atomic import atomic_write
from featopt.errors import FeatoptError
from featopt.attribution.adjacency import Graph
from featopt.attribution.pruning import Pruned

SCHEMA_VERSION = 1
_TENSORS = ("input_ids", "features", "activations", "logit_ids", "logit_probs", "adjacency")


def save_graph(graph: Graph, path: str | Path) -> None:
    """Write `graph` to `path` (safetensors), atomically."""
    tensors = {name: getattr(graph, name).contiguous() for name in _TENSORS}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"n_layers": str(graph.n_layers)}))


def load_graph(path: str | Path) -> Graph:
    """The graph `save_graph` wrote."""
    try:
        with safe_open(str(path), "pt") as f:
            n_layers = int((f.metadata() or {})["n_layers"])
        tensors = load_file(str(path))
        return Graph(**{name: tensors[name] for name in _TENSORS}, n_layers=n_layers)
    except (OSError, KeyError, ValueError, SafetensorError) as error:
        raise FeatoptError(f"{path} is not an attribution graph written by featopt ({error}).") from None


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def node_entries(graph: Graph, pruned: Pruned, decode, labels: dict[int, str] | None = None) -> dict[int, dict]:
    """The frontend's node records of the kept nodes, by node index; `decode(token_id) -> str`;
    `labels` (by feature node index) fill the features' `clerp`, the label the frontend shows."""
    ranges = graph.node_ranges()
    T, top = graph.n_pos, int(graph.logit_probs.argmax()) if len(graph.logit_probs) else -1
    out = {}
    for index in torch.nonzero(pruned.nodes).flatten().tolist():
        influence = float(pruned.cumulative[index])
        if index < ranges["features"][1]:
            layer, pos, latent = graph.features[index].tolist()
            node = dict(node_id=f"{layer}_{latent}_{pos}", feature=_cantor(layer, latent), layer=str(layer), ctx_idx=pos,
                        feature_type="cross layer transcoder", jsNodeId=f"{layer}_{latent}-0",
                        activation=float(graph.activations[index]), clerp=(labels or {}).get(index, ""))
        elif index < ranges["errors"][1]:
            layer, pos = divmod(index - ranges["errors"][0], T)
            node = dict(node_id=f"{layer}_-1_{pos}", feature=-1, layer=str(layer), ctx_idx=pos,
                        feature_type="mlp reconstruction error", jsNodeId=f"{layer}_-1-{pos}")
        elif index < ranges["tokens"][1]:
            pos = index - ranges["tokens"][0]
            token = int(graph.input_ids[pos])
            node = dict(node_id=f"E_{token}_{pos}", feature=pos, layer="E", ctx_idx=pos, feature_type="embedding",
                        jsNodeId=f"E_{token}-{pos}")
        else:
            j = index - ranges["logits"][0]
            token, p, layer = int(graph.logit_ids[j]), float(graph.logit_probs[j]), str(graph.n_layers + 1)
            node = dict(node_id=f"{layer}_{token}_{T - 1}", feature=token, layer=layer, ctx_idx=T - 1, feature_type="logit",
                        token_prob=p, is_target_logit=j == top, jsNodeId=f"L_{token}-{T - 1}",
                        clerp=f'Output "{decode(token)}" (p={p:.3f})')
        defaults = dict(token_prob=0.0, is_target_logit=False, run_idx=0, reverse_ctx_idx=0, clerp="", activation=None)
        out[index] = {**defaults, **node, "influence": influence}
    return out


def graph_json(graph: Graph, pruned: Pruned, decode, *, slug: str, scan: str, transcoders: list[str],
               node_threshold: float, labels: dict[int, str] | None = None) -> dict:
    """The pruned graph in circuit-tracer's frontend layout (see the module docstring); `labels`:
    the features' `clerp` by node index."""
    nodes = node_entries(graph, pruned, decode, labels)
    targets, sources = torch.nonzero(pruned.edges, as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in nodes and t in nodes]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    metadata = dict(slug=slug, scan=scan, transcoder_list=transcoders, prompt_tokens=[decode(int(t)) for t in graph.input_ids],
                    prompt="".join(decode(int(t)) for t in graph.input_ids), node_threshold=node_threshold,
                    schema_version=SCHEMA_VERSION)
    qparams = dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_graph_json(doc: dict, path: str | Path) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))


def write_graphml(doc: dict, path: str | Path) -> None:
    """The pruned graph of `graph_json`'s `doc` as GraphML (node ids and attributes as in the JSON,
    `weight` on each edge), for networkx, Gephi or Cytoscape."""
    import networkx as nx

    G = nx.DiGraph()
    for node in doc["nodes"]:
        G.add_node(node["node_id"], **{k: v for k, v in node.items() if k != "node_id" and v is not None})
    for link in doc["links"]:
        G.add_edge(link["source"], link["target"], weight=link["weight"])
    atomic_write(Path(path), lambda tmp: nx.write_graphml(G, tmp))
