"""A user's objective and parametrization, run end to end (see docs/extending.md).

`LastPosition`: the selected features at the last position, minus their mean over earlier ones.
It runs under every method: gradient ascent, the exhaustive sweep, GCG and EPO (`every_method`).
`SphereEmbeddings`: every input embedding on the sphere of the mean token norm r, e = r v / ||v||.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn

import featopt
from featopt.gradient.module import FeatureOptimization
from featopt.gradient.parametrization import Parametrization
from featopt.gradient.readout import evaluate
from featopt.objectives import Context, Objective, Selection
from featopt.runs.lightning import StepsDataModule


class LastPosition(Objective):
    """Loss `[rows]`: -(a_last - mean_{t < last} a_t), a_t the mean of the row's selected features
    at position t (the selection's positions are ignored: the objective picks them). Needs two
    positions or more: give the discrete searches a prefix or several tokens."""

    def __init__(self, selection: Selection):
        self.selection = selection
        self.sites = (selection.site,)  # what the forward must read: it stops after the deepest site
        self.n_problems = len(selection)  # one problem per feature of the selection
        self.description = f"last_position({selection.site})"

    def bind(self, adapter) -> "LastPosition":
        self.selection.bind(adapter)  # a site given by name becomes the model's Site; features are checked
        self.sites = (self.selection.site,)
        return self

    def loss(self, ctx: Context) -> Tensor:
        acts = ctx.acts[self.selection.site].float()  # [rows, tokens, width]
        per_token = self.selection.per_position(acts, ctx.rows)  # [rows, tokens]: each row's own problem
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
    """The new parametrization with the new objective, in one LightningModule and any Trainer:
    returns the module and one FeatureResult per problem."""
    selection = Selection(adapter.site("resid_post", layer), features).bind(adapter)
    parametrization = SphereEmbeddings(len(selection), tokens, adapter.d_model, seed)
    module = FeatureOptimization(parametrization, LastPosition(selection), selection, adapter, lr=lr)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=StepsDataModule(steps))
    results, _ = evaluate(module, "last-position", decoder="nearest", seed=seed)
    return module, results


def every_method(adapter, out: str, layer: int = 1, features: str = "[:, :, 0-2]") -> dict:
    """The same objective value under gradient ascent, the exhaustive sweep, GCG and EPO: each
    returns its result object, whose records hold the found tokens and their re-measured score."""
    objective = LastPosition(Selection(f"blocks.{layer}.resid_post", features))
    common = dict(adapter=adapter, progress=False)
    return {
        "ascent": featopt.optimize(objective, tokens=4, steps=30, out=f"{out}/ascent", **common),
        # one candidate token after a fixed prefix: two positions, and the sweep is exact
        "exhaustive": featopt.search.exhaustive(objective, prefix="The", top_k=3, out=f"{out}/exhaustive", **common),
        "gcg": featopt.search.gcg(objective, tokens=3, steps=8, search_width=64, out=f"{out}/gcg", **common),
        "epo": featopt.search.epo(objective, tokens=3, steps=4, lambdas=[0.0, 1.0], search_width=32, out=f"{out}/epo",
                                  **common),
    }


if __name__ == "__main__":
    from featopt.models import load_model

    adapter = load_model("tiny-llama")
    print(featopt.commands.tables.problem_lines(run(adapter)[1]))
    for method, found in every_method(adapter, "featopt-runs/last-position").items():
        print(f"\n{method}:\n{found.table()}")
