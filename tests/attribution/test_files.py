"""Graph files: the safetensors graph round-trips exactly; the frontend JSON holds exactly the kept
nodes and edges with the adjacency's weights, under node ids that name what they are."""

from __future__ import annotations

import json

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.attribution.files import graph_json, load_graph, save_graph, write_graph_json
from featopt.attribution.pruning import prune


def test_a_saved_graph_loads_back_the_same(graph, tmp_path):
    save_graph(graph, tmp_path / "graph.safetensors")
    back = load_graph(tmp_path / "graph.safetensors")
    for name in ("input_ids", "features", "activations", "logit_ids", "logit_probs", "adjacency"):
        assert torch.equal(getattr(back, name), getattr(graph, name)), name
    assert back.n_layers == graph.n_layers
    (tmp_path / "bad.safetensors").write_text("not a graph")
    with pytest.raises(FeatoptError, match="is not an attribution graph written by featopt"):
        load_graph(tmp_path / "bad.safetensors")


def test_the_json_holds_the_kept_edges_with_their_weights(setup, graph, tmp_path):
    adapter = setup[0]
    pruned = prune(graph, 0.8, 0.98)
    doc = graph_json(graph, pruned, lambda t: adapter.tokenizer.decode([t]), slug="cat", scan="tiny", transcoders=["a", "b", "c"],
                     node_threshold=0.8)
    write_graph_json(doc, tmp_path / "graph.json")
    doc = json.loads((tmp_path / "graph.json").read_text())
    assert set(doc) == {"metadata", "qParams", "nodes", "links"} and doc["metadata"]["schema_version"] == 1
    assert doc["metadata"]["prompt"] == "The cat sat on the mat."
    ranges, T = graph.node_ranges(), graph.n_pos
    index = {}  # node id -> node index, from what the id says
    for node in doc["nodes"]:
        kind = node["feature_type"]
        if kind == "cross layer transcoder":
            layer, latent, pos = map(int, node["node_id"].split("_"))
            i = [tuple(f) for f in graph.features.tolist()].index((layer, pos, latent))
            assert node["activation"] == pytest.approx(float(graph.activations[i]))
        elif kind == "mlp reconstruction error":
            layer, _, pos = map(int, node["node_id"].split("_"))
            i = ranges["errors"][0] + layer * T + pos
        elif kind == "embedding":
            _, token, pos = node["node_id"].split("_")
            i = ranges["tokens"][0] + int(pos)
            assert int(token) == int(graph.input_ids[int(pos)])
        else:
            layer, token, pos = map(int, node["node_id"].split("_"))
            assert layer == graph.n_layers + 1 and pos == T - 1
            i = ranges["logits"][0] + graph.logit_ids.tolist().index(token)
        index[node["node_id"]] = i
        assert bool(pruned.nodes[i])
    links = {(index[link["target"]], index[link["source"]]): link["weight"] for link in doc["links"]}
    kept = {tuple(e) for e in torch.nonzero(pruned.edges).tolist()}
    assert set(links) == kept and len(links) > 0
    for (t, s), weight in links.items():
        assert weight == pytest.approx(float(graph.adjacency[t, s]))
    targets = [n for n in doc["nodes"] if n["is_target_logit"]]
    assert len(targets) == 1 and targets[0]["token_prob"] == pytest.approx(float(graph.logit_probs.max()))
