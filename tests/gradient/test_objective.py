"""Objectives: values that compose, and losses that match a brute-force computation."""

from __future__ import annotations

import torch

from featopt.specs import parse_features
from featopt.models import Site
from featopt.objectives.objective import Context
from featopt.objectives.targets import Selection, l1_target, maximize

SITE = Site(1, "resid_post")


def _selection(spec: str, tokens: int = 4, width: int = 6) -> Selection:
    return Selection(SITE, parse_features(spec, n_tokens=tokens, width=width), tokens, width)


def _ctx(acts: torch.Tensor, rows=None) -> Context:
    rows = torch.arange(acts.shape[0]) if rows is None else torch.tensor(rows)
    return Context({SITE: acts}, torch.zeros(acts.shape[0], acts.shape[1], 3), rows, adapter=None)


def test_l1_target_matches_a_loop():
    sel = _selection("[:, 0-1, 2:5]")  # two problems: position 0 and 1, features 2..4 together
    acts = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(0))
    got = l1_target(sel, 7.0).loss(_ctx(acts))
    for p, pos in enumerate((0, 1)):
        want = sum(abs(7.0 - acts[p, pos, f].item()) for f in (2, 3, 4))
        assert abs(got[p].item() - want) < 1e-5


def test_maximize_and_activation_are_the_mean_over_the_selection():
    sel = _selection("[:, :, 0-2]")
    acts = torch.randn(3, 4, 6)
    want = torch.stack([acts[p, :, p].mean() for p in range(3)])
    torch.testing.assert_close(sel.activation(acts), want)
    torch.testing.assert_close(maximize(sel).loss(_ctx(acts)), -want)


def test_rows_pick_their_own_problems():
    """A process computing rows [2] must score problem 2's features, not problem 0's."""
    sel = _selection("[:, :, 0-2]")
    acts = torch.randn(1, 4, 6)
    torch.testing.assert_close(sel.activation(acts, torch.tensor([2])), acts[0, :, 2].mean().reshape(1))


def test_objectives_compose_and_describe_themselves():
    sel_a, sel_b = _selection("[:, :, 0]"), _selection("[:, :, 1]")
    combined = l1_target(sel_a, 10) - 0.5 * maximize(sel_b) + 2 * maximize(sel_a)
    assert combined.description == f"l1_target({SITE}, C=10) - 0.5 * maximize({SITE}) + 2 * maximize({SITE})"
    acts = torch.randn(1, 4, 6)
    want = (10 - acts[0, :, 0]).abs().sum() + 0.5 * acts[0, :, 1].mean() - 2 * acts[0, :, 0].mean()
    torch.testing.assert_close(combined.loss(_ctx(acts)), want.reshape(1))
    assert (-maximize(sel_a)).description == f"-maximize({SITE})"
    assert combined.sites == (SITE,)
