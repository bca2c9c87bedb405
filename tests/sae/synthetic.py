"""A toy activation source with a known sparse dictionary: every token is a nonnegative sum of
a few of `n_atoms` unit-norm atoms (plus a constant offset), so a good SAE recovers the atoms."""

from __future__ import annotations

import torch
from torch import Tensor

from featopt.models import Site

SITE = Site(0, "resid_post")


class SparseSource:
    """`{SITE: [C, T, d]}` for context indices `[C]`, fixed by `seed` (no model)."""

    def __init__(self, n_contexts=64, context_length=17, d=16, n_atoms=24, active=3, seed=0):
        gen = torch.Generator().manual_seed(seed)
        atoms = torch.randn(n_atoms, d, generator=gen)
        self.atoms = atoms / atoms.norm(dim=1, keepdim=True)
        n = n_contexts * context_length
        idx = torch.stack([torch.randperm(n_atoms, generator=gen)[:active] for _ in range(n)])
        coef = torch.rand(n, active, generator=gen) * 2 + 0.5
        z = torch.zeros(n, n_atoms).scatter(1, idx, coef)
        self.acts = (z @ self.atoms + 0.3).view(n_contexts, context_length, d)
        self.coefficients = z  # [C * T, n_atoms]
        self.sites = [SITE]

    @property
    def n_contexts(self) -> int:
        return self.acts.shape[0]

    def __call__(self, index: Tensor) -> dict[Site, Tensor]:
        return {SITE: self.acts[index]}


def make_source(adapter=None, **kwargs) -> SparseSource:
    """A picklable factory for `SAETraining(make_source=...)` (spawned workers call it)."""
    return SparseSource(**kwargs)


IN_SITE, OUT_SITE = Site(0, "mlp_in"), Site(0, "mlp_out")


class PlantedMLP(SparseSource):
    """A sparse MLP to recover: the input `{IN_SITE: [C, T, d]}` is SparseSource's, and the output
    `{OUT_SITE: [C, T, d_out]}` writes each active atom's coefficient along its own output
    direction, `y = z @ out_atoms` (unit rows), so a transcoder's decoder rows should find them."""

    def __init__(self, n_contexts=64, context_length=17, d=16, d_out=12, n_atoms=24, active=3, seed=0):
        super().__init__(n_contexts, context_length, d, n_atoms, active, seed)
        gen = torch.Generator().manual_seed(seed + 1)
        out = torch.randn(n_atoms, d_out, generator=gen)
        self.out_atoms = out / out.norm(dim=1, keepdim=True)
        self.outputs = (self.coefficients @ self.out_atoms).view(n_contexts, context_length, d_out)
        self.sites = [IN_SITE, OUT_SITE]

    def __call__(self, index: Tensor) -> dict[Site, Tensor]:
        return {IN_SITE: self.acts[index], OUT_SITE: self.outputs[index]}


def make_planted_mlp(adapter=None, **kwargs) -> PlantedMLP:
    return PlantedMLP(**kwargs)
