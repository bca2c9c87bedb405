"""Influence, pruning and the two scores of an attribution graph (Circuit Tracing, "Pruning" and
"Evaluating graphs"; the same rules and defaults as circuit-tracer's `prune_graph` and
`compute_graph_scores`).

With `A [N, N]` the adjacency (rows: targets), `Â = |A|` with each row divided by its sum (the share
of a target's direct inputs that each source makes up), and `w [N]` the logit nodes' probabilities
(0 elsewhere):

- influence on the logits: `I = w (Â + Â^2 + Â^3 + ...) = w ((1 - Â)^-1 - 1)`, finite because the
  graph is acyclic (a power series that ends after at most its depth);
- node pruning keeps the nodes of largest influence that together make `node_threshold` of the total
  (sorted descending, up to the first whose running share reaches it; ties kept), and every token and
  logit node;
- edge pruning scores each edge of the node-pruned graph by `Â[t, s] (I_t + w_t)` and keeps the
  largest that make `edge_threshold` of the total; then features and errors without an outgoing kept
  edge, and features without an incoming one, are dropped until none is left;
- replacement score: `I_tokens / (I_tokens + I_errors)`, the share of the tokens' and errors' total
  influence that the tokens have (1 when no path runs through an error node);
- completeness score: `sum_n (1 - sum_errors Â[n, e]) (I_n + w_n) / sum_n (I_n + w_n)`, the share of
  each node's inputs that are not errors, weighted by its influence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.attribution.adjacency import Graph

NODE_THRESHOLD, EDGE_THRESHOLD = 0.8, 0.98  # circuit-tracer's defaults


@dataclass
class Pruned:
    """Which nodes and edges a pruned graph keeps, and each node's running share of influence."""

    nodes: Tensor  # [N] bool
    edges: Tensor  # [N, N] bool (rows: targets)
    cumulative: Tensor  # [N]: the share of total influence of the nodes at least as influential


def normalized(adjacency: Tensor) -> Tensor:
    """`|A|` with each row divided by its sum (rows of zeros stay zero)."""
    absolute = adjacency.abs()
    return absolute / absolute.sum(1, keepdim=True).clamp_min(1e-10)


def influence(matrix: Tensor, weights: Tensor, max_steps: int | None = None) -> Tensor:
    """`weights (M + M^2 + ...)` for an acyclic graph's `matrix [N, N]` (a series that ends)."""
    steps = max_steps or len(matrix) + 1
    current = weights @ matrix
    total = current.clone()
    for _ in range(steps):
        if not bool(current.any()):
            return total
        current = current @ matrix
        total += current
    raise FeatoptError("the attribution graph has a cycle: its influence does not converge.")


def logit_weights(graph: Graph) -> Tensor:
    """`[N]`: the logit nodes' probabilities, 0 for every other node."""
    weights = torch.zeros(len(graph.adjacency))
    start, end = graph.node_ranges()["logits"]
    weights[start:end] = graph.logit_probs.float()
    return weights


def _threshold(scores: Tensor, fraction: float) -> Tensor:
    """The smallest score kept when keeping the largest scores that make `fraction` of their sum."""
    ranked = scores.sort(descending=True).values
    share = ranked.cumsum(0) / ranked.sum().clamp_min(1e-30)
    index = min(int(torch.searchsorted(share, torch.tensor(fraction, dtype=share.dtype))), len(ranked) - 1)
    return ranked[index]


def check_threshold(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise FeatoptError(f"--{name} must be in (0, 1], got {value}.")


def logit_influence(graph: Graph) -> Tensor:
    """`[N]`: each node's influence on the logits in the whole graph, `w (Â + Â^2 + ...)`."""
    return influence(normalized(graph.adjacency), logit_weights(graph))


def prune(graph: Graph, node_threshold: float = NODE_THRESHOLD, edge_threshold: float = EDGE_THRESHOLD,
          node_influence: Tensor | None = None) -> Pruned:
    """The nodes and edges kept (see the module docstring); `node_influence`: the graph's
    :func:`logit_influence`, when the caller has it already."""
    check_threshold("node_threshold", node_threshold)
    check_threshold("edge_threshold", edge_threshold)
    ranges = graph.node_ranges()
    weights = logit_weights(graph)
    if node_influence is None:
        node_influence = logit_influence(graph)
    nodes = node_influence >= _threshold(node_influence, node_threshold)
    nodes[ranges["tokens"][0]:] = True  # tokens and logits always stay
    kept = graph.adjacency.clone()
    kept[~nodes] = 0
    kept[:, ~nodes] = 0
    matrix = normalized(kept)
    edge_scores = matrix * (influence(matrix, weights) + weights)[:, None]
    edges = (edge_scores >= _threshold(edge_scores.flatten(), edge_threshold)) & (edge_scores > 0)
    f_end, inner_end = ranges["features"][1], ranges["errors"][1]
    while True:
        before = nodes.clone()
        edges &= nodes[:, None] & nodes[None, :]
        nodes[:inner_end] &= edges[:, :inner_end].any(0)  # features and errors need an outgoing edge
        nodes[:f_end] &= edges[:f_end].any(1)  # features need an incoming one
        if torch.equal(nodes, before):
            break
    order = node_influence.argsort(descending=True)
    cumulative = torch.empty_like(node_influence)
    cumulative[order] = node_influence[order].cumsum(0) / node_influence.sum().clamp_min(1e-30)
    return Pruned(nodes, edges, cumulative)


def scores(graph: Graph, node_influence: Tensor | None = None) -> tuple[float, float]:
    """`(replacement score, completeness score)` of the graph (see the module docstring);
    `node_influence`: its :func:`logit_influence`, when the caller has it already."""
    ranges = graph.node_ranges()
    weights = logit_weights(graph)
    if node_influence is None:
        node_influence = logit_influence(graph)
    (e0, e1), (t0, t1) = ranges["errors"], ranges["tokens"]
    tokens, errors = node_influence[t0:t1].sum(), node_influence[e0:e1].sum()
    replacement = float(tokens / (tokens + errors).clamp_min(1e-30))
    output = node_influence + weights
    absolute = graph.adjacency.abs()  # the errors' share of each row: Â's error columns, without all of Â
    error_share = absolute[:, e0:e1].sum(1) / absolute.sum(1).clamp_min(1e-10)
    completeness = float(((1 - error_share) * output).sum() / output.sum())
    return replacement, completeness
