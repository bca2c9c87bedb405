"""GCG against independent computations: the brute-force optimum for one token, every scored swap
against a plain HF forward of that sequence, the one-hot gradient against finite differences of
the plain forward, determinism under a seed, and two processes against one."""

from __future__ import annotations

import pytest
import torch
from search_reference import feature_loss, resid_post

from featopt.specs import parse_features
from featopt.models import Site
from featopt.discrete.candidates import CandidateModel
from featopt.commands.swaps import GCGConfig
from featopt.commands.swaps import gcg
from featopt.commands.search import GreedyConfig
from featopt.commands.search import greedy

FEATURES = [0, 3, 7, 12, 21, 40]


def test_one_token_gcg_reaches_the_brute_force_optimum(tiny64, tmp_path):
    spec = "[:, :, [" + ", ".join(map(str, FEATURES)) + "]]"
    run = gcg(GCGConfig(model="tiny-llama", layer=1, features=spec, tokens=1, steps=12, search_width=64, topk=64,
                        allow="all", out=str(tmp_path), progress=False), tiny64)
    every = torch.arange(tiny64.vocab_size)[:, None]
    with torch.no_grad():
        acts = resid_post(tiny64.model, every, 1)[:, 0]  # [V, d]
    for result, feature in zip(run.results, FEATURES):
        assert result.token_ids == [int(acts[:, feature].argmax())]
        assert result.activation == pytest.approx(float(acts[:, feature].max()), rel=1e-9)
        # it got there scoring fewer sequences than the vocabulary holds
        assert result.extra["forward_evaluations"] < tiny64.vocab_size


def _plans(adapter, spec, layer=1):
    site = Site(layer, "resid_post")
    return [(site, parse_features(spec, width=adapter.width(site)))], site


@pytest.mark.parametrize("variant", ["last", "sum"])
def test_every_scored_swap_equals_a_plain_forward_of_its_sequence(tiny64, variant):
    plans, site = _plans(tiny64, "[:, :, [2, 5, 9:12]]")
    prefix = torch.tensor([17, 250, 3])
    n_problems = 3
    loss = feature_loss(tiny64, plans, variant)
    model = CandidateModel(tiny64, [site], loss, prefix, batch_size=7)
    gen = torch.Generator().manual_seed(1)
    cands = torch.randint(0, tiny64.vocab_size, (20, 4), generator=gen)
    problems = torch.arange(20) % n_problems
    scored, xent = model.evaluate(cands, problems)
    assert xent is None
    full = torch.cat([prefix.expand(20, -1), cands], dim=1)
    with torch.no_grad():
        acts = resid_post(tiny64.model, full, 1)  # [20, T, d]
    for c in range(20):
        feature = (2, 5, slice(9, 12))[int(problems[c])]
        per_pos = acts[c, :, feature]
        per_pos = per_pos.mean(-1) if per_pos.dim() == 2 else per_pos
        expected = per_pos[-1] if variant == "last" else per_pos.sum()
        assert float(scored[c]) == pytest.approx(-float(expected), rel=1e-9, abs=1e-12)


def test_cross_entropy_of_candidates_equals_the_plain_forward(tiny64):
    plans, site = _plans(tiny64, "[:, :, 4]")
    prefix = torch.tensor([40, 41])
    loss = feature_loss(tiny64, plans, 'last')
    model = CandidateModel(tiny64, [site], loss, prefix, xent=True, batch_size=4)
    cands = torch.tensor([[5, 6, 7], [100, 3, 9], [7, 7, 7]])
    _, xent = model.evaluate(cands, torch.zeros(3, dtype=torch.long))
    full = torch.cat([prefix.expand(3, -1), cands], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(tiny64.model(input_ids=full).logits, dim=-1)
    for c in range(3):  # tokens 2, 3, 4 of the sequence, each predicted from the one before
        expected = -sum(float(logp[c, t - 1, full[c, t]]) for t in range(2, 5)) / 3
        assert float(xent[c]) == pytest.approx(expected, rel=1e-9)


def test_one_hot_gradient_equals_finite_differences_of_the_plain_forward(tiny64):
    plans, site = _plans(tiny64, "[:, :, [6, 1:4]]")
    prefix = torch.tensor([11, 12])
    loss = feature_loss(tiny64, plans, 'sum')
    model = CandidateModel(tiny64, [site], loss, prefix)
    ids = torch.tensor([[30, 31, 32], [200, 201, 202]])
    problems = torch.tensor([0, 1])
    grad = model.gradient(ids, problems)
    E = tiny64.embedding.detach()

    def plain(onehot, row):  # the loss through the plain HF modules, from inputs_embeds
        embeds = torch.cat([E[prefix], onehot @ E])[None]
        seen = {}
        hook = tiny64.model.model.layers[1].register_forward_hook(lambda m, a, out: seen.setdefault("o", out))
        try:
            tiny64.model(inputs_embeds=embeds, use_cache=False)
        finally:
            hook.remove()
        out = seen["o"][0] if isinstance(seen["o"], tuple) else seen["o"]
        feature = (6, slice(1, 4))[row]
        values = out[0, :, feature]
        return -float((values.mean(-1) if values.dim() == 2 else values).sum())

    # Not smaller: the tiny Llama's rotary tables are float32, so differences below ~1e-5 are noise.
    eps = 1e-3
    for row in (0, 1):
        onehot = torch.nn.functional.one_hot(ids[row], tiny64.vocab_size).double()
        for n, v in ((0, 5), (1, 31), (2, 400), (2, 202)):
            up, down = onehot.clone(), onehot.clone()
            up[n, v] += eps
            down[n, v] -= eps
            with torch.no_grad():
                fd = (plain(up, row) - plain(down, row)) / (2 * eps)
            assert float(grad[row, n, v]) == pytest.approx(fd, rel=1e-3, abs=1e-6)


def test_the_same_seed_gives_the_same_search_and_another_seed_another_start(tiny64, tmp_path):
    base = dict(model="tiny-llama", layer=0, features="[:, :, 0-2]", tokens=4, steps=5, search_width=32, topk=16,
                progress=False)
    a = gcg(GCGConfig(out=str(tmp_path / "a"), **base), tiny64).results
    b = gcg(GCGConfig(out=str(tmp_path / "b"), **base), tiny64).results
    c = gcg(GCGConfig(out=str(tmp_path / "c"), seed=1, **base), tiny64).results
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.extra["trajectory"] for r in a] == [r.extra["trajectory"] for r in b]
    assert [r.extra["init_ids"] for r in a] != [r.extra["init_ids"] for r in c]


def test_two_processes_give_the_search_of_one(tiny64, tmp_path):
    base = dict(model="tiny-llama", layer=1, features="[:, :, [0-2, 8:10]]", tokens=3, steps=4, search_width=24,
                topk=12, prefix=" the sea", batch_size=10, progress=False)
    one = gcg(GCGConfig(out=str(tmp_path / "one"), **base), tiny64).results
    two = gcg(GCGConfig(out=str(tmp_path / "two"), devices=2, device="cpu", **base), tiny64).results
    # The same path: the same tokens and the same number of sequences scored (exact: in float64 the
    # gaps between candidates' scores lie orders of magnitude above last-digit rounding).
    assert [r.token_ids for r in two] == [r.token_ids for r in one]
    assert [r.extra["forward_evaluations"] for r in two] == [r.extra["forward_evaluations"] for r in one]
    # The values, though, come from forwards of other batch shapes (each rank scores its shard) in
    # processes with their own thread counts: equal up to rounding only (on one machine they
    # differed in the 16th digit). A rank scoring the wrong shard is off by far more than this.
    for a, b in zip(two, one, strict=True):
        assert a.extra["trajectory"] == pytest.approx(b.extra["trajectory"], rel=1e-9, abs=1e-12)
        assert a.activation == pytest.approx(b.activation, rel=1e-9, abs=1e-12)


def test_results_are_re_measured_and_the_trajectory_never_falls(tiny64, tmp_path):
    run = gcg(GCGConfig(model="tiny-llama", layer=2, features="[:, :, 5-6]", tokens=5, steps=6, search_width=32,
                        topk=32, prefix=" a", variant="sum", out=str(tmp_path), progress=False), tiny64)
    for r, feature in zip(run.results, (5, 6)):
        ids = torch.tensor([r.token_ids])
        with torch.no_grad():
            expected = float(resid_post(tiny64.model, ids, 2)[0, :, feature].sum())
            logp = torch.log_softmax(tiny64.model(input_ids=ids).logits, dim=-1)
        assert r.activation == pytest.approx(expected, rel=1e-9)
        assert r.extra["search_activation"] == pytest.approx(expected, rel=1e-9)
        n = len(r.token_ids)  # xent: the searched tokens (positions 1..n-1) after the 1-token prefix
        xent = -sum(float(logp[0, t - 1, ids[0, t]]) for t in range(1, n)) / (n - 1)
        assert r.extra["xent"] == pytest.approx(xent, rel=1e-9)
        trajectory = r.extra["trajectory"]
        assert all(b >= a for a, b in zip(trajectory, trajectory[1:])) and len(trajectory) == 7
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_gcg_beats_or_ties_greedy_at_fewer_evaluations_on_a_tiny_model(tiny64, tmp_path):
    # Not a speed target: a check that the search searches. Greedy scores N x V sequences.
    base = dict(model="tiny-llama", layer=1, features="[:, :, 0-3]", tokens=3, progress=False)
    g = greedy(GreedyConfig(out=str(tmp_path / "g"), **base), tiny64).results
    budget = 3 * tiny64.vocab_size
    s = gcg(GCGConfig(out=str(tmp_path / "s"), steps=40, search_width=64, topk=64, allow="all",
                      max_evaluations=budget, **base), tiny64).results
    assert all(r.extra["forward_evaluations"] <= budget + 1 for r in s)
    assert sum(a.activation >= b.activation - 1e-9 for a, b in zip(s, g)) >= 3


def test_init_ids_start_the_search_from_exactly_those_tokens(tiny64, tmp_path):
    run = gcg(GCGConfig(model="tiny-llama", layer=0, features="[:, :, 0-1]", init="ids:300,7,45", steps=1,
                        search_width=8, topk=8, out=str(tmp_path), progress=False), tiny64)
    for r, feature in zip(run.results, (0, 1)):
        assert r.extra["init_ids"] == [300, 7, 45]
        with torch.no_grad():
            start = float(resid_post(tiny64.model, torch.tensor([[300, 7, 45]]), 0)[0, -1, feature])
        assert r.extra["trajectory"][0] == pytest.approx(start, rel=1e-9)
