"""Output matching (source document 000, "Complete Search Features"): learn an input whose
output at a site matches a target output `O(e)` of real text, by the documents' L1 distance
`||O(e_n) - O(e)||_1` or by the cosine of the flattened outputs.

Targets are per problem (one text per row) and padded to one length; `token_mask` marks the
real positions, and padded positions count nowhere (in a causal model they cannot change the
activations of the positions before them, so masking them is exact).
"""

from __future__ import annotations

from torch import Tensor

from featopt.errors import FeatoptError
from featopt.gradient.metrics import DISTANCES, masked_cosine_distance, masked_l1
from featopt.models.sites import Site
from featopt.objectives.objective import Context, Objective


class _Match(Objective):
    kind = ""

    def __init__(self, site: Site, target: Tensor, token_mask: Tensor):
        """site: where outputs are compared; target: `O(e)` `[P, T, W]` for every problem of the
        run; token_mask: `[P, T]` bool, True at real (unpadded) positions."""
        if target.dim() != 3 or tuple(token_mask.shape) != tuple(target.shape[:2]):
            raise FeatoptError(f"target must be [problems, tokens, width] with a [problems, tokens] mask, "
                               f"got {tuple(target.shape)} and {tuple(token_mask.shape)}.")
        self.site = site
        self.sites = (site,)
        self.target = target.detach()
        self.token_mask = token_mask.bool()
        self.description = f"match_{self.kind}({site})"

    def _rows(self, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        """This process's activations `[rows, T, W]`, with their own targets and masks."""
        acts = ctx.acts[self.site]
        if self.target.device != acts.device:  # once: the target then lives where the model runs
            self.target, self.token_mask = self.target.to(acts.device), self.token_mask.to(acts.device)
        rows = ctx.rows.to(acts.device)
        return acts, self.target[rows], self.token_mask[rows]


class MatchL1(_Match):
    """`sum over valid positions and features |O(e_n) - O(e)|` per problem."""

    kind = "l1"

    def loss(self, ctx: Context) -> Tensor:
        return masked_l1(*self._rows(ctx))


class MatchCosine(_Match):
    """`1 - cos(O(e_n)[valid].flatten(), O(e)[valid].flatten())` per problem."""

    kind = "cosine"

    def loss(self, ctx: Context) -> Tensor:
        return masked_cosine_distance(*self._rows(ctx))


OBJECTIVES = DISTANCES  # ("l1", "cosine")


def match(kind: str, site: Site, target: Tensor, token_mask: Tensor) -> _Match:
    """The matching objective named `kind` ("l1" or "cosine")."""
    classes = {"l1": MatchL1, "cosine": MatchCosine}
    if kind not in classes:
        raise FeatoptError(f"objective {kind!r} is not known: allowed are {', '.join(classes)}.")
    return classes[kind](site, target, token_mask)
