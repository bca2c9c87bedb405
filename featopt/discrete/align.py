"""Are the features of one neuron index aligned across layers? (source document 000, "Llama
features are aligned across layers", and its complete-search version.) The arithmetic: each entry
is one layer's exhaustive top-k token sets; `featopt align` (`featopt.commands.align`) sweeps or
reads them.

For two entries the overlap of problem f is `|T_l(f) & T_l'(f)| / k`, and the matrix holds its mean
over the problems. The baseline pairs problem f of entry l with problem `pi(f)` of entry l', `pi` a
fixed-seed derangement (no problem paired with itself): the overlap two unrelated features reach
by chance, which tokens that top many features raise above `k / vocab`. `top1` is the share of
problems whose best token is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError


@dataclass
class Entry:
    """One layer's sweep: `ids [problems, k]`, each problem's top-k token ids, best first."""

    label: str
    layer: int
    kind: str
    isolated: bool
    untrained: bool
    model: str
    seed: int | None
    dtype: str
    source: str
    specs: list[str]
    ids: Tensor


@dataclass
class Alignment:
    entries: list[Entry]
    overlap: Tensor  # [E, E] mean top-k overlap
    baseline: Tensor  # [E, E] the same with problems of the second entry permuted
    top1: Tensor  # [E, E] share of problems with the same best token
    top1_baseline: Tensor
    out: Path


def derangement(n: int, seed: int) -> Tensor:
    """`[n]` a permutation without fixed points, the same for the same `(n, seed)`: uniform
    over derangements (a random permutation is redrawn until it has none, e tries on average)."""
    if n < 2:
        raise FeatoptError(f"the shuffled baseline needs at least two features, got {n}: select more with --features.")
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not (perm == torch.arange(n)).any():
            return perm


def shared(a: Tensor, b: Tensor) -> Tensor:
    """`a, b [F, k]` token ids, distinct within a row -> `[F]` how many ids rows share."""
    return (a[:, :, None] == b[:, None, :]).sum((1, 2))


def matrices(entries: list[Entry], perm: Tensor) -> tuple[Tensor, ...]:
    """`(overlap, baseline, top1, top1_baseline)`, each `[E, E]`, and the per-problem overlaps
    `[E, E, F]`. The baseline matrix is not symmetric: entry j's problems are the permuted ones."""
    n, (F, k) = len(entries), entries[0].ids.shape
    per = torch.zeros(n, n, F, dtype=torch.float64)
    base = torch.zeros(n, n, dtype=torch.float64)
    top1, top1_base = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for i, a in enumerate(entries):
        for j, b in enumerate(entries):
            if j >= i:
                per[i, j] = per[j, i] = shared(a.ids, b.ids).double() / k
                top1[i, j] = top1[j, i] = (a.ids[:, 0] == b.ids[:, 0]).double().mean()
            base[i, j] = shared(a.ids, b.ids[perm]).double().mean() / k
            top1_base[i, j] = (a.ids[:, 0] == b.ids[perm, 0]).double().mean()
    return per.mean(-1), base, top1, top1_base, per


def summary(result: Alignment) -> dict:
    """Each entry against the one before it and against the first, pairs of entries at the same
    layer; the means over adjacent and over all pairs."""
    o, b, t, tb = result.overlap, result.baseline, result.top1, result.top1_baseline

    def pair(i: int, j: int) -> dict:
        return {"a": result.entries[i].label, "b": result.entries[j].label, "overlap": float(o[i, j]),
                "baseline": float(b[i, j]), "top1": float(t[i, j]), "top1_baseline": float(tb[i, j])}

    n, entries = len(result.entries), result.entries
    adjacent = [pair(i - 1, i) for i in range(1, n)]
    off = ~torch.eye(n, dtype=torch.bool)
    return {"adjacent": adjacent, "from_first": [pair(0, i) for i in range(1, n)],
            # the same layer in two runs (isolated and not, trained and untrained): with --from
            "same_layer": [pair(i, j) for i in range(n) for j in range(i + 1, n) if entries[i].layer == entries[j].layer],
            "mean_adjacent": sum(p["overlap"] for p in adjacent) / len(adjacent),
            "mean_adjacent_baseline": sum(p["baseline"] for p in adjacent) / len(adjacent),
            "mean_all_pairs": float(o[off].mean()), "mean_all_pairs_baseline": float(b[off].mean())}


def plot(result: Alignment, path: Path) -> Path:
    """Two heatmaps on one colour scale: the mean overlap, and its shuffled baseline."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = [e.label for e in result.entries]
    step = max(1, len(labels) // 10)  # at most about ten tick labels per axis
    k, first = result.entries[0].ids.shape[1], result.entries[0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), constrained_layout=True)
    for ax, matrix, title in ((axes[0], result.overlap, f"mean top-{k} overlap, feature f vs f"),
                              (axes[1], result.baseline, "baseline: f vs shuffled pi(f)")):
        image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
        ticks = list(range(0, len(labels), step))
        ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8)
    what = first.model + (f", untrained (seed {first.seed})" if first.untrained else "")
    fig.suptitle(f"{what}: {len(first.specs)} features at {first.kind}", fontsize=10)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
