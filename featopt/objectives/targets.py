"""What is scored on a site's activations: a selection of features per problem, and the
objectives of the source documents over it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from featopt.specs import Problem, selection_masks
from featopt.models.sites import Site
from featopt.objectives.objective import Context, Objective


class Selection:
    """Which activations each problem scores: problem p reads the positions of
    `pos_mask[p]` times the features of `feat_mask[p]` at `site`.

    Args:
        site: where the features live.
        problems: one per row of the run's learnable input.
        n_tokens, width: the input length and the site's number of features.
    """

    def __init__(self, site: Site, problems: Sequence[Problem], n_tokens: int, width: int):
        self.site = site
        self.problems = list(problems)
        self.pos_mask, self.feat_mask = selection_masks(self.problems, n_tokens, width)  # [P, T], [P, W]

    def __len__(self) -> int:
        return len(self.problems)

    def weights(self, rows: Tensor, like: Tensor) -> Tensor:
        """The 0/1 selection for `rows` as `[rows, tokens, width]`, matching `like`'s device and dtype."""
        pos = self.pos_mask.to(like.device)[rows].to(like.dtype)
        feat = self.feat_mask.to(like.device)[rows].to(like.dtype)
        return pos[:, :, None] * feat[:, None, :]

    def activation(self, acts: Tensor, rows: Tensor | None = None) -> Tensor:
        """Mean selected activation per problem: `acts [rows, tokens, width]` -> `[rows]`."""
        if rows is None:
            rows = torch.arange(len(self), device=acts.device)
        w = self.weights(rows, acts)
        return (acts * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2))


class L1Target(Objective):
    """The documents' loss `||C - O_f(e)||_1`: pulls every selected activation towards a large
    constant C, so below C it is an ascent on the features."""

    def __init__(self, selection: Selection, target: float = 100.0):
        self.selection, self.target = selection, float(target)
        self.sites = (selection.site,)
        self.description = f"l1_target({selection.site}, C={self.target:g})"

    def loss(self, ctx: Context) -> Tensor:
        acts = ctx.acts[self.selection.site]
        w = self.selection.weights(ctx.rows, acts)
        return ((self.target - acts).abs() * w).sum(dim=(1, 2))


class Maximize(Objective):
    """Plain ascent: minus the mean selected activation."""

    def __init__(self, selection: Selection):
        self.selection = selection
        self.sites = (selection.site,)
        self.description = f"maximize({selection.site})"

    def loss(self, ctx: Context) -> Tensor:
        return -self.selection.activation(ctx.acts[self.selection.site], ctx.rows)


def l1_target(selection: Selection, target: float = 100.0) -> L1Target:
    return L1Target(selection, target)


def maximize(selection: Selection) -> Maximize:
    return Maximize(selection)
