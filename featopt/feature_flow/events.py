"""Firing events of the residual SAEs' features, and their predecessors (document 003, §5.1).

An **event** is a feature f of `L/res` firing (`z_f > 0`) at one (context, position). Its
predecessor SAEs are `L-1/res`, `L/mlp` and `L/att` (the roles of
:data:`~featopt.feature_flow.groups.ROLES`); in each, f's top-1 match (largest decoder cosine) may fire
at that position too, and which of them do names the event's **group** (`"From RES & MLP"`, ...,
:data:`~featopt.feature_flow.groups.GROUPS`), as in :mod:`featopt.feature_flow.groups`.
:func:`sample_events` draws a uniform sample of them over a corpus, with a seeded random firing
latent per role beside each top-1 (the baseline of :mod:`featopt.feature_flow.deactivate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.feature_flow.groups import (GROUPS, ROLES, check_contexts, group_index, predecessor_key, predecessors,
                                         target_layers)
from featopt.feature_flow.saes import FlowSet, Node


# ----------------------------------------------------------------------- checks
def check_token_contexts(adapter, contexts, batch_size: int, skip_first: int = 0) -> Tensor:
    """`contexts [N, T]` as long, checked by :func:`~featopt.feature_flow.groups.check_contexts`, with
    `T >= 2` (the loss needs a next token) and every id in the model's vocabulary."""
    c = check_contexts(torch.as_tensor(contexts), batch_size, skip_first)
    if c.shape[1] < 2:
        raise FeatoptError(f"contexts must have at least 2 tokens each, got {c.shape[1]}.")
    if int(c.min()) < 0 or int(c.max()) >= adapter.vocab_size:
        raise FeatoptError(f"context token ids must lie in 0-{adapter.vocab_size - 1}, the vocabulary of "
                           f"{adapter.name!r}, got {int(c.min())}-{int(c.max())}.")
    return c


def top1_table(flow: FlowSet, layer: int) -> Tensor:
    """`[d_sae of layer/res, 3]` long: each feature's top-1 match per role of :data:`ROLES`
    (:func:`~featopt.feature_flow.groups.predecessors`), -1 where that SAE is absent."""
    out = torch.full((flow[(layer, "res")].d_sae, len(ROLES)), -1, dtype=torch.long)
    for role, (index, _) in predecessors(flow, layer, method="top1").items():
        out[:, ROLES.index(role)] = index
    return out


def encode_cpu(sae, act: Tensor) -> Tensor:
    """`sae`'s latents of `act`, computed on the SAE's device, returned on the CPU."""
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
    contexts = check_token_contexts(adapter, contexts, batch_size, skip_first)
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
        acts = adapter.run([flow.read_site(k) for k in keys], input_ids=ids)
        fired = {}  # only the firing latents are kept: one dense [B, T, d_sae] at a time
        for L in layers:
            z = encode_cpu(flow[(L, "res")], acts[flow.read_site((L, "res"))][:, skip_first:])
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
            act = acts[flow.read_site(key)]
            fires = encode_cpu(flow[key], act[i.to(act.device), t.to(act.device)]) > 0  # [m, d_pred]
            active[:, s] = fires.gather(1, top[:, s, None])[:, 0]
            eligible = fires.scatter(1, top[:, s, None], False)  # firing, not the top-1
            count = eligible.sum(1)
            pick = (u[m, s] * count).floor().long().clamp(max=(count - 1).clamp(min=0))
            choice = ((eligible.cumsum(1) == (pick + 1)[:, None]) & eligible).float().argmax(1)
            random[:, s] = torch.where(count > 0, choice, -1)
        out["active"][m], out["random"][m] = active, random
    return out


def check_events(events: Events, contexts: Tensor) -> None:
    """The events were sampled from (at least as many) `contexts` as given."""
    if len(events) and int(events.context.max()) >= len(contexts):
        raise FeatoptError(f"the events refer to context {int(events.context.max())} but {len(contexts)} contexts were "
                           "given: pass the contexts the events were sampled from.")
