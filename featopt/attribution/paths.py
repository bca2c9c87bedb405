"""A pruned graph in words: what each feature writes (its decoder read through the unembedding, the
logit lens of its output), and the graph's top path from the first logit back to a token or error.

The top path starts at the first logit node and steps, each time, to the feature or token whose kept
edge into the current node is the largest positive one (the strongest direct support that the graph
explains; an error node only when nothing else supports the node), until it reaches a token
embedding or an error node (which have no inputs in the graph).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from featopt.attribution.adjacency import Graph
from featopt.attribution.pruning import Pruned


def lens_tokens(transcoders: Sequence, W_U: Tensor, features: Tensor, k: int = 3) -> list[list[int]]:
    """`[n][k]` token ids each feature `(layer, position, latent)` of `features [n, 3]` most raises
    directly: the top of `W_dec[latent] W_U^T` of its layer's transcoder."""
    out: list[list[int]] = [[] for _ in range(len(features))]
    W_U = W_U.detach().float()
    for layer in features[:, 0].unique().tolist():
        rows = torch.nonzero(features[:, 0] == layer).flatten()
        W_dec = transcoders[layer].W_dec.detach().float()[features[rows, 2]]  # [n_l, d_model]
        top = (W_dec.to(W_U.device) @ W_U.T).topk(k, dim=-1).indices.cpu()
        for r, ids in zip(rows.tolist(), top.tolist()):
            out[r] = ids
    return out


def top_path(graph: Graph, pruned: Pruned, logit: int = 0) -> list[int]:
    """Node indices from a token or error node up to the logit node `logit` (see the module docstring)."""
    ranges = graph.node_ranges()
    current = ranges["logits"][0] + logit
    path = [current]
    inner_end = ranges["errors"][0]  # sources below this index are features, which have inputs
    errors = torch.zeros(len(graph.adjacency), dtype=torch.bool)
    errors[ranges["errors"][0]:ranges["errors"][1]] = True
    while True:
        weights = torch.where(pruned.edges[current] & pruned.nodes, graph.adjacency[current], torch.tensor(0.0))
        explained = weights.masked_fill(errors, 0.0)  # a feature or token, when one supports the node at all
        best = int((explained if float(explained.max()) > 0 else weights).argmax())
        if float(weights[best]) <= 0 or best in path:
            break
        path.append(best)
        current = best
        if best >= inner_end:
            break
    return path[::-1]


def node_words(graph: Graph, index: int, tokens: Sequence[str], lens: Callable[[int], list[str]],
               decode: Callable[[int], str]) -> str:
    """One node in words: `L12 #345 at ' France' (writes ' Paris', ' French')`, `error L3 at ' of'`,
    `token ' France'`, `logit ' Paris'`. `tokens`: the prompt's tokens as text; `lens(feature
    index)` the tokens a feature writes; `decode(token id)`."""
    ranges = graph.node_ranges()
    if index < ranges["features"][1]:
        layer, pos, latent = graph.features[index].tolist()
        return f"L{layer} #{latent} at {tokens[pos]!r} (writes {', '.join(repr(t) for t in lens(index))})"
    if index < ranges["errors"][1]:
        layer, pos = divmod(index - ranges["errors"][0], graph.n_pos)
        return f"error L{layer} at {tokens[pos]!r}"
    if index < ranges["tokens"][1]:
        return f"token {tokens[index - ranges['tokens'][0]]!r}"
    return f"logit {decode(int(graph.logit_ids[index - ranges['logits'][0]]))!r}"


def path_words(graph: Graph, path: list[int], tokens: Sequence[str], lens: Callable[[int], list[str]],
               decode: Callable[[int], str]) -> str:
    """The path as one line: nodes joined by arrows that carry each edge's weight."""
    parts = [node_words(graph, path[0], tokens, lens, decode)]
    for source, target in zip(path, path[1:]):
        parts.append(f"-[{float(graph.adjacency[target, source]):+.3g}]-> {node_words(graph, target, tokens, lens, decode)}")
    return " ".join(parts)
