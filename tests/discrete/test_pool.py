"""Pooled GCG (every candidate scored for every feature): the readout of all problems against
plain HF forwards, each problem ending at the best of every sequence the run scored for it, and
no sequence forwarded twice."""

from __future__ import annotations

import pytest
import torch
from search_reference import feature_loss, resid_post

from featopt.specs import parse_features
from featopt.models import Site
from featopt.discrete.candidates import CandidateModel
from featopt.commands.swaps import GCGConfig
from featopt.commands.swaps import gcg
from featopt.discrete.swap_search import SwapSettings, swap_search


def _model(adapter, prefix, variant="last", n_tokens=3, layers=(1,)):
    """Problems: features 2, 5 and the mean of 9-11 at every layer of `layers` (site-major)."""
    plans = [(Site(layer, "resid_post"), parse_features("[:, :, [2, 5, 9:12]]", width=adapter.d_model)) for layer in layers]
    loss = feature_loss(adapter, plans, variant)
    return CandidateModel(adapter, [s for s, _ in plans], loss, prefix, batch_size=5)


def _plain(adapter, ids, layer, variant):
    """`[C, 3]` the three problems' activations of `ids [C, T]` by a plain forward."""
    with torch.no_grad():
        acts = resid_post(adapter.model, ids, layer)  # [C, T, d]
    cols = torch.stack([acts[..., 2], acts[..., 5], acts[..., 9:12].mean(-1)], dim=-1)  # [C, T, 3]
    return cols[:, -1] if variant == "last" else cols.sum(1)


@pytest.mark.parametrize("variant", ["last", "sum"])
def test_every_problems_score_of_every_candidate_equals_a_plain_forward(tiny64, variant):
    prefix = torch.tensor([17, 250])
    model = _model(tiny64, prefix, variant, layers=(0, 2))
    cands = torch.randint(0, tiny64.vocab_size, (11, 3), generator=torch.Generator().manual_seed(3))
    scored, _ = model.evaluate_all(cands)  # [11, 6]
    full = torch.cat([prefix.expand(11, -1), cands], dim=1)
    expected = torch.cat([_plain(tiny64, full, 0, variant), _plain(tiny64, full, 2, variant)], dim=1)
    torch.testing.assert_close(scored, -expected.double(), rtol=1e-9, atol=1e-9)


def test_each_pooled_problem_ends_at_the_best_sequence_the_run_scored_for_it(tiny64):
    prefix = torch.tensor([40])
    model = _model(tiny64, prefix)
    init = torch.randint(0, tiny64.vocab_size, (3, 3), generator=torch.Generator().manual_seed(0))
    scored = []
    state = swap_search(model, init, torch.arange(3), torch.arange(tiny64.vocab_size),
                        SwapSettings(steps=4, search_width=16, topk=8, progress=False), pool=True,
                        on_step=lambda step, state, ev: scored.append(ev.ids.clone()))
    every = torch.unique(torch.cat(scored), dim=0)  # each sequence the run forwarded
    plain = _plain(tiny64, torch.cat([prefix.expand(len(every), -1), every], dim=1), 1, "last")  # [S, 3]
    for p in range(3):
        best = int(plain[:, p].argmax())
        assert state.ids[p].tolist() == every[best].tolist()
        assert -float(state.loss[p]) == pytest.approx(float(plain[best, p]), rel=1e-9)
    # Pooled, a sequence is forwarded once whoever proposed it: the counts add up to the distinct ones.
    assert int(state.evaluations.sum()) == len(every) == sum(len(s) for s in scored)


def test_pooled_one_token_search_reaches_the_optimum_forwarding_each_token_at_most_once(tiny64, tmp_path):
    features = [0, 3, 7, 12, 21, 40]
    spec = "[:, :, [" + ", ".join(map(str, features)) + "]]"
    base = dict(model="tiny-llama", layer=1, features=spec, tokens=1, steps=12, search_width=64, topk=64,
                allow="all", progress=False)
    pooled = gcg(GCGConfig(out=str(tmp_path / "p"), **base), tiny64).results
    alone = gcg(GCGConfig(out=str(tmp_path / "a"), pool=False, **base), tiny64).results
    with torch.no_grad():
        acts = resid_post(tiny64.model, torch.arange(tiny64.vocab_size)[:, None], 1)[:, 0]
    for result, feature in zip(pooled, features):
        assert result.token_ids == [int(acts[:, feature].argmax())]
    total = sum(r.extra["forward_evaluations"] for r in pooled)
    assert total <= tiny64.vocab_size  # no token twice, whichever feature proposed it
    assert total < sum(r.extra["forward_evaluations"] for r in alone)


def test_pool_refuses_what_it_cannot_share(tiny64):
    model = _model(tiny64, torch.tensor([40]))
    init = torch.zeros(3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="pool"):
        swap_search(model, init, torch.arange(3), torch.arange(10), SwapSettings(steps=1, progress=False),
                    pool=True, editable=torch.ones(3, 3, dtype=torch.bool))
