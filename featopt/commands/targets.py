"""What a command scores: the objective its `--objective`, `--features`, `--layer`/`--site`,
`--target` and `--sae` name, built the same way in every command (one part per site, stacked)."""

from __future__ import annotations

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site
from featopt.objectives import Defaults, Objective, parse_objective, stack
from featopt.specs import parse_features


def objective_for(settings, adapter: ModelAdapter, sites: list[Site], *, over: str = "mean",
                  n_tokens: int | None = None) -> Objective:
    """The settings' objective, bound to `adapter`: an objective value given from Python as is,
    else `--objective` read at every site of `sites` (problems site-major). Terms that name no
    features read `--features` at the site, with positions combined by `over` and checked against
    `n_tokens` when the input length is known."""
    value = settings.objective
    if isinstance(value, Objective):
        return value.bind(adapter)
    parts = []
    for site in sites:
        defaults = Defaults(site=site, features=settings.features, over=over, target=float(settings.target),
                            n_tokens=n_tokens)
        parts.append(parse_objective(value, defaults).bind(adapter))
    return stack(parts)


def spec_positions_free(settings, what: str) -> None:
    """A search whose positions are chosen by its variant: `--features` must leave them free."""
    if isinstance(settings.objective, Objective):
        return
    if any(p.positions is not None for p in parse_features(settings.features)):
        raise FeatoptError(f"{settings.features!r} names positions, but the searched positions are chosen by "
                           f"--variant (last, or sum over all){what}: write the position field as \":\".")
