"""How well an inversion recovered its texts: token recovery, exact match, output distance.

Rows are texts padded to one length; `mask [N, T]` (bool) marks the real positions, and every
function here ignores the padded ones. The functional forms are shared with the objectives of
:mod:`featopt.objectives.matching`, so a logged distance is exactly the loss that was optimized.
The :class:`torchmetrics.Metric` classes accumulate over updates and sum across processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from featopt.errors import FeatoptError

DISTANCES = ("l1", "cosine")


def _check(x: Tensor, y: Tensor, mask: Tensor, dims: int) -> None:
    if x.shape != y.shape or x.dim() != dims or tuple(mask.shape) != tuple(x.shape[:2]):
        raise FeatoptError(f"shapes do not match: {tuple(x.shape)} and {tuple(y.shape)} with a mask of "
                           f"{tuple(mask.shape)}; expected two {'[N, T, W]' if dims == 3 else '[N, T]'} and a [N, T] mask.")


def masked_l1(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """`sum |x - y|` over the valid positions: x, y `[N, T, W]`, mask `[N, T]` -> `[N]`."""
    _check(x, y, mask, 3)
    # where, not a product: a padded inf or nan must not leak in, not even as 0 * inf.
    diff = torch.where(mask[..., None].to(x.device), x - y, 0.0)
    return diff.abs().sum(dim=(1, 2))


def masked_cosine_distance(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """`1 - cos(x[valid].flatten(), y[valid].flatten())` per row: `[N, T, W]` x2, `[N, T]` -> `[N]`.

    Zeroing the padded positions in both leaves the dot product and both norms those of the
    valid positions alone."""
    _check(x, y, mask, 3)
    dtype = torch.promote_types(x.dtype, y.dtype)
    keep = mask[..., None].to(x.device)
    a = torch.where(keep, x.to(dtype), 0.0).flatten(1)
    b = torch.where(keep, y.to(dtype), 0.0).flatten(1)
    return 1.0 - F.cosine_similarity(a, b, dim=1)


DISTANCE_FNS = {"l1": masked_l1, "cosine": masked_cosine_distance}


def token_matches(preds: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Recovered ids vs original ids `[N, T]` -> (matching valid positions `[N]`, valid positions `[N]`)."""
    _check(preds, target, mask, 2)
    mask = mask.to(preds.device).bool()
    correct = ((preds == target.to(preds.device)) & mask).sum(dim=1)
    return correct, mask.sum(dim=1)


class TokenRecovery(Metric):
    """Fraction of all valid positions whose recovered token is the original one (pooled over
    texts, so a long text weighs more than a short one)."""

    is_differentiable, higher_is_better, full_state_update = False, True, False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor) -> None:
        correct, valid = token_matches(preds, target, mask)
        self.correct += correct.sum().to(self.correct.device)
        self.total += valid.sum().to(self.total.device)

    def compute(self) -> Tensor:
        return self.correct.float() / self.total  # nan before any valid position, like MeanMetric


class ExactMatch(Metric):
    """Fraction of texts whose every valid position was recovered."""

    is_differentiable, higher_is_better, full_state_update = False, True, False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("matched", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor) -> None:
        correct, valid = token_matches(preds, target, mask)
        self.matched += (correct == valid).sum().to(self.matched.device)
        self.total += torch.tensor(len(valid), device=self.total.device)

    def compute(self) -> Tensor:
        return self.matched.float() / self.total


class OutputDistance(Metric):
    """Mean over texts of the masked distance (`"l1"` or `"cosine"`) between two outputs."""

    is_differentiable, higher_is_better, full_state_update = False, False, False

    def __init__(self, kind: str = "l1", **kwargs):
        super().__init__(**kwargs)
        if kind not in DISTANCE_FNS:
            raise FeatoptError(f"distance {kind!r} is not known: allowed are {', '.join(DISTANCES)}.")
        self.kind = kind
        self.add_state("sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, x: Tensor, y: Tensor, mask: Tensor) -> None:
        rows = DISTANCE_FNS[self.kind](x.detach(), y.detach(), mask)
        self.sum += rows.sum().to(self.sum.device, torch.float64)
        self.total += torch.tensor(len(rows), device=self.total.device)

    def compute(self) -> Tensor:
        return (self.sum / self.total).float()
