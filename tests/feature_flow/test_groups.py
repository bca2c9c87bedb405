"""Predecessor groups against a brute force: hidden states from hand-written forward hooks on the
HF modules, a float64 numpy topk encoder, dense cosine matrices and a Python loop over
contexts, positions and features."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from tests.feature_flow.flow_reference import KEYS, encode64, hidden, make_sae
from featopt.errors import FeatoptError
from featopt.feature_flow.groups import (GROUPS, GroupStats, format_groups, group_counts, plot_group_shares, plot_transitions,
                                 predecessors)
from featopt.feature_flow.saes import FlowSet

ROLE_KEY = {"res": lambda L: (L - 1, "res"), "mlp": lambda L: (L, "mlp"), "att": lambda L: (L, "att")}


def _biased(key):
    """make_sae's SAE with nonzero encoder and decoder biases, so the brute force checks them."""
    sae = make_sae(*key)
    g = torch.Generator().manual_seed(7 + 10 * key[0] + ("res", "mlp", "att").index(key[1]))
    with torch.no_grad():
        sae.b_dec.copy_(0.01 * torch.randn(sae.d_in, generator=g))
        sae.b_enc.copy_(0.005 * torch.randn(sae.d_sae, generator=g))
    return sae


@pytest.fixture(scope="module")
def flow():
    return FlowSet({key: _biased(key) for key in KEYS})


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(512, (6, 12), generator=torch.Generator().manual_seed(3))


def dense_top1(flow, target, cand):
    A, B = flow[target].W_dec.double().numpy(), flow[cand].W_dec.double().numpy()
    C = (A / np.linalg.norm(A, axis=1, keepdims=True)) @ (B / np.linalg.norm(B, axis=1, keepdims=True)).T
    return C.argmax(1), C.max(1)


def brute(flow, llama, contexts, layers, *, skip_first=1, min_score=None, method="top1", seed=0):
    """(counts {L: Counter group name}, feature counts {L: Counter (f, name)}, transitions Counter (L, A, B))."""
    h = hidden(llama, contexts)
    z = {key: encode64(flow[key], h[key]) for key in flow.keys()}
    preds = {}  # L -> role -> (index list, matched list)
    for L in layers:
        preds[L] = {}
        for j, role in enumerate(("res", "mlp", "att")):
            cand = ROLE_KEY[role](L)
            if cand not in flow:
                continue
            if method == "top1":
                idx, score = dense_top1(flow, (L, "res"), cand)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + 3 * L + j)
                idx = torch.randint(flow[cand].d_sae, (flow[(L, "res")].d_sae,), generator=g).numpy()
                A, B = flow[(L, "res")].W_dec.double().numpy(), flow[cand].W_dec.double().numpy()[idx]
                score = (A * B).sum(1) / np.linalg.norm(A, axis=1) / np.linalg.norm(B, axis=1)
            matched = [True] * len(idx) if min_score is None else [bool(s >= min_score) for s in score]
            preds[L][role] = (list(idx), matched)

    def group(L, n, t, f):
        on = [role.upper() for role in ("res", "mlp", "att") if role in preds[L]
              and preds[L][role][1][f] and z[ROLE_KEY[role](L)][n, t, preds[L][role][0][f]] > 0]
        return "From " + " & ".join(on) if on else "From nowhere"

    counts = {L: Counter() for L in layers}
    features = {L: Counter() for L in layers}
    trans = Counter()
    N, T = contexts.shape
    for n in range(N):
        for t in range(skip_first, T):
            for L in layers:
                for f in range(flow[(L, "res")].d_sae):
                    if z[(L, "res")][n, t, f] <= 0:
                        continue
                    name = group(L, n, t, f)
                    counts[L][name] += 1
                    features[L][(f, name)] += 1
                    p = preds[L].get("res", ([], []))
                    if L - 1 in layers and "RES" in name:
                        trans[(L - 1, group(L - 1, n, t, p[0][f]), name)] += 1
    return counts, features, trans


def check(stats: GroupStats, flow, expected, layers):
    counts, features, trans = expected
    for L in layers:
        assert stats.counts[L].tolist() == [counts[L][name] for name in GROUPS]
        want = torch.tensor([[features[L][(f, name)] for name in GROUPS] for f in range(flow[(L, "res")].d_sae)])
        assert torch.equal(stats.feature_counts[L], want)
        total = sum(counts[L].values())
        assert torch.allclose(stats.shares[L], torch.tensor([counts[L][name] / total for name in GROUPS], dtype=torch.float64))
    pairs = [(L, L + 1) for L in layers if L + 1 in layers]
    assert sorted(stats.transitions) == pairs
    for a, b in pairs:
        want = torch.tensor([[trans[(a, A, B)] for B in GROUPS] for A in GROUPS])
        assert torch.equal(stats.transitions[(a, b)], want)
        rows = want.sum(1, keepdim=True)
        probs = torch.where(rows > 0, want / rows.clamp_min(1), 0.0).double()
        assert torch.allclose(stats.transition_probs[(a, b)], probs)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_counts_match_brute_force(flow, llama, contexts, batch_size):
    stats = group_counts(flow, llama, contexts, batch_size=batch_size, progress=False)
    assert stats.layers == [1, 2] and stats.tokens == 6 * 11
    expected = brute(flow, llama, contexts, [1, 2])
    check(stats, flow, expected, [1, 2])
    # The tiny setup must exercise the counting: many groups filled, transitions seen.
    assert all(sum(c > 0 for c in stats.counts[L].tolist()) >= 6 for L in (1, 2))
    assert int(stats.transitions[(1, 2)].sum()) > 20 and (stats.transitions[(1, 2)] > 0).sum() >= 6


@pytest.mark.parametrize("skip_first", [0, 4])
def test_skip_first(flow, llama, contexts, skip_first):
    stats = group_counts(flow, llama, contexts, batch_size=4, skip_first=skip_first, progress=False)
    assert stats.tokens == 6 * (12 - skip_first)
    check(stats, flow, brute(flow, llama, contexts, [1, 2], skip_first=skip_first), [1, 2])


def test_min_score(flow, llama, contexts):
    scores = torch.cat([s for L in (1, 2) for _, s in predecessors(flow, L).values()])
    threshold = float(scores.median())
    stats = group_counts(flow, llama, contexts, min_score=threshold, progress=False)
    check(stats, flow, brute(flow, llama, contexts, [1, 2], min_score=threshold), [1, 2])
    plain = group_counts(flow, llama, contexts, progress=False)
    assert stats.counts[1][-1] > plain.counts[1][-1]  # unmatched predecessors push events to "From nowhere"


def test_random_method(flow, llama, contexts):
    for L in (1, 2):
        for j, (role, cand) in enumerate([("res", (L - 1, "res")), ("mlp", (L, "mlp")), ("att", (L, "att"))]):
            g = torch.Generator().manual_seed(5 * 1_000_003 + 3 * L + j)
            want = torch.randint(flow[cand].d_sae, (flow[(L, "res")].d_sae,), generator=g)
            assert torch.equal(predecessors(flow, L, method="random", seed=5)[role][0], want)
    stats = group_counts(flow, llama, contexts, method="random", seed=5, progress=False)
    check(stats, flow, brute(flow, llama, contexts, [1, 2], method="random", seed=5), [1, 2])
    again = group_counts(flow, llama, contexts, method="random", seed=5, batch_size=1, progress=False)
    assert all(torch.equal(again.feature_counts[L], stats.feature_counts[L]) for L in (1, 2))
    other = group_counts(flow, llama, contexts, method="random", seed=6, progress=False)
    assert any(not torch.equal(other.feature_counts[L], stats.feature_counts[L]) for L in (1, 2))


def test_missing_predecessors_and_layer_subset(llama, contexts):
    keys = [(0, "res"), (1, "res"), (2, "res"), (1, "att"), (2, "mlp")]  # no 1/mlp, no 2/att
    partial = FlowSet({key: _biased(key) for key in keys})
    stats = group_counts(partial, llama, contexts, progress=False)
    check(stats, partial, brute(partial, llama, contexts, [1, 2]), [1, 2])
    names_without = {1: "MLP", 2: "ATT"}
    for L, absent in names_without.items():
        assert all(int(stats.counts[L][i]) == 0 for i, name in enumerate(GROUPS) if absent in name)
    only2 = group_counts(partial, llama, contexts, layers=[2], progress=False)
    assert only2.layers == [2] and only2.transitions == {}
    assert torch.equal(only2.counts[2], stats.counts[2])


def test_record_format_and_plots(flow, llama, contexts, tmp_path):
    stats = group_counts(flow, llama, contexts, progress=False)
    record = json.loads(json.dumps(stats.record()))
    assert record["groups"] == list(GROUPS) and record["tokens"] == 66
    assert record["layers"]["1"]["counts"] == stats.counts[1].tolist()
    assert record["transitions"]["1->2"]["counts"] == stats.transitions[(1, 2)].tolist()
    assert abs(sum(record["layers"]["2"]["feature_shares"]) - 1) < 1e-9
    assert record["settings"]["method"] == "top1" and "versions" in record
    text = format_groups(stats)
    assert all(name in text for name in GROUPS)
    for plot, name in ((plot_group_shares, "groups.png"), (plot_transitions, "transitions.png")):
        path = plot(stats, tmp_path / name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, words", [
    (dict(layers=[0]), "layer 0"),  # 0/res has no predecessor SAE
    (dict(layers=[3]), "layer 3"),
    (dict(method="top5"), "method"),
    (dict(batch_size=0), "batch_size"),
    (dict(skip_first=12), "skip_first"),
])
def test_bad_input(flow, llama, contexts, kwargs, words):
    with pytest.raises(FeatoptError, match=words):
        group_counts(flow, llama, contexts, progress=False, **kwargs)


@pytest.mark.parametrize("bad", [torch.arange(12), torch.rand(2, 12), torch.zeros(2, 12, dtype=torch.bool)])
def test_bad_contexts(flow, llama, bad):
    with pytest.raises(FeatoptError, match="contexts"):
        group_counts(flow, llama, bad, progress=False)


def test_no_target_layer(llama, contexts):
    with pytest.raises(FeatoptError, match="no residual SAE"):
        group_counts(FlowSet({(1, "mlp"): make_sae(1, "mlp"), (0, "res"): make_sae(0, "res")}), llama, contexts,
                     progress=False)
