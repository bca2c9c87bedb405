"""tiny-llama with three random transcoders (the one of layer 1 with a skip connection), a prompt,
its capture and its attribution graph, shared by the graph tests."""

from __future__ import annotations

import pytest

from featopt.attribution.adjacency import attribute
from featopt.attribution.replacement import ReplacementModel
from featopt.models import load_model
from tests.attribution.tiny_graph import transcoder


@pytest.fixture(scope="module")
def setup():
    adapter = load_model("tiny-llama")
    model = ReplacementModel(adapter, [transcoder(layer, seed=layer, skip=layer == 1) for layer in range(adapter.n_layers)])
    ids = adapter.tokenizer("The cat sat on the mat.", return_tensors="pt").input_ids[0]
    return adapter, model, ids, model.capture(ids)


@pytest.fixture(scope="module")
def graph(setup):
    _, model, ids, _ = setup
    return attribute(model, ids, batch_size=16)
