"""How the learnable input becomes `inputs_embeds`.

A parametrization is an `nn.Module` whose parameters are the only learnable state of a run,
one row per problem. Objectives never see it, only the embeddings it produces, so a prior (a
softmax simplex over the vocabulary, say) is a new parametrization and nothing else changes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Parametrization(nn.Module):
    """Base class: `forward(rows) -> inputs_embeds [rows, tokens, d_model]`."""

    def forward(self, rows: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    @property
    def n_problems(self) -> int:
        raise NotImplementedError

    def bind(self, adapter) -> None:
        """Called with the model (on its device) before the first step; a parametrization that
        needs the embedding matrix keeps a reference here (never as a registered tensor, so the
        model's weights stay out of checkpoints)."""

    def set_step(self, step: int, max_steps: int) -> None:
        """Set any schedule to its value after `step` steps (called when training starts, so a
        resumed run continues the schedule where it stopped)."""

    def after_step(self, step: int, max_steps: int) -> None:
        """Called after every optimizer step with the number of steps done: projections and
        schedules go here. It must depend only on `step`, so a resumed run matches."""

    def direct_ids(self) -> Tensor | None:
        """Token ids `[problems, tokens]` the input stands for without decoding its embeddings
        (a simplex's argmax), or None when only embedding decoding applies."""
        return None


class FreeEmbeddings(Parametrization):
    """The documents' method: the embeddings themselves, `[problems, tokens, d_model]`, are
    learned directly."""

    def __init__(self, init: Tensor):
        super().__init__()
        self.embeds = nn.Parameter(init.detach().clone().float())

    @property
    def n_problems(self) -> int:
        return self.embeds.shape[0]

    def forward(self, rows: Tensor | None = None) -> Tensor:
        return self.embeds if rows is None else self.embeds[rows]

    @classmethod
    def random(cls, embedding: Tensor, problems: int, tokens: int, seed: int) -> FreeEmbeddings:
        """Gaussian rows with the per-dimension mean and spread of the real token embeddings
        `embedding [vocab, d_model]`, so the start lies where tokens live, not at the origin."""
        table = embedding.detach().float()
        mean, std = table.mean(dim=0), table.std(dim=0)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(problems, tokens, table.shape[1], generator=gen)
        return cls(mean.cpu() + noise * std.cpu())

    @classmethod
    def from_ids(cls, embedding: Tensor, ids: Tensor, problems: int) -> FreeEmbeddings:
        """Every problem starts from the embeddings of the same token ids `[tokens]`."""
        rows = embedding.detach().float()[ids.to(embedding.device)].cpu()
        return cls(rows.unsqueeze(0).expand(problems, -1, -1))
