"""Deactivation: testing the links of the data-free matching causally (document 003, §5.1-5.2).

The events measured (a feature f of `L/res` firing at one position, its top-1 predecessors per
role and its group) are sampled by :func:`featopt.feature_flow.events.sample_events`.

- :func:`deactivate`: one predecessor latent p at a time, its contribution at its site rescaled
  by r at every position (:func:`~featopt.interventions.edits.scale_latents`, r = 0 removes it),
  and f read again at the event's position: `delta = z_new - z_old`, `relative = delta / z_old`
  (negative: p fed f), "deactivated" when `z_new == 0`. `method="top1"` rescales the top-1 of
  each active role; `"random"` a seeded random latent of the same SAE that fires at the position
  and is not the top-1 (Figure 6's baseline; rows are paired with the top-1 rows). Rows are split
  by group and by whether the rescaled predecessor was the only active top-1 (Figure 7).
- :func:`r_sweep`: all active top-1 predecessors of an event rescaled at once, for each r: the
  relative change of f and of the model's next-token loss over the context (Figure 8).

Every measurement compares an edited forward with an unedited forward of the same rows, so
r = 1 gives a change of exactly zero rather than batch-shape rounding noise. Tables, records and
plots of the results are in :mod:`featopt.feature_flow.deactivate_report`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.feature_flow.events import Events, check_events, check_token_contexts, encode_cpu
from featopt.feature_flow.groups import GROUPS, ROLES, predecessor_key
from featopt.feature_flow.saes import FlowSet
from featopt.interventions.edits import Edit, edited, latent_edits

# Which predecessor is rescaled: the top-1 match, or a random firing latent of the same SAE
# (not groups.METHODS' fixed random latent per feature, though the names are the same).
METHODS = ("top1", "random")


def _check_r(r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
        raise FeatoptError(f"the rescaling coefficient r must be a finite number, got {r!r}.")
    return float(r)


# ----------------------------------------------------------------------- measuring
def _read(adapter, flow, layer: int, ids: Tensor, pos: Tensor, feat: Tensor, edits: list[Edit],
          loss: bool = False) -> tuple[Tensor, Tensor | None]:
    """f's activation `[B]` at `(row, pos)` under `edits` (forward stops at `layer/res`), and with
    `loss` the full model's mean next-token cross-entropy of each row `[B]`."""
    site, sae = flow.read_site((layer, "res")), flow[(layer, "res")]
    if loss:
        with edited(adapter, edits), adapter.hooks(read=[site]) as captured:
            logits = adapter.logits(ids)
        act = captured[site]
        target = ids.to(logits.device)[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), reduction="none")
        ce = ce.view(len(ids), -1).mean(1).cpu()
    else:
        with edited(adapter, edits):
            act = adapter.run([site], input_ids=ids)[site]
        ce = None
    x = act[torch.arange(len(ids), device=act.device), pos.to(act.device)]  # [B, d]
    return encode_cpu(sae, x).gather(1, feat[:, None])[:, 0].float(), ce


def _nanmean(x: Tensor) -> float | None:
    x = x[~x.isnan()]
    return float(x.double().mean()) if len(x) else None


def _stats(relative: Tensor, deactivated: Tensor) -> dict:
    return {"count": len(relative), "mean_relative": _nanmean(relative),
            "fraction_deactivated": float(deactivated.double().mean()) if len(relative) else None}


def _relative(new: Tensor, old: Tensor) -> Tensor:
    return torch.where(old != 0, (new - old) / old, torch.full_like(old, float("nan")))


@dataclass
class DeactivationResult:
    """One row per (event, role) rescaled: `event, slot, latent [M]` (the event, the role's index
    in :data:`ROLES` and the predecessor latent rescaled),
    `z_old, z_new [M]` (f unedited and edited, same forward rows), `groups` the event's group,
    `alone [M]` whether that predecessor was the event's only active top-1."""

    method: str
    r: float
    event: Tensor
    slot: Tensor
    latent: Tensor
    z_old: Tensor
    z_new: Tensor
    groups: list[str]
    alone: Tensor

    @property
    def delta(self) -> Tensor:
        return self.z_new - self.z_old

    @property
    def relative(self) -> Tensor:
        """`delta / z_old` (nan where z_old is 0 in the unedited forward)."""
        return _relative(self.z_new, self.z_old)

    @property
    def deactivated(self) -> Tensor:
        return self.z_new == 0

    def summary(self) -> dict:
        rel, off = self.relative, self.deactivated
        groups = torch.tensor([GROUPS.index(g) for g in self.groups], dtype=torch.long)
        by_pred = {}
        for s, role in enumerate(ROLES):
            m = self.slot == s
            if m.any():
                by_pred[role.upper()] = {"alone": _stats(rel[m & self.alone], off[m & self.alone]),
                                          "with_others": _stats(rel[m & ~self.alone], off[m & ~self.alone])}
        return {"method": self.method, "r": self.r, **_stats(rel, off),
                "groups": {g: _stats(rel[groups == j], off[groups == j]) for j, g in enumerate(GROUPS)
                           if (groups == j).any()},
                "alone": _stats(rel[self.alone], off[self.alone]),
                "with_others": _stats(rel[~self.alone], off[~self.alone]), "by_predecessor": by_pred}

    def record(self) -> dict:
        return {"summary": self.summary(), "rows": [
            {"event": int(e), "predecessor": ROLES[int(s)], "latent": int(p), "z_old": float(a), "z_new": float(b),
             "group": g, "alone": bool(al)}
            for e, s, p, a, b, g, al in zip(self.event, self.slot, self.latent, self.z_old, self.z_new, self.groups,
                                            self.alone)]}


@torch.no_grad()
def deactivate(flow: FlowSet, adapter, contexts, events: Events, *, r: float = 0.0, method: str = "top1",
               batch_size: int = 16) -> DeactivationResult:
    """Rescale one predecessor per row by `r` (see the module docstring); rows of one layer and
    role run `batch_size` at a time, each row its event's context with its own latent edited."""
    if method not in METHODS:
        raise FeatoptError(f"deactivation method {method!r} is not known: allowed are {', '.join(METHODS)}.")
    r = _check_r(r)
    contexts = check_token_contexts(adapter, contexts, batch_size)
    check_events(events, contexts)
    latents = events.top1 if method == "top1" else events.random
    ev, slot = (events.active & (latents >= 0)).nonzero(as_tuple=True)
    lat = latents[ev, slot]
    z_old, z_new = torch.zeros(len(ev)), torch.zeros(len(ev))
    for L in events.layer[ev].unique().tolist():
        for s, role in enumerate(ROLES):
            rows = ((events.layer[ev] == L) & (slot == s)).nonzero()[:, 0]
            if not len(rows):  # torch.split of an empty tensor still yields one empty chunk
                continue
            key = predecessor_key(L, role)
            for c in rows.split(batch_size):
                e = ev[c]
                ids, pos, feat = contexts[events.context[e]], events.position[e], events.feature[e]
                edit = latent_edits(flow[key], lat[c][:, None], r)
                z_old[c] = _read(adapter, flow, L, ids, pos, feat, [])[0]
                z_new[c] = _read(adapter, flow, L, ids, pos, feat, edit)[0]
    groups = events.groups()
    return DeactivationResult(method, r, ev, slot, lat, z_old, z_new, [groups[int(e)] for e in ev],
                              events.active[ev].sum(1) == 1)


# ----------------------------------------------------------------------- r sweep
@dataclass
class SweepResult:
    """All active top-1 predecessors of each event rescaled together, for each r in `rs [R]`:
    `event [M]` the events with at least one, `z_old [M]`, `z_new [R, M]`, and the full model's
    mean next-token loss of the event's context `loss_old [M]`, `loss_new [R, M]`."""

    rs: list[float]
    event: Tensor
    z_old: Tensor
    z_new: Tensor
    loss_old: Tensor
    loss_new: Tensor

    @property
    def relative(self) -> Tensor:
        return _relative(self.z_new, self.z_old)

    @property
    def loss_relative(self) -> Tensor:
        """`(L_new - L_old) / L_old` `[R, M]`."""
        return (self.loss_new - self.loss_old) / self.loss_old

    def summary(self) -> dict:
        rel, off, loss = self.relative, self.z_new == 0, self.loss_relative
        return {"events": len(self.event), "points": [
            {"r": r, **_stats(rel[j], off[j]), "mean_loss_relative": _nanmean(loss[j])} for j, r in enumerate(self.rs)]}

    def record(self) -> dict:
        return {"summary": self.summary(), "event": self.event.tolist(), "z_old": self.z_old.tolist(),
                "z_new": self.z_new.tolist(), "loss_old": self.loss_old.tolist(), "loss_new": self.loss_new.tolist()}


@torch.no_grad()
def r_sweep(flow: FlowSet, adapter, contexts, events: Events, rs: Sequence[float], *,
            batch_size: int = 16) -> SweepResult:
    """For each r, every active top-1 predecessor of each event rescaled by r at once (rows
    whose predecessor is inactive get r = 1, an exact no-op); full forwards, for the loss."""
    rs = [_check_r(r) for r in rs]
    if not rs:
        raise FeatoptError("no value of r given: give one or more finite rescaling coefficients.")
    contexts = check_token_contexts(adapter, contexts, batch_size)
    check_events(events, contexts)
    sel = events.active.any(1).nonzero()[:, 0]
    z_old, loss_old = torch.zeros(len(sel)), torch.zeros(len(sel))
    z_new, loss_new = torch.zeros(len(rs), len(sel)), torch.zeros(len(rs), len(sel))
    for L in events.layer[sel].unique().tolist():
        for c in (events.layer[sel] == L).nonzero()[:, 0].split(batch_size):
            e = sel[c]
            ids, pos, feat = contexts[events.context[e]], events.position[e], events.feature[e]
            z_old[c], loss_old[c] = _read(adapter, flow, L, ids, pos, feat, [], loss=True)
            for j, r in enumerate(rs):
                edits = []
                for s, role in enumerate(ROLES):
                    key = predecessor_key(L, role)
                    if key in flow and events.active[e, s].any():
                        factor = torch.where(events.active[e, s], r, 1.0).double()
                        edits += latent_edits(flow[key], events.top1[e, s].clamp(min=0)[:, None], factor)
                z_new[j, c], loss_new[j, c] = _read(adapter, flow, L, ids, pos, feat, edits, loss=True)
    return SweepResult(rs, sel, z_old, z_new, loss_old, loss_new)
