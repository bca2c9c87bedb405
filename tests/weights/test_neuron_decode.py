"""Neuron weights and the decoding of every layer, against HF modules and a full softmax by hand."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from neuron_reference import full_softmax, up_rows

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.models.families import get_module
from featopt.commands.neurons import DecodeConfig, decode
from featopt.weights.neurons import decode_model, neuron_weights
from featopt.weights.store import load_decoded

# Written out by hand, independent of the adapter's family table: the module computing the neurons'
# pre-activations (and, for gated MLPs, the gate).
UP = {"gpt2": "mlp.c_fc", "gpt_neo": "mlp.c_fc", "gpt_neox": "mlp.dense_h_to_4h", "gpt_neox_serial": "mlp.dense_h_to_4h",
      "llama": "mlp.up_proj", "mistral": "mlp.up_proj", "qwen2": "mlp.up_proj", "gemma2": "mlp.up_proj",
      "gemma3": "mlp.up_proj"}
BLOCKS = {"gpt2": "transformer.h", "gpt_neo": "transformer.h", "gpt_neox": "gpt_neox.layers",
          "gpt_neox_serial": "gpt_neox.layers", "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
          "gemma2": "model.layers", "gemma3": "model.layers"}
GATED = ("llama", "mistral", "qwen2", "gemma2", "gemma3")


def test_neuron_weights_are_what_each_neuron_reads(family_model):
    """Row n of the weights is neuron n's pre-activation as a linear function of the MLP's input:
    `up(x) - up(0) = x @ W.T` for the unmodified HF module, whatever its storage layout."""
    family, model = family_model
    adapter = ModelAdapter(model)
    x = torch.randn(5, adapter.d_model, generator=torch.Generator().manual_seed(0))
    for layer in range(adapter.n_layers):
        block = get_module(model, BLOCKS[family])[layer]
        paths = [("up", UP[family])] + ([("gate", "mlp.gate_proj")] if family in GATED else [])
        for which, path in paths:
            module = get_module(block, path)
            with torch.no_grad():
                expected = module(x) - module(torch.zeros_like(x))
            torch.testing.assert_close(x @ neuron_weights(adapter, layer, which).T, expected, atol=1e-5, rtol=1e-5)
    if family not in GATED:
        with pytest.raises(FeatoptError, match="no gated MLP"):
            neuron_weights(adapter, 0, "gate")


@pytest.mark.parametrize("which", ["up", "gate"])
def test_every_layer_decodes_like_the_full_softmax(llama64, which):
    got = decode_model(llama64, [0, 1, 2], which=which, k=10, row_chunk=50, vocab_chunk=200, progress=False)
    for layer in range(3):
        mlp = llama64.model.model.layers[layer].mlp
        rows = up_rows(llama64.model, "llama", layer) if which == "up" else mlp.gate_proj.weight
        with torch.no_grad():
            _, ids, values, mean = full_softmax(llama64.model.lm_head(rows), 10)
        assert torch.equal(got[layer].ids, ids), layer
        torch.testing.assert_close(got[layer].probs, values)
        torch.testing.assert_close(got[layer].top_mean, mean)


def test_conv1d_layout_decodes_like_the_full_softmax(gpt64):
    got = decode_model(gpt64, [1], k=5, norm="apply", progress=False)
    with torch.no_grad():
        logits = gpt64.model.lm_head(gpt64.model.transformer.ln_f(up_rows(gpt64.model, "gpt2", 1)))
    assert torch.equal(got[1].ids, full_softmax(logits, 5)[1])


def test_decode_writes_results_that_read_back(llama64, tmp_path):
    run = decode(DecodeConfig(layers="0,2", top_k=4, out=str(tmp_path), progress=False), llama64)
    settings, back = load_decoded(tmp_path)
    assert sorted(back) == [0, 2] and settings["layers"] == [0, 2] and settings["norm"] == "none"
    for layer in (0, 2):
        for name in ("ids", "probs", "logsumexp", "top_mean"):
            assert torch.equal(getattr(back[layer], name), getattr(run.decoded[layer], name))
    summary = json.loads((tmp_path / "neurons.json").read_text())
    assert [s["layer"] for s in summary["layers"]] == [0, 2] and summary["layers"][0]["neurons"] == 128
    with open(tmp_path / "neurons.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))  # token texts may hold newlines: parse, do not split lines
    assert len(rows) == 2 * 128 and rows[-1]["layer"] == "2" and rows[-1]["neuron"] == "127"
    assert json.loads(rows[5]["tokens"]) == [llama64.decode([t]) for t in run.decoded[0].ids[5].tolist()]
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary file behind
    assert "layer   2 neuron" in run.table()


@pytest.mark.parametrize("field,value,message", [
    ("which", "down", "allowed are up, gate"), ("norm", "ln", "allowed are none, weight, apply"),
    ("layers", "7", "layer 7 is out of range"), ("top_k", 0, "at least 1"),
])
def test_bad_settings_are_featopt_errors(llama64, tmp_path, field, value, message):
    with pytest.raises(FeatoptError, match=message):
        decode(DecodeConfig(**{field: value, "out": str(tmp_path), "progress": False}), llama64)


def test_missing_results_are_a_featopt_error(tmp_path):
    with pytest.raises(FeatoptError, match="no decoded neurons"):
        load_decoded(tmp_path)
