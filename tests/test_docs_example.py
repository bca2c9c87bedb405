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


def _contrast_ids(adapter, ids):
    """The example objective's loss of token ids `[N, T]`, row n scoring feature FEATURES[n % 3],
    from the plain HF hidden states (no featopt code)."""
    with torch.no_grad():
        hidden = adapter.model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]
    f = torch.tensor([FEATURES[n % 3] for n in range(len(ids))])
    per_token = hidden[torch.arange(len(ids)), :, f]  # [N, T]
    return -(per_token[:, -1] - per_token[:, :-1].mean(dim=1))


def test_the_same_objective_value_runs_under_every_method(example, tiny, tmp_path):
    """The guide's `every_method`: ascent, exhaustive, GCG and EPO all score the user's objective,
    and every record's score is that objective re-computed from the HF hidden states."""
    runs = example.every_method(tiny, str(tmp_path), layer=LAYER)
    for method, found in runs.items():
        ids = torch.tensor([r.token_ids for r in found.results])
        assert [r.spec for r in found.results] == ["[:, :, 0]", "[:, :, 1]", "[:, :, 2]"], method
        assert all(r.objective.startswith(f"last_position(blocks.{LAYER}.resid_post)") for r in found.results)
        expected = -_contrast_ids(tiny, ids)
        scores = torch.tensor([r.extra["score"] for r in found.results])
        torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=1e-5, msg=method)


def test_the_discrete_methods_reach_the_brute_force_optimum_of_the_users_objective(example, tiny, tmp_path):
    """One token after the prefix "The": every token tried by hand gives the optimum of each
    problem; the exhaustive sweep finds it, and so do GCG and EPO (lambda 0) when every single
    swap fits in their candidate batch."""
    import featopt
    from featopt.objectives import Selection

    prefix = tiny.encode("The", bos=False)
    vocab = torch.arange(tiny.vocab_size)
    ids = torch.cat([prefix.expand(len(vocab), -1), vocab[:, None]], dim=1)  # [V, 2]: "The" then each token
    with torch.no_grad():
        hidden = tiny.model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]  # [V, 2, d]
    losses = torch.stack([-(hidden[:, -1, f] - hidden[:, :-1, f].mean(dim=1)) for f in FEATURES])  # [3, V]
    best = losses.argmin(dim=1)  # each problem's optimal token

    def objective():
        return example.LastPosition(Selection(f"blocks.{LAYER}.resid_post", "[:, :, 0-2]"))

    common = dict(adapter=tiny, progress=False, prefix="The")
    sweep = featopt.search.exhaustive(objective(), out=str(tmp_path / "ex"), **common)
    gcg = featopt.search.gcg(objective(), tokens=1, steps=2, topk=tiny.vocab_size, search_width=tiny.vocab_size,
                             allow="all", out=str(tmp_path / "gcg"), **common)
    epo = featopt.search.epo(objective(), tokens=1, steps=2, topk=tiny.vocab_size, search_width=tiny.vocab_size,
                             allow="all", lambdas=[0.0], out=str(tmp_path / "epo"), **common)
    for method, found in (("exhaustive", sweep), ("gcg", gcg), ("epo", epo)):
        assert [r.token_ids[-1] for r in found.results] == best.tolist(), method
