"""The Lightning set-up both LightningModules share (gradient ascent and SAE training): precisions,
the strategy for several devices and nodes, the steps data module, and the Trainer itself.

Several nodes are Lightning's own launch (`--num_nodes N`, `--devices` per node): under torchrun or
SLURM it reads their environment; by hand, start the same command on every node with
`MASTER_ADDR`, `MASTER_PORT` and `NODE_RANK` set (Lightning's `LightningEnvironment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, IterableDataset

from featopt.errors import FeatoptError

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


class UnwrappedDDPStrategy(DDPStrategy):
    """DDP's processes, launchers (`start_method` "popen" as ddp, "spawn" as ddp_spawn), process
    group and collectives, without the DistributedDataParallel wrapper: for a module that
    synchronizes itself (SAEs divided among ranks), so no gradient is averaged and no buffer is
    broadcast."""

    def configure_ddp(self) -> None:
        pass  # the module stays itself (Lightning calls it directly; pre_backward skips it)


def resolve_strategy(strategy: str, devices: int, accelerator: str, num_nodes: int = 1, unwrapped: bool = False):
    """`strategy`, with "auto" on several processes resolved: ddp on GPUs or several nodes,
    ddp_spawn on one node's CPUs (plain ddp re-runs the launching command in child processes);
    `unwrapped` (a module that syncs itself): the same as an :class:`UnwrappedDDPStrategy`."""
    if num_nodes < 1:
        raise FeatoptError(f"--num_nodes must be at least 1, got {num_nodes}.")
    if unwrapped and devices * num_nodes > 1:
        name = resolve_strategy(strategy, max(devices, 2), accelerator, num_nodes)
        if name not in ("ddp", "ddp_spawn"):
            raise FeatoptError(f"--strategy {strategy} does not run modules divided among processes: give --strategy "
                               "auto, ddp or ddp_spawn.")
        return UnwrappedDDPStrategy(start_method="spawn" if name == "ddp_spawn" else "popen")
    if strategy != "auto" or devices * num_nodes <= 1:
        return strategy
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "ddp" if on_gpu or num_nodes > 1 else "ddp_spawn"


def end_distributed() -> None:
    """End this process's process group, if any, once training is over (ddp, several nodes): what
    rank 0 then computes alone (torchmetrics' evaluations) must not wait for the other ranks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class _Steps(IterableDataset):
    # Iterable, so Lightning never shards it with a DistributedSampler: every rank takes every step.
    def __init__(self, steps: int):
        self.steps = steps

    def __iter__(self):
        return iter(range(self.steps))


class StepsDataModule(L.LightningDataModule):
    """Lightning needs batches; an optimization over fixed inputs (or a stream that is a function
    of the step, as SAE training's) only needs step indices."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Steps(self.steps), batch_size=None)


def make_trainer(settings, out: Path, *, max_steps: int, callbacks: Sequence[L.Callback] = (),
                 progress: bool = True, unwrapped: bool = False) -> L.Trainer:
    """A Trainer for a run's settings (`precision`, `devices`, `num_nodes`, `accelerator`,
    `strategy`, `log_every`, `checkpoint_every`): TensorBoard under `out/tensorboard`, checkpoints
    only when `checkpoint_every` is set, no validation, no model summary; `unwrapped`: see
    :func:`resolve_strategy`."""
    from lightning.pytorch.loggers import TensorBoardLogger

    num_nodes = getattr(settings, "num_nodes", 1)
    return L.Trainer(
        accelerator=settings.accelerator, devices=settings.devices, num_nodes=num_nodes,
        strategy=resolve_strategy(settings.strategy, settings.devices, settings.accelerator, num_nodes, unwrapped),
        precision=settings.precision, max_steps=max_steps,
        logger=TensorBoardLogger(out, name="tensorboard", version=""), callbacks=list(callbacks),
        enable_checkpointing=bool(settings.checkpoint_every), enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=settings.log_every, num_sanity_val_steps=0,
    )
