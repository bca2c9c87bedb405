"""Data-free matching of SAE features by the cosine of their decoder rows (document 003, §3).

A feature's embedding is its decoder row `W_dec[i] [d_in]` (the paper's decoder *column*, in its
`[d_in, d_sae]` layout). For every feature of a target SAE, :func:`top_matches` finds the `k`
rows of a candidate SAE with the largest cosine. Rows of the target go `chunk` at a time against
all candidate rows, so at most a `[chunk, d_sae_b]` block of scores exists (64 MB for 1,024 x
16k float32), never `[d_sae_a, d_sae_b]`.

Baselines, for telling a match from chance:
- **random**: the same top-k against random Gaussian rows of the candidate's shape (what scores
  look like when nothing is shared);
- **permutation**: the candidate's own rows with their `d_in` coordinates shuffled by one random
  permutation (norms and the rows' statistics kept, alignment with the target's basis destroyed).
Predecessor-level random baselines (a random latent instead of the top-1) live where they are
used, in groups and deactivation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.feature_flow.saes import FlowSet

BASELINES = ("none", "random", "permutation")


def _unit_rows(X: Tensor, dtype: torch.dtype) -> Tensor:
    X = X.detach().to(dtype)
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)  # a zero row stays zero: cosine 0


@torch.no_grad()
def top_matches(A: Tensor, B: Tensor, k: int = 1, *, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """For each row of `A [na, d]`, the `k` rows of `B [nb, d]` of largest cosine.

    Returns `(scores [na, k], indices [na, k] long)`, best first, float32 (float64 when `A` is),
    on `A`'s device. Holds at most one `[chunk, nb]` block of cosines.
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise FeatoptError(f"decoder matrices must be [n, d] with the same d, got {tuple(A.shape)} and {tuple(B.shape)}: "
                           "match SAEs of one model and width.")
    if not 1 <= k <= B.shape[0]:
        raise FeatoptError(f"top-k must be between 1 and the candidate's {B.shape[0]} latents, got k={k}.")
    if chunk < 1:
        raise FeatoptError(f"chunk must be at least 1, got {chunk}.")
    dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    An, Bn = _unit_rows(A, dtype), _unit_rows(B, dtype).to(A.device)
    scores = torch.empty(len(An), k, dtype=dtype, device=A.device)
    indices = torch.empty(len(An), k, dtype=torch.long, device=A.device)
    # One block buffer reused for every chunk: a fresh [chunk, nb] allocation per chunk would be
    # new pages from the OS each time, and their page faults cost as much as the max.
    buffer = torch.empty(min(chunk, len(An)), len(Bn), dtype=dtype, device=A.device)
    for a0 in range(0, len(An), chunk):
        rows = An[a0:a0 + chunk]
        block = torch.matmul(rows, Bn.T, out=buffer[:len(rows)])  # [chunk, nb]
        if k == 1:
            value, index = block.max(dim=1, keepdim=True)  # one pass, cheaper than topk
        else:
            value, index = block.topk(k, dim=1)
        scores[a0:a0 + chunk], indices[a0:a0 + chunk] = value, index
    return scores, indices


def baseline_rows(B: Tensor, kind: str, seed: int = 0) -> Tensor:
    """The candidate rows `B [nb, d]` of a baseline: `"random"` Gaussian rows of the same shape,
    `"permutation"` B with its columns (coordinates) shuffled, seeded."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(B.shape, generator=g, dtype=torch.float32).to(B.device)
    if kind == "permutation":
        return B.detach()[:, torch.randperm(B.shape[1], generator=g).to(B.device)]
    raise FeatoptError(f"baseline {kind!r} is not known: allowed are {', '.join(BASELINES)}.")


@dataclass
class Matches:
    """Top-k matches of every feature of SAE `target` in SAE `candidate` (keys `(layer, module)`).

    `scores, indices [d_sae_target, k]`; `baseline_scores [d_sae_target, k]` the same top-k against
    the baseline's rows (None without one).
    """

    target: tuple[int, str]
    candidate: tuple[int, str]
    scores: Tensor
    indices: Tensor
    baseline: str = "none"
    baseline_scores: Tensor | None = None

    def above(self, threshold: float) -> Tensor:
        """`[d_sae_target, k]` bool: which matches score at least `threshold`."""
        return self.scores >= threshold

    def summary(self, threshold: float | None = None) -> dict:
        top1 = self.scores[:, 0].double()
        out = {"target": "/".join(map(str, self.target)), "candidate": "/".join(map(str, self.candidate)),
               "k": self.scores.shape[1], "mean_top1": float(top1.mean()), "median_top1": float(top1.quantile(0.5))}
        if threshold is not None:
            out.update(threshold=threshold, above=int((top1 >= threshold).sum()))
        if self.baseline_scores is not None:
            base = self.baseline_scores[:, 0].double()
            out.update(baseline=self.baseline, baseline_mean_top1=float(base.mean()),
                       baseline_p99_top1=float(base.quantile(0.99)))
            if threshold is not None:
                out["baseline_above"] = int((base >= threshold).sum())
        return out


def match(flow: FlowSet, target: tuple[int, str], candidate: tuple[int, str], k: int = 1, *, chunk: int = 1024,
          baseline: str = "none", seed: int = 0) -> Matches:
    """:func:`top_matches` of SAE `target`'s decoder rows in SAE `candidate`'s, with a baseline."""
    if baseline not in BASELINES:
        raise FeatoptError(f"baseline {baseline!r} is not known: allowed are {', '.join(BASELINES)}.")
    A, B = flow[target].W_dec, flow[candidate].W_dec
    scores, indices = top_matches(A, B, k, chunk=chunk)
    base = None
    if baseline != "none":
        base = top_matches(A, baseline_rows(B, baseline, seed), k, chunk=chunk)[0]
    return Matches(tuple(target), tuple(candidate), scores, indices, baseline, base)


def match_predecessors(flow: FlowSet, target: tuple[int, str], k: int = 1, **kwargs) -> dict[tuple[int, str], Matches]:
    """:func:`match` of `target` against each of its predecessor SAEs present (document 003's
    inner-layer matching: `L-1/res`, `L/mlp`, `L/att` for `L/res`)."""
    return {cand: match(flow, target, cand, k, **kwargs) for cand in flow.predecessors(target)}


def plot_matches(pairs: list[Matches], path: str | Path) -> Path:
    """One histogram per pair of its features' top-1 decoder cosines, with the baseline's beside."""
    from featopt.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 2.8), squeeze=False)
    bins = torch.linspace(-0.2, 1.0, 49)
    for ax, p in zip(axes[0], pairs):
        ax.hist(p.scores[:, 0].float().cpu().numpy(), bins=bins.numpy(), alpha=0.8, label="top-1")
        if p.baseline_scores is not None:
            ax.hist(p.baseline_scores[:, 0].float().cpu().numpy(), bins=bins.numpy(), alpha=0.6, label=p.baseline)
        ax.set_title(f"{p.target[0]}/{p.target[1]} <- {p.candidate[0]}/{p.candidate[1]}", fontsize=9)
        ax.set_xlabel("decoder cosine")
    axes[0][0].set_ylabel("features")
    axes[0][0].legend(fontsize=8)
    return save_figure(fig, plt, path)
