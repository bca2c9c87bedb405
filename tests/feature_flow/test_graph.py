"""Flow graphs against a hand-built chain planted in the decoders, and against an independent
breadth-first walk over dense float64 cosine matrices; GraphML and PNG output; logit-lens labels
against a hand matmul `W_U @ (gain * w)`."""

from __future__ import annotations

import json
import math

import networkx as nx
import numpy as np
import pytest
import torch

from tests.feature_flow.flow_reference import D, D_SAE, KEYS, make_sae
from featopt.errors import FeatoptError
from featopt.feature_flow.graph import FlowGraph, flow_graph, label_nodes, plot_graph
from featopt.feature_flow.saes import FlowSet, Node, parse_node
from featopt.models import load_model

# The planted chain, in an orthonormal basis e_0..e_63: every other decoder row lies in the span of
# e_8..e_63, so it has cosine 0 with every planted row and never wins a top-1.
PLANTED = {
    "0/res/5": {0: 1.0},
    "1/res/7": {0: 1.0, 1: 0.3},
    "1/mlp/3": {0: 1.0, 2: 0.6},
    "1/att/2": {0: 0.2, 3: 1.0},  # nearly orthogonal: the weak edges
    "2/res/4": {0: 1.0, 5: 0.2},
    "2/mlp/6": {0: 1.0, 6: 1.0},
    "2/att/1": {0: 0.3, 7: 1.0},
}
# Edges (earlier, later) of the whole chain: each node's best match in each neighbouring SAE.
ALL_EDGES = {("1/res/7", "2/res/4"), ("2/mlp/6", "2/res/4"), ("2/att/1", "2/res/4"), ("0/res/5", "1/res/7"),
             ("1/mlp/3", "1/res/7"), ("1/att/2", "1/res/7"), ("1/res/7", "2/mlp/6"), ("1/res/7", "2/att/1"),
             ("0/res/5", "1/mlp/3"), ("0/res/5", "1/att/2")}


@pytest.fixture(scope="module")
def chain() -> FlowSet:
    Q = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64))[0].T
    saes = {}
    for n, key in enumerate(KEYS):
        coef = torch.randn(D_SAE, D - 8, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
        W = coef @ Q[8:]  # [d_sae, d]: orthogonal to e_0..e_7
        for name, parts in PLANTED.items():
            node = parse_node(name)
            if node.key == key:
                W[node.index] = sum(c * Q[i] for i, c in parts.items())
        saes[key] = make_sae(*key, W_dec=W.float())
    return FlowSet(saes)


def cosine(flow: FlowSet, a: str, b: str) -> float:
    a, b = parse_node(a), parse_node(b)
    u, v = flow[a.key].W_dec[a.index].double(), flow[b.key].W_dec[b.index].double()
    return float(u @ v / (u.norm() * v.norm()))


def edge_set(graph: FlowGraph) -> set[tuple[str, str]]:
    return {(str(s), str(d)) for s, d, _ in graph.edges}


def check(graph: FlowGraph, flow: FlowSet, nodes: set[str], edges: set[tuple[str, str]], starts: set[str]):
    assert {str(n) for n in graph.nodes} == nodes
    assert edge_set(graph) == edges and len(graph.edges) == len(edges)  # no edge twice
    for node, attrs in graph.nodes.items():
        assert attrs == {"layer": node.layer, "module": node.module, "index": node.index, "label": "",
                         "start": str(node) in starts}
    for src, dst, score in graph.edges:
        assert score == pytest.approx(cosine(flow, str(src), str(dst)), abs=1e-5)


def test_planted_scores_are_what_the_chain_says(chain):
    """The fixture itself: the hand values the expectations below rest on."""
    assert cosine(chain, "1/res/7", "2/res/4") == pytest.approx(1 / math.sqrt(1.09 * 1.04), abs=1e-6)
    assert cosine(chain, "1/att/2", "1/res/7") == pytest.approx(0.2 / math.sqrt(1.04 * 1.09), abs=1e-6)
    assert abs(cosine(chain, "2/res/4", "1/res/8")) < 1e-6


@pytest.mark.parametrize("start", ["2/res/4", "0/res/5"])
def test_whole_chain_backward_from_the_end_and_forward_from_the_beginning(chain, start):
    direction = "backward" if start == "2/res/4" else "forward"
    graph = flow_graph(chain, [start], direction=direction, threshold=0.1)
    check(graph, chain, set(PLANTED), ALL_EDGES, {start})


def test_directions_from_the_middle(chain):
    back = flow_graph(chain, ["1/res/7"], direction="backward", threshold=0.1)
    back_edges = {("0/res/5", "1/res/7"), ("1/mlp/3", "1/res/7"), ("1/att/2", "1/res/7"), ("0/res/5", "1/mlp/3"),
                  ("0/res/5", "1/att/2")}
    check(back, chain, {"1/res/7", "0/res/5", "1/mlp/3", "1/att/2"}, back_edges, {"1/res/7"})
    fwd = flow_graph(chain, ["1/res/7"], direction="forward", threshold=0.1)
    fwd_edges = {("1/res/7", "2/res/4"), ("1/res/7", "2/mlp/6"), ("1/res/7", "2/att/1"), ("2/mlp/6", "2/res/4"),
                 ("2/att/1", "2/res/4")}
    check(fwd, chain, {"1/res/7", "2/res/4", "2/mlp/6", "2/att/1"}, fwd_edges, {"1/res/7"})
    both = flow_graph(chain, [parse_node("1/res/7")], threshold=0.1)
    check(both, chain, set(PLANTED), back_edges | fwd_edges, {"1/res/7"})
    assert both.settings["direction"] == "both" and both.settings["starts"] == ["1/res/7"]


def test_no_zig_zag(chain):
    """Forward from 1/mlp/3 reaches 1/res/7; stepping back from there would add 0/res/5 and 1/att/2."""
    graph = flow_graph(chain, ["1/mlp/3"], direction="forward", threshold=0.1)
    check(graph, chain, {"1/mlp/3", "1/res/7", "2/res/4", "2/mlp/6", "2/att/1"},
          {("1/mlp/3", "1/res/7"), ("1/res/7", "2/res/4"), ("1/res/7", "2/mlp/6"), ("1/res/7", "2/att/1"),
           ("2/mlp/6", "2/res/4"), ("2/att/1", "2/res/4")}, {"1/mlp/3"})


def test_two_starts_share_nodes_and_edges(chain):
    graph = flow_graph(chain, ["2/res/4", "1/res/7", "2/res/4"], direction="backward", threshold=0.1)
    check(graph, chain, set(PLANTED), ALL_EDGES, {"2/res/4", "1/res/7"})


def test_thresholds_drop_exactly_the_weak_edges(chain):
    # A scalar just above / below the 2/mlp/6 -> 2/res/4 cosine (the edge that adds 2/mlp/6).
    s = cosine(chain, "2/mlp/6", "2/res/4")
    above = flow_graph(chain, ["2/res/4"], direction="backward", threshold=s + 1e-4)
    below = flow_graph(chain, ["2/res/4"], direction="backward", threshold=s - 1e-4)
    assert "2/mlp/6" not in {str(n) for n in above.nodes} and "2/mlp/6" in {str(n) for n in below.nodes}
    want_above = {e for e in ALL_EDGES if "att" not in e[0] + e[1] and "2/mlp/6" not in e}
    assert {e: cosine(chain, *e) >= s + 1e-4 for e in ALL_EDGES} == {e: e in want_above for e in ALL_EDGES}
    check(above, chain, {"2/res/4", "1/res/7", "0/res/5", "1/mlp/3"}, want_above, {"2/res/4"})
    # Per module: the threshold is that of the node being added. att 0.25 keeps 2/att/1 (0.281) and
    # drops 1/att/2 (0.188); res and mlp, not named, keep everything.
    graph = flow_graph(chain, ["2/res/4"], direction="backward", threshold={"att": 0.25})
    check(graph, chain, set(PLANTED) - {"1/att/2"},
          ALL_EDGES - {("1/att/2", "1/res/7"), ("0/res/5", "1/att/2")}, {"2/res/4"})
    assert graph.settings["threshold"] == {"res": 0.0, "mlp": 0.0, "att": 0.25}
    # res 0.68: the 1/res/7 -> 2/att/1 (0.275), 1/res/7 -> 2/mlp/6 (0.677) and 0/res/5 -> 1/att/2
    # (0.196) edges go, as their res ends are added; the nodes stay, reached through stronger edges.
    graph = flow_graph(chain, ["2/res/4"], direction="backward", threshold={"res": 0.68, "mlp": 0.5, "att": 0.1})
    check(graph, chain, set(PLANTED),
          ALL_EDGES - {("1/res/7", "2/att/1"), ("1/res/7", "2/mlp/6"), ("0/res/5", "1/att/2")}, {"2/res/4"})


# ---------------------------------------------------------------- against a dense, independent walk
def earlier_keys(key):
    layer, module = key
    return [(layer - 1, "res"), (layer, "mlp"), (layer, "att")] if module == "res" else [(layer - 1, "res")]


def dense_walk(saes: dict, starts: list[Node], k: int, least: dict, direction: str):
    """Depth-first over whole `[d_a, d_b]` float64 cosine matrices: no chunks, no batching."""
    unit = {key: (W := sae.W_dec.detach().double()) / W.norm(dim=1, keepdim=True) for key, sae in saes.items()}
    later = {key: [o for o in saes if key in earlier_keys(o)] for key in saes}
    nodes, edges, near = set(starts), {}, []
    for way in (["backward", "forward"] if direction == "both" else [direction]):
        stack, seen = list(starts), set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            others = [o for o in earlier_keys(node.key) if o in saes] if way == "backward" else later[node.key]
            for other in others:
                cos = unit[node.key] @ unit[other].T  # the dense matrix
                values, order = torch.sort(cos[node.index], descending=True)
                for value, index in zip(values[:k].tolist(), order[:k].tolist()):
                    near.append(abs(value - least[other[1]]))
                    if value >= least[other[1]]:
                        match = Node(other[0], other[1], index)
                        nodes.add(match)
                        edges[(match, node) if way == "backward" else (node, match)] = value
                        stack.append(match)
    return nodes, edges, min(near)


@pytest.mark.parametrize("k,threshold,direction,start", [
    (2, 0.2, "backward", "2/res/3"), (2, {"res": 0.25, "mlp": 0.2, "att": 0.3}, "both", "1/res/11"),
    (2, 0.15, "forward", "0/res/0"), (3, 0.2, "both", "1/mlp/40"), (1, -1.0, "backward", "2/res/47")])
def test_equals_a_dense_walk(flow_set, k, threshold, direction, start):
    least = threshold if isinstance(threshold, dict) else dict.fromkeys(("res", "mlp", "att"), threshold)
    nodes, edges, near = dense_walk(flow_set.saes, [parse_node(start)], k, least, direction)
    assert near > 1e-5  # no score so close to a threshold that float32 could flip it
    graph = flow_graph(flow_set, [start], k=k, threshold=threshold, direction=direction, chunk=2)
    assert set(graph.nodes) == nodes and len(nodes) > 4
    assert {(s, d) for s, d, _ in graph.edges} == set(edges) and len(graph.edges) == len(edges)
    for s, d, score in graph.edges:
        assert score == pytest.approx(edges[(s, d)], abs=1e-5)


def test_max_nodes(flow_set):
    full = flow_graph(flow_set, ["2/res/0"], k=2, threshold=-1.0, direction="backward")
    assert len(flow_graph(flow_set, ["2/res/0"], k=2, threshold=-1.0, direction="backward",
                          max_nodes=len(full.nodes)).nodes) == len(full.nodes)
    with pytest.raises(FeatoptError, match="max_nodes"):
        flow_graph(flow_set, ["2/res/0"], k=2, threshold=-1.0, direction="backward", max_nodes=len(full.nodes) - 1)


@pytest.mark.parametrize("kwargs", [
    {"starts": ["2/res/48"]}, {"starts": ["0/mlp/1"]}, {"starts": ["2/foo/1"]}, {"starts": []}, {"k": 0},
    {"k": 49}, {"k": 1.5}, {"threshold": float("nan")}, {"threshold": 1.5}, {"threshold": {"res": float("inf")}},
    {"threshold": {"foo": 0.2}}, {"threshold": "0.2"}, {"direction": "sideways"}, {"max_nodes": 0}, {"chunk": 0}])
def test_bad_inputs(flow_set, kwargs):
    kwargs = {"starts": ["1/res/0"], **kwargs}
    with pytest.raises(FeatoptError):
        flow_graph(flow_set, **kwargs)


# ---------------------------------------------------------------- files
def test_save_graphml_json_png(chain, tmp_path):
    graph = flow_graph(chain, ["1/res/7"], threshold=0.1)
    graph.nodes[parse_node("0/res/5")]["label"] = "' a' 'b'"
    paths = graph.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["graph.graphml", "graph.json", "graph.png"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    G = nx.read_graphml(paths["graphml"])
    assert set(G.nodes) == {str(n) for n in graph.nodes}
    assert set(G.edges) == edge_set(graph)
    for src, dst, score in graph.edges:
        assert G.edges[str(src), str(dst)]["score"] == pytest.approx(score, abs=1e-12)
    for node, attrs in graph.nodes.items():
        assert G.nodes[str(node)] == attrs  # types too: int, str, bool
    assert json.loads(G.graph["settings"])["starts"] == ["1/res/7"]

    record = json.loads(paths["json"].read_text())
    assert {n["id"] for n in record["nodes"]} == {str(n) for n in graph.nodes} and "versions" in record
    again = FlowGraph.load(tmp_path / "out")
    assert again.nodes == graph.nodes and again.edges == graph.edges and again.settings == graph.settings


def test_plot_of_fifty_nodes(flow_set, tmp_path):
    graph = flow_graph(flow_set, ["2/res/0", "2/res/1"], k=2, threshold=0.22)
    assert 30 <= len(graph.nodes) <= 80
    for node in graph.nodes:
        graph.nodes[node]["label"] = "' token' 'other' ' third'"
    path = plot_graph(graph, tmp_path / "g.png", title="fifty")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ---------------------------------------------------------------- labels
@pytest.fixture(scope="module")
def lens_model():
    adapter = load_model("tiny-llama")  # a fresh model: the gain edit touches no other test
    with torch.no_grad():
        adapter.model.model.norm.weight.copy_(0.5 + torch.rand(D, generator=torch.Generator().manual_seed(0)))
    return adapter


def test_labels_are_the_hand_logit_lens(flow_set, lens_model):
    graph = flow_graph(flow_set, ["1/res/5"], k=2, threshold=0.2)
    assert len({n.key for n in graph.nodes}) >= 3
    label_nodes(graph, flow_set, lens_model, k=3)
    W_U = lens_model.model.lm_head.weight.detach().double()
    gain = lens_model.model.model.norm.weight.detach().double()
    norms = np.linalg.norm(W_U.numpy(), axis=1)
    removed = set(np.nonzero((norms - norms.mean()) / norms.std() > 3.0)[0].tolist())  # the high-norm rule
    for node, attrs in graph.nodes.items():
        logits = W_U @ (gain * flow_set[node.key].W_dec[node.index].double())
        ids = [t for t in torch.argsort(logits, descending=True).tolist() if t not in removed][:3]
        assert attrs["label"] == " ".join(repr(lens_model.decode([t])) for t in ids)
    assert graph.settings["labels"]["k"] == 3
