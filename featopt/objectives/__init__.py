"""Objectives: what every method scores, as values that compose with `+`, `-` and `*`.

`maximize(sel)`, `l1_target(sel, C)`, `latent(sae, features)`, `direction(vector, site)`,
`logit(token)`, `logprob(token)` and any :class:`Objective` subclass run under gradient ascent,
inversion, the exhaustive sweep, greedy search, GCG and EPO alike; `parse_objective` reads the
same values from the text of `--objective`.
"""

from featopt.objectives.expression import Defaults, parse_objective
from featopt.objectives.objective import Context, Objective, Stack, Sum, stack
from featopt.objectives.selection import OVER, Selection
from featopt.objectives.targets import (
    L1Target, Maximize, TokenTarget, direction, l1_target, latent, logit, logprob, maximize,
)

__all__ = [
    "OVER", "Context", "Defaults", "L1Target", "Maximize", "Objective", "Selection", "Stack", "Sum", "TokenTarget",
    "direction", "l1_target", "latent", "logit", "logprob", "maximize", "parse_objective", "stack",
]
