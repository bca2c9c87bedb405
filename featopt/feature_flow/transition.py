"""Consecutive residual SAEs as a transcoder: `z_{t+1} ≈ z_t T` (document 003, Figures 21-22,
Appendix F).

For SAEs at `t = L/res` and `t+1 = L+1/res`, `T [d_sae_t, d_sae_t1]` is the document's
`I_{x>0} top_1 W_dec(t)^T W_dec(t+1)`: column `j` (a latent of `t+1`) holds one entry, at its
top-1 match `i_j` in `t` by decoder cosine, equal to that cosine when it is positive and 0
otherwise. It is stored as `(rows [d_sae_t1], values [d_sae_t1])`, never dense, so the
prediction of latent `j` is `z_t[:, rows[j]] * values[j]`.

The explained variance `EV = 1 - sum((Z1 - Z0 T)^2) / sum((Z1 - mean(Z1))^2)`, over tokens and
latents, with `mean` each latent's mean over the tokens, is reported for three variants:

- `cosine`: T as above;
- `fitted`: T's sparsity pattern with each column's coefficient the least-squares scale
  `a_j = <z_t[:, i_j], z_{t+1}[:, j]> / <z_t[:, i_j], z_t[:, i_j]>` (0 when `z_t[:, i_j]` is all 0);
- `permutation` (baseline): `fitted` with each `j` given a random predecessor instead of `i_j`:
  `torch.randperm(d_sae_t, generator=Generator().manual_seed(seed * 1_000_003 + L))[:d_sae_t1]`
  (`torch.randint(d_sae_t, (d_sae_t1,), ...)` with that generator when `d_sae_t1 > d_sae_t`).

Coefficients are fitted on the first `N // 2` contexts and every variant's EV is measured on
the rest, so the three are comparable; `cosine_all` is the cosine variant on all tokens. One
pass accumulates per-half sufficient statistics, all `O(d_sae)`: token counts, per latent of t+1
`sum z1`, `sum z1^2` and the cross products `sum z_t[:, i_j] z1_j` of both row choices, per
latent of t `sum z_t^2`. The sum of squared errors of column j with coefficient `c` is then
`sum z1_j^2 - 2 c sum z_t[:, i_j] z1_j + c^2 sum z_t[:, i_j]^2`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.feature_flow.groups import check_contexts
from featopt.feature_flow.match import top_matches
from featopt.feature_flow.saes import FlowSet, choose_layers

VARIANTS = ("cosine", "fitted", "permutation")


@torch.no_grad()
def transition_matrix(sae_t, sae_t1) -> tuple[Tensor, Tensor]:
    """T between SAEs `t` and `t+1` by columns: `(rows [d_sae_t1] long, values [d_sae_t1] float32)`,
    `T[rows[j], j] = values[j]` (the top-1 cosine, 0 when not positive), every other entry 0."""
    if sae_t.d_in != sae_t1.d_in:
        raise FeatoptError(f"the two SAEs read {sae_t.d_in}- and {sae_t1.d_in}-wide activations: a transition needs "
                           "SAEs of one model and width.")
    scores, index = top_matches(sae_t1.W_dec, sae_t.W_dec, k=1)
    return index[:, 0], scores[:, 0].float().clamp_min(0.0)


def permutation_rows(d_t: int, d_t1: int, layer: int, seed: int = 0) -> Tensor:
    """The permutation baseline's random predecessor of each latent of `t+1` `[d_t1]` (module docstring)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    if d_t1 <= d_t:
        return torch.randperm(d_t, generator=g)[:d_t1]
    return torch.randint(d_t, (d_t1,), generator=g)


def transition_layers(flow: FlowSet, layers=None) -> list[int]:
    """Layers `L` with both `L/res` and `L+1/res` SAEs: all such, or those given."""
    usable = [layer for layer, module in flow.keys() if module == "res" and (layer + 1, "res") in flow]
    return choose_layers(usable, layers,
                         none=f"no two consecutive residual SAEs among {flow.describe_keys()}: a transition needs "
                              "SAEs at L/res and L+1/res.",
                         why=lambda layer: f"layer {layer} has no pair of SAEs {layer}/res and {layer + 1}/res "
                                           f"(given: {flow.describe_keys()})")


@dataclass
class TransitionStats:
    """Explained variance per layer pair `(L, L+1)`: `ev[pair][variant]` for :data:`VARIANTS`
    (held-out half) and `cosine_all`; `positive[pair]` how many columns of T are nonzero;
    `tokens = (fit half, held-out half)`."""

    pairs: list[tuple[int, int]]
    ev: dict[tuple[int, int], dict[str, float]]
    positive: dict[tuple[int, int], int]
    tokens: tuple[int, int]
    settings: dict = field(default_factory=dict)

    def record(self) -> dict:
        from featopt.results import versions

        clean = lambda v: None if math.isnan(v) else v  # noqa: E731  (JSON has no NaN)
        return {"format": "featopt-flow-transition", "variants": [*VARIANTS, "cosine_all"],
                "tokens": {"fit": self.tokens[0], "eval": self.tokens[1]},
                "pairs": {f"{a}->{b}": {**{k: clean(v) for k, v in self.ev[(a, b)].items()},
                                        "positive_columns": self.positive[(a, b)]} for a, b in self.pairs},
                "settings": dict(self.settings), "versions": versions()}


def _new_sums(d_t: int, d_t1: int, device) -> dict[str, Tensor]:
    zeros = lambda d: torch.zeros(2, d, dtype=torch.float64, device=device)  # noqa: E731  (row = half)
    return {"n": torch.zeros(2, dtype=torch.float64, device=device), "s1": zeros(d_t1), "s11": zeros(d_t1),
            "s00": zeros(d_t), "s01_top": zeros(d_t1), "s01_perm": zeros(d_t1)}


def _ev(s: dict[str, Tensor], half, rows: Tensor, cross: Tensor, coef: Tensor) -> float:
    """EV of predicting latent j by `coef[j] * z_t[:, rows[j]]` from the sums of `half` (an
    index or a slice of halves, summed)."""
    n, s1, s11 = s["n"][half].sum(), s["s1"][half], s["s11"][half]
    s00, cross = s["s00"][half], cross[half]
    if s1.ndim == 2:
        s1, s11, s00, cross = s1.sum(0), s11.sum(0), s00.sum(0), cross.sum(0)
    sse = s11 - 2 * coef * cross + coef ** 2 * s00[rows]
    sst = s11 - s1 ** 2 / n
    total = float(sst.sum())
    return 1.0 - float(sse.sum()) / total if total > 0 else float("nan")


@torch.no_grad()
def explained_variance(flow: FlowSet, adapter, contexts: Tensor, *, layers=None, batch_size: int = 8,
                       skip_first: int = 1, seed: int = 0, progress: bool = True) -> TransitionStats:
    """EV of `z_{L+1} ≈ z_L T` for each `L` in `layers` (default all with `L/res` and `L+1/res`)
    over `contexts [N, T]` (N >= 2: the first `N // 2` fit, the rest evaluate), one pass."""
    contexts = check_contexts(contexts, batch_size, skip_first)
    if len(contexts) < 2:
        raise FeatoptError(f"the explained variance fits on the first half of the contexts and measures on the second: "
                           f"give at least 2 contexts, got {len(contexts)}.")
    layers = transition_layers(flow, layers)
    flow.check_model(adapter)
    device = adapter.device
    pairs = [(layer, layer + 1) for layer in layers]
    keys = sorted({(layer, "res") for pair in pairs for layer in pair})
    sites = {key: flow.read_site(key) for key in keys}
    mats, perms, sums = {}, {}, {}
    for low, high in pairs:
        rows, values = transition_matrix(flow[(low, "res")], flow[(high, "res")])
        mats[low] = (rows.to(device), values.to(device).double())
        perms[low] = permutation_rows(flow[(low, "res")].d_sae, flow[(high, "res")].d_sae, low, seed).to(device)
        sums[low] = _new_sums(flow[(low, "res")].d_sae, flow[(high, "res")].d_sae, device)
    n_fit = len(contexts) // 2

    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(contexts), batch_size), desc="transition", disable=not progress, leave=False):
        batch = contexts[start:start + batch_size]
        half = (torch.arange(start, start + len(batch), device=device) >= n_fit).long()  # [B] 0 fit, 1 eval
        acts = adapter.run(list(sites.values()), input_ids=batch.to(device))
        z = {key: flow[key].encode(acts[site][:, skip_first:]).double() for key, site in sites.items()}  # [B, T', d]
        for low, high in pairs:
            z0, z1, s = z[(low, "res")], z[(high, "res")], sums[low]
            s["n"].index_add_(0, half, torch.full((len(batch),), float(z0.shape[1]), dtype=torch.float64, device=device))
            s["s1"].index_add_(0, half, z1.sum(1))
            s["s11"].index_add_(0, half, (z1 * z1).sum(1))
            s["s00"].index_add_(0, half, (z0 * z0).sum(1))
            s["s01_top"].index_add_(0, half, (z0[..., mats[low][0]] * z1).sum(1))
            s["s01_perm"].index_add_(0, half, (z0[..., perms[low]] * z1).sum(1))

    ev, positive = {}, {}
    for low, high in pairs:
        s, (rows, values), prows = sums[low], mats[low], perms[low]
        fit = lambda cross, r: torch.where(s["s00"][0][r] > 0, s[cross][0] / s["s00"][0][r].clamp_min(1e-300), 0.0)  # noqa: E731
        ev[(low, high)] = {
            "cosine": _ev(s, 1, rows, s["s01_top"], values),
            "fitted": _ev(s, 1, rows, s["s01_top"], fit("s01_top", rows)),
            "permutation": _ev(s, 1, prows, s["s01_perm"], fit("s01_perm", prows)),
            "cosine_all": _ev(s, slice(None), rows, s["s01_top"], values),
        }
        positive[(low, high)] = int((values > 0).sum())
    per_context = contexts.shape[1] - skip_first
    settings = {"seed": seed, "skip_first": skip_first, "batch_size": batch_size, "contexts": list(contexts.shape),
                "fit_contexts": n_fit, "model": adapter.name, "saes": {f"{a}/{b}": flow[(a, b)].describe() for a, b in keys}}
    return TransitionStats(pairs=pairs, ev=ev, positive=positive,
                           tokens=(n_fit * per_context, (len(contexts) - n_fit) * per_context), settings=settings)


def format_transition(stats: TransitionStats) -> str:
    """Plain-text table: one row per layer pair, one column per variant."""
    names = [*VARIANTS, "cosine_all"]
    lines = [f"{'pair':<10}" + "".join(f"{name:>13}" for name in names) + f"{'T nonzero':>11}"]
    for a, b in stats.pairs:
        lines.append(f"{f'{a}->{b}':<10}" + "".join(f"{stats.ev[(a, b)][name]:13.4f}" for name in names)
                     + f"{stats.positive[(a, b)]:>11}")
    lines.append(f"explained variance of z_(L+1) ≈ z_L T; fit on {stats.tokens[0]} tokens, measured on {stats.tokens[1]} "
                 "(cosine_all: all tokens)")
    return "\n".join(lines)
