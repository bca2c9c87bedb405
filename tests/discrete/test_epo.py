"""EPO against independent computations: the Pareto front against a brute-force non-dominated
filter; a small run on the tiny Llama whose front points are re-measured by the plain HF
forward (the activation from a hook on the block, the cross-entropy from the logits by hand),
whose members are consistent with the front, and whose files exist."""

from __future__ import annotations

import json

import pytest
import torch
from epo_spy import record_scored
from search_reference import resid_post

from featopt.commands.swaps import EPOConfig
from featopt.discrete.epo import Front
from featopt.commands.swaps import epo


def _dominates(a, x, b, y):
    """(a, x) dominates (b, y): activation >= and xent <=, one of them strictly."""
    return a >= b and x <= y and (a > b or x < y)


def _brute_front(act, xent):
    """Indices kept by the rule `Front` states: a point is kept iff no point dominates it, and of
    points with equal (activation, xent) only the first (in the order they were added)."""
    keep = []
    for i in range(len(act)):
        if any(_dominates(act[j], xent[j], act[i], xent[i]) for j in range(len(act))):
            continue
        if any(act[j] == act[i] and xent[j] == xent[i] for j in range(i)):
            continue
        keep.append(i)
    return keep


def _points(seed, n, levels):
    """Random points on a coarse grid: many ties in each coordinate and exact duplicates."""
    gen = torch.Generator().manual_seed(seed)
    # xent grows with activation (as on a real front), plus noise: wide fronts, not one winner
    act = torch.randint(0, levels, (n,), generator=gen)
    xent = act + torch.randint(0, 4, (n,), generator=gen)
    act, xent = act.double() / 4, xent.double() / 4
    ids = torch.stack([torch.arange(n), torch.arange(n) * 7 % 11], dim=1)  # row i identifies point i
    return ids, act, xent


def _kept(front):
    return sorted(int(i) for i in front.ids[:, 0])


def _check_ids_match_points(front, act, xent):
    for row, a, x in zip(front.ids.tolist(), front.activation.tolist(), front.xent.tolist()):
        assert (a, x) == (float(act[row[0]]), float(xent[row[0]])) and row[1] == row[0] * 7 % 11


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunks", [1, 3])
def test_front_is_the_brute_force_non_dominated_set(seed, chunks):
    ids, act, xent = _points(seed, 60, 8)
    front = Front()
    for part in torch.arange(60).chunk(chunks):
        front.add(ids[part], act[part], xent[part])
    expected = _brute_front(act.tolist(), xent.tolist())
    assert _kept(front) == expected
    _check_ids_match_points(front, act, xent)
    assert len(expected) >= 2  # the case is not degenerate


def test_front_ties_keep_the_first_duplicate_and_drop_weakly_dominated_points():
    ids = torch.arange(6)[:, None]
    act = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 0.5], dtype=torch.float64)
    xent = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 1.0], dtype=torch.float64)
    front = Front()
    front.add(ids, act, xent)
    # 0 and 1 are duplicates (0 kept), 2 has 0's activation at higher xent, 3 and 4 duplicates,
    # 5 has 0's xent at lower activation
    assert _kept(front) == [0, 3]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("size", [2, 3, 5])
def test_a_spread_front_is_a_subset_of_the_true_front_with_both_ends(seed, size):
    ids, act, xent = _points(seed + 10, 200, 40)
    true = _brute_front(act.tolist(), xent.tolist())
    assert len(true) > size
    front = Front()
    front.add(ids, act, xent)
    front = front.spread(size)
    kept = _kept(front)
    assert set(kept) <= set(true) and len(kept) == size
    ends = {min(true, key=lambda i: (float(xent[i]), -float(act[i]))), max(true, key=lambda i: (float(act[i]), -float(xent[i])))}
    assert ends <= set(kept)
    _check_ids_match_points(front, act, xent)


@pytest.mark.parametrize("seed", range(4))
def test_a_front_grown_over_several_adds_is_the_true_front_and_spreads_to_both_ends(seed):
    ids, act, xent = _points(seed + 20, 200, 40)
    true = _brute_front(act.tolist(), xent.tolist())
    front = Front()
    for part in torch.arange(200).chunk(5):
        front.add(ids[part], act[part], xent[part])
    assert _kept(front) == true  # a point dropped early can never come back dominated-but-kept
    assert _kept(front.spread(1)) == [max(true, key=lambda i: (float(act[i]), -float(xent[i])))]
    kept = _kept(front.spread(4))
    ends = {min(true, key=lambda i: (float(xent[i]), -float(act[i]))), max(true, key=lambda i: (float(act[i]), -float(xent[i])))}
    assert ends <= set(kept) and len(kept) == 4
    for i in kept:
        assert not any(_dominates(float(act[j]), float(xent[j]), float(act[i]), float(xent[i])) for j in kept)


FEATURES = (0, 1)
LAMBDAS = [0.0, 1.0, 4.0]


@pytest.fixture(scope="module")
def epo_run(tiny64, tmp_path_factory):
    out = tmp_path_factory.mktemp("epo")
    run = epo(EPOConfig(model="tiny-llama", layer=1, features="[:, :, 0-1]", tokens=3, steps=3, search_width=16, topk=16,
                        lambdas=LAMBDAS, prefix=" the", out=str(out), progress=False), tiny64)
    return run, out


def test_every_front_point_is_re_measured_by_the_plain_forward(tiny64, epo_run):
    run, _ = epo_run
    prefix = tiny64.encode(" the").tolist()
    L = len(prefix)
    for result, feature in zip(run.results, FEATURES):
        front = result.extra["front"]
        assert len(front) >= 2
        for q in front:
            ids = torch.tensor([q["token_ids"]])
            assert q["token_ids"][:L] == prefix and len(q["token_ids"]) == L + 3
            with torch.no_grad():
                activation = float(resid_post(tiny64.model, ids, 1)[0, -1, feature])
                logp = torch.log_softmax(tiny64.model(input_ids=ids).logits[0].double(), dim=-1)
            # the three searched tokens, each given everything before it (the first given the prefix)
            xent = -sum(float(logp[t - 1, ids[0, t]]) for t in range(L, L + 3)) / 3
            assert q["activation"] == pytest.approx(activation, rel=1e-9, abs=1e-12)
            assert q["xent"] == pytest.approx(xent, rel=1e-9)
            assert q["search_activation"] == pytest.approx(activation, rel=1e-9, abs=1e-12)
            assert q["search_xent"] == pytest.approx(xent, rel=1e-9)


def test_the_front_is_non_dominated_and_each_member_is_the_best_front_point_for_its_lambda(epo_run):
    run, _ = epo_run
    for result in run.results:
        front = [(q["search_activation"], q["search_xent"]) for q in result.extra["front"]]
        for i, (a, x) in enumerate(front):
            assert not any(_dominates(b, y, a, x) for j, (b, y) in enumerate(front) if j != i)
        members = result.extra["members"]
        assert [m["lambda"] for m in members] == LAMBDAS
        for m in members:
            a, x = m["search_activation"], m["search_xent"]
            # every member's answer was scored, so it fed the front: no front point is dominated by
            # it, and some front point is at least as good in both
            assert not any(_dominates(a, x, b, y) for b, y in front)
            assert any(b >= a and y <= x for b, y in front)
            # a member keeps the best sequence of its problem's shared pool under its own lambda,
            # and every front point was in that pool
            total = -a + m["lambda"] * x
            assert all(total <= -b + m["lambda"] * y + 1e-12 for b, y in front)
            trajectory = m["trajectory"]
            assert len(trajectory) == 4 and trajectory[-1] == pytest.approx(a, rel=1e-12)
        # lambda 0 is plain GCG: its answer is the front's most active point
        assert members[0]["search_activation"] == pytest.approx(max(b for b, _ in front), rel=1e-12)


def test_the_answer_is_the_most_active_front_point_and_the_files_are_written(epo_run):
    run, out = epo_run
    for result in run.results:
        front = result.extra["front"]
        best = max(front, key=lambda q: q["activation"])
        assert result.token_ids == best["token_ids"] and result.activation == best["activation"]
        assert result.extra["xent"] == best["xent"] and result.method == "epo"
    document = json.loads((out / "fronts.json").read_text())
    assert [f["spec"] for f in document["fronts"]] == [r.spec for r in run.results]
    assert [f["front"] for f in document["fronts"]] == [r.extra["front"] for r in run.results]
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["token_ids"] for r in results] == [r.token_ids for r in run.results]
    png = (out / "fronts.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_member_labels_merge_members_on_one_point_and_keep_the_others_apart():
    from featopt.discrete.epo import member_labels

    front = [{"xent": 8.0, "activation": 1.0}, {"xent": 12.0, "activation": 11.0}]  # spans 4 and 10
    members = [
        {"lambda": 0.0, "search_xent": 12.0, "search_activation": 11.0},
        {"lambda": 0.5, "search_xent": 12.0, "search_activation": 11.0},  # the same answer
        {"lambda": 1.0, "search_xent": 11.95, "search_activation": 10.9},  # within 2% of both spans
        {"lambda": 2.0, "search_xent": 8.0, "search_activation": 1.0},
        {"lambda": 4.0, "search_xent": 8.5, "search_activation": 1.0},  # 12.5% of the xent span away
    ]
    assert member_labels(members, front) == {(12.0, 11.0): [0.0, 0.5, 1.0], (8.0, 1.0): [2.0], (8.5, 1.0): [4.0]}
    # a degenerate front (one point) still groups by exact position
    one = [{"xent": 3.0, "activation": 2.0}]
    same = [{"lambda": lam, "search_xent": 3.0, "search_activation": 2.0} for lam in (0.0, 1.0)]
    assert member_labels(same, one) == {(3.0, 2.0): [0.0, 1.0]}


def test_pooled_members_rank_every_candidate_of_every_problem_by_their_own_lambda(tiny64, tmp_path, monkeypatch):
    # --pool: one forward scores a candidate for both features and its own xent; each member keeps
    # the best of ALL candidates under its feature and lambda (checked by plain forwards here).
    scored = record_scored(monkeypatch)
    run = epo(EPOConfig(model="tiny-llama", layer=1, features="[:, :, 0-1]", tokens=3, steps=2, search_width=8, topk=8,
                        lambdas=LAMBDAS, prefix=" the", pool=True, out=str(tmp_path), progress=False), tiny64)
    assert all(who is None for _, who in scored)  # every candidate scored for every problem
    prefix = tiny64.encode(" the")
    seqs = torch.unique(torch.cat([ids for ids, _ in scored]), dim=0)
    full = torch.cat([prefix.expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        acts = resid_post(tiny64.model, full, 1)[:, -1]
        logp = torch.log_softmax(tiny64.model(input_ids=full).logits.double(), dim=-1)
    L = len(prefix)
    xent = torch.stack([-logp[:, t - 1].gather(1, full[:, t:t + 1])[:, 0] for t in range(L, L + 3)], 1).mean(1)
    for result, feature in zip(run.results, FEATURES):
        for m in result.extra["members"]:
            best = float((-acts[:, feature].double() + m["lambda"] * xent).min())
            assert -m["search_activation"] + m["lambda"] * m["search_xent"] == pytest.approx(best, rel=1e-9, abs=1e-9)
        assert max(q["activation"] for q in result.extra["front"]) == pytest.approx(float(acts[:, feature].max()), rel=1e-9)


@pytest.mark.parametrize("pool", [True, False])
def test_a_budget_member_pays_for_xent_only_above_its_floor(tiny64, monkeypatch, pool):
    # floors [P, M]: member m of problem p minimizes -activation + lambda_m * max(xent - floor, 0);
    # each ends at the best of what it could pick from, under exactly that total (plain forwards here).
    from featopt.discrete import epo as epo_module
    from featopt.discrete.swap_search import SwapSettings
    from featopt.objectives import Selection, maximize

    scored = record_scored(monkeypatch)
    objective = maximize(Selection("blocks.1.resid_post", "[:, :, [0, 1]]", over="last")).bind(tiny64)
    prefix = tiny64.encode(" the")
    init = torch.randint(3, tiny64.vocab_size, (2, 3), generator=torch.Generator().manual_seed(4))
    lambdas, floors = [0.0, 3.0], torch.tensor([[0.0, 6.0], [0.0, 5.5]], dtype=torch.float64)
    state, _ = epo_module.epo(tiny64, objective, prefix=prefix, init=init, allowed=torch.arange(3, tiny64.vocab_size),
                              settings=SwapSettings(steps=2, search_width=8, topk=8, progress=False), lambdas=lambdas,
                              pool=pool, floors=floors)
    L = len(prefix)
    for p in range(2):
        seqs = torch.unique(torch.cat([ids if who is None else ids[who == p] for ids, who in scored]), dim=0)
        full = torch.cat([prefix.expand(len(seqs), -1), seqs], dim=1)
        with torch.no_grad():
            acts = resid_post(tiny64.model, full, 1)[:, -1, p].double()
            logp = torch.log_softmax(tiny64.model(input_ids=full).logits.double(), dim=-1)
        xent = torch.stack([-logp[:, t - 1].gather(1, full[:, t:t + 1])[:, 0] for t in range(L, L + 3)], 1).mean(1)
        for m, lam in enumerate(lambdas):
            want = float((-acts + lam * (xent - floors[p, m]).clamp(min=0)).min())
            assert float(state.total[p * 2 + m]) == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("pool", [True, False])
def test_a_likely_member_swaps_only_to_the_models_own_likeliest_tokens(tiny64, monkeypatch, pool):
    # likely[m] = M: every swap member m proposes puts at position i one of the M tokens the plain
    # HF forward ranks likeliest after the tokens before i; a member with 0 is free (it proposes
    # some token outside them, or the check below could not fail).
    from featopt.discrete import swap_search as swap_module
    from featopt.discrete import epo as epo_module
    from featopt.discrete.swap_search import SwapSettings
    from featopt.objectives import Selection, maximize

    M = 5
    proposals = []  # (row's sequence before the step, its sampled proposals [W, N], likely M)
    original = swap_module.sample_swaps

    def spy(current, top, width, *args, **kwargs):
        out = original(current, top, width, *args, **kwargs)
        proposals.append((current.clone(), out.clone()))
        return out

    monkeypatch.setattr(swap_module, "sample_swaps", spy)
    objective = maximize(Selection("blocks.1.resid_post", "[:, :, [0, 1]]", over="last")).bind(tiny64)
    prefix = tiny64.encode(" the")
    init = torch.randint(3, tiny64.vocab_size, (2, 4), generator=torch.Generator().manual_seed(5))
    epo_module.epo(tiny64, objective, prefix=prefix, init=init, allowed=torch.arange(3, tiny64.vocab_size),
                   settings=SwapSettings(steps=3, search_width=16, topk=8, progress=False), lambdas=[0.0, 1.0],
                   pool=pool, likely=[0, M])
    L = len(prefix)
    free_outside = 0
    for current, out in proposals:
        assert len(current) == 4  # rows problem-major: members 0 and 1 of each problem
        for r in range(4):
            member = r % 2
            for cand in out[r]:
                diff = (cand != current[r]).nonzero()[:, 0]
                if not len(diff):
                    continue
                i = int(diff[0])
                full = torch.cat([prefix, current[r]])[None]
                with torch.no_grad():
                    logits = tiny64.model(input_ids=full).logits[0, L + i - 1]
                logits[:3] = -torch.inf  # ids 0-2 are not allowed
                likeliest = set(logits.topk(M).indices.tolist())
                if member == 1:
                    assert int(cand[i]) in likeliest
                else:
                    free_outside += int(cand[i]) not in likeliest
    assert free_outside > 0


def test_likely_tokens_rank_first_and_the_rest_keep_the_gradients_order(tiny64):
    # gradient(..., likely): the M likeliest allowed tokens at a position (plain HF forward) rank
    # before every other token, and among each group the plain gradient's order is kept (a stuck
    # row widening past M goes on in the gradient's order).
    from featopt.discrete.candidates import CandidateModel
    from featopt.discrete.objective_scoring import ObjectiveLoss
    from featopt.objectives import Selection, maximize

    objective = maximize(Selection("blocks.1.resid_post", "[:, :, [0, 1]]", over="last")).bind(tiny64)
    prefix = tiny64.encode(" the")
    model = CandidateModel(tiny64, list(objective.sites), ObjectiveLoss(objective, tiny64), prefix, xent=True)
    ids = torch.randint(3, tiny64.vocab_size, (2, 3), generator=torch.Generator().manual_seed(2))
    problems, lam = torch.tensor([0, 1]), torch.tensor([0.5, 0.5], dtype=torch.float64)
    allowed = torch.arange(3, tiny64.vocab_size)
    M = 4
    plain = model.gradient(ids, problems, lam)
    ranked = model.gradient(ids, problems, lam, likely=torch.tensor([M, 0]), allowed=allowed)
    assert torch.equal(ranked[1], plain[1])  # likely 0: untouched
    L = len(prefix)
    for i in range(3):
        with torch.no_grad():
            logits = tiny64.model(input_ids=torch.cat([prefix, ids[0]])[None]).logits[0, L + i - 1].clone()
        logits[:3] = -torch.inf
        likeliest = logits.topk(M).indices
        order = ranked[0, i, allowed].argsort() + 3  # ids, most negative first
        assert set(order[:M].tolist()) == set(likeliest.tolist())
        for group in (order[:M], order[M:]):
            assert bool((plain[0, i, group].diff() >= -1e-6).all())  # ascending, up to the offset's rounding
