"""Deactivation: testing the links of the data-free matching causally (document 003, §5.1-5.2).

An **event** is a feature f of `L/res` firing (`z_f > 0`) at one (context, position). Its
predecessor SAEs are `L-1/res`, `L/mlp` and `L/att` (the roles of
:data:`~featopt.feature_flow.groups.ROLES`); in each, f's top-1 match (largest decoder cosine) may fire
at that position too, and which of them do names the event's **group** (`"From RES & MLP"`, ...,
:data:`~featopt.feature_flow.groups.GROUPS`), as in :mod:`featopt.feature_flow.groups`.

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
from featopt.feature_flow.groups import (GROUPS, ROLES, check_contexts, group_index, predecessor_key, predecessors,
                                 target_layers)
from featopt.feature_flow.saes import FlowSet, Node, key_site
from featopt.interventions.edits import Edit, edited, scale_latents

# Which predecessor is rescaled: the top-1 match, or a random firing latent of the same SAE
# (not groups.METHODS' fixed random latent per feature, though the names are the same).
METHODS = ("top1", "random")


# ----------------------------------------------------------------------- checks
def _check_contexts(adapter, contexts, batch_size: int, skip_first: int = 0) -> Tensor:
    """`contexts [N, T]` as long, checked by :func:`~featopt.feature_flow.groups.check_contexts`, with
    `T >= 2` (the loss needs a next token) and every id in the model's vocabulary."""
    c = check_contexts(torch.as_tensor(contexts), batch_size, skip_first)
    if c.shape[1] < 2:
        raise FeatoptError(f"contexts must have at least 2 tokens each, got {c.shape[1]}.")
    if int(c.min()) < 0 or int(c.max()) >= adapter.vocab_size:
        raise FeatoptError(f"context token ids must lie in 0-{adapter.vocab_size - 1}, the vocabulary of "
                           f"{adapter.name!r}, got {int(c.min())}-{int(c.max())}.")
    return c


def _check_r(r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
        raise FeatoptError(f"the rescaling coefficient r must be a finite number, got {r!r}.")
    return float(r)


def top1_table(flow: FlowSet, layer: int) -> Tensor:
    """`[d_sae of layer/res, 3]` long: each feature's top-1 match per role of :data:`ROLES`
    (:func:`~featopt.feature_flow.groups.predecessors`), -1 where that SAE is absent."""
    out = torch.full((flow[(layer, "res")].d_sae, len(ROLES)), -1, dtype=torch.long)
    for role, (index, _) in predecessors(flow, layer, method="top1").items():
        out[:, ROLES.index(role)] = index
    return out


def _encode(sae, act: Tensor) -> Tensor:
    return sae.encode(act.to(sae.W_enc.device)).cpu()


# ----------------------------------------------------------------------- events
@dataclass
class Events:
    """`E` firing events of `L/res` features, sorted by (context, layer, position, feature).

    `context, position, layer, feature [E]` long; `z_old [E]` the feature's activation there.
    Per role (:data:`ROLES`): `top1 [E, 3]` the feature's top-1 match in that SAE (-1: SAE
    absent), `active [E, 3]` whether it fires at the event's position, `random [E, 3]` a seeded
    random latent of that SAE firing there that is not the top-1 (-1: none). `population`: the
    number of events seen, of which these are a uniform random sample.
    """

    context: Tensor
    position: Tensor
    layer: Tensor
    feature: Tensor
    z_old: Tensor
    top1: Tensor
    active: Tensor
    random: Tensor
    seed: int = 0
    population: int = 0

    def __len__(self) -> int:
        return len(self.feature)

    def groups(self) -> list[str]:
        """Each event's group name (of :data:`GROUPS`)."""
        return [GROUPS[i] for i in group_index(self.active).tolist()]

    def take(self, index) -> "Events":
        """The events at `index` (a list or long tensor), in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Events(**{f: getattr(self, f)[index] for f in _FIELDS}, seed=self.seed, population=self.population)

    def node(self, i: int) -> Node:
        return Node(int(self.layer[i]), "res", int(self.feature[i]))

    def record(self) -> dict:
        groups = self.groups()
        return {"seed": self.seed, "population": self.population, "events": [
            {"context": int(self.context[i]), "position": int(self.position[i]), "feature": str(self.node(i)),
             "z_old": float(self.z_old[i]), "group": groups[i],
             **{f"top1_{role}": int(self.top1[i, j]) for j, role in enumerate(ROLES)},
             **{f"random_{role}": int(self.random[i, j]) for j, role in enumerate(ROLES)}} for i in range(len(self))]}


_FIELDS = ("context", "position", "layer", "feature", "z_old", "top1", "active", "random")


@torch.no_grad()
def sample_events(flow: FlowSet, adapter, contexts, *, layers=None, max_events: int = 200, skip_first: int = 1,
                  seed: int = 0, batch_size: int = 8) -> Events:
    """Up to `max_events` firing events of the `L/res` features, uniform over all of them.

    One forward per batch reads every needed site. Each event gets a random key (and three
    uniforms for its random predecessors) from a generator seeded by `(seed, context)` in a
    fixed order, and the events of smallest key are kept: the sample does not depend on
    `batch_size`. Positions before `skip_first` (the first token's attention sink) are skipped.
    """
    contexts = _check_contexts(adapter, contexts, batch_size, skip_first)
    layers = target_layers(flow, layers)
    if not layers:
        raise FeatoptError(f"no layer given: choose among {target_layers(flow)}.")
    if int(max_events) < 1:
        raise FeatoptError(f"max_events must be at least 1, got {max_events}.")
    tops = {L: top1_table(flow, L) for L in layers}
    keys = sorted({key for L in layers for key in [(L, "res"), *flow.predecessors((L, "res"))]})
    kept: dict[str, Tensor] = {"key": torch.empty(0, dtype=torch.float64)}
    population = 0
    for b0 in range(0, len(contexts), batch_size):
        ids = contexts[b0:b0 + batch_size]
        acts = adapter.run([key_site(k) for k in keys], input_ids=ids)
        fired = {}  # only the firing latents are kept: one dense [B, T, d_sae] at a time
        for L in layers:
            z = _encode(flow[(L, "res")], acts[key_site((L, "res"))][:, skip_first:])
            nz = (z > 0).nonzero()  # [n, 3] (row, position - skip_first, feature), row-major
            fired[L] = (nz, z[nz[:, 0], nz[:, 1], nz[:, 2]].float())
        rows, values, draws = [], [], []
        for i in range(len(ids)):
            n = 0
            for L in layers:
                nz, z = fired[L]
                m = nz[:, 0] == i
                rows.append(torch.stack([nz[m, 0] + b0, nz[m, 1] + skip_first, torch.full_like(nz[m, 0], L),
                                         nz[m, 2]], 1))
                values.append(z[m])
                n += int(m.sum())
            g = torch.Generator().manual_seed((int(seed) * 1_000_003 + b0 + i) % 2**63)
            draws.append(torch.rand(n, 1 + len(ROLES), generator=g, dtype=torch.float64))
        rows, values, draws = torch.cat(rows), torch.cat(values), torch.cat(draws)
        population += len(rows)
        n_kept = len(kept["key"])
        order = torch.cat([kept["key"], draws[:, 0]]).sort(stable=True).indices[:max_events]
        new = order[order >= n_kept] - n_kept
        fresh = _fill(flow, acts, tops, rows[new], values[new], draws[new, 1:], b0)
        fresh["key"] = draws[new, 0]
        old = order[order < n_kept]
        kept = {f: torch.cat([kept[f][old], fresh[f]]) if n_kept else fresh[f] for f in fresh}
    if population == 0:
        raise FeatoptError(f"no feature of the residual SAEs at layers {layers} fires in the contexts after position "
                           f"{skip_first}: give more or longer contexts.")
    sort_by = ("context", "layer", "position", "feature")
    order = sorted(range(len(kept["key"])), key=lambda j: tuple(int(kept[f][j]) for f in sort_by))
    return Events(**{f: kept[f][order] for f in _FIELDS}, seed=int(seed), population=population)


def _fill(flow, acts, tops, rows: Tensor, z_old: Tensor, u: Tensor, b0: int) -> dict[str, Tensor]:
    """The fields of new events `rows [n, 4]` (context, position, layer, feature), `z_old [n]`,
    from the batch's activations `acts`; `u [n, 3]` picks each role's random predecessor."""
    n = len(rows)
    out = {"context": rows[:, 0], "position": rows[:, 1], "layer": rows[:, 2], "feature": rows[:, 3],
           "z_old": z_old, "top1": torch.full((n, 3), -1, dtype=torch.long),
           "active": torch.zeros(n, 3, dtype=torch.bool), "random": torch.full((n, 3), -1, dtype=torch.long)}
    for L in rows[:, 2].unique().tolist():
        m = rows[:, 2] == L
        i, t, f = rows[m, 0] - b0, rows[m, 1], rows[m, 3]
        top = tops[L][f]
        out["top1"][m] = top
        active, random = torch.zeros(len(f), 3, dtype=torch.bool), torch.full((len(f), 3), -1, dtype=torch.long)
        for s, role in enumerate(ROLES):
            key = predecessor_key(L, role)
            if key not in flow:
                continue
            act = acts[key_site(key)]
            fires = _encode(flow[key], act[i.to(act.device), t.to(act.device)]) > 0  # [m, d_pred]
            active[:, s] = fires.gather(1, top[:, s, None])[:, 0]
            eligible = fires.scatter(1, top[:, s, None], False)  # firing, not the top-1
            count = eligible.sum(1)
            pick = (u[m, s] * count).floor().long().clamp(max=(count - 1).clamp(min=0))
            choice = ((eligible.cumsum(1) == (pick + 1)[:, None]) & eligible).float().argmax(1)
            random[:, s] = torch.where(count > 0, choice, -1)
        out["active"][m], out["random"][m] = active, random
    return out


def _check_events(events: Events, contexts: Tensor) -> None:
    if len(events) and int(events.context.max()) >= len(contexts):
        raise FeatoptError(f"the events refer to context {int(events.context.max())} but {len(contexts)} contexts were "
                           "given: pass the contexts the events were sampled from.")


# ----------------------------------------------------------------------- measuring
def _read(adapter, flow, layer: int, ids: Tensor, pos: Tensor, feat: Tensor, edits: list[Edit],
          loss: bool = False) -> tuple[Tensor, Tensor | None]:
    """f's activation `[B]` at `(row, pos)` under `edits` (forward stops at `layer/res`), and with
    `loss` the full model's mean next-token cross-entropy of each row `[B]`."""
    site, sae = key_site((layer, "res")), flow[(layer, "res")]
    if loss:
        with edited(adapter, edits), adapter.hooks(read=[site]) as captured:
            logits = adapter.logits(ids)
        act = captured[site]
        target = ids.to(logits.device)[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), reduction="none")
        ce = ce.view(len(ids), -1).mean(1).cpu()
    else:
        act = adapter.run([site], input_ids=ids, write={e.site: e.fn for e in edits})[site]
        ce = None
    x = act[torch.arange(len(ids), device=act.device), pos.to(act.device)]  # [B, d]
    return _encode(sae, x).gather(1, feat[:, None])[:, 0].float(), ce


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
    contexts = _check_contexts(adapter, contexts, batch_size)
    _check_events(events, contexts)
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
                edit = Edit(key_site(key), scale_latents(flow[key], lat[c][:, None], r))
                z_old[c] = _read(adapter, flow, L, ids, pos, feat, [])[0]
                z_new[c] = _read(adapter, flow, L, ids, pos, feat, [edit])[0]
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
    contexts = _check_contexts(adapter, contexts, batch_size)
    _check_events(events, contexts)
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
                        edits.append(Edit(key_site(key), scale_latents(
                            flow[key], events.top1[e, s].clamp(min=0)[:, None], factor)))
                z_new[j, c], loss_new[j, c] = _read(adapter, flow, L, ids, pos, feat, edits, loss=True)
    return SweepResult(rs, sel, z_old, z_new, loss_old, loss_new)
