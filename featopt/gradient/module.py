"""The LightningModule that optimizes the inputs of all problems of a run at once.

Its only learnable state is the parametrization (`[problems, tokens, ...]`); the language model
is held outside the module tree, so it is never in `state_dict()`, checkpoints or DDP's buckets.
Each problem's loss depends only on its own row and the losses are summed, so on K processes
every rank computes the rows `tensor_split(range(P), K)[rank]` and DDP's gradient average,
scaled back by K, equals the one-process gradient: all ranks stay identical.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor

from featopt.models import ModelAdapter
from featopt.runs.handle import ModelHandle
from featopt.objectives.objective import Context, Objective
from featopt.gradient.parametrization import Parametrization
from featopt.objectives.targets import Selection


class FeatureOptimization(L.LightningModule):
    """Gradient optimization of a parametrized input against an objective.

    Args:
        parametrization: the learnable input; `forward(rows) -> [rows, tokens, d_model]`.
        objective: what is minimized, per problem.
        selection: the run's features, for measuring and logging each problem's activation.
        model: a loaded `ModelAdapter`, a zero-argument loader called inside each worker, or a
            :class:`~featopt.runs.handle.ModelHandle` (multi-process runs pickle the module; the
            handle keeps the model out of the pickle).
        isolated: run the site's block alone on the input, skipping the blocks before it.
        lr: Adam's learning rate.
    """

    def __init__(
        self,
        parametrization: Parametrization,
        objective: Objective,
        selection: Selection,
        model: ModelAdapter | Callable[[], ModelAdapter] | ModelHandle,
        *,
        isolated: bool = False,
        lr: float = 0.01,
    ):
        super().__init__()
        self.parametrization = parametrization
        self.objective = objective
        self.selection = selection
        self.isolated = isolated
        self.lr = lr
        self.handle = ModelHandle.of(model)
        if self.handle.loaded:
            parametrization.bind(self.handle.adapter)
        self.decoded: list[str] = []  # latest decoded text per problem, filled by DecodeCallback

    @property
    def adapter(self) -> ModelAdapter:
        if not self.handle.loaded:  # a worker's first use: the model is rebuilt from the handle's recipe
            self.parametrization.bind(self.handle.adapter)
        return self.handle.adapter

    def configure_model(self) -> None:
        self.adapter  # noqa: B018 - builds the model inside the worker

    def on_fit_start(self) -> None:
        self.adapter.to(self.device)
        self.parametrization.bind(self.adapter)

    def on_train_start(self) -> None:
        # global_step is restored from a checkpoint by now: schedules resume where they stopped.
        self.parametrization.set_step(self.global_step, self.trainer.max_steps)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: callbacks (checkpointing) run before that module hook,
        # and a checkpoint must hold the input after its projection. global_step counts this
        # step only once this returns.
        self.parametrization.after_step(self.global_step + 1, self.trainer.max_steps)

    def my_rows(self) -> Tensor:
        """The problems this process computes: all of them on one device."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        return torch.tensor_split(torch.arange(self.parametrization.n_problems), world)[rank].to(self.device)

    def step_losses(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and activation per problem `[rows]` for the current input."""
        embeds = self.parametrization(rows)
        # The selection's site is read too: activations are logged even when the objective reads
        # no site at all (a penalty) or another one.
        sites = tuple(dict.fromkeys((*self.objective.sites, self.selection.site)))
        acts = self.adapter.run(sites, inputs_embeds=embeds, isolated=self.isolated, bos=self.adapter.bos)
        losses = self.objective.loss(Context(acts, embeds, rows, self.adapter))
        activation = self.selection.activation(acts[self.selection.site].float(), rows)
        return losses, activation

    def training_step(self, batch, batch_idx) -> Tensor:
        rows = self.my_rows()
        world = self.trainer.world_size
        if len(rows) == 0:
            # More ranks than problems: contribute a zero gradient so DDP's all-reduce still matches.
            loss = self.parametrization(None).sum() * 0.0
            activation = torch.zeros(0, device=self.device)
        else:
            losses, activation = self.step_losses(rows)
            loss = losses.sum() * world
        self._log_activations(rows, activation.detach(), loss.detach() / world)
        return loss

    def _log_activations(self, rows: Tensor, activation: Tensor, loss: Tensor) -> None:
        every = max(1, self.trainer.log_every_n_steps)
        if self.global_step % every and self.global_step + 1 != self.trainer.max_steps:
            return
        # float32 whatever the default dtype (64-true makes it float64), as the activation is cast
        full = torch.zeros(self.parametrization.n_problems, dtype=torch.float32, device=self.device)
        full[rows] = activation.float()
        if self.trainer.world_size > 1:
            full = self.all_gather(full).sum(dim=0)
            loss = self.all_gather(loss).sum()
        self.log("loss", loss, prog_bar=True, rank_zero_only=True)
        self.log("activation/mean", full.mean(), prog_bar=True, rank_zero_only=True)
        for p, problem in enumerate(self.selection.problems):
            self.log(f"activation/{p}_{problem.spec}", full[p], rank_zero_only=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parametrization.parameters(), lr=self.lr)
