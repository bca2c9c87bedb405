"""Influence, pruning and the graph scores against brute force: influence by the matrix inverse
`(1 - Â)^-1 - 1` in float64, the kept nodes and edges by loops over sorted Python floats, the scores
by their formulas written out."""

from __future__ import annotations

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.attribution.adjacency import Graph
from featopt.attribution.pruning import influence, logit_weights, normalized, prune, scores

N_LAYERS, T = 2, 3


def _graph(seed: int, error_weight: float = 1.0) -> Graph:
    """A random acyclic graph in attribution order: 8 features over two layers, 6 errors, 3 tokens,
    2 logits; edges only from earlier layers (tokens first) to later nodes."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.tensor([[0, 0, 1], [0, 1, 4], [0, 2, 2], [0, 2, 5], [1, 0, 3], [1, 1, 1], [1, 2, 0], [1, 2, 6]])
    n_f = len(features)
    n = n_f + N_LAYERS * T + T + 2
    depth = torch.zeros(n)  # tokens 0, layer-0 features and errors 1, layer-1 2, logits 3
    depth[:n_f] = features[:, 0].float() + 1
    depth[n_f:n_f + N_LAYERS * T] = torch.arange(N_LAYERS).repeat_interleave(T).float() + 1
    depth[n - 2:] = 3
    adjacency = torch.randn(n, n, generator=gen) * (depth[:, None] > depth[None, :])
    adjacency[:, n_f:n_f + N_LAYERS * T] *= error_weight
    adjacency[n_f:n - 2] = 0  # errors and tokens have no inputs
    adjacency[:n_f, n - 2:] = 0
    return Graph(torch.arange(T), features, torch.rand(n_f, generator=gen) + 0.1, torch.tensor([7, 9]),
                 torch.tensor([0.6, 0.3]), adjacency, N_LAYERS)


def _brute_influence(graph: Graph) -> list[float]:
    a = normalized(graph.adjacency).double()
    series = torch.linalg.inv(torch.eye(len(a), dtype=torch.float64) - a) - torch.eye(len(a), dtype=torch.float64)
    return (logit_weights(graph).double() @ series).tolist()


def _keep_largest(scores: dict, fraction: float) -> set:
    """Keys of the largest scores until their running share reaches `fraction`, and ties of the last."""
    ranked = sorted(scores.values(), reverse=True)
    total, running, cut = sum(ranked), 0.0, ranked[-1]
    for value in ranked:
        running += value
        if running / total >= fraction - 1e-12:
            cut = value
            break
    return {key for key, value in scores.items() if value >= cut - 1e-12}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_influence_is_the_power_series_of_the_normalized_graph(seed):
    graph = _graph(seed)
    got = influence(normalized(graph.adjacency), logit_weights(graph))
    torch.testing.assert_close(got.double(), torch.tensor(_brute_influence(graph), dtype=torch.float64), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed,node_threshold,edge_threshold", [(0, 0.8, 0.98), (1, 0.5, 0.9), (2, 0.95, 0.7), (3, 1.0, 1.0)])
def test_pruning_keeps_exactly_the_influential_nodes_and_edges(seed, node_threshold, edge_threshold):
    graph = _graph(seed)
    ranges = graph.node_ranges()
    n = len(graph.adjacency)
    node_influence = dict(enumerate(_brute_influence(graph)))
    nodes = _keep_largest(node_influence, node_threshold) | set(range(ranges["tokens"][0], n))
    kept = graph.adjacency.clone()
    for i in range(n):
        if i not in nodes:
            kept[i] = 0
            kept[:, i] = 0
    a = normalized(kept).double()
    w = logit_weights(graph).double()
    series = torch.linalg.inv(torch.eye(n, dtype=torch.float64) - a) - torch.eye(n, dtype=torch.float64)
    pruned_influence = (w @ series + w).tolist()
    edge_scores = {(t, s): float(a[t, s]) * pruned_influence[t] for t in range(n) for s in range(n) if a[t, s] > 0}
    edges = _keep_largest(edge_scores, edge_threshold)
    inner_end, f_end = ranges["errors"][1], ranges["features"][1]
    while True:  # drop dangling features and errors until none is left
        edges = {(t, s) for t, s in edges if t in nodes and s in nodes}
        drop = {i for i in nodes if i < inner_end and not any(s == i for _, s in edges)}
        drop |= {i for i in nodes if i < f_end and not any(t == i for t, _ in edges)}
        if not drop:
            break
        nodes -= drop
    result = prune(graph, node_threshold, edge_threshold)
    assert set(torch.nonzero(result.nodes).flatten().tolist()) == nodes
    assert {tuple(e) for e in torch.nonzero(result.edges).tolist()} == edges
    assert float(result.cumulative.max()) == pytest.approx(1.0)


def test_the_scores_follow_their_formulas_and_reach_one_without_errors():
    graph = _graph(4)
    ranges = graph.node_ranges()
    infl = _brute_influence(graph)
    w = logit_weights(graph).tolist()
    a = normalized(graph.adjacency).double()
    (e0, e1), (t0, t1) = ranges["errors"], ranges["tokens"]
    tokens, errors = sum(infl[t0:t1]), sum(infl[e0:e1])
    out = [i + x for i, x in zip(infl, w)]
    completeness = sum((1 - float(a[n, e0:e1].sum())) * out[n] for n in range(len(out))) / sum(out)
    replacement, got_completeness = scores(graph)
    assert replacement == pytest.approx(tokens / (tokens + errors), rel=1e-5)
    assert got_completeness == pytest.approx(completeness, rel=1e-5)
    assert 0 < replacement < 1 and 0 < got_completeness < 1
    assert scores(_graph(4, error_weight=0.0)) == pytest.approx((1.0, 1.0))


@pytest.mark.parametrize("node_threshold,edge_threshold,bad", [(0.0, 0.9, "node_threshold"), (1.2, 0.9, "node_threshold"),
                                                                 (0.8, -0.1, "edge_threshold")])
def test_thresholds_outside_zero_one_are_refused(node_threshold, edge_threshold, bad):
    with pytest.raises(FeatoptError, match=rf"--{bad} must be in \(0, 1\]"):
        prune(_graph(0), node_threshold, edge_threshold)
