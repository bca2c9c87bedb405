"""Sharding the sweep: any split of the candidates, in one process or two, gives the one-pass
top-k; the cached prefix equals running every candidate sequence in full."""

from __future__ import annotations

import pytest
import torch
from search_reference import resid_post

from featopt.models import Site
from featopt.results import read_results
from featopt.commands.search import ExhaustiveConfig
from featopt.commands.search import exhaustive
from featopt.discrete import greedy as greedy_module
from featopt.commands.search import GreedyConfig
from featopt.commands.search import greedy
from featopt.discrete.scoring import Scorer, merge_topk
from featopt.discrete.sweep import shard, sweep


def _scorers(n_tokens):
    weights = torch.zeros(4, n_tokens, dtype=torch.float64)
    weights[:, -1] = 1.0
    return [(Site(1, "resid_post"), Scorer([(0,), (3,), (5, 6, 7), (9,)], 64, weights))]


def test_shards_cover_every_row_once():
    for n, world in ((10, 3), (2, 4), (512, 2)):
        bounds = [shard(n, rank, world) for rank in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_any_split_of_the_candidates_merges_to_the_one_pass_top_k(tiny64):
    # two prefixes, problems 0-1 continue prefix 0 and problems 2-3 prefix 1: shards cut across both
    prefixes = torch.tensor([[5, 17], [300, 2]])
    groups = torch.tensor([0, 0, 1, 1])
    whole = sweep(tiny64, _scorers(3), prefixes=prefixes, groups=groups, k=6, progress=False)
    for world in (2, 3, 7):
        parts = [sweep(tiny64, _scorers(3), prefixes=prefixes, groups=groups, k=6, rank=r, world_size=world,
                       batch_size=33, progress=False) for r in range(world)]
        merged = merge_topk(parts)
        assert torch.equal(merged.ids, whole.ids)
        torch.testing.assert_close(merged.values, whole.values, rtol=1e-12, atol=0)
    # and the one pass equals every full sequence run through the plain HF forward
    for p, (g, feature) in enumerate(zip(groups.tolist(), (0, 3, slice(5, 8), 9))):
        ids = torch.cat([prefixes[g].expand(tiny64.vocab_size, -1), torch.arange(tiny64.vocab_size)[:, None]], 1)
        with torch.no_grad():
            acts = resid_post(tiny64.model, ids, 1)[:, -1, feature]
        scores = acts.mean(-1) if acts.dim() == 2 else acts
        expected = [t for _, t in sorted((-float(v), t) for t, v in enumerate(scores))[:6]]
        assert whole.ids[:, p].tolist() == expected


def test_two_processes_give_the_results_of_one(tiny64, tmp_path):
    base = dict(model="tiny-llama", layer="0,1", features="[:, :, [0-5, 8:12]]", prefix=" the sea", top_k=4,
                batch_size=50, progress=False)
    one = exhaustive(ExhaustiveConfig(out=str(tmp_path / "one"), **base), tiny64).results
    two = exhaustive(ExhaustiveConfig(out=str(tmp_path / "two"), devices=2, **base), tiny64).results
    assert read_results(tmp_path / "two")[0]["world_size"] == 2 and read_results(tmp_path / "one")[0]["world_size"] == 1
    assert [r.extra["top_k"]["token_ids"] for r in two] == [r.extra["top_k"]["token_ids"] for r in one]
    # Float64 values from forwards of other batch shapes in processes with their own thread
    # counts: equal up to rounding, not bit for bit. A rank sweeping the wrong shard changes the
    # token ids above, and the values by far more than this tolerance.
    for a, b in zip(two, one, strict=True):
        assert a.activation == pytest.approx(b.activation, rel=1e-9, abs=1e-12)
        assert a.extra["top_k"]["activations"] == pytest.approx(b.extra["top_k"]["activations"], rel=1e-9, abs=1e-12)


def test_greedy_with_every_step_sharded_gives_the_results_of_one_pass(tiny64, tmp_path, monkeypatch):
    # Each greedy step is one sweep; in a process group every rank sweeps its shard and the top-k
    # are merged (the two-process test above covers that exchange). Here every step is split into
    # three shards in one process and merged with merge_topk: the tokens must not change.
    base = dict(model="tiny-llama", layer=1, features="[:, :, 0-3]", tokens=3, variant="both", batch_size=50,
                progress=False)
    one = greedy(GreedyConfig(out=str(tmp_path / "one"), **base), tiny64).results

    steps = []

    def sharded(*args, **kw):
        steps.append(kw["prefixes"])
        return merge_topk([sweep(*args, **kw, rank=r, world_size=3) for r in range(3)])

    monkeypatch.setattr(greedy_module, "sweep", sharded)
    three = greedy(GreedyConfig(out=str(tmp_path / "three"), **base), tiny64).results
    assert len(steps) == 3 and steps[2].shape[0] > 1  # the last steps continue several prefixes
    assert [r.token_ids for r in three] == [r.token_ids for r in one]
