"""The kept pairs of topk-like training (`selection.py`, found through block maxima) against a plain
top-k over every entry, and the sparse step's groupings (`sparse_step.py`) against loops."""

from __future__ import annotations

import pytest
import torch

from featopt.models.sae.selection import batch_topk_pairs, row_topk_pairs
from featopt.models.sae.sparse_step import KeptPairs, decode_pairs, preacts_buffer

# (rows, latents, k): narrow SAEs (plain top-k), block counts that divide the latents and that leave
# a tail, k = d_sae, and fewer latents than a block
SHAPES = [(40, 24, 3), (64, 200, 4), (100, 1000, 8), (33, 1001, 8), (50, 513, 16), (300, 2304, 32), (7, 97, 5),
          (5, 10, 10), (9, 6, 2)]


def _matrix(n, d_sae, seed):
    gen = torch.Generator().manual_seed(seed)
    # a per-latent offset and a per-row one, as real pre-activations have (some latents and tokens run high)
    return torch.randn(n, d_sae, generator=gen) + torch.randn(1, d_sae, generator=gen) + torch.randn(n, 1, generator=gen)


@pytest.mark.parametrize("n,d_sae,k", SHAPES)
def test_row_topk_pairs_are_each_rows_k_largest(n, d_sae, k):
    pre = _matrix(n, d_sae, seed=d_sae)
    rows, cols, values = row_topk_pairs(pre, k)
    assert torch.equal(rows, torch.arange(n).repeat_interleave(k)) and torch.equal(values, pre[rows, cols])
    ranked = pre.argsort(dim=1, descending=True, stable=True)  # a full sort: no top-k, no blocks
    for r in range(n):
        assert sorted(cols[rows == r].tolist()) == sorted(ranked[r, :k].tolist()), r


@pytest.mark.parametrize("n,d_sae,k", SHAPES)
@pytest.mark.parametrize("saturated", [False, True])
def test_batch_topk_pairs_are_the_largest_of_the_whole_batch(n, d_sae, k, saturated):
    pre = _matrix(n, d_sae, seed=d_sae + 1)
    if saturated:  # one row holds far more than k of the kept entries
        pre[n // 2] += 10
    rows, cols, values = batch_topk_pairs(pre, k)
    assert torch.equal(values, pre[rows, cols])
    flat = pre.reshape(-1).argsort(descending=True, stable=True)[:n * k]  # a full sort of every entry
    assert sorted((rows * d_sae + cols).tolist()) == sorted(flat.tolist())
    assert torch.all(rows[1:] >= rows[:-1])  # rows ascending, as decode_pairs needs
    if saturated and d_sae > k:
        assert int((rows == n // 2).sum()) > k


def test_ties_at_the_batch_cut_are_all_kept():
    pre = torch.zeros(6, 40)
    pre[0, :3] = 1.0
    rows, cols, _ = batch_topk_pairs(pre, 2)  # the 12th largest is a 0: every entry ties at the cut
    assert len(rows) == 6 * 40


def test_pairs_group_by_latent_with_rows_ascending_and_decode_like_a_loop():
    gen = torch.Generator().manual_seed(0)
    n, d_sae, d = 30, 50, 7
    rows, cols, _ = batch_topk_pairs(torch.randn(n, d_sae, generator=gen), 3)
    pairs = KeptPairs(rows, cols, n, d_sae)
    order, by_rows, offsets = pairs.by_latent
    ends = list(offsets[1:].tolist()) + [len(rows)]
    for j in range(d_sae):
        members = order[offsets[j]:ends[j]]
        assert torch.all(cols[members] == j) and torch.equal(by_rows[offsets[j]:ends[j]], rows[members])
        assert torch.all(by_rows[offsets[j]:ends[j]].diff() > 0)  # within a latent, rows ascending
    values, W_dec = torch.randn(len(rows), generator=gen), torch.randn(d_sae, d, generator=gen)
    want = torch.zeros(n, d)
    for p in range(len(rows)):
        want[rows[p]] += values[p] * W_dec[cols[p]]
    torch.testing.assert_close(decode_pairs(pairs, values, W_dec), want)
    table, weights = torch.randn(n, d, generator=gen), torch.randn(len(rows), generator=gen)
    summed = torch.zeros(d_sae, d)
    for p in range(len(rows)):
        summed[cols[p]] += weights[p] * table[rows[p]]
    torch.testing.assert_close(pairs.sum_by_latent(table, weights), summed)


def test_the_preactivation_buffer_is_reused_and_grows():
    like = torch.zeros(1)
    first = preacts_buffer(64, 100, like)
    assert first.shape == (64, 100) and preacts_buffer(32, 100, like).data_ptr() == first.data_ptr()
    bigger = preacts_buffer(128, 100, like)
    assert bigger.shape == (128, 100)
    assert preacts_buffer(64, 100, like.double()).dtype == torch.float64
