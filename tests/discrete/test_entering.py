"""The sweep's shortcut (`Scorer.threshold`/`blocks`/`above`, `TopK.add`: only the rows that can
enter the running top-k are scored in float64 and merged) against a stable full sort of every
candidate's float64 score: ties to the lower token id, also ties that only appear in float64 (a
large prefix constant), negative weights, half-precision activations, -inf and NaN, several
sites, any batch size and any merge cadence."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from featopt.models import Site
from featopt.discrete.scoring import Scorer, TopK
from featopt.discrete.sweep import sweep


class _Prefix:
    def __init__(self, acts):
        self.acts = acts

    def broadcast(self, index):
        return None


class TableAdapter:
    """A stand-in model: the activation of token t at site s is `tables[s][t]` (`[V, width]`); a prefix's
    activations are `prefix_acts[s]` (`[1, L, width]`), whatever the prefix."""

    def __init__(self, tables, prefix_acts=None):
        self.tables, self.prefix_acts = tables, prefix_acts or {}
        self.vocab_size, width = next(iter(tables.values())).shape
        self.device = torch.device("cpu")
        # what the sweep sizes its batch by (`featopt.memory.forward_row_bytes`)
        self.model = SimpleNamespace(config=SimpleNamespace(hidden_size=width, num_attention_heads=1))
        self.calls = 0

    def run(self, sites, *, input_ids, cache=None, isolated=False):
        self.calls += 1
        return {s: self.tables[s][input_ids] for s in sites}  # [B, 1, width]

    def prefix(self, sites, input_ids):
        return _Prefix({s: self.prefix_acts[s] for s in sites})


def _reference(scores, k):
    """Per column, the k best rows of `scores [V, P]` by a stable descending sort (NaN first)."""
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices[:k]
    return order, scores.gather(0, order)


def _scores(table, features, weights, const=None):
    """Every candidate's float64 score, as the sweep defines it."""
    a = table.to(torch.float64)[:, list(features)] * weights[:, -1]
    return a if const is None else a + const


def _check(topk, scores, k):
    ids, values = _reference(scores, k)
    assert topk.ids.tolist() == ids.tolist()
    assert torch.equal(topk.values.isnan(), values.isnan())
    assert torch.equal(topk.values.nan_to_num(), values.nan_to_num())


def _tied_table(v, width, dtype, seed):
    """`[v, width]` activations of few distinct values (ties everywhere), a third of them random."""
    gen = torch.Generator().manual_seed(seed)
    tied = torch.randint(-4, 5, (v, width), generator=gen, dtype=torch.float64) / 4
    noise = torch.randn(v, width, generator=gen, dtype=torch.float64)
    return torch.where(torch.rand(v, width, generator=gen) < 0.3, noise, tied).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 7, 64, 300])
def test_sweep_equals_a_stable_full_sort(dtype, batch):
    v, width, k = 300, 6, 5
    table = _tied_table(v, width, dtype, seed=batch)
    table[7, 0] = table[250, 0] = float("inf")
    table[:40, 1] = float("-inf")  # the best of column 1 only come later
    table[-3:, 2] = float("-inf")
    features = [(0,), (1,), (2,), (3,), (4,), (5,), (0,)]
    weights = torch.ones(len(features), 1, dtype=torch.float64)
    weights[3, 0] = -1.0  # maximizing -a
    weights[4, 0] = 0.3  # a weight that rounds
    weights[6, 0] = -2.5
    site = Site(0, "resid_post")
    adapter = TableAdapter({site: table})
    topk = sweep(adapter, [(site, Scorer(features, width, weights))], k=k, batch_size=batch, progress=False)
    _check(topk, _scores(table, [f[0] for f in features], weights), k)


def test_ties_that_only_exist_in_float64_go_to_the_lower_id():
    # A prefix constant so large that neighbouring float32 activations round to the same float64
    # score: the k best by activation are not the k best by (score, lower id).
    v, width, k = 200, 3, 4
    gen = torch.Generator().manual_seed(3)
    table = (1.0 + torch.randint(0, 64, (v, width), generator=gen) * 2.0 ** -23).float()  # consecutive floats
    site = Site(1, "resid_post")
    weights = torch.tensor([[1.0, 1.0], [1.0, 0.5], [0.5, -1.0]], dtype=torch.float64)  # [P, L + 1], L = 1
    prefix_acts = torch.tensor([[[2.0 ** 31, 0.0, 2.0 ** 32]]])  # [1, 1, width]
    adapter = TableAdapter({site: table}, {site: prefix_acts})
    scorer = Scorer([(0,), (1,), (2,)], width, weights)
    topk = sweep(adapter, [(site, scorer)], prefixes=torch.tensor([[9]]), k=k, batch_size=16, progress=False)
    const = (prefix_acts[0, 0].double() * weights[:, 0])
    scores = _scores(table, [0, 1, 2], weights, const)
    assert len(scores[:, 0].unique()) < len(table[:, 0].unique())  # the case is real: float64 merges values
    _check(topk, scores, k)


def test_nan_sorts_first_as_in_a_full_sort():
    v, width, k = 120, 2, 3
    table = torch.randn(v, width, generator=torch.Generator().manual_seed(5))
    table[[30, 90], 0] = float("nan")
    table[50:, 1] = float("nan")
    site = Site(0, "resid_post")
    adapter = TableAdapter({site: table})
    weights = torch.ones(2, 1, dtype=torch.float64)
    topk = sweep(adapter, [(site, Scorer([(0,), (1,)], width, weights))], k=k, batch_size=16, progress=False)
    _check(topk, _scores(table, [0, 1], weights), k)


def test_several_sites_and_averaged_features_in_one_sweep():
    # site a: single features (the shortcut); site b: a mean of features (scored in full)
    v, k = 257, 6
    a, b = Site(0, "resid_post"), Site(1, "mlp_out")
    ta, tb = _tied_table(v, 5, torch.float32, 11), _tied_table(v, 4, torch.float32, 12)
    adapter = TableAdapter({a: ta, b: tb})
    wa, wb = torch.ones(3, 1, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64)
    scorers = [(a, Scorer([(4,), (0,), (2,)], 5, wa)), (b, Scorer([(0, 1), (3,)], 4, wb))]
    topk = sweep(adapter, scorers, k=k, batch_size=32, progress=False)
    mean = torch.stack([tb[:, :2].double().mean(1), tb[:, 3].double()], 1)
    expected = torch.cat([_scores(ta, [4, 0, 2], wa), mean], 1)
    ids, values = _reference(expected, k)
    assert topk.ids.tolist() == ids.tolist()
    torch.testing.assert_close(topk.values, values, rtol=1e-15, atol=0)


def test_most_batches_are_dropped_after_one_comparison():
    # the point of the shortcut: once the top-k holds high scores, a batch with none above them
    # is compared with the thresholds and dropped, nothing kept, nothing scored in float64
    v, width, k = 4096, 8, 3
    table = torch.randn(v, width, generator=torch.Generator().manual_seed(2))
    table[:64] += 10.0
    site = Site(0, "resid_post")
    weights = torch.ones(width, 1, dtype=torch.float64)
    scorer = Scorer([(f,) for f in range(width)], width, weights)
    topk = TopK(k, width)
    topk.update(scorer(table[:64, None]), torch.arange(64))
    u = scorer.threshold(topk.values[-1], table.dtype)
    assert u.dtype == torch.float32 and (u.double() <= topk.values[-1]).all()
    scores, rows, problems = scorer.above([scorer.blocks(table[64:96, None]), scorer.blocks(table[96:128, None])], u)
    assert scores.numel() == rows.numel() == problems.numel() == 0
    # rows counted across the batches; a short last block
    scores, rows, problems = scorer.above([scorer.blocks(table[64:164, None]), scorer.blocks(table[:37, None])], u)
    assert len(scores) > 0 and (rows >= 100).all() and (rows < 137).all()
    assert (scores > topk.values[-1][problems]).all()
    adapter = TableAdapter({site: table})
    found = sweep(adapter, [(site, scorer)], k=k, batch_size=32, progress=False)
    _check(found, _scores(table, range(width), weights), k)


def test_candidates_merged_one_by_one_equal_sorting():
    # TopK.add: candidates of several problems interleaved, each problem's in candidate order
    gen = torch.Generator().manual_seed(4)
    n, problems, k = 300, 4, 6
    values = torch.randint(0, 5, (n, problems), generator=gen).double()
    values[5, 2] = float("nan")
    topk = TopK(k, problems)
    topk.update(values[:10], torch.arange(10))
    for lo, hi in ((10, 40), (40, 41), (41, 300)):
        chosen = torch.rand(hi - lo, problems, generator=gen) < 0.7  # some candidates are left out...
        chosen |= values[lo:hi] >= 3  # ... but never one that could enter
        row, col = chosen.nonzero().unbind(1)
        topk.add(values[lo:hi][row, col], row + lo, col)
    ids, best = _reference(values, k)
    assert topk.ids.tolist() == ids.tolist()
    assert torch.equal(topk.values.nan_to_num(), best.nan_to_num())


@pytest.mark.parametrize("k", [1, 3, 8])
def test_candidates_merged_one_by_one_equal_sorting_everything(k):
    # TopK.add after every chunk equals a stable sort of all the candidates so far: ties, NaN
    # (first), -inf, problems with many candidates in a chunk and problems with none
    gen = torch.Generator().manual_seed(k)
    n, problems = 240, 6
    values = torch.randint(0, 5, (n, problems), generator=gen).double()
    values[torch.rand(n, problems, generator=gen) < 0.04] = float("nan")
    values[torch.rand(n, problems, generator=gen) < 0.04] = float("-inf")
    values[:, 5] = float("-inf")  # never better than the placeholders
    topk = TopK(k, problems)
    topk.update(values[:2], torch.arange(2))
    cuts = [2] + sorted(torch.randperm(n - 3, generator=gen)[:12].add(3).tolist()) + [n]
    for lo, hi in zip(cuts, cuts[1:]):
        row, col = (torch.rand(hi - lo, problems, generator=gen) < 2).nonzero().unbind(1)  # all, row-major
        topk.add(values[lo:hi][row, col], row + lo, col)
        ids, best = _reference(torch.cat([torch.full((k, problems), float("-inf"), dtype=torch.float64),
                                          values[:hi]]), k)
        expected = torch.where(ids < k, -1, ids - k)  # the placeholders first among -inf: id -1
        assert topk.ids.tolist() == expected.tolist()
        assert torch.equal(topk.values.nan_to_num(), best.nan_to_num())


@pytest.mark.parametrize("cadence", [dict(MERGE_BYTES=1), dict(MERGE_BATCHES=10**6, MERGE_GROWTH=10**6)])
def test_any_merge_cadence_gives_the_same_top_k(monkeypatch, cadence):
    # every batch merged at once, or all of them only at the end (thresholds never tightened)
    module = importlib.import_module("featopt.discrete.sweep")  # (`featopt.discrete.sweep` is the function)
    for name, value in cadence.items():
        monkeypatch.setattr(module, name, value)
    v, width, k = 500, 5, 4
    table = _tied_table(v, width, torch.float32, seed=9)
    table[[50, 450], 3] = float("nan")
    site = Site(0, "resid_post")
    weights = torch.tensor([[1.0], [-1.0], [0.5], [1.0], [2.0]], dtype=torch.float64)
    scorer = Scorer([(f,) for f in range(width)], width, weights)
    found = sweep(TableAdapter({site: table}), [(site, scorer)], k=k, batch_size=24, progress=False)
    _check(found, _scores(table, range(width), weights), k)
