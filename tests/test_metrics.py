"""Inversion metrics against plain Python counting, with padding that never counts."""

from __future__ import annotations

import math
import random

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.gradient.metrics import ExactMatch, OutputDistance, TokenRecovery
from featopt.objectives.matching import token_matches


def _batches(seed=0, n_batches=3):
    """Random (preds, target, mask) batches whose padded cells hold arbitrary ids."""
    rng = random.Random(seed)
    batches = []
    for _ in range(n_batches):
        rows, tokens = rng.randint(1, 5), rng.randint(1, 6)
        lengths = [rng.randint(1, tokens) for _ in range(rows)]
        target = [[rng.randrange(4) for _ in range(tokens)] for _ in range(rows)]
        # mostly right, sometimes wrong, so exact matches happen too
        preds = [[t if rng.random() < 0.8 else rng.randrange(4) for t in row] for row in target]
        mask = [[t < n for t in range(tokens)] for n in lengths]
        batches.append((preds, target, mask))
    return batches


def _count(batches):
    correct = total = exact = texts = 0
    for preds, target, mask in batches:
        for p_row, t_row, m_row in zip(preds, target, mask):
            hits = [p == t for p, t, m in zip(p_row, t_row, m_row) if m]
            correct, total = correct + sum(hits), total + len(hits)
            exact, texts = exact + all(hits), texts + 1
    return correct / total, exact / texts


@pytest.mark.parametrize("seed", range(5))
def test_recovery_and_exact_match_equal_plain_counting_over_updates(seed):
    batches = _batches(seed)
    recovery, exact = TokenRecovery(), ExactMatch()
    for preds, target, mask in batches:
        args = (torch.tensor(preds), torch.tensor(target), torch.tensor(mask))
        recovery.update(*args)
        exact.update(*args)
    want_recovery, want_exact = _count(batches)
    assert recovery.compute().item() == pytest.approx(want_recovery)
    assert exact.compute().item() == pytest.approx(want_exact)


def test_padded_positions_never_count():
    target = torch.tensor([[5, 6, 7], [5, 6, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    preds = torch.tensor([[5, 6, 7], [5, 6, 9]])  # row 1 differs only in its padding
    correct, valid = token_matches(preds, target, mask)
    assert correct.tolist() == [3, 2] and valid.tolist() == [3, 2]
    exact = ExactMatch()
    exact.update(preds, target, mask)
    assert exact.compute().item() == 1.0


def test_output_distance_is_the_mean_of_hand_computed_row_distances():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 4, 2, generator=gen), torch.randn(3, 4, 2, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]).bool()
    x[~mask] = 1e9  # padding: must not count
    l1, cosine = [], []
    for p in range(3):
        a = [v for t in range(4) if mask[p, t] for v in x[p, t].tolist()]
        b = [v for t in range(4) if mask[p, t] for v in y[p, t].tolist()]
        l1.append(sum(abs(u - v) for u, v in zip(a, b)))
        dot = sum(u * v for u, v in zip(a, b))
        cosine.append(1 - dot / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b)))
    for kind, rows in (("l1", l1), ("cosine", cosine)):
        metric = OutputDistance(kind)
        metric.update(x[:2], y[:2], mask[:2])
        metric.update(x[2:], y[2:], mask[2:])
        assert metric.compute().item() == pytest.approx(sum(rows) / 3, rel=1e-5)


def test_bad_shapes_and_kinds_are_refused():
    with pytest.raises(FeatoptError, match="shapes do not match"):
        token_matches(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(FeatoptError, match="allowed are l1, cosine"):
        OutputDistance("l2")
