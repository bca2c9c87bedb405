"""Where active features come from: predecessor groups over a corpus (document 003, Figures 5,
12, 13 and 15a).

A feature `f` of the residual SAE `L/res` has one top-1 predecessor (by decoder cosine) in each
of its predecessor SAEs present: `p_R(f)` in `L-1/res`, `p_M(f)` in `L/mlp`, `p_A(f)` in
`L/att`. At every token where `f` fires (`z_f > 0`), the predecessors firing at the same token
name its **group**: bits R, M, A (an absent SAE, or a predecessor scoring below `min_score`,
never fires) give one of the eight :data:`GROUPS`. Counting these **events** per layer gives
Figure 5; Figure 13 follows a feature one layer on: when `f` at `L+1` is in group B and its RES
predecessor `p_R(f)` (a feature of `L/res`) fires at that token, `p`'s own group A at layer L
there counts at `[A, B]`.

The `"random"` method (Figure 15a's baseline) replaces each top-1 predecessor by a fixed random
latent of the predecessor SAE, drawn per target feature with
`torch.randint(d_sae_pred, (d_sae_target,), generator=Generator().manual_seed(seed * 1_000_003
+ 3 * L + j))`, `j` = 0, 1, 2 for RES, MLP, ATT; `min_score` then applies to that latent's cosine.

Everything is counted on the firing entries only (`~k` per token for a topk SAE): no dense
`[tokens, d_sae]` integer tensor is made, and there is no Python loop over tokens or features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.feature_flow.match import match
from featopt.feature_flow.saes import FlowSet, choose_layers

GROUPS = ("From RES", "From MLP", "From ATT", "From RES & MLP", "From RES & ATT", "From MLP & ATT",
          "From RES & MLP & ATT", "From nowhere")
METHODS = ("top1", "random")
ROLES = ("res", "mlp", "att")  # the bit of each role in a group code: 1, 2, 4
#: group code R + 2 M + 4 A -> index into GROUPS.
_CODE_TO_GROUP = torch.tensor([7, 0, 1, 3, 2, 4, 5, 6])


def predecessor_key(layer: int, role: str) -> tuple[int, str]:
    """The SAE of role `res`, `mlp` or `att` for a target `layer/res`."""
    return (layer - 1, "res") if role == "res" else (layer, role)


def group_index(active: Tensor) -> Tensor:
    """`active [..., 3]` bool (whether the RES, MLP and ATT predecessor fire) -> index into
    :data:`GROUPS` `[...]` long, on `active`'s device."""
    code = (active.long() << torch.arange(len(ROLES), device=active.device)).sum(-1)
    return _CODE_TO_GROUP.to(active.device)[code]


def check_contexts(contexts: Tensor, batch_size: int, skip_first: int) -> Tensor:
    """`contexts [N, T]` of token ids as long, with `0 <= skip_first < T` and `batch_size >= 1`."""
    if not isinstance(contexts, Tensor) or contexts.ndim != 2 or contexts.dtype.is_floating_point \
            or contexts.dtype == torch.bool or contexts.is_complex() or contexts.numel() == 0:
        shape = tuple(contexts.shape) if isinstance(contexts, Tensor) else type(contexts).__name__
        raise FeatoptError(f"contexts must be a non-empty 2-D tensor of token ids [N, T] (integer), got {shape}"
                           f"{' ' + str(contexts.dtype) if isinstance(contexts, Tensor) else ''}.")
    if batch_size < 1:
        raise FeatoptError(f"batch_size must be at least 1, got {batch_size}.")
    if not 0 <= skip_first < contexts.shape[1]:
        raise FeatoptError(f"skip_first must be in [0, {contexts.shape[1]}) for contexts of {contexts.shape[1]} tokens, "
                           f"got {skip_first}.")
    return contexts.long()


def target_layers(flow: FlowSet, layers=None) -> list[int]:
    """Layers `L` with an `L/res` SAE and at least one predecessor SAE: all such, or those given."""
    usable = [layer for layer, module in flow.keys() if module == "res" and flow.predecessors((layer, "res"))]
    return choose_layers(usable, layers,
                         none=f"no residual SAE with a predecessor among {flow.describe_keys()}: groups need an L/res "
                              "SAE and one of L-1/res, L/mlp, L/att.",
                         why=lambda layer: f"layer {layer} has no residual SAE with a predecessor SAE (given: {flow.describe_keys()})")


def predecessors(flow: FlowSet, layer: int, *, method: str = "top1", seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Per role present (`res`, `mlp`, `att`): `(index [d_sae], score [d_sae])`, each feature of
    `layer/res`'s predecessor latent and their decoder cosine (see the module docstring)."""
    if method not in METHODS:
        raise FeatoptError(f"method {method!r} is not known: allowed are {', '.join(METHODS)}.")
    target = (layer, "res")
    out = {}
    for j, role in enumerate(ROLES):
        cand = predecessor_key(layer, role)
        if cand not in flow:
            continue
        if method == "top1":
            m = match(flow, target, cand, k=1)
            out[role] = (m.indices[:, 0].cpu(), m.scores[:, 0].float().cpu())
            continue
        d_t, d_c = flow[target].d_sae, flow[cand].d_sae
        g = torch.Generator().manual_seed(seed * 1_000_003 + 3 * layer + j)
        index = torch.randint(d_c, (d_t,), generator=g)
        A, B = flow[target].W_dec.detach().float().cpu(), flow[cand].W_dec.detach().float().cpu()[index]
        score = torch.nn.functional.cosine_similarity(A, B, dim=1, eps=1e-12)
        out[role] = (index, score)
    return out


@dataclass
class GroupStats:
    """Events per predecessor group.

    `counts {L: [8] long}` events per group; `feature_counts {L: [d_sae, 8] long}` the same per
    target feature; `transitions {(L, L+1): [8, 8] long}` Figure 13's counts, row = group at L,
    column = group at L+1; `tokens` the tokens counted (after `skip_first`).
    """

    layers: list[int]
    counts: dict[int, Tensor]
    feature_counts: dict[int, Tensor]
    transitions: dict[tuple[int, int], Tensor]
    tokens: int
    settings: dict = field(default_factory=dict)

    @property
    def shares(self) -> dict[int, Tensor]:
        """Per layer, the fraction of events in each group `[8]` (zeros without events)."""
        return {layer: c.double() / max(int(c.sum()), 1) for layer, c in self.counts.items()}

    @property
    def feature_shares(self) -> dict[int, Tensor]:
        """Per layer, each group's share averaged over the features that fired (each feature's
        events normalized first, so every active feature weighs the same) `[8]`."""
        out = {}
        for layer, fc in self.feature_counts.items():
            total = fc.sum(1, keepdim=True)
            active = total[:, 0] > 0
            out[layer] = (fc[active].double() / total[active]).mean(0) if active.any() else torch.zeros(8, dtype=torch.float64)
        return out

    @property
    def transition_probs(self) -> dict[tuple[int, int], Tensor]:
        """Row-normalized :attr:`transitions` (rows without events stay zero)."""
        return {pair: _row_normalize(t) for pair, t in self.transitions.items()}

    def total_transitions(self) -> Tensor:
        """`[8, 8]` counts summed over all layer pairs."""
        return sum(self.transitions.values(), torch.zeros(8, 8, dtype=torch.long))

    def record(self) -> dict:
        from featopt.results import versions

        shares, fshares = self.shares, self.feature_shares
        layers = {str(layer): {"counts": self.counts[layer].tolist(), "shares": shares[layer].tolist(),
                               "feature_shares": fshares[layer].tolist(), "events": int(self.counts[layer].sum()),
                               "active_features": int((self.feature_counts[layer].sum(1) > 0).sum())}
                  for layer in self.layers}
        trans = {f"{a}->{b}": {"counts": t.tolist(), "probs": _row_normalize(t).tolist()}
                 for (a, b), t in self.transitions.items()}
        total = self.total_transitions()
        return {"format": "featopt-flow-groups", "groups": list(GROUPS), "tokens": self.tokens, "layers": layers,
                "transitions": trans, "transitions_total": {"counts": total.tolist(), "probs": _row_normalize(total).tolist()},
                "settings": dict(self.settings), "versions": versions()}


def _row_normalize(t: Tensor) -> Tensor:
    return t.double() / t.sum(1, keepdim=True).clamp_min(1).double()


@torch.no_grad()
def group_counts(flow: FlowSet, adapter, contexts: Tensor, *, layers=None, batch_size: int = 8, method: str = "top1",
                 seed: int = 0, skip_first: int = 1, min_score: float | None = None, progress: bool = True) -> GroupStats:
    """Count predecessor-group events of every feature of each target `L/res` over `contexts
    [N, T]`, one forward per batch of `batch_size` contexts (stopped at the deepest site read).

    `layers`: target layers (default all with an `L/res` SAE and a predecessor SAE); the first
    `skip_first` positions of each context are left out (the attention sink).
    """
    if method not in METHODS:
        raise FeatoptError(f"method {method!r} is not known: allowed are {', '.join(METHODS)}.")
    contexts = check_contexts(contexts, batch_size, skip_first)
    layers = target_layers(flow, layers)
    flow.check_model(adapter)
    preds = {}
    for layer in layers:
        table = predecessors(flow, layer, method=method, seed=seed)
        # An unmatched predecessor (score below min_score) gets index -1: it never fires.
        preds[layer] = {role: torch.where(score >= min_score, index, -1) if min_score is not None else index
                        for role, (index, score) in table.items()}
    keys = sorted({(layer, "res") for layer in layers}
                  | {predecessor_key(layer, role) for layer in layers for role in preds[layer]})
    sites = {key: flow.read_site(key) for key in keys}
    device = adapter.device
    preds = {layer: {role: idx.to(device) for role, idx in table.items()} for layer, table in preds.items()}
    feature_counts = {layer: torch.zeros(flow[(layer, "res")].d_sae * 8, dtype=torch.long, device=device) for layer in layers}
    pairs = [(layer, layer + 1) for layer in layers if layer + 1 in layers]
    transitions = {pair: torch.zeros(64, dtype=torch.long, device=device) for pair in pairs}

    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(contexts), batch_size), desc="groups", disable=not progress, leave=False):
        acts = adapter.run(list(sites.values()), input_ids=contexts[start:start + batch_size].to(device))
        # z [tokens, d_sae] per SAE, positions after skip_first only.
        z = {key: flow[key].encode(acts[site][:, skip_first:]).reshape(-1, flow[key].d_sae) for key, site in sites.items()}

        def active_of(layer: int, token: Tensor, feature: Tensor) -> Tensor:
            """`[E, 3]` bool: whether each role's predecessor of features `feature [E]` of
            `layer/res` fires at tokens `token [E]` (False where the role's SAE is absent)."""
            active = torch.zeros(len(feature), len(ROLES), dtype=torch.bool, device=feature.device)
            for j, role in enumerate(ROLES):
                if role in preds[layer]:
                    p = preds[layer][role][feature]
                    active[:, j] = (p >= 0) & (z[predecessor_key(layer, role)][token, p.clamp_min(0)] > 0)
            return active

        groups = {}
        for layer in layers:
            token, feature = (z[(layer, "res")] > 0).nonzero(as_tuple=True)
            active = active_of(layer, token, feature)
            group = group_index(active)
            feature_counts[layer] += torch.bincount(feature * 8 + group, minlength=feature_counts[layer].numel())
            groups[layer] = (token, feature, active, group)
        for low, high in pairs:
            token, feature, active, group = groups[high]
            carried = active[:, 0]  # the RES predecessor fires: follow it one layer down
            p = preds[high]["res"][feature[carried]]
            before = group_index(active_of(low, token[carried], p))
            transitions[(low, high)] += torch.bincount(before * 8 + group[carried], minlength=64)

    feature_counts = {layer: fc.view(-1, 8).cpu() for layer, fc in feature_counts.items()}
    settings = {"method": method, "seed": seed, "skip_first": skip_first, "min_score": min_score,
                "batch_size": batch_size, "contexts": list(contexts.shape), "model": adapter.name,
                "saes": {f"{a}/{b}": flow[(a, b)].describe() for a, b in keys}}
    return GroupStats(layers=layers, counts={layer: fc.sum(0) for layer, fc in feature_counts.items()},
                      feature_counts=feature_counts, transitions={pair: t.view(8, 8).cpu() for pair, t in transitions.items()},
                      tokens=len(contexts) * (contexts.shape[1] - skip_first), settings=settings)


def format_groups(stats: GroupStats) -> str:
    """Plain-text table: one row per group, one column per layer (share of events, %)."""
    shares = stats.shares
    width = max(len(g) for g in GROUPS)
    lines = [f"{'group':<{width}}  " + "  ".join(f"{'L' + str(layer):>7}" for layer in stats.layers)]
    for i, name in enumerate(GROUPS):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * float(shares[layer][i]):6.1f}%" for layer in stats.layers))
    lines.append(f"{'events':<{width}}  " + "  ".join(f"{int(stats.counts[layer].sum()):>7}" for layer in stats.layers))
    lines.append(f"{stats.tokens} tokens, method {stats.settings.get('method', 'top1')}")
    if stats.transitions:
        probs = _row_normalize(stats.total_transitions())
        lines += ["", "transitions (row: group at L, column: group at L+1; all layer pairs)",
                  " " * (width + 2) + " ".join(f"{j:>5}" for j in range(8))]
        lines += [f"{name:<{width}}  " + " ".join(f"{float(v):5.2f}" for v in probs[i]) for i, name in enumerate(GROUPS)]
        lines.append("columns: " + ", ".join(f"{j} {name}" for j, name in enumerate(GROUPS)))
    return "\n".join(lines)


def plot_group_shares(stats: GroupStats, path: str | Path) -> Path:
    """Figure 5: the share of each group's events, stacked, one bar per layer."""
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(stats.layers) + 3), 4))
    x = list(range(len(stats.layers)))
    bottom = [0.0] * len(x)
    for i, name in enumerate(GROUPS):
        heights = [100 * float(stats.shares[layer][i]) for layer in stats.layers]
        ax.bar(x, heights, bottom=bottom, label=name, color=f"C{i}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(x, [str(layer) for layer in stats.layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("events (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    ax.set_title(f"predecessor groups ({stats.settings.get('method', 'top1')}, {stats.tokens} tokens)", fontsize=9)
    return save_figure(fig, plt, path)


def plot_transitions(stats: GroupStats, path: str | Path) -> Path:
    """Figure 13: P(group B at L+1 | group A at L), rows A, all layer pairs together, numbers in cells."""
    from featopt.plots import pyplot, save_figure

    if not stats.transitions:
        raise FeatoptError("no transitions to plot: they need two consecutive target layers (L/res and L+1/res).")
    plt = pyplot()
    probs = _row_normalize(stats.total_transitions()).numpy()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ax.imshow(probs, cmap="Blues", vmin=0, vmax=1)
    for i in range(8):
        for j in range(8):
            ax.text(j, i, f"{probs[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if probs[i, j] > 0.5 else "black")
    ax.set_xticks(range(8), GROUPS, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(8), GROUPS, fontsize=7)
    ax.set_xlabel("group at layer L+1")
    ax.set_ylabel("group at layer L")
    ax.set_title("group transitions, row-normalized", fontsize=9)
    return save_figure(fig, plt, path)
