"""Naming the problems of an objective: which selection each is about, and how records label it.

A problem's *primary selection* is the features the problem is about: a selection objective's own,
the first term over the same problems of a sum (the run's `--features` in `l1_target(...) - 0.5 *
maximize(...)`), or the `selection` a user's objective keeps. Records name a problem by its
selection's site and spec, and report that selection's activation beside the objective's score.
"""

from __future__ import annotations

from featopt.objectives.objective import Objective, Stack, Sum
from featopt.objectives.selection import Selection
from featopt.objectives.targets import SelectionObjective


def primary(objective: Objective) -> Selection | None:
    """The selection an (unstacked) objective's problems are about, or None (a user's objective
    over no selection: its records then carry its score as the activation)."""
    if isinstance(objective, SelectionObjective):
        return objective.selection
    if isinstance(objective, Sum):
        for weight, term in objective.terms:
            if weight and isinstance(term, SelectionObjective) and term.n_problems == objective.n_problems:
                return term.selection
    selection = getattr(objective, "selection", None)  # a user's subclass that keeps one
    return selection if isinstance(selection, Selection) else None


def parts(objective: Objective) -> list[Objective]:
    """The parts of a stacked objective (one per layer of a run), or the objective itself."""
    return objective.parts if isinstance(objective, Stack) else [objective]


def labels(objective: Objective) -> list[tuple[str, str]]:
    """`(site, spec)` of every problem, in problem order (how tables and records name them)."""
    out = []
    for part in parts(objective):
        sel = primary(part)
        if sel is not None:
            out += [(str(sel.site), problem.spec) for problem in sel.problems]
        else:
            site = str(part.sites[0]) if part.sites else ""
            out += [(site, f"problem {p}") for p in range(part.n_problems)]
    return out


def descriptions(objective: Objective) -> list[str]:
    """Each problem's objective, as its record names it: its part's description."""
    return [part.description for part in parts(objective) for _ in range(part.n_problems)]


def feature_maps(objective: Objective, adapter) -> list[dict | None]:
    """What each problem's features are when not the raw activation, as records name it: its
    selection's own feature map (an SAE term, directions), else the model view's at the site
    (`--sae`), else None."""
    out = []
    for part in parts(objective):
        sel = primary(part)
        if sel is not None and sel.feature_map is not None:
            described = sel.feature_map.describe()
        else:
            site = sel.site if sel is not None else (part.sites[0] if part.sites else None)
            described = adapter.describe_features(site) if site is not None else None
        out += [None if described is None else dict(described)] * part.n_problems
    return out
