"""Max cosine similarity (MCS) between SAE dictionaries (source document 002).

Document 002 trains 1x, 2x, 4x and 8x dictionaries and says the larger ones "learned
progressively more features according to the MCS metric": for each decoder row (feature
direction) of dictionary `a`, its largest cosine similarity with any row of dictionary `b`. A
feature found again by another dictionary (trained from another seed or at another size) has an
MCS near 1; the fraction above a threshold (0.9 here) counts features both learned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models.sae.attach import site_of


def _unit_rows(X: Tensor) -> Tensor:
    # A zero row stays zero: its cosine with anything is 0, not nan.
    X = X.detach().to(torch.float64 if X.dtype == torch.float64 else torch.float32)
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def max_cosine(A: Tensor, B: Tensor, *, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """For each row of `A [na, d]`, its max cosine with the rows of `B [nb, d]` and their index.

    Returns `(mcs [na], argmax [na] long)`, on `A`'s device, float32 (float64 for float64 `A`).
    Rows of A and B go `chunk` at a time, so at most a `[chunk, chunk]` similarity block is held.
    """
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise FeatoptError(f"A and B must be [n, d] with the same d, got shapes {tuple(A.shape)} and {tuple(B.shape)}.")
    if B.shape[0] < 1:
        raise FeatoptError("B has no rows, so no row of A has a most similar one: give at least one.")
    if chunk < 1:
        raise FeatoptError(f"chunk must be at least 1, got {chunk}.")
    An, Bn = _unit_rows(A), _unit_rows(B).to(A.device)
    Bn = Bn.to(An.dtype)
    best = torch.full((len(An),), float("-inf"), dtype=An.dtype, device=An.device)
    arg = torch.zeros(len(An), dtype=torch.long, device=An.device)
    for a0 in range(0, len(An), chunk):
        rows = slice(a0, a0 + chunk)
        for b0 in range(0, len(Bn), chunk):
            value, index = (An[rows] @ Bn[b0:b0 + chunk].T).max(dim=1)  # [ca, cb] -> [ca]
            better = value > best[rows]  # strict: the first of equal maxima keeps its place
            best[rows] = torch.where(better, value, best[rows])
            arg[rows] = torch.where(better, index + b0, arg[rows])
    return best, arg


def mcs_table(saes: Sequence, names: Sequence[str], *, threshold: float = 0.9, bins: int = 20,
              chunk: int = 2048) -> list[dict]:
    """MCS of every SAE's decoder rows against every other's, one dict per ordered pair (a, b).

    All SAEs must read the same site with the same `d_in`. Each row: `a`, `b` (names), `d_sae_a`,
    `d_sae_b`, `mean` and `median` MCS of a's latents, `above` (latents of a with MCS >= threshold),
    `above_fraction`, `threshold`, and `histogram`: counts in `bins` equal bins over [0, 1]
    (negative values, possible only for tiny dictionaries, counted in the first bin).
    """
    if len(saes) != len(names):
        raise FeatoptError(f"{len(saes)} SAEs but {len(names)} names: give one name per SAE.")
    if len(saes) < 2:
        raise FeatoptError(f"MCS compares dictionaries: give at least two SAEs, got {len(saes)}.")
    if bins < 1:
        raise FeatoptError(f"bins must be at least 1, got {bins}.")
    sites = [site_of(sae) for sae in saes]
    for name, sae, site in zip(names, saes, sites):
        if site != sites[0] or sae.d_in != saes[0].d_in:
            raise FeatoptError(f"SAE {name!r} reads {site} with d_in={sae.d_in} but {names[0]!r} reads {sites[0]} with "
                               f"d_in={saes[0].d_in}: MCS compares SAEs of the same site and width only.")
    rows = []
    for i, a in enumerate(saes):
        for j, b in enumerate(saes):
            if i == j:
                continue
            mcs = max_cosine(a.W_dec, b.W_dec, chunk=chunk)[0].double().cpu()
            above = int((mcs >= threshold).sum())
            rows.append({"a": names[i], "b": names[j], "d_sae_a": a.d_sae, "d_sae_b": b.d_sae,
                         "mean": float(mcs.mean()), "median": float(mcs.quantile(0.5)), "above": above,
                         "above_fraction": above / len(mcs), "threshold": threshold,
                         "histogram": torch.histc(mcs.clamp(0, 1), bins, 0, 1).long().tolist()})
    return rows
