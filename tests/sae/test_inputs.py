"""The inputs that fire SAE latents (`featopt.dictionaries.inputs`, `corpus_windows`), against
independent computations: the firing score's rule written out per architecture, re-measured
activations from a plain HF forward plus the SAE formula, every scored candidate re-scored by plain
forwards (pooled and per-latent searches keep each latent's best of what they scored), the
fluency threshold from a hand-computed cross-entropy, corpus windows cut from the contexts."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

from featopt.commands.sae_inputs import latent_objectives
from featopt.dictionaries import corpus_windows, inputs
from featopt.dictionaries.corpus_stats import corpus_stats
from featopt.discrete.epo import Front
from featopt.models import ModelAdapter
from featopt.models.sae.model import SAEConfig, SparseAutoencoder
from featopt.models.tiny import build_tiny
from tests.discrete.epo_spy import record_scored
from tests.discrete.search_reference import resid_post

LAYER, D_SAE = 1, 24


@pytest.fixture(scope="module")
def tiny64():
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model.double(), tok, name="tiny-llama")


def _sae(adapter, architecture: str, seed: int = 0):
    cfg = SAEConfig(d_in=adapter.d_model, d_sae=D_SAE, architecture=architecture, k=4 if architecture == "topk" else None,
                    hook_name=f"blocks.{LAYER}.hook_resid_post")
    sae = SparseAutoencoder(cfg)
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.3, 0.1, D_SAE))
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.linspace(0.0, 0.4, D_SAE))
    sae.source = "in-memory"
    return sae.double()


@pytest.fixture(scope="module", params=["topk", "relu", "jumprelu"])
def sae(request, tiny64):
    return _sae(tiny64, request.param)


def _formula(sae, x):
    """The SAE written out: pre-activations, then each architecture's rule by loops."""
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = torch.zeros_like(pre)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in pre.shape[:-1]]).reshape(-1, pre.dim() - 1).tolist():
        row = pre[tuple(idx)]
        for i in range(row.shape[-1]):
            v = float(row[i])
            if sae.cfg.architecture == "topk":
                above = sum(float(u) > v for u in row)
                z[tuple(idx) + (i,)] = max(v, 0.0) if above < sae.cfg.k else 0.0
            elif sae.cfg.architecture == "jumprelu":
                z[tuple(idx) + (i,)] = v if v > float(sae.threshold[i]) and v > 0 else 0.0
            else:
                z[tuple(idx) + (i,)] = max(v, 0.0)
    return pre, z


def test_firing_score_is_the_latent_where_it_fires_and_the_gap_to_firing_elsewhere(tiny64, sae):
    x = torch.randn(3, 5, tiny64.d_model, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pre, z = _formula(sae, x)
    with torch.no_grad():
        score = sae.firing_score(x)
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(5)).tolist():
        row, b, t = pre[idx[0], idx[1]], idx[0], idx[1]
        for i in range(D_SAE):
            if z[b, t, i] > 0:
                expected = float(z[b, t, i])
            elif sae.cfg.architecture == "topk":
                kth = sorted(row.tolist(), reverse=True)[sae.cfg.k - 1]
                expected = float(row[i]) - max(kth, 0.0)
            elif sae.cfg.architecture == "jumprelu":
                expected = float(row[i]) - max(float(sae.threshold[i]), 0.0)
            else:
                expected = float(row[i])
            assert score[b, t, i].item() == pytest.approx(expected, abs=1e-12)
            assert (expected > 0) == (z[b, t, i] > 0)


def test_front_keeps_exactly_the_non_dominated_points():
    gen = torch.Generator().manual_seed(0)
    front = Front()
    acts, xents, ids = [], [], []
    for batch in range(4):
        a = torch.randint(0, 12, (30,), generator=gen).double()  # ties on purpose
        x = torch.randint(0, 12, (30,), generator=gen).double()
        i = torch.arange(30)[:, None] + 100 * batch
        front.add(i, a, x)
        acts += a.tolist(); xents += x.tolist(); ids += i[:, 0].tolist()
    kept = set()
    for j, (a, x) in enumerate(zip(acts, xents)):
        dominated = any((a2 >= a and x2 <= x and (a2 > a or x2 < x)) for a2, x2 in zip(acts, xents))
        earlier_twin = any(a2 == a and x2 == x for a2, x2 in zip(acts[:j], xents[:j]))
        if not dominated and not earlier_twin:
            kept.add(ids[j])
    assert set(front.ids[:, 0].tolist()) == kept
    best = max(range(len(acts)), key=lambda j: (acts[j], -xents[j], -j))
    assert int(front.ids[front.best(), 0]) == ids[best]


def _corpus(adapter):
    gen = torch.Generator().manual_seed(5)
    return torch.randint(3, adapter.vocab_size, (6, 12), generator=gen)


def _hand_xent(adapter, ids, start):
    """Mean NLL of tokens start.. of each row, from the plain HF forward's logits."""
    with torch.no_grad():
        logits = adapter.model(input_ids=ids, use_cache=False).logits.double()
    logp = F.log_softmax(logits, dim=-1)
    return [float(-sum(logp[b, t - 1, ids[b, t]] for t in range(start, ids.shape[1])) / (ids.shape[1] - start))
            for b in range(len(ids))]


def test_windows_from_stats_and_from_a_pass_are_the_corpus_tokens_before_each_top_example(tiny64):
    sae = _sae(tiny64, "relu")
    contexts = _corpus(tiny64)
    stats = corpus_stats(tiny64, sae, contexts, top_k=5, window=(6, 2), skip_first=1, progress=False)
    latents = [0, 3, 7, 20]
    n = 4
    windows = corpus_windows.from_stats(stats, latents, n)
    _, z = _formula(sae, resid_post(tiny64.model, contexts, LAYER))
    for j, latent in enumerate(latents):
        values = [(float(z[c, p, latent]), c, p) for c in range(6) for p in range(1, 12)]
        values.sort(key=lambda v: (-v[0], v[1] * 12 + v[2]))
        expected = [contexts[c, p - n + 1:p + 1] for v, c, p in values[:5] if v > 0 and p - n + 1 >= 0]
        assert len(windows.windows[j]) == len(expected)
        for got, want in zip(windows.windows[j], expected):
            assert torch.equal(got, want)
        assert float(windows.maximum[j]) == pytest.approx(max(v for v, _, _ in values), abs=1e-6)
    _, measure = latent_objectives(tiny64, sae, latents)
    passed = corpus_windows.from_corpus(tiny64, measure, contexts, n, top_k=5, skip_first=1, progress=False)
    for j, latent in enumerate(latents):
        values = [(float(z[c, p, latent]), c, p) for c in range(6) for p in range(n - 1, 12)]
        values.sort(key=lambda v: -v[0])
        top = [v for v in values[:5] if v[0] > 0]
        assert passed.activations[j].tolist() == pytest.approx([v for v, _, _ in top], abs=1e-9)
        assert {tuple(w.tolist()) for w in passed.windows[j]} == {tuple(contexts[c, p - n + 1:p + 1].tolist()) for _, c, p in top}
        assert float(passed.maximum[j]) == pytest.approx(float(z[:, 1:, latent].max()), abs=1e-9)
    with pytest.raises(ValueError, match="window_before"):
        corpus_windows.from_stats(stats, latents, 8)


def test_fluency_threshold_is_the_median_of_the_windows_hand_computed_cross_entropy(tiny64):
    sae = _sae(tiny64, "topk")
    contexts = _corpus(tiny64)
    _, measure = latent_objectives(tiny64, sae, [1, 2, 5])
    windows = corpus_windows.from_corpus(tiny64, measure, contexts, 4, top_k=6, progress=False)
    prefix = torch.tensor([2])
    fluent = corpus_windows.fluency(tiny64, measure, windows, prefix)
    for p in range(3):
        if not len(windows.windows[p]):
            assert fluent.threshold[p] != fluent.threshold[p]  # NaN: no window, no fluent input
            continue
        ids = torch.cat([prefix.expand(len(windows.windows[p]), -1), windows.windows[p]], dim=1)
        hand = _hand_xent(tiny64, ids, 1)
        assert fluent.xent[p].tolist() == pytest.approx(hand, abs=1e-9)
        assert float(fluent.threshold[p]) == pytest.approx(statistics.median_low(hand), abs=1e-9)


@pytest.mark.parametrize("pool", [True, False])
def test_each_latent_keeps_the_best_of_everything_scored_for_it_re_measured_by_plain_forwards(tiny64, sae, pool,
                                                                                              monkeypatch):
    latents = [0, 4, 9, 13, 21]
    contexts = _corpus(tiny64)
    objective, measure = latent_objectives(tiny64, sae, latents)
    windows = corpus_windows.from_corpus(tiny64, measure, contexts, 3, top_k=4, progress=False)
    prefix = torch.tensor([2])
    scored = record_scored(monkeypatch)  # every sequence the search scored: (ids, its problem, or None: all)
    # Pooled, the sweep's seeds are scored with the starts (the spy sees them); per-latent they are
    # scored apart, so the search here goes without them.
    settings = inputs.InputSearch(tokens=3, steps=3, search_width=6, topk=8, lambdas=[0.0, 1.0], warm=3, pool=pool,
                                  sweep=2 if pool else 0, progress=False, seed=1)
    found = inputs.search(tiny64, objective, measure, windows, prefix=prefix, allowed=torch.arange(3, tiny64.vocab_size),
                          settings=settings)
    rows = inputs.records(tiny64, measure, found, prefix, front_size=4)
    # Every sequence scored for each latent (pooled: by every latent; per-latent: its own), and its windows.
    for p, latent in enumerate(latents):
        seqs = [ids for ids, who in scored for ids in (ids if who is None else ids[who == p])]
        seqs += list(windows.windows[p])  # every corpus window is an input too (scored when the threshold is)
        seqs = torch.unique(torch.stack(seqs), dim=0)
        full = torch.cat([prefix.expand(len(seqs), -1), seqs], dim=1)
        _, z = _formula(sae, resid_post(tiny64.model, full, LAYER))
        hand = z[:, -1, latent]
        assert rows[p]["best"]["activation"] == pytest.approx(float(hand.max()), abs=1e-9)
        best_ids = torch.tensor(rows[p]["best"]["token_ids"])
        _, z_best = _formula(sae, resid_post(tiny64.model, best_ids[None], LAYER))
        assert rows[p]["best"]["acts"] == pytest.approx(z_best[0, :, latent].tolist(), abs=1e-9)
        xent = torch.tensor(_hand_xent(tiny64, full, 1), dtype=torch.float64)
        threshold = rows[p]["fluency_threshold"]
        if threshold is not None:
            fits = xent <= threshold + inputs.SLACK
            got = rows[p]["best_fluent"]["activation"] if rows[p]["best_fluent"] else None
            assert (got is None) == (not fits.any())
            if fits.any():
                assert got == pytest.approx(float(hand[fits].max()), abs=1e-9)
        maximum = rows[p]["corpus_max"]
        assert rows[p]["best_ratio"] == (pytest.approx(rows[p]["best"]["activation"] / maximum) if maximum > 0 else None)
        # The history: one entry per step and the starts, never falling, ending at the best of
        # everything scored (the searched firing score is the latent wherever the latent fires).
        history = rows[p]["history"]
        assert len(history["best"]) == found.steps + 1 == len(history["forwards"]) == len(history["best_fluent"])
        assert history["forwards"][-1] == rows[p]["forward_evaluations"]
        assert history["forwards"] == sorted(history["forwards"])
        best = [v for v in history["best"] if v is not None]
        assert best == sorted(best)
        if float(hand.max()) > 0:
            assert history["best"][-1] == pytest.approx(float(hand.max()), rel=1e-6)  # searched in the SAE's float32
        if threshold is not None and fits.any() and float(hand[fits].max()) > 0:
            assert history["best_fluent"][-1] == pytest.approx(float(hand[fits].max()), rel=1e-6)
    if pool:
        assert found.evaluations == sum(len(torch.unique(ids, dim=0)) for ids, _ in scored)
        # The sweep's seeds: each latent's 2 best single tokens after the prefix (brute force over
        # the allowed tokens by plain forwards), each put last in its 2 best windows.
        first, checked = {tuple(row.tolist()) for row in scored[0][0]}, 0
        tokens = torch.arange(3, tiny64.vocab_size)
        with torch.no_grad():  # ranked by the firing score (checked against the formula above)
            x = resid_post(tiny64.model, torch.stack([prefix.expand(len(tokens), -1)[:, 0], tokens], 1), LAYER)
            score_one = sae.firing_score(x)[:, -1]
        for p, latent in enumerate(latents):
            if not len(windows.windows[p]):
                continue
            for t in tokens[score_one[:, latent].topk(2).indices].tolist():
                for w in windows.windows[p][:2]:
                    assert tuple(w[:-1].tolist()) + (t,) in first
                    checked += 1
        assert checked > 0 or not any(len(w) for w in windows.windows)  # (no window: seeds end random starts)
