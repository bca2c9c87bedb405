"""The neuron finder against the paper's formula computed from a full softmax by hand."""

from __future__ import annotations

import json

import pytest
import torch
from neuron_reference import up_rows

from featopt.errors import FeatoptError
from featopt.commands.neurons import DecodeConfig, FindConfig, decode, find


def _normalized(adapter, token_ids: list[int]) -> dict[int, torch.Tensor]:
    """p(tokens) / mean of the top-100 probabilities, per neuron of every layer, all at once."""
    out = {}
    for layer in range(adapter.n_layers):
        with torch.no_grad():
            probs = torch.softmax(adapter.model.lm_head(up_rows(adapter.model, "llama", layer)), -1)
        out[layer] = probs[:, token_ids].sum(1) / probs.topk(100, -1).values.mean(1)
    return out


def test_normalized_probability_and_top_neurons(llama64, tmp_path):
    run = find(FindConfig(token=" machine", top=6, top_k=4, out=str(tmp_path), progress=False), llama64)
    assert run.token_ids == [409] and run.note == ""
    expected = _normalized(llama64, [409])
    for layer in range(3):
        torch.testing.assert_close(run.normalized[layer], expected[layer])
    flat = torch.cat([expected[layer] for layer in range(3)])
    width = len(expected[0])
    best = [(j // width, j % width) for j in flat.topk(6).indices.tolist()]
    assert [(h.layer, h.neuron) for h in run.hits] == best
    h = run.hits[0]
    with torch.no_grad():
        probs = torch.softmax(llama64.model.lm_head(up_rows(llama64.model, "llama", h.layer)[h.neuron]), -1)
    assert h.tokens == [llama64.decode([t]) for t in probs.topk(4).indices.tolist()]
    assert h.prob == pytest.approx(float(probs[409]))
    assert (tmp_path / "find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "find.json").read_text())["hits"][0]["neuron"] == h.neuron
    assert f"layer {h.layer:>3} neuron {h.neuron:>6}" in run.table()


def test_a_word_of_several_tokens_says_so(llama64, tmp_path):
    ids = llama64.encode(" xylophone").tolist()
    assert len(ids) > 1
    first = find(FindConfig(token=" xylophone", plot=False, out=str(tmp_path), progress=False), llama64)
    assert first.token_ids == ids[:1] and f"is {len(ids)} tokens" in first.note and "using the first" in first.note
    every = find(FindConfig(token=" xylophone", multi="all", plot=False, out=str(tmp_path), progress=False), llama64)
    assert every.token_ids == ids and "using all" in every.note
    torch.testing.assert_close(every.normalized[1], _normalized(llama64, ids)[1])


def test_a_saved_decode_gives_the_same_answer(llama64, tmp_path):
    decode(DecodeConfig(out=str(tmp_path / "decode"), progress=False), llama64)
    fresh = find(FindConfig(token=" the", plot=False, out=str(tmp_path / "a"), progress=False), llama64)
    saved = find(FindConfig(token=" the", decoded=str(tmp_path / "decode"), plot=False, out=str(tmp_path / "b"),
                                progress=False), llama64)
    for layer in range(3):
        torch.testing.assert_close(saved.normalized[layer], fresh.normalized[layer])
    assert [(h.layer, h.neuron, h.tokens) for h in saved.hits] == [(h.layer, h.neuron, h.tokens) for h in fresh.hits]
    with pytest.raises(FeatoptError, match="norm='none', not 'apply'"):
        find(FindConfig(token=" the", norm="apply", decoded=str(tmp_path / "decode"), out=str(tmp_path / "c"),
                            progress=False), llama64)


@pytest.mark.parametrize("kwargs,message", [
    ({"token": None}, "give a word or token"), ({"token": ""}, "give a word or token"),
    ({"token_id": 512}, "out of range"), ({"multi": "each"}, "allowed are first and all"), ({"top": 0}, "at least 1"),
])
def test_bad_tokens_are_featopt_errors(llama64, tmp_path, kwargs, message):
    with pytest.raises(FeatoptError, match=message):
        find(FindConfig(**{**kwargs, "out": str(tmp_path), "progress": False}), llama64)
