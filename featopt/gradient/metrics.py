"""How well an inversion recovered its texts: token recovery, exact match, output distance.

Rows are texts padded to one length; `mask [N, T]` (bool) marks the real positions, and every
function here ignores the padded ones. The functional forms are the objectives' own
(:mod:`featopt.objectives.matching`), so a logged distance is exactly the loss that was optimized.
The :class:`torchmetrics.Metric` classes accumulate over updates and sum across processes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from featopt.errors import FeatoptError
from featopt.objectives.matching import DISTANCE_FNS, DISTANCES, token_matches

__all__ = ["ExactMatch", "OutputDistance", "TokenRecovery", "token_matches"]


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
