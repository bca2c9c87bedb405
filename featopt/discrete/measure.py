"""Re-measuring what a search found, by a plain forward (no cache, no batching tricks).

Every record carries the objective's `score` (minus its loss) of the found input and the
`activation` of its *primary selection* (`featopt.objectives.problems.primary`: the features the
problem is about). For `maximize` the two are the same number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from featopt.models import ModelAdapter
from featopt.objectives import Context, Objective
from featopt.objectives.problems import parts, primary


@dataclass
class Measured:
    """Per row: the objective's score `[N]`, the primary selection's activation `[N]` and its
    per-position values `[N, T]` (None for a row without a primary selection); float64, CPU."""

    score: Tensor
    activation: Tensor
    per_position: list[list[float] | None]


@torch.inference_mode()
def remeasure(adapter: ModelAdapter, objective: Objective, ids: Tensor, problems: Tensor | None = None,
              isolated: bool = False, batch: int = 256) -> Measured:
    """Row n of `ids [N, T]` (whole sequences, any fixed prefix included) scored for problem
    `problems[n]` (default: row n is problem n) by plain forwards."""
    problems = torch.arange(len(ids)) if problems is None else problems.cpu()
    scores, activations, per_pos = [], [], []
    for start in range(0, len(ids), batch):
        rows, wanted = ids[start:start + batch], problems[start:start + batch]
        acts = adapter.run(objective.sites, input_ids=rows, isolated=isolated)
        device = next(iter(acts.values())).device
        scores.append(-objective.loss(Context(acts, None, wanted.to(device), adapter)).double().cpu())
        act = scores[-1].clone()
        pos: list[list[float] | None] = [None] * len(rows)
        offset = 0
        for part in parts(objective):
            sel, lo, hi = primary(part), offset, offset + part.n_problems
            offset = hi
            mine = ((wanted >= lo) & (wanted < hi)).nonzero()[:, 0]
            if sel is None or not len(mine):
                continue
            local = (wanted[mine] - lo).to(device)
            values = sel.per_position(acts[sel.site][mine.to(device)], local).double()  # [n, T]
            weights = sel.position_weights(values.shape[1], values.device, values.dtype)[local]
            act[mine] = (values * weights).sum(1).cpu()
            for j, i in enumerate(mine.tolist()):
                pos[i] = values[j].cpu().tolist()
        activations.append(act)
        per_pos += pos
    return Measured(torch.cat(scores), torch.cat(activations), per_pos)
