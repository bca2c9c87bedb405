"""The top path and the words of a graph, on a graph built by hand whose answer is known."""

from __future__ import annotations

import torch

from featopt.attribution.adjacency import Graph
from featopt.attribution.paths import lens_tokens, path_words, top_path
from featopt.attribution.pruning import Pruned


def _hand_graph() -> Graph:
    """Two layers, two positions: f0 (layer 0, pos 0, latent 5), f1 (layer 1, pos 1, latent 2);
    errors 2..5, tokens 6-7, the logit 8."""
    A = torch.zeros(9, 9)
    A[8, 1] = 2.0  # f1 -> logit
    A[8, 5] = 3.0  # error (layer 1, pos 1) -> logit: stronger, but the path prefers what the graph explains
    A[1, 0] = 0.5  # f0 -> f1
    A[1, 7] = 0.7  # token 1 -> f1: the stronger input of f1
    A[1, 6] = -3.0  # a negative edge is never the path
    A[0, 6] = 3.0
    features = torch.tensor([[0, 0, 5], [1, 1, 2]])
    return Graph(torch.tensor([11, 12]), features, torch.tensor([1.0, 2.0]), torch.tensor([40]), torch.tensor([0.9]), A, 2)


def _all_kept(graph: Graph) -> Pruned:
    n = len(graph.adjacency)
    return Pruned(torch.ones(n, dtype=torch.bool), graph.adjacency != 0, torch.zeros(n))


def test_the_top_path_follows_the_strongest_positive_input_back_to_a_token():
    graph = _hand_graph()
    assert top_path(graph, _all_kept(graph)) == [7, 1, 8]
    pruned = _all_kept(graph)
    pruned.edges[1, 7] = False  # that edge pruned: the path goes through f0 to token 0
    assert top_path(graph, pruned) == [6, 0, 1, 8]
    pruned.nodes[1] = False  # f1 pruned: the error is the only kept input
    assert top_path(graph, pruned) == [5, 8]


def test_the_path_in_words_names_each_node_and_edge():
    graph = _hand_graph()
    words = path_words(graph, [7, 1, 8], ["The", " cat"], lambda i: [" dog"], lambda t: f"<{t}>")
    assert words == "token ' cat' -[+0.7]-> L1 #2 at ' cat' (writes ' dog') -[+2]-> logit '<40>'"


def test_lens_tokens_are_the_top_of_each_decoder_row_through_the_unembedding():
    class TC:
        def __init__(self, W_dec):
            self.W_dec = W_dec

    gen = torch.Generator().manual_seed(0)
    transcoders = [TC(torch.randn(8, 4, generator=gen)) for _ in range(2)]
    W_U = torch.randn(30, 4, generator=gen)
    features = torch.tensor([[1, 0, 3], [0, 2, 7], [1, 1, 0]])
    got = lens_tokens(transcoders, W_U, features, k=2)
    for (layer, _, latent), ids in zip(features.tolist(), got):
        scores = [float(transcoders[layer].W_dec[latent] @ W_U[v]) for v in range(30)]
        assert ids == sorted(range(30), key=lambda v: -scores[v])[:2]
