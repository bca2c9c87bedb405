"""The swap proposals of GCG/EPO against brute force: which positions a candidate changes and to
what, first-occurrence deduplication against a Python loop with a seen-set, the seen-sequence
memory, the top-k tokens per position against a sort of the allowed tokens, and the step
penalty against the direct `||E_v - E_cur||^2` loop."""

from __future__ import annotations

import pytest
import torch

from featopt.discrete.swaps import Seen, distinct, sample_swaps, step_penalty, top_candidates


def _no_current_tops(current, k, vocab, gen):
    """`[R, N, k]` distinct ids per position, none equal to that position's current token, so
    every chosen position visibly changes."""
    R, N = current.shape
    top = torch.empty(R, N, k, dtype=torch.long)
    for r in range(R):
        for n in range(N):
            pool = [v for v in torch.randperm(vocab, generator=gen).tolist() if v != int(current[r, n])]
            top[r, n] = torch.tensor(pool[:k])
    return top


@pytest.mark.parametrize("n_replace", [1, 2, 3, 7])
def test_sample_swaps_changes_exactly_min_n_replace_editable_positions_to_top_tokens(n_replace):
    gen = torch.Generator().manual_seed(3)
    R, N, k, vocab, width = 4, 6, 5, 60, 40
    current = torch.randint(0, vocab, (R, N), generator=gen)
    top = _no_current_tops(current, k, vocab, gen)
    editable = torch.tensor([[1, 1, 1, 1, 1, 1],   # all 6
                             [1, 0, 1, 0, 1, 0],   # 3
                             [0, 0, 0, 1, 1, 0],   # 2
                             [0, 0, 0, 0, 0, 1]],  # 1
                            dtype=torch.bool)
    out = sample_swaps(current, top, width, n_replace, torch.Generator().manual_seed(9), editable)
    assert out.shape == (R, width, N)
    for r in range(R):
        expected = min(n_replace, int(editable[r].sum()))
        for c in range(width):
            changed = [n for n in range(N) if out[r, c, n] != current[r, n]]
            assert len(changed) == expected, (r, c, changed)
            for n in changed:
                assert bool(editable[r, n])
                assert int(out[r, c, n]) in top[r, n].tolist()


def test_sample_swaps_without_an_editable_position_changes_nothing():
    current = torch.tensor([[1, 2, 3], [4, 5, 6]])
    top = torch.full((2, 3, 2), 9)
    editable = torch.tensor([[False, False, False], [True, True, False]])
    out = sample_swaps(current, top, 10, 2, torch.Generator().manual_seed(0), editable)
    assert torch.equal(out[0], current[0].expand(10, -1))
    assert all((out[1, c] != current[1]).sum() == 2 and out[1, c, 2] == 6 for c in range(10))


def test_sample_swaps_default_editable_is_every_position_and_picks_cover_the_top_list():
    current = torch.zeros(1, 3, dtype=torch.long)
    top = torch.tensor([[[10, 11, 12], [20, 21, 22], [30, 31, 32]]])
    out = sample_swaps(current, top, 600, 1, torch.Generator().manual_seed(1))
    changed = (out[0] != 0)
    assert bool((changed.sum(1) == 1).all())
    # 600 draws of 9 (position, pick) pairs: every pair shows up, nothing else does
    seen = {(int(n), int(out[0, c, n])) for c, n in changed.nonzero().tolist()}
    assert seen == {(n, 10 * (n + 1) + j) for n in range(3) for j in range(3)}


def test_sample_swaps_is_fixed_by_the_generator_seed():
    gen = torch.Generator().manual_seed(5)
    current = torch.randint(0, 100, (3, 8), generator=gen)
    top = torch.randint(0, 100, (3, 8, 10), generator=gen)
    a = sample_swaps(current, top, 32, 2, torch.Generator().manual_seed(42))
    b = sample_swaps(current, top, 32, 2, torch.Generator().manual_seed(42))
    c = sample_swaps(current, top, 32, 2, torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _first_occurrences(candidates, keys):
    seen, rows, ks = set(), [], []
    for row, key in zip(candidates.tolist(), keys.tolist()):
        if (key, tuple(row)) not in seen:
            seen.add((key, tuple(row)))
            rows.append(row)
            ks.append(key)
    return rows, ks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distinct_keeps_first_occurrences_in_order(seed):
    gen = torch.Generator().manual_seed(seed)
    # few values, so rows repeat often, within one key and across keys
    candidates = torch.randint(0, 3, (200, 3), generator=gen)
    keys = torch.randint(0, 3, (200,), generator=gen)
    rows, ks = _first_occurrences(candidates, keys)
    assert len(rows) < 200  # the case has repeats to drop
    got_rows, got_keys = distinct(candidates, keys)
    assert got_rows.tolist() == rows and got_keys.tolist() == ks


def test_distinct_tells_the_same_row_under_two_keys_apart():
    candidates = torch.tensor([[1, 2], [1, 2], [1, 2], [3, 4]])
    keys = torch.tensor([5, 0, 5, 0])
    rows, ks = distinct(candidates, keys)
    assert rows.tolist() == [[1, 2], [1, 2], [3, 4]] and ks.tolist() == [5, 0, 0]


def test_seen_reports_only_sequences_never_added_under_their_key():
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 500, (30, 4), generator=gen)
    keys = torch.randint(0, 3, (30,), generator=gen)
    assert len({(k, tuple(r)) for k, r in zip(keys.tolist(), a.tolist())}) == 30  # all distinct
    seen = Seen(4, seed=1)
    assert bool(seen.new(a, keys).all())
    seen.add(a[:10], keys[:10])
    assert seen.new(a, keys).tolist() == [False] * 10 + [True] * 20
    # the same sequence under another key is new; adding it twice changes nothing
    assert bool(seen.new(a[:10], keys[:10] + 3).all())
    seen.add(a[:10], keys[:10])
    assert seen.new(a, keys).tolist() == [False] * 10 + [True] * 20
    seen.add(a[20:], keys[20:])
    assert seen.new(a, keys).tolist() == [False] * 10 + [True] * 10 + [False] * 10
    # a memory with another seed hashes differently but answers the same
    other = Seen(4, seed=2)
    other.add(a[:5], keys[:5])
    assert other.new(a, keys).tolist() == [False] * 5 + [True] * 25


def _brute_top(score, allowed, k):
    """Per (r, n): the allowed ids sorted by score, lowest first, first k."""
    R, N, _ = score.shape
    out = torch.empty(R, N, min(k, len(allowed)), dtype=torch.long)
    for r in range(R):
        for n in range(N):
            ranked = sorted(allowed.tolist(), key=lambda v: float(score[r, n, v]))
            out[r, n] = torch.tensor(ranked[:k])
    return out


@pytest.mark.parametrize("k", [1, 4, 25, 1000])
def test_top_candidates_are_the_allowed_tokens_with_the_most_negative_gradient(k):
    gen = torch.Generator().manual_seed(k)
    V = 80
    grad = torch.randn(3, 5, V, generator=gen)
    # the most negative gradients are on disallowed tokens: they must not win
    allowed = torch.tensor(sorted(torch.randperm(V, generator=gen)[:30].tolist()))
    disallowed = torch.tensor([v for v in range(V) if v not in set(allowed.tolist())])
    grad[..., disallowed[:5]] -= 100.0
    top = top_candidates(grad, allowed, k)
    assert torch.equal(top, _brute_top(grad, allowed, k))
    assert set(top.flatten().tolist()) <= set(allowed.tolist())


def test_top_candidates_with_a_curvature_term_rank_by_gradient_plus_curvature():
    gen = torch.Generator().manual_seed(7)
    V = 60
    grad = torch.randn(2, 4, V, generator=gen)
    curvature = 3 * torch.rand(2, 4, V, generator=gen)
    allowed = torch.arange(5, 55)
    top = top_candidates(grad, allowed, 8, curvature)
    assert torch.equal(top, _brute_top(grad + curvature, allowed, 8))
    assert not torch.equal(top, top_candidates(grad, allowed, 8))  # the term changes the ranking here


def test_step_penalty_is_the_squared_distance_to_the_current_embedding():
    gen = torch.Generator().manual_seed(0)
    E = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    current = torch.tensor([[0, 5, 39], [7, 7, 12]])
    penalty = step_penalty(E, current)
    assert penalty.shape == (2, 3, 40) and penalty.dtype == torch.float32
    for r in range(2):
        for n in range(3):
            for v in range(40):
                expected = float(((E[v] - E[current[r, n]]) ** 2).sum())
                assert float(penalty[r, n, v]) == pytest.approx(expected, rel=1e-5, abs=1e-4)
    assert bool((penalty[0, 1].argmin() == 5) and (penalty[1, 0].argmin() == 7))


def test_sample_swaps_row_k_draws_each_row_from_its_first_row_k_tokens():
    current = torch.zeros(3, 2, dtype=torch.long)
    top = torch.arange(1, 9).expand(3, 2, 8).clone()  # column j holds token j + 1
    out = sample_swaps(current, top, 400, 1, torch.Generator().manual_seed(2), row_k=torch.tensor([1, 3, 8]))
    for r, k in enumerate((1, 3, 8)):
        placed = set(out[r][out[r] != 0].tolist())
        assert placed == set(range(1, k + 1))  # 400 draws: every allowed column, nothing past row_k
