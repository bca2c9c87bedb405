"""A new objective and a new parametrization, run end to end (see docs/extending.md).

`LastPosition`: the selected features at the last position, minus their mean over earlier ones.
`SphereEmbeddings`: every input embedding on the sphere of the mean token norm r, e = r v / ||v||.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

from featopt.specs import parse_features
from featopt.gradient.module import FeatureOptimization
from featopt.runs.lightning import StepsDataModule
from featopt.objectives.objective import Context, Objective
from featopt.gradient.parametrization import Parametrization
from featopt.gradient.readout import evaluate
from featopt.objectives.targets import Selection


class LastPosition(Objective):
    """Loss `[rows]`: -(a_last - mean_{t < last} a_t), a_t the mean of the row's selected
    features at position t (the selection's positions are ignored: the objective picks them)."""

    def __init__(self, selection: Selection):
        self.selection = selection
        self.sites = (selection.site,)  # what the forward must read
        self.description = f"last_position({selection.site})"

    def loss(self, ctx: Context) -> Tensor:
        acts = ctx.acts[self.selection.site].float()  # [rows, tokens, width]
        feats = self.selection.feat_mask.to(acts.device)[ctx.rows].float()  # [rows, width]: each row its own
        per_token = (acts * feats[:, None]).sum(dim=-1) / feats.sum(dim=-1, keepdim=True)  # [rows, tokens]
        return -(per_token[:, -1] - per_token[:, :-1].mean(dim=1))


class SphereEmbeddings(Parametrization):
    """Directions v `[problems, tokens, d_model]`; `forward(rows)` -> r v / ||v||, `[rows, tokens, d_model]`."""

    def __init__(self, problems: int, tokens: int, d_model: int, seed: int = 0):
        super().__init__()
        v = torch.randn(problems, tokens, d_model, generator=torch.Generator().manual_seed(seed))
        self.v = nn.Parameter(v / v.norm(dim=-1, keepdim=True))
        self.radius = 1.0  # set by bind(); a float, not a buffer, so no model weight is checkpointed

    @property
    def n_problems(self) -> int:
        return self.v.shape[0]

    def bind(self, adapter) -> None:
        self.radius = adapter.embedding.detach().float().norm(dim=-1).mean().item()

    def forward(self, rows: Tensor | None = None) -> Tensor:
        v = self.v if rows is None else self.v[rows]
        return self.radius * v / v.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def after_step(self, step: int, max_steps: int) -> None:
        # The output ignores ||v||, but Adam turns v by about lr / ||v|| per step, and ||v|| grows:
        # keeping ||v|| = 1 keeps the step size. It only projects the state, so a resumed run matches.
        self.v /= self.v.norm(dim=-1, keepdim=True)


def run(adapter, layer: int = 1, features: str = "[:, :, 0-2]", tokens: int = 5, steps: int = 30,
        lr: float = 0.05, seed: int = 0):
    """Optimize every problem of `features` at once; returns the module and one FeatureResult each."""
    site = adapter.site("resid_post", layer)
    width = adapter.width(site)
    selection = Selection(site, parse_features(features, n_tokens=tokens, width=width), tokens, width)
    parametrization = SphereEmbeddings(len(selection), tokens, adapter.d_model, seed)
    module = FeatureOptimization(parametrization, LastPosition(selection), selection, adapter, lr=lr)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=StepsDataModule(steps))
    results, _ = evaluate(module, "last-position", decoder="nearest", seed=seed)
    return module, results


if __name__ == "__main__":
    from featopt.models import load_model
    from featopt.gradient.ascent import format_results

    print(format_results(run(load_model("tiny-llama"))[1]))
