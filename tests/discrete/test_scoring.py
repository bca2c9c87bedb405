"""The running top-k and the feature reduction, against sorted() and hand-written means."""

from __future__ import annotations

import pytest
import torch

from featopt.discrete.scoring import FeatureReduce, TopK, merge_topk


def _sorted_topk(values, k):
    """Per column, the k best (value, id) by plain sorting: ties to the lower id."""
    columns = []
    for p in range(values.shape[1]):
        pairs = sorted(((-float(values[i, p]), i) for i in range(values.shape[0])))[:k]
        columns.append(pairs)
    return columns


@pytest.mark.parametrize("tied", [True, False])
def test_running_topk_equals_sorting_with_ties_to_the_lower_id(tied):
    gen = torch.Generator().manual_seed(0)
    if tied:
        values = torch.randint(0, 6, (200, 5), generator=gen).double()
    else:
        values = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    expected = _sorted_topk(values, 7)
    for batch in (1, 13, 200):
        topk = TopK(7, 5, torch.float64)
        for start in range(0, 200, batch):
            topk.update(values[start:start + batch], torch.arange(start, min(start + batch, 200)))
        for p, pairs in enumerate(expected):
            assert topk.ids[:, p].tolist() == [i for _, i in pairs]
            assert topk.values[:, p].tolist() == [-v for v, _ in pairs]


def test_merged_shards_equal_one_pass():
    gen = torch.Generator().manual_seed(1)
    values = torch.randint(0, 4, (90, 3), generator=gen).double()
    parts = []
    for lo, hi in ((0, 31), (31, 60), (60, 90)):
        part = TopK(5, 3, torch.float64)
        part.update(values[lo:hi], torch.arange(lo, hi))
        parts.append(part)
    merged = merge_topk(parts)
    for p, pairs in enumerate(_sorted_topk(values, 5)):
        assert merged.ids[:, p].tolist() == [i for _, i in pairs]


def test_fewer_candidates_than_k_leave_minus_one():
    topk = TopK(4, 1, torch.float64)
    topk.update(torch.tensor([[2.0], [3.0]], dtype=torch.float64), torch.tensor([10, 11]))
    assert topk.ids[:, 0].tolist() == [11, 10, -1, -1]


def test_feature_reduce_gathers_singles_and_averages_slices():
    acts = torch.randn(2, 3, 12, dtype=torch.float64)
    reduce = FeatureReduce([(4,), (0, 1, 2, 3), None, (11,)], 12)
    out = reduce(acts)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out[..., 0], acts[..., 4])
    torch.testing.assert_close(out[..., 1], (acts[..., 0] + acts[..., 1] + acts[..., 2] + acts[..., 3]) / 4)
    torch.testing.assert_close(out[..., 2], acts.sum(-1) / 12)
    torch.testing.assert_close(out[..., 3], acts[..., 11])


def test_updating_some_columns_leaves_the_others():
    values = torch.randint(0, 5, (40, 3)).double()
    topk = TopK(3, 3, torch.float64)
    topk.update(values[:20], torch.arange(20))
    before = topk.ids[:, 1].clone()
    topk.update(values[20:, [0, 2]], torch.arange(20, 40), torch.tensor([0, 2]))
    assert torch.equal(topk.ids[:, 1], before)
    for p, pairs in ((0, _sorted_topk(values, 3)[0]), (2, _sorted_topk(values, 3)[2])):
        assert topk.ids[:, p].tolist() == [i for _, i in pairs]
