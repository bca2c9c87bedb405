"""Gradient ascent on a learnable input (source document 000): free embeddings, or a softmax
simplex over the vocabulary, optimized against any objective that reads activations (and, here
only, penalties on the input itself), then decoded to tokens and re-measured.

`train` fits a :class:`FeatureOptimization` with a Trainer that decodes the input every few steps
(TensorBoard text, the progress bar), writes checkpoints when asked and names them in the notice
of an interrupted run; `featopt optimize`, `featopt invert` and `featopt compare` all use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L

from featopt.gradient.callbacks import DecodeCallback, TextProgressBar
from featopt.gradient.module import FeatureOptimization
from featopt.runs import checkpoints
from featopt.runs.lightning import StepsDataModule, make_trainer


def trainer_for(settings, out: Path, extra_callbacks: Sequence[L.Callback] = (), command: str = "optimize") -> L.Trainer:
    """The Trainer for a gradient run's settings (`steps`, `decode_every`, `decoder`, `progress`
    and the Lightning settings of `TrainerSettings`); `extra_callbacks` are a method's own, added
    after the shared ones; `command` is stamped into the checkpoints."""
    callbacks = [DecodeCallback(settings.decode_every, settings.decoder), *extra_callbacks]
    if settings.progress:
        callbacks.append(TextProgressBar())
    callbacks.extend(checkpoints.callbacks(command, out, settings.checkpoint_every))
    return make_trainer(settings, out, max_steps=settings.steps, callbacks=callbacks, progress=settings.progress)


def train(module: FeatureOptimization, trainer: L.Trainer, *, steps: int, seed: int, out: Path,
          checkpoint_every: int = 0, resume: str | None = None, command: str = "optimize") -> None:
    """Fit `module` for `steps` steps under `seed` (resuming from `resume`, a checkpoint this
    command wrote, after checking it fits the module)."""
    if resume:
        checkpoints.check_resume(resume, module, command)
    L.seed_everything(seed, verbose=False)
    with checkpoints.resume_hint(out, checkpoint_every):
        trainer.fit(module, datamodule=StepsDataModule(steps), ckpt_path=resume, weights_only=True)
