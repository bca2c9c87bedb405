"""Any objective, scored exactly on real token sequences: the one contract every discrete search
uses (the exhaustive sweep, greedy, GCG, EPO, discrete inversion).

A candidate's activations are the whole sequence's, `[B, L + N, W]` (a cached prefix's positions
first), so positions mean what the feature spec says they mean. The sweep's fast path for
maximized single features (`Scorer`: a threshold per problem rules out most rows in one comparison)
is an implementation of the same contract: it computes exactly `-Maximize.loss_all`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from featopt.discrete.scoring import SCORE_DTYPE, Scorer
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site
from featopt.objectives import Context, Maximize, Objective, Stack, Sum


def check_discrete(objective: Objective, method: str) -> None:
    """Refuse, in one sentence, what a discrete search cannot score."""
    if objective.reads_input:
        raise FeatoptError(f"{method} searches real tokens, which have no continuous input, but the objective "
                           f"{objective.description!r} reads the input itself (a penalty on the embeddings): "
                           "drop that term, or use optimize for it.")
    if objective.n_problems is None:
        raise FeatoptError(f"the objective {objective.description!r} scores no feature of its own: "
                           f"{method} needs at least one term over features.")


class ObjectiveLoss:
    """A candidate model's loss for an objective: `(acts, problems [B]) -> [B]`, and `.all(acts)`,
    every problem's loss of every row `[B, P]` (pooled searches)."""

    def __init__(self, objective: Objective, adapter: ModelAdapter):
        self.objective, self.adapter = objective, adapter

    def __call__(self, acts: dict[Site, Tensor], problems: Tensor) -> Tensor:
        return self.objective.loss(Context(acts, None, problems, self.adapter))

    def all(self, acts: dict[Site, Tensor]) -> Tensor:
        return self.objective.loss_all(Context(acts, None, None, self.adapter))


class ObjectiveScorer:
    """The sweep's scorer for any objective: a candidate's score for every problem is minus the
    objective's `loss_all` on the whole sequence (the prefix's cached activations, then the new
    token's), in float64."""

    def __init__(self, objective: Objective, adapter: ModelAdapter):
        self.objective, self.adapter = objective, adapter
        self.sites = tuple(objective.sites)
        self.n = objective.n_problems
        self.prefix: dict[Site, Tensor] | None = None

    def set_prefix(self, prefix_acts: dict[Site, Tensor] | None) -> None:
        """`{site: [G, L, W]}` of the G prefixes (None: no prefix)."""
        self.prefix = prefix_acts if prefix_acts and next(iter(prefix_acts.values())).shape[1] else None

    def shortcut(self) -> bool:
        return False

    def __call__(self, acts: dict[Site, Tensor], group: Tensor | None = None) -> Tensor:
        """`{site: [B, 1, W]}` of the new tokens (rows of prefix `group [B]`) -> scores `[B, P]`."""
        if self.prefix is not None:
            index = group if group is not None else torch.zeros(len(next(iter(acts.values()))), dtype=torch.long)
            acts = {s: torch.cat([self.prefix[s][index.to(self.prefix[s].device)].to(a.dtype), a], dim=1)
                    for s, a in acts.items()}
        return -self.objective.loss_all(Context(acts, None, None, self.adapter)).to(SCORE_DTYPE)


def _fast(objective: Objective) -> tuple[Site, Scorer] | None:
    """The sweep's `Scorer` for a maximized (or minimized: any weight) selection, else None."""
    weight = 1.0
    if isinstance(objective, Sum) and len(objective.terms) == 1:
        weight, objective = objective.terms[0]
    if not isinstance(objective, Maximize):
        return None
    sel = objective.selection
    return sel.site, Scorer([p.features for p in sel.problems], sel.width, None, positions=sel, scale=weight,
                            feature_map=sel.feature_map)


def sweep_scorers(objective: Objective, adapter: ModelAdapter, n_tokens: int) -> list[tuple[Site | None, object]]:
    """The sweep's scorers for `objective` on sequences of `n_tokens` positions, one per part of a
    stacked objective, in problem order: the fast `Scorer` where a part allows it, else the
    objective itself (site None: it reads every site it names)."""
    parts = objective.parts if isinstance(objective, Stack) else [objective]
    out = []
    for part in parts:
        fast = _fast(part)
        if fast is not None:
            fast[1].set_length(n_tokens)
            out.append(fast)
        else:
            out.append((None, ObjectiveScorer(part, adapter)))
    return out
