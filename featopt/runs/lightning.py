"""The Lightning set-up both LightningModules share (gradient ascent and SAE training): precisions,
the strategy for several devices, the steps data module, and the Trainer itself."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def resolve_strategy(strategy: str, devices: int, accelerator: str) -> str:
    """`strategy`, with "auto" on several devices resolved: ddp on GPUs, ddp_spawn on CPUs
    (plain ddp re-runs the launching command in child processes)."""
    if strategy != "auto" or devices <= 1:
        return strategy
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "ddp" if on_gpu else "ddp_spawn"


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
                 progress: bool = True) -> L.Trainer:
    """A Trainer for a run's settings (`precision`, `devices`, `accelerator`, `strategy`,
    `log_every`, `checkpoint_every`): TensorBoard under `out/tensorboard`, checkpoints only when
    `checkpoint_every` is set, no validation, no model summary."""
    from lightning.pytorch.loggers import TensorBoardLogger

    return L.Trainer(
        accelerator=settings.accelerator, devices=settings.devices,
        strategy=resolve_strategy(settings.strategy, settings.devices, settings.accelerator),
        precision=settings.precision, max_steps=max_steps,
        logger=TensorBoardLogger(out, name="tensorboard", version=""), callbacks=list(callbacks),
        enable_checkpointing=bool(settings.checkpoint_every), enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=settings.log_every, num_sanity_val_steps=0,
    )
