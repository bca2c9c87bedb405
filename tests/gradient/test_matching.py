"""Output-matching objectives against hand loops, and padding that never counts."""

from __future__ import annotations

import math

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.models import Site
from featopt.objectives.matching import MatchCosine, MatchL1, match
from featopt.objectives.objective import Context

SITE = Site(0, "resid_post")
LENGTHS = [4, 2, 3]  # three texts padded to 4 tokens


def _data(seed=0, width=5):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(3, 4, width, generator=gen)
    acts = torch.randn(3, 4, width, generator=gen)
    mask = torch.tensor([[t < n for t in range(4)] for n in LENGTHS])
    return acts, target, mask


def _ctx(acts, rows=None):
    rows = torch.arange(acts.shape[0]) if rows is None else torch.tensor(rows)
    return Context({SITE: acts}, torch.zeros(acts.shape[0], acts.shape[1], 2), rows, adapter=None)


def _hand_l1(acts, target, n):
    return sum(abs(acts[t][w] - target[t][w]) for t in range(n) for w in range(len(acts[0])))


def _hand_cosine(acts, target, n):
    a = [acts[t][w] for t in range(n) for w in range(len(acts[0]))]
    b = [target[t][w] for t in range(n) for w in range(len(acts[0]))]
    dot = sum(x * y for x, y in zip(a, b))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.mark.parametrize("cls, hand", [(MatchL1, _hand_l1), (MatchCosine, _hand_cosine)])
def test_loss_matches_a_hand_loop_over_the_valid_positions(cls, hand):
    acts, target, mask = _data()
    got = cls(SITE, target, mask).loss(_ctx(acts))
    for p, n in enumerate(LENGTHS):
        assert got[p].item() == pytest.approx(hand(acts[p].tolist(), target[p].tolist(), n), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("cls", [MatchL1, MatchCosine])
def test_rows_pick_their_own_targets(cls):
    """A process computing rows [2, 0] must compare with texts 2 and 0, in that order."""
    acts, target, mask = _data()
    objective = cls(SITE, target, mask)
    full = objective.loss(_ctx(acts))
    part = objective.loss(_ctx(acts[[2, 0]], rows=[2, 0]))
    torch.testing.assert_close(part, full[[2, 0]])


@pytest.mark.parametrize("cls", [MatchL1, MatchCosine])
def test_padding_never_changes_the_loss_or_gets_a_gradient(cls):
    acts, target, mask = _data(seed=1)
    objective = cls(SITE, target, mask)
    clean = objective.loss(_ctx(acts))
    wild = acts.clone()
    wild[~mask] = torch.tensor([float("inf"), float("nan"), 1e30, -7.0, 0.0])  # padded cells: anything
    wild.requires_grad_(True)
    loss = objective.loss(_ctx(wild))
    torch.testing.assert_close(loss, clean)
    loss.sum().backward()
    assert torch.all(wild.grad[~mask] == 0) and torch.isfinite(wild.grad).all()
    assert wild.grad[mask].abs().sum() > 0


def test_matching_the_target_itself_is_zero_and_descriptions_name_the_site():
    _, target, mask = _data()
    assert MatchL1(SITE, target, mask).loss(_ctx(target)).abs().max() == 0
    assert MatchCosine(SITE, target, mask).loss(_ctx(target)).abs().max() < 1e-6
    assert match("l1", SITE, target, mask).description == "match_l1(blocks.0.resid_post)"
    assert match("cosine", SITE, target, mask).description == "match_cosine(blocks.0.resid_post)"
    combined = match("l1", SITE, target, mask) + 0.5 * match("cosine", SITE, target, mask)
    assert combined.description == "match_l1(blocks.0.resid_post) + 0.5 * match_cosine(blocks.0.resid_post)"


def test_bad_objective_or_shapes_say_what_is_allowed():
    _, target, mask = _data()
    with pytest.raises(FeatoptError, match="allowed are l1, cosine"):
        match("l2", SITE, target, mask)
    with pytest.raises(FeatoptError, match="mask"):
        MatchL1(SITE, target, mask[:, :3])
