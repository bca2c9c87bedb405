"""SAE training with every SAE sharded over its latents (`featopt sae train --shard_latents`): the
dictionaries too wide for one device, over K ranks of Lightning's `ModelParallelStrategy`
(`data_parallel_size=1, tensor_parallel_size=K`; FSDP2's DTensors, gloo on CPUs).

:class:`ShardedSAETraining` is :class:`SAETraining` with each SAE a
:class:`~featopt.models.sae.sharded.ShardedSAE` built in `configure_model` on the strategy's mesh
(rank r: latents `r d_sae/K ..`, see that module for the collectives). Every rank reads the whole
global batch (the stream is not split by rank: each rank runs the model, or reads the cache, for
all of it), computes the whole loss and steps only its own latents (and the replicated `b_dec`,
whose gradient is the same everywhere), so no gradient is all-reduced and the optimizer's state is
sharded with the parameters. The start, the batches, the loss and so the steps are those of the
unsharded run, up to float rounding (and ties at topk's cut, see `sharded.py`).

At the end of training (schedule-free's evaluation point, as unsharded), every rank sends its
share to rank 0, whose :meth:`ShardedSAETraining.export` gives ordinary `SparseAutoencoder`s saved
like any other; rank 0 then holds the whole SAE in CPU memory (its size is the weights'; the
shares travel in pieces, see `ShardedSAE.gather`).
"""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from featopt.dictionaries.activations import ActivationStream
from featopt.dictionaries.optimizers import evaluation_point
from featopt.dictionaries.train import SAETraining
from featopt.errors import FeatoptError
from featopt.models.sae import SAEConfig, SparseAutoencoder
from featopt.models.sae.sharded import ShardedSAE, check_shardable

#: The flags `--shard_latents` refuses, with why.
_REFUSED = {
    "eval_every": "the held-out evaluation's metrics synchronize over every process, and only rank 0 evaluates",
    "checkpoint_every": "checkpoints of sharded SAEs are not written yet",
    "resume": "checkpoints of sharded SAEs are not read yet",
    "target_site": "transcoders do not shard",
    "distribute_modules": "the SAEs are split, not divided among the processes",
}


def check_settings(settings) -> None:
    """Raise FeatoptError, one sentence, for `sae train` settings (`architecture`, `devices`,
    `num_nodes`, `precision`, `strategy`, the flags of `_REFUSED`) that `--shard_latents` does not
    support."""
    if settings.architecture not in ("relu", "topk"):
        raise FeatoptError(f"--shard_latents trains relu or topk SAEs, not {settings.architecture}: train "
                           f"{settings.architecture} SAEs without it.")
    if settings.devices < 2:
        raise FeatoptError(f"--shard_latents splits the latents over --devices, got {settings.devices}: give --devices 2 "
                           "or more.")
    if getattr(settings, "num_nodes", 1) != 1:
        raise FeatoptError(f"--shard_latents splits the latents over one node's --devices, got --num_nodes "
                           f"{settings.num_nodes}: give --num_nodes 1.")
    if settings.precision != "32-true":
        raise FeatoptError(f"--shard_latents trains in --precision 32-true only, got {settings.precision}.")
    if settings.strategy != "auto":
        raise FeatoptError(f"--shard_latents runs Lightning's ModelParallelStrategy: leave --strategy auto, "
                           f"not {settings.strategy}.")
    for flag, why in _REFUSED.items():
        if getattr(settings, flag, None):
            raise FeatoptError(f"--shard_latents does not support --{flag} ({why}): leave it out.")


def training_for(settings, configs: list[SAEConfig], default: type[SAETraining]) -> tuple[type[SAETraining], object]:
    """`(the LightningModule class, the settings for runs.lightning.make_trainer)` of a `sae train`
    run: `(default, settings)`, or with `settings.shard_latents` (checked, and every SAE of `configs`
    found to shard over `settings.devices`, before any process starts) :class:`ShardedSAETraining`
    and `settings` with :func:`strategy`."""
    if not getattr(settings, "shard_latents", False):
        return default, settings
    check_settings(settings)
    for cfg in configs:
        check_shardable(cfg, settings.devices)
    return ShardedSAETraining, SimpleNamespace(**{**vars(settings), "strategy": strategy(settings.devices)})


def strategy(devices: int):
    """Lightning's strategy for `devices` ranks sharing every SAE's latents (one data-parallel group)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=devices)


class ShardedSAETraining(SAETraining):
    """:class:`SAETraining`'s arguments; relu and topk SAEs only (not transcoders). Run it under
    :func:`strategy`; `configure_model` shards the SAEs (`d_sae` divisible by the ranks)."""

    def __init__(self, configs: list[SAEConfig], *args, **kwargs):
        for cfg in configs:
            check_shardable(cfg, 1)
        with torch.device("meta"):  # the whole SAEs are never allocated: configure_model builds the shares
            super().__init__(configs, *args, **kwargs)
        self.register_buffer("scales", torch.ones(len(self.site_list)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.configs = list(configs)
        self._whole: list[SparseAutoencoder | None] = []  # rank 0: every SAE, after training
        self._ended = False

    def configure_model(self) -> None:
        if isinstance(self.saes[0], ShardedSAE):  # a second fit keeps its shards
            return
        mesh = self.device_mesh
        if mesh["data_parallel"].size() != 1:
            raise FeatoptError(f"latent-sharded SAEs train on one data-parallel group, got {mesh['data_parallel'].size()}: "
                               "use ModelParallelStrategy(data_parallel_size=1).")
        tp = mesh["tensor_parallel"]
        device = self.trainer.strategy.root_device
        self.saes = nn.ModuleList(ShardedSAE(cfg, tp, device=device) for cfg in self.configs)
        for i, sae in enumerate(self.saes):
            self.register_buffer(f"since_fired_{i}", torch.zeros(sae.d_local, dtype=torch.long, device=device))

    def setup(self, stage: str) -> None:
        if self.adapter is not None:
            self.adapter.to(self.device)
        # Every rank reads the whole global batch: the stream is not split by rank.
        self.stream = ActivationStream(self.make_source(self.adapter), **self.stream_args)

    def _global(self, t: Tensor, op: str = "sum") -> Tensor:
        # The data is the same on every rank: the batch statistics need no reduction.
        return t

    def training_step(self, batch, batch_idx) -> Tensor:
        acts = self.stream.batch(self.global_step)
        n = self.stream.batch_tokens
        inputs, total_vars = {}, {}
        for s, site in enumerate(self.site_list):  # as SAETraining's, on the whole batch
            x = acts[site].to(self.device) * self.scales[s]
            moments = torch.cat([x.sum(0).double(), x.pow(2).sum(dtype=torch.float64)[None]]).detach()
            mean = moments[:-1] / n
            total_vars[site] = (moments[-1] - n * mean.pow(2).sum()).float().clamp_min(1e-12)
            inputs[site] = x
        loss = torch.zeros((), device=self.device)
        fvus, l0s = [], []
        for i, (sae, site) in enumerate(zip(self.saes, self.sites)):
            part, stats = self._losses(i, sae, inputs[site], None, total_vars[site])
            loss = loss + part
            fvus.append(stats["fvu"] / total_vars[site])
            l0s.append(stats["l0"])
            since = getattr(self, f"since_fired_{i}")  # this rank's latents
            since += n
            since[stats["fired"]] = 0
        self._log_step(fvus, l0s, n)
        return loss  # the whole loss on every rank; each rank's gradient is its own latents'

    def _log_step(self, fvus, l0s, n_global) -> None:
        self._tokens_seen += n_global
        if not self._logs_this_step():  # the same steps on every rank: the collectives below match
            return
        counts = torch.cat([torch.stack(l0s).double(),
                            torch.stack([(getattr(self, f"since_fired_{i}") >= self.dead_tokens).sum().double()
                                         for i in range(len(self.saes))])])
        torch.distributed.all_reduce(counts)
        l0, dead = counts[:len(self.saes)] / n_global, counts[len(self.saes):]
        elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
        if elapsed > 0:
            self.log("tok/s", self._tokens_seen / elapsed, prog_bar=True, rank_zero_only=True)
        for i, sae in enumerate(self.saes):
            name = self.sae_name(i)
            self.log(f"train/fvu/{name}", fvus[i].float(), prog_bar=len(self.saes) == 1, rank_zero_only=True)
            self.log(f"train/l0/{name}", l0[i].float(), prog_bar=len(self.saes) == 1, rank_zero_only=True)
            self.log(f"train/dead_fraction/{name}", (dead[i] / sae.d_sae).float(), rank_zero_only=True)

    def on_train_end(self) -> None:
        super().on_train_end()  # schedule-free: to the evaluation point first
        self._whole = self._gather()
        self._ended = True

    def teardown(self, stage: str) -> None:
        # Rank 0 goes on alone (the held-out evaluation, the saving), and torchmetrics, which the
        # evaluation uses, synchronizes over any process group it finds: leave none.
        if stage == "fit" and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def _gather(self) -> list[SparseAutoencoder | None]:
        """Every SAE whole at its evaluation point, on rank 0 (None elsewhere); collective."""
        return [sae.gather(point=lambda p: evaluation_point(self._optimizer, p)) for sae in self.saes]

    def gathered_exports(self) -> list[SparseAutoencoder] | None:
        """Every SAE as :meth:`export` gives it, on rank 0 (None elsewhere); during training a
        collective (every rank calls it: the held-out evaluation of `--eval_every`)."""
        whole = self._whole if self._ended else self._gather()
        return None if whole[0] is None else [self._export(i, w) for i, w in enumerate(whole)]

    def export(self, i: int) -> SparseAutoencoder:
        """SAE i, whole, for raw activations (see :meth:`SAETraining.export`); rank 0 after training."""
        whole = self._whole[i] if self._ended else None
        if whole is None:
            raise FeatoptError("a latent-sharded SAE is whole only on rank 0 after training: export it there, then.")
        return self._export(i, whole)

    def _export(self, i: int, whole: SparseAutoencoder) -> SparseAutoencoder:
        out = SparseAutoencoder(dataclasses.replace(whole.cfg, hook_name=self.sites[i].tl_name,
                                                    metadata=dict(whole.cfg.metadata)))
        out.load_state_dict(whole.state_dict())
        out.fold_scale(float(self.scales[self.site_list.index(self.sites[i])]))
        return out
