"""Checkpoint comparison: the share of neurons with the same top token, against a brute-force count."""

from __future__ import annotations

import json

import pytest
import torch
from neuron_reference import tiny, up_rows

from featopt.errors import FeatoptError
from featopt.models import load_model
from featopt.commands.neurons import CompareConfig
from featopt.commands.neurons import compare as run_compare
from featopt.weights.compare import compare


def _top_tokens(adapter, layer: int) -> torch.Tensor:
    with torch.no_grad():
        return adapter.model.lm_head(up_rows(adapter.model, "llama", layer)).argmax(-1)


def test_a_model_against_itself_is_100_percent(tmp_path):
    run = run_compare(CompareConfig(model="tiny-llama", out=str(tmp_path), progress=False))  # two separate loads
    assert run.same == run.neurons == 3 * 128 and run.share == 1.0
    document = json.loads((tmp_path / "compare.json").read_text())
    assert document["overall"]["share"] == 1.0 and len(document["layers"]) == 3
    assert "100.00%" in run.table()


def test_against_the_untrained_copy_matches_a_brute_force_count(tmp_path):
    run = run_compare(CompareConfig(model="tiny-llama", untrained_b=True, seed_b=1, out=str(tmp_path), progress=False))
    a, b = load_model("tiny-llama"), load_model("tiny-llama", untrained=True, seed=1)
    for x in run.layers:
        assert x.same == int((_top_tokens(a, x.layer) == _top_tokens(b, x.layer)).sum())
    assert run.share < 0.1  # chance agreement over 512 tokens, not a shared structure


def test_a_slightly_perturbed_copy_gives_a_share_in_between():
    a, b = tiny("tiny-llama"), tiny("tiny-llama")
    with torch.no_grad():
        for layer in b.model.model.layers:
            w = layer.mlp.up_proj.weight
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype) * w.std() * 0.3)
    agreement = compare(a, b, [0, 2], progress=False)
    for x in agreement:
        assert x.same == int((_top_tokens(a, x.layer) == _top_tokens(b, x.layer)).sum())
    share = sum(x.same for x in agreement) / sum(x.neurons for x in agreement)
    assert 0.05 < share < 0.95


def test_models_of_different_shapes_are_a_featopt_error():
    with pytest.raises(FeatoptError, match="differ in shape"):
        compare(tiny("tiny-llama"), tiny("tiny-gpt2"), progress=False)
