"""The worked example of docs/extending.md runs end to end and its numbers match a plain HF forward;
the guide shows the example file verbatim, so the two cannot drift apart."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "last_position.py"
GUIDE = ROOT / "docs" / "extending.md"
LAYER, TOKENS, FEATURES = 1, 5, (0, 1, 2)


def _load_example():
    spec = importlib.util.spec_from_file_location("featopt_docs_last_position", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model, tok, name="tiny-llama")


def _contrast(adapter, embeds):
    """-(a_last - mean of earlier a_t) per problem from the plain HF hidden states; problem p
    scores feature FEATURES[p]."""
    hidden = adapter.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[LAYER + 1]
    return torch.stack([-(hidden[p, -1, f] - hidden[p, :-1, f].mean()) for p, f in enumerate(FEATURES)])


def test_guide_shows_the_example_file_verbatim():
    assert EXAMPLE.read_text(encoding="utf-8") in GUIDE.read_text(encoding="utf-8")


def test_example_runs_and_matches_an_independent_computation(example, tiny):
    start = example.SphereEmbeddings(len(FEATURES), TOKENS, tiny.d_model, seed=0)
    start.bind(tiny)
    with torch.no_grad():
        before = _contrast(tiny, start(None))

    module, results = example.run(tiny, layer=LAYER, features="[:, :, 0-2]", tokens=TOKENS, steps=30)
    embeds = module.parametrization(None).detach()

    # the parametrization: every row on the sphere of the mean token norm, measured here by hand
    table = tiny.model.get_input_embeddings().weight.detach()
    radius = sum(math.sqrt(sum(x * x for x in row.tolist())) for row in table) / table.shape[0]
    torch.testing.assert_close(embeds.norm(dim=-1), torch.full((3, TOKENS), radius), rtol=1e-5, atol=1e-6)

    # the objective, through the package's own step, vs the HF hidden states
    losses, _ = module.step_losses(torch.arange(3))
    with torch.no_grad():
        after = _contrast(tiny, embeds)
    torch.testing.assert_close(losses.detach(), after, rtol=1e-4, atol=1e-5)
    assert (after < before).all()  # the run lowered every problem's loss

    # the results: one per problem, named by the objective, decoded to the nearest-cosine tokens
    nearest = F.cosine_similarity(embeds[:, :, None], table[None, None], dim=-1).argmax(dim=-1)
    assert [r.spec for r in results] == ["[:, :, 0]", "[:, :, 1]", "[:, :, 2]"]
    for p, r in enumerate(results):
        assert r.objective == f"last_position(blocks.{LAYER}.resid_post)" and r.method == "last-position"
        assert r.token_ids == nearest[p].tolist()
