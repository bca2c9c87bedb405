"""Lightning callbacks: watch a run's decoded text while it optimizes."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from featopt.gradient.module import FeatureOptimization
from featopt.gradient.readout import decode_ids, decoded_texts


class DecodeCallback(L.Callback):
    """Every `every_n_steps` steps (and at the end), decode the current input to text, keep it
    on the module (`module.decoded`, shown by :class:`TextProgressBar`) and log it to
    TensorBoard as text, one tag per problem."""

    def __init__(self, every_n_steps: int = 50, decoder: str = "pinv"):
        self.every_n_steps = max(1, every_n_steps)
        self.decoder = decoder

    def _decode(self, trainer: L.Trainer, module: FeatureOptimization) -> None:
        # Every rank holds the full (replicated) input, so decoding needs no communication.
        ids = decode_ids(module, self.decoder)
        module.decoded = decoded_texts(module, ids)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for p, (problem, text) in enumerate(zip(module.selection.problems, module.decoded)):
                    logger.experiment.add_text(f"decoded/{p}_{problem.spec}", repr(text), trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 or step == trainer.max_steps:
            self._decode(trainer, module)


class TextProgressBar(TQDMProgressBar):
    """Lightning's bar, plus the first problem's latest decoded text."""

    def get_metrics(self, trainer, module):
        items = super().get_metrics(trainer, module)
        items.pop("v_num", None)
        if getattr(module, "decoded", None):
            items["text"] = repr(module.decoded[0][:40])
        return items
