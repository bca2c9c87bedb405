"""`build_graph`: the files it writes agree with the graph computed directly, and bad input ends in
one sentence with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.attribution.adjacency import attribute
from featopt.attribution.build import build_graph, load_transcoders, target_id
from featopt.attribution.files import load_graph
from featopt.attribution.pruning import scores
from featopt.attribution.replacement import ReplacementModel
from featopt.models.sae.formats import save_sae


def test_build_writes_the_graph_its_pruned_json_and_scores(setup, tmp_path):
    adapter, model, ids, _ = setup
    summary = build_graph(adapter, model.transcoders, "The cat sat on the mat.", tmp_path / "g", batch_size=16)
    graph = load_graph(tmp_path / "g" / "graph.safetensors")
    skipping = ReplacementModel(adapter, model.transcoders, skip_first=1)  # build_graph's default, as circuit-tracer
    direct = attribute(skipping, ids, batch_size=7)  # another batching: the same rows
    torch.testing.assert_close(graph.adjacency, direct.adjacency, rtol=1e-5, atol=1e-6)
    assert summary["replacement_score"] == pytest.approx(scores(direct)[0], rel=1e-4)
    assert json.loads((tmp_path / "g" / "summary.json").read_text())["completeness_score"] == summary["completeness_score"]
    doc = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert len(doc["links"]) == summary["edges"]["kept"] > 0
    assert summary["versions"]["torch"] == torch.__version__ and summary["tokens"][-1] == "."


def test_a_named_target_is_the_one_logit_node(setup, tmp_path):
    adapter, model, _, _ = setup
    summary = build_graph(adapter, model.transcoders, "The cat sat on the mat and", tmp_path / "t", target=" the")
    assert [row["token"] for row in summary["logits"]] == [" the"]


@pytest.mark.parametrize("kwargs,message", [
    ({"prompt": "word " * 80}, "the prompt needs .* positions, but .* takes at most 64"),
    ({"target": " cat"}, "--target ' cat' is 2 tokens"),
    ({"node_threshold": 0.0}, r"--node_threshold must be in \(0, 1\]"),
    ({"edge_threshold": 1.5}, r"--edge_threshold must be in \(0, 1\]"),
    ({"layers": [0, 1]}, "missing layer 2"),
    ({"skip_first": 40}, "--skip_first 40 leaves out every position"),
])
def test_bad_input_ends_in_one_sentence_and_writes_nothing(setup, tmp_path, kwargs, message):
    adapter, model, _, _ = setup
    layers = kwargs.pop("layers", [0, 1, 2])
    prompt = kwargs.pop("prompt", "The cat sat")
    with pytest.raises(FeatoptError, match=message):
        build_graph(adapter, [model.transcoders[i] for i in layers], prompt, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_transcoders_load_from_the_folder_sae_train_writes(setup, tmp_path):
    adapter, model, _, _ = setup
    for tc in model.transcoders:
        save_sae(tc, tmp_path / "tcs" / tc.cfg.hook_name)
    loaded = load_transcoders(tmp_path / "tcs")
    assert [tc.cfg.hook_name for tc in loaded] == [tc.cfg.hook_name for tc in model.transcoders]
    assert all(torch.equal(a.W_enc, b.W_enc) for a, b in zip(loaded, model.transcoders))
    with pytest.raises(FeatoptError, match="does not exist"):
        load_transcoders(tmp_path / "nowhere")
    assert target_id(adapter, " the") == adapter.tokenizer(" the", add_special_tokens=False).input_ids[0]


def test_the_graphml_holds_the_jsons_nodes_and_weighted_links(setup, tmp_path):
    import networkx as nx

    adapter, model, _, _ = setup
    build_graph(adapter, model.transcoders, "The cat sat on the mat.", tmp_path / "g")
    doc = json.loads((tmp_path / "g" / "graph.json").read_text())
    G = nx.read_graphml(tmp_path / "g" / "graph.graphml")
    assert set(G.nodes) == {n["node_id"] for n in doc["nodes"]}
    assert {(u, v): d["weight"] for u, v, d in G.edges(data=True)} == pytest.approx(
        {(link["source"], link["target"]): link["weight"] for link in doc["links"]})
    kinds = nx.get_node_attributes(G, "feature_type")
    assert {"embedding", "logit", "cross layer transcoder"} <= set(kinds.values())


def test_a_graph_too_big_for_free_memory_is_refused_before_it_is_made(setup, tmp_path, monkeypatch):
    import featopt.memory

    adapter, model, _, _ = setup
    monkeypatch.setattr(featopt.memory, "available", lambda device="cpu": 100_000)  # 100 kB free
    with pytest.raises(FeatoptError, match=r"the attribution graph of [\d,]+ nodes \([\d,]+ active features\) needs .* but only"):
        build_graph(adapter, model.transcoders, "The cat sat on the mat.", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_forward_batch_shrinks_to_fit_and_gives_the_same_rows(setup, monkeypatch):
    import featopt.memory

    adapter, model, ids, _ = setup
    want = attribute(model, ids, batch_size=16)
    n = len(want.adjacency)
    monkeypatch.setattr(featopt.memory, "available", lambda device="cpu": int((4 * n * n + 300_000) / 0.8))
    batches, fit = [], featopt.memory.fit_batch
    monkeypatch.setattr(featopt.memory, "fit_batch", lambda *a, **k: batches.append(fit(*a, **k)) or batches[-1])
    got = attribute(model, ids, batch_size=16)  # room for the adjacency and a copy or two of the prompt
    assert 1 <= batches[0] < 16
    torch.testing.assert_close(got.adjacency, want.adjacency, rtol=1e-5, atol=1e-6)
