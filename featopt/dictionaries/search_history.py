"""A search's progress, per feature and step: the best and best fluent score found so far and the
sequences scored for it, for `featopt sae inputs` records and the progress curves of
`benchmarks/bench_sae_inputs.py` (how fast each latent reaches its corpus max)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from featopt.dictionaries.corpus_windows import Fluency
from featopt.discrete.epo import Front

#: Slack (nats/token) on the fluency threshold: the window at the median is fluent itself, whatever
#: the rounding of the batch it is re-measured in.
SLACK = 1e-5


class SearchHistory:
    """An `on_step` for `epo` that records, after each step, every feature's best and best fluent
    score in its growing `fronts` and the sequences its members brought so far (`extra [P]` added:
    an unpooled search scores a feature's own seeds after it). The corpus windows (`fluent`: their
    standalone activations and xent) count as inputs from the start."""

    def __init__(self, fronts: list[Front], fluent: Fluency, extra: Tensor | int):
        self._fronts, self.fluent, self.extra = fronts, fluent, extra
        self.floor = torch.tensor([float(a.max()) if len(a) else -math.inf for a in fluent.standalone])
        self.floor_fluent = torch.tensor([
            float(a[x <= t + SLACK].max()) if bool((x <= t + SLACK).any()) else -math.inf
            for a, x, t in zip(fluent.standalone, fluent.xent, fluent.threshold.tolist())])
        self.rows: list[tuple[Tensor, Tensor, Tensor]] = []

    def __call__(self, step: int, state, evaluated) -> None:
        fronts = self._fronts
        best = torch.tensor([float(f.activation.max()) if len(f.activation) else -math.inf for f in fronts])
        fluent = torch.full((len(fronts),), -math.inf, dtype=torch.float64)
        for p, (front, t) in enumerate(zip(fronts, self.fluent.threshold.tolist())):
            i = front.best(t + SLACK) if t == t else None
            if i is not None:
                fluent[p] = front.activation[i]
        self.rows.append((state.evaluations.clone() + self.extra, torch.maximum(best.double(), self.floor.double()),
                          torch.maximum(fluent, self.floor_fluent.double())))

    def tensors(self) -> dict[str, Tensor]:
        """`forwards`, `best` and `fluent`, each `[steps + 1, P]` (NaN: nothing yet)."""
        if not self.rows:
            return {}
        nan = lambda t: torch.where(torch.isinf(t), torch.nan, t)  # noqa: E731 (none yet: NaN, as JSON can hold it)
        return {"forwards": torch.stack([r[0] for r in self.rows]),
                "best": nan(torch.stack([r[1] for r in self.rows])),
                "fluent": nan(torch.stack([r[2] for r in self.rows]))}


def history_of(history: dict[str, Tensor], p: int) -> dict[str, list] | None:
    """Feature p's search history as JSON: after each step, the sequences its members brought so
    far and the best and best fluent searched scores (None: none yet)."""
    if not history:
        return None
    value = lambda v: None if v != v else float(v)  # noqa: E731
    return {"forwards": [int(v) for v in history["forwards"][:, p]], "best": [value(v) for v in history["best"][:, p]],
            "best_fluent": [value(v) for v in history["fluent"][:, p]]}
