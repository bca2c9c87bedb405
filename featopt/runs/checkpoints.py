"""Checkpoints of the Lightning runs (`optimize`, `invert`, `sae train`: `--checkpoint_every`,
`--resume`): written with a stamp naming the command, checked before Lightning reads one back,
and named in the notice of an interrupted run.

Checkpoints hold only tensors, numbers and strings (the model's weights stay out), so they load
with `torch.load(weights_only=True)`: no pickled code runs from a file given to `--resume`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L
import torch

from featopt.errors import FeatoptError
from featopt.interrupt import Interrupted

STAMP = "featopt"  # the checkpoint key of the stamp: {"command": "optimize" | "invert" | "sae train"}
_LIGHTNING_KEYS = ("state_dict", "global_step", "optimizer_states", "loops")


class Stamp(L.Callback):
    """Adds `{"featopt": {"command": ...}}` to every checkpoint, so `--resume` can tell a checkpoint
    of another command from one of this command."""

    def __init__(self, command: str):
        self.command = command

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[STAMP] = {"command": self.command}


def callbacks(command: str, out: Path, every: int) -> list[L.Callback]:
    """The callbacks that save `out/checkpoints/step<N>.ckpt` and `last.ckpt` every `every` steps
    (none when `every` is 0). Lightning writes each file atomically (fsspec's transaction)."""
    if not every:
        return []
    from lightning.pytorch.callbacks import ModelCheckpoint

    return [Stamp(command), ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=every, save_top_k=-1,
                                            save_last=True, filename="step{step}", auto_insert_metric_name=False)]


def check_resume(path: str, module: torch.nn.Module, command: str) -> None:
    """Raise :class:`FeatoptError` (one sentence naming `--resume`) unless `path` is a checkpoint
    that `featopt <command>` wrote for a problem of `module`'s shape (same parameter names and
    shapes). Lightning would otherwise fail with a traceback deep in `torch.load` or
    `load_state_dict`."""
    expected = (f"give the last.ckpt (or step<N>.ckpt) that `featopt {command} --checkpoint_every N` wrote "
                f"under OUT/checkpoints, with the same problem flags")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - not a zip, truncated, foreign pickle: all the same answer
        reason = " ".join(str(error).split())[:120] or error.__class__.__name__
        raise FeatoptError(f"--resume {path!r} is not a featopt checkpoint (torch.load: {reason}): {expected}.") from None
    if not isinstance(checkpoint, dict) or not all(k in checkpoint for k in _LIGHTNING_KEYS):
        raise FeatoptError(f"--resume {path!r} is not a featopt checkpoint (it lacks Lightning's state): {expected}.")
    stamp = checkpoint.get(STAMP)
    if isinstance(stamp, dict) and stamp.get("command") != command:
        raise FeatoptError(f"--resume {path!r} is a checkpoint of `featopt {stamp.get('command')}`, not of "
                           f"`featopt {command}`: {expected}.")
    theirs = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)}
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if theirs != mine:
        diff = sorted(set(theirs.items()) ^ set(mine.items()))[:2]
        shown = ", ".join(f"{k} {list(s)} {'there' if (k, s) in theirs.items() else 'here'}" for k, s in diff)
        raise FeatoptError(f"--resume {path!r} was written for another problem ({shown}): {expected}.")


@contextlib.contextmanager
def resume_hint(out: Path, every: int):
    """On :class:`Interrupted`, tell the user how to go on (resume from the last checkpoint if any)."""
    try:
        yield
    except Interrupted as interrupted:
        last = out / "checkpoints" / "last.ckpt"
        if every and last.is_file():
            interrupted.hint = f"resume it with the same flags plus --resume {last}"
        elif every:
            interrupted.hint = "no checkpoint was written yet: run it again"
        else:
            interrupted.hint = "nothing was saved: run it again (--checkpoint_every N makes a run resumable)"
        raise
