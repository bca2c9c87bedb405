"""`featopt graph build|intervene|view` and their Python functions end to end on tiny-llama with three
random transcoders saved to disk. The graph itself is checked against independent computations in
tests/attribution; here: each command writes what it says, the records agree with a recomputation from
the library, and the view links each feature to its latent page when a dashboard exists."""

from __future__ import annotations

import json

import pytest
import torch

import featopt
from featopt.cli import main
from featopt.attribution.adjacency import attribute
from featopt.attribution.files import load_graph
from featopt.attribution.intervene import predicted, total_effects
from featopt.attribution.replacement import ReplacementModel
from featopt.models import load_model
from featopt.models.sae.formats import load_sae, save_sae
from tests.attribution.tiny_graph import transcoder

PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph-cli")
    for layer in range(3):
        save_sae(transcoder(layer, seed=layer, skip=layer == 1), root / "tc" / f"layer{layer}")
    out = root / "graph"
    assert main(["graph", "build", "--prompt", PROMPT, "--model", "tiny-llama", "--transcoders", str(root / "tc"), "--no_progress",
                 "--out", str(out)]) == 0
    return root, out


def test_build_writes_the_graph_its_view_and_a_summary_of_the_library_graph(built, capsys):
    root, out = built
    for name in ("graph.safetensors", "graph.json", "graph.graphml", "summary.json", "graph.html", "graph.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    adapter = load_model("tiny-llama").with_bos(True)  # the command's defaults: BOS first, position 0 left out
    ids = adapter.encode(PROMPT)
    model = ReplacementModel(adapter, [load_sae(root / "tc" / f"layer{i}") for i in range(3)], skip_first=1)
    expected = attribute(model, ids)
    graph = load_graph(out / "graph.safetensors")
    assert torch.equal(graph.features, expected.features) and torch.equal(graph.logit_ids, expected.logit_ids)
    torch.testing.assert_close(graph.adjacency, expected.adjacency, rtol=1e-4, atol=1e-6)
    assert summary["prompt"] == PROMPT and summary["check"] < 1e-4 and int(ids[0]) == adapter.bos_token_id()
    assert summary["transcoder_folder"] == str((root / "tc").resolve())
    doc = json.loads((out / "graph.json").read_text())
    page = (out / "graph.html").read_text()
    assert doc["links"] and f'{doc["links"][0]["weight"]:.4g}'[:4] in page  # the view shows the kept edges' weights


def test_intervene_sets_prediction_beside_measurement(built, capsys):
    root, out = built
    capsys.readouterr()
    assert main(["graph", "intervene", "--graph", str(out), "--top", "2", "--factor", "0"]) == 0
    table = capsys.readouterr().out
    record = json.loads((out / "intervention.json").read_text())
    graph = load_graph(out / "graph.safetensors")
    nodes = total_effects(graph).abs().topk(2).indices.sort().values
    assert [f["node_id"] for f in record["features"]] == [
        f"{layer}_{latent}_{pos}" for layer, pos, latent in graph.features[nodes].tolist()]
    row = record["logits"][0]
    assert row["predicted"] == pytest.approx(float(predicted(graph, nodes, 0.0)[0]), rel=1e-5, abs=1e-7)
    assert record["model"] == "tiny-llama" and record["factor"] == 0.0 and "torch" in record["versions"]
    assert "frozen errors" in table and record["features"][0]["node_id"] in table

    assert main(["graph", "intervene", "--graph", str(out), "--top", "2", "--layers", "1", "--out", str(root / "l1")]) == 0
    effects = total_effects(graph).abs().masked_fill(graph.features[:, 0] != 1, -1)
    chosen = json.loads((root / "l1" / "intervention.json").read_text())["features"]
    assert [f["node_id"] for f in chosen] == [f"{layer}_{latent}_{pos}" for layer, pos, latent in
                                              graph.features[effects.topk(2).indices.sort().values].tolist()]

    first = record["features"][0]["node_id"]
    run = featopt.graph.intervene(graph=str(out), features=first, factor=2.0, out=str(root / "twice"))
    assert run.record["features"][0]["node_id"] == first and run.record["factor"] == 2.0
    assert (root / "twice" / "intervention.json").is_file()


def test_view_links_features_to_the_latent_pages_of_their_dashboards(built, tmp_path):
    from featopt.dictionaries.dashboard import write_dashboard

    root, out = built
    doc = json.loads((out / "graph.json").read_text())
    feature = next(n for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, latent, _ = (int(v) for v in feature["node_id"].split("_"))
    sae = load_sae(root / "tc" / f"layer{layer}")
    write_dashboard(tmp_path / "dash" / f"layer{layer}", {"model": "tiny-llama", "sae": sae.describe()},
                    [{"latent": latent, "frequency": 0.1, "max": 1.0}])
    run = featopt.graph.view(graph=str(out), dashboards=str(tmp_path / "dash"), out=str(tmp_path / "view"))
    page = (tmp_path / "view" / "graph.html").read_text()
    assert f"latent-{latent}.html" in page and "dash/layer" in page
    assert run.table().startswith("graph of") and (tmp_path / "view" / "graph.png").is_file()
