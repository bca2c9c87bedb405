"""`featopt invert --method gcg` against independent computations: recovered ids against the
tokenizer's own encoding of each text, the metrics against a direct count, distances against
an L1 of the plain HF forward, and the padding of shorter texts never searched."""

from __future__ import annotations

import pytest
import torch
from search_reference import resid_post

from featopt.commands.invert import InversionConfig
from featopt.objectives.matching import encode_texts
from featopt.commands.invert import invert
from featopt.discrete import inversion as gcg_inversion
from featopt.discrete.inversion import causal_pass

TEXTS = ["the sea", "a small town", "x"]  # 4, 3 and 1 tokens


def _config(tmp_path, **kw):
    base = dict(method="gcg", model="tiny-llama", layer=1, texts=TEXTS, out=str(tmp_path), progress=False)
    return InversionConfig(**{**base, **kw})


def _plain_l1(model, ids, original, layer):
    """L1 over every position and feature between the plain forwards of two same-length rows."""
    with torch.no_grad():
        a = resid_post(model, torch.tensor([ids]), layer)
        b = resid_post(model, torch.tensor([original]), layer)
    return float((a.float() - b.float()).abs().sum())


def _direct_metrics(results, tok_ids):
    hits = [sum(a == b for a, b in zip(r.token_ids, ids)) for r, ids in zip(results, tok_ids)]
    tokens = sum(len(ids) for ids in tok_ids)
    exact = sum(h == len(ids) for h, ids in zip(hits, tok_ids))
    return hits, tokens, exact


def test_gcg_inversion_recovers_short_texts_exactly_and_counts_right(tiny64, tmp_path):
    run = invert(_config(tmp_path, steps=20, search_width=64, topk=32), tiny64)
    expected = [tiny64.tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    assert len({len(ids) for ids in expected}) == 3  # three lengths: two rows carry padding
    assert [r.token_ids for r in run.results] == expected
    assert [r.spec for r in run.results] == TEXTS and [r.text for r in run.results] == TEXTS
    hits, tokens, exact = _direct_metrics(run.results, expected)
    m = run.metrics
    assert (m["tokens"], m["tokens_recovered"], m["texts"], m["texts_recovered"]) == (tokens, sum(hits), 3, exact)
    assert m["token_recovery"] == 1.0 and m["exact_match"] == 1.0
    for r, ids in zip(run.results, expected):
        assert r.extra["original_token_ids"] == ids and r.extra["exact_match"] is True
        assert r.extra["distance"] == pytest.approx(_plain_l1(tiny64.model, r.token_ids, ids, 1), abs=1e-9)
    assert (tmp_path / "results.json").is_file()


def test_swap_search_alone_lowers_the_distance_from_its_random_start(tiny64, tmp_path):
    run = invert(_config(tmp_path, causal_topk=0, steps=2, search_width=8, topk=4, seed=3), tiny64)
    expected = [tiny64.tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    start, end = [], []
    for r, ids in zip(run.results, expected):
        assert r.extra["after_causal_pass"] == r.extra["init_ids"]  # no causal pass ran
        start.append(_plain_l1(tiny64.model, r.extra["init_ids"], ids, 1))
        end.append(_plain_l1(tiny64.model, r.token_ids, ids, 1))
        assert r.extra["distance"] == pytest.approx(end[-1], rel=1e-5, abs=1e-6)
    assert all(e <= s + 1e-9 for s, e in zip(start, end))
    assert sum(end) < sum(start)
    # the metrics are a direct count of the recovered ids (here a partial recovery)
    hits, tokens, exact = _direct_metrics(run.results, expected)
    m = run.metrics
    assert (m["tokens"], m["tokens_recovered"], m["texts_recovered"]) == (tokens, sum(hits), exact)
    assert m["token_recovery"] == pytest.approx(sum(hits) / tokens) and m["exact_match"] == pytest.approx(exact / 3)
    assert [r.extra["tokens_recovered"] for r in run.results] == hits


def test_padded_positions_are_never_swapped_and_each_text_takes_n_replace_swaps(tiny64, tmp_path, monkeypatch):
    steps = []  # per step: (the rows' ids before the step, the candidates scored, their problems)
    real = gcg_inversion.swap_search

    def spy(model, init, problems, allowed, settings, **kw):
        inner, before = kw.get("on_step"), [init.clone()]

        def on_step(step, state, evaluated):
            steps.append((before[0], evaluated.ids.clone(), evaluated.problems.clone()))
            before[0] = state.ids.clone()
            if inner:
                inner(step, state, evaluated)

        kw["on_step"] = on_step
        return real(model, init, problems, allowed, settings, **kw)

    monkeypatch.setattr(gcg_inversion, "swap_search", spy)
    run = invert(_config(tmp_path, causal_topk=0, steps=3, search_width=16, topk=8, n_replace=3), tiny64)
    batch = encode_texts(tiny64, TEXTS)
    lengths = [len(tiny64.tokenizer.encode(t, add_special_tokens=False)) for t in TEXTS]
    assert len(steps) == 4 and [len(r.token_ids) for r in run.results] == lengths
    for s, (parents, ids, problems) in enumerate(steps):
        most = {}
        for row, p in zip(ids.tolist(), problems.tolist()):
            n = lengths[p]
            assert row[n:] == batch.ids[p, n:].tolist()  # the pad id, never swapped
            if s:
                changed = sum(a != b for a, b in zip(row[:n], parents[p, :n].tolist()))
                assert 1 <= changed <= min(3, n)
                most[p] = max(most.get(p, 0), changed)
        # at every step, each text still searched swaps min(n_replace, its length) positions (a
        # pick may equal the current token, so some candidates show fewer), whatever the lengths
        # of the other texts in the batch
        assert all(most[p] == min(3, lengths[p]) for p in most)
        if s == 1:
            assert sorted(most) == [0, 1, 2]  # at the first step every text is searched


def test_causal_pass_with_every_token_recovers_the_texts_and_leaves_padding(tiny64):
    batch = encode_texts(tiny64, TEXTS)
    P, T = batch.ids.shape
    with torch.no_grad():
        target = resid_post(tiny64.model, batch.ids, 1).float()  # plain forward: padding is after each text
    gen = torch.Generator().manual_seed(0)
    init = torch.randint(0, tiny64.vocab_size, (P, T), generator=gen)
    init = torch.where(batch.mask, init, torch.full_like(init, 7))  # a marker at the padded positions
    ids, scored = causal_pass(tiny64, tiny64.site("resid_post", 1), "l1", target, batch, init,
                              torch.arange(tiny64.vocab_size), topk=tiny64.vocab_size, progress=False)
    for p, text in enumerate(TEXTS):
        n = int(batch.mask[p].sum())
        assert ids[p, :n].tolist() == tiny64.tokenizer.encode(text, add_special_tokens=False)
        assert ids[p, n:].tolist() == [7] * (T - n)
    assert scored == int(batch.mask.sum()) * tiny64.vocab_size


def test_with_bos_the_texts_are_recovered_after_a_fixed_bos_and_the_distance_is_a_plain_forwards(tiny64, tmp_path):
    """--bos: the target is the plain forward of [BOS] + text (the BOS position dropped), the
    BOS is never part of the answer, and the distance is the plain L1 of [BOS] + answer."""
    import copy

    adapter = copy.copy(tiny64)
    adapter.bos = True
    bos = adapter.tokenizer.bos_token_id
    run = invert(_config(tmp_path, steps=20, search_width=64, topk=32, bos=True), adapter)
    expected = [adapter.tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    assert [r.token_ids for r in run.results] == expected and run.metrics["exact_match"] == 1.0
    assert all(r.bos for r in run.results)
    for r, ids in zip(run.results, expected):
        with torch.no_grad():
            a = resid_post(adapter.model, torch.tensor([[bos, *r.token_ids]]), 1)[:, 1:]
            b = resid_post(adapter.model, torch.tensor([[bos, *ids]]), 1)[:, 1:]
        assert r.extra["distance"] == pytest.approx(float((a - b).abs().sum()), abs=1e-9)


def test_gradient_inversion_with_bos_scores_answers_by_plain_forwards_after_the_bos(tiny64, tmp_path):
    import copy

    adapter = copy.copy(tiny64)
    adapter.bos = True
    bos = adapter.tokenizer.bos_token_id
    run = invert(InversionConfig(model="tiny-llama", layer=0, texts=TEXTS[:2], steps=5, bos=True, out=str(tmp_path),
                                 progress=False), adapter)
    for r, text in zip(run.results, TEXTS[:2]):
        original = adapter.tokenizer.encode(text, add_special_tokens=False)
        assert r.extra["original_token_ids"] == original and r.bos  # the BOS is not a token to recover
        with torch.no_grad():
            a = resid_post(adapter.model, torch.tensor([[bos, *r.token_ids]]), 0)[:, 1:]
            b = resid_post(adapter.model, torch.tensor([[bos, *original]]), 0)[:, 1:]
        assert r.extra["distance"] == pytest.approx(float((a - b).abs().sum()), rel=1e-6, abs=1e-6)
