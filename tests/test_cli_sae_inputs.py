"""`featopt sae inputs` end to end on a tiny model: SAE latents (from a corpus pass and from `sae
features` statistics), neurons and a direction through the same command, and the dashboard that
shows the inputs. Each best input is re-measured here by a plain HF forward and the feature's own
formula; the searches' internals are checked against brute force in tests/sae/test_inputs.py."""

from __future__ import annotations

import json

import pytest
import torch

from featopt.cli import main
from featopt.models import load_model
from featopt.models.sae.formats import load_sae, save_sae
from featopt.models.sae.model import SAEConfig, SparseAutoencoder
from tests.discrete.search_reference import mlp_hidden, resid_post

TEXT = ("The cat sat on the mat. The dog ran to the park and back again. " * 30)
CTX = ["--context_length", "16", "--corpus_tokens", "2000", "--no_progress"]
FAST = ["--tokens", "3", "--steps", "2", "--search_width", "6", "--topk", "8", "--lambdas", "[0, 1]", "--warm", "3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae-inputs")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "b.txt").write_text(TEXT.upper())
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=32, architecture="topk", k=4, hook_name="blocks.1.hook_resid_post"))
    sae.init_weights(torch.Generator().manual_seed(0))
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3))
    torch.save(direction, root / "v.pt")
    return {"root": root, "corpus": corpus, "sae": save_sae(sae, root / "sae"), "vector": root / "v.pt"}


def _read(out):
    return json.loads((out / "results.json").read_text())


def test_latents_best_inputs_are_what_a_plain_forward_and_the_sae_give(files, tmp_path, capsys):
    out = tmp_path / "inputs"
    assert main(["sae", "inputs", "--model", "tiny-llama", "--sae", str(files["sae"]), "--corpus", str(files["corpus"]),
                 "--features", "[:, :, 0-4]", *CTX, *FAST, "--out", str(out)]) == 0
    assert "best >= corpus max" in capsys.readouterr().out
    doc = _read(out)
    assert (out / "fronts.png").stat().st_size > 0
    assert doc["run"]["summary"]["features"] == 5 and doc["run"]["command"] == "sae inputs"
    adapter, sae = load_model("tiny-llama"), load_sae(files["sae"])
    for latent, r in enumerate(doc["results"]):
        extra = r["extra"]
        ids = torch.tensor([r["token_ids"]])
        x = resid_post(adapter.model, ids, 1)[0, -1]
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        kept = pre.topk(4).indices
        z = float(torch.relu(pre[latent])) if latent in kept.tolist() else 0.0
        assert r["activation"] == pytest.approx(z, abs=1e-5)
        assert r["token_ids"][0] == adapter.tokenizer.eos_token_id  # the prefix: never at position 0
        assert len(r["token_ids"]) == 1 + 3
        assert extra["best_ratio"] == (pytest.approx(z / extra["corpus_max"]) if extra["corpus_max"] > 0 else None)
        assert r["seed"] == 0 and r["model"] == "tiny-llama" and r["feature_map"]["sha256"]
        for q in extra["front"]:
            assert q["xent"] >= 0 and len(q["acts"]) == len(q["token_ids"])


def test_from_statistics_with_bos_and_reused_by_the_dashboard(files, tmp_path):
    feats, out, dash = tmp_path / "feats", tmp_path / "inputs", tmp_path / "dash"
    assert main(["sae", "features", "--model", "tiny-llama", "--bos", "--sae", str(files["sae"]), "--corpus",
                 str(files["corpus"]), "--context_length", "16", "--no_progress", "--out", str(feats)]) == 0
    assert main(["sae", "inputs", "--model", "tiny-llama", "--bos", "--sae", str(files["sae"]), "--stats", str(feats),
                 "--features", "all", "--sample", "3", *FAST, "--no_progress", "--out", str(out)]) == 0
    doc = _read(out)
    latents = [int(r["spec"].strip("[]").split(",")[-1]) for r in doc["results"]]
    stats = json.loads((feats / "features.json").read_text())
    assert len(latents) == 3 and stats["tokens"] > 0
    adapter = load_model("tiny-llama")
    for r in doc["results"]:
        assert r["token_ids"][0] == adapter.tokenizer.bos_token_id and len(r["token_ids"]) == 1 + 3
    assert main(["sae", "dashboard", "--model", "tiny-llama", "--bos", "--sae", str(files["sae"]), "--stats", str(feats),
                 "--features", f"[:, :, [{', '.join(map(str, latents))}]]", "--inputs", str(out), "--ablate_examples", "0",
                 "--search_top", "0", "--no_progress", "--out", str(dash)]) == 0
    records = json.loads((dash / "records.json").read_text())["latents"]
    for record, r in zip(records, doc["results"]):
        assert record["inputs"]["best"]["activation"] == r["activation"]
    page = (dash / f"latent-{latents[0]}.html").read_text()
    assert "Inputs that fire the latent" in page and '<svg class="front"' in page


def test_neurons_and_a_direction_through_the_same_command(files, tmp_path):
    adapter = load_model("tiny-llama")
    out = tmp_path / "neurons"
    assert main(["sae", "inputs", "--model", "tiny-llama", "--corpus", str(files["corpus"]), "--site", "mlp_hidden",
                 "--layer", "1", "--features", "[:, :, 0-2]", *CTX, *FAST, "--out", str(out)]) == 0
    for neuron, r in enumerate(_read(out)["results"]):
        value = mlp_hidden(adapter.model, torch.tensor([r["token_ids"]]), 1)[0, -1, neuron]
        assert r["activation"] == pytest.approx(float(value), abs=1e-5)
    out = tmp_path / "direction"
    assert main(["sae", "inputs", "--model", "tiny-llama", "--corpus", str(files["corpus"]), "--objective",
                 f"direction(vector='{files['vector']}', layer=1)", *CTX, *FAST, "--out", str(out)]) == 0
    (r,) = _read(out)["results"]
    x = resid_post(adapter.model, torch.tensor([r["token_ids"]]), 1)[0, -1]
    assert r["activation"] == pytest.approx(float(x @ torch.load(files["vector"])), abs=1e-4)
    assert r["extra"]["corpus_max"] > 0 and r["extra"]["corpus_windows"] > 0
