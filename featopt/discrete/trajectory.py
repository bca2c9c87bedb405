"""TensorBoard scalars of a swap search (GCG, EPO, discrete inversion), written by rank 0."""

from __future__ import annotations

from pathlib import Path

from featopt.discrete.swap_search import Evaluated, SwapState
from featopt.runs.processes import distributed


class Trajectory:
    """Per step, each row's best activation under `tags[row]` (and its xent where the search
    scores one), and the mean number of sequences scored per problem."""

    def __init__(self, out: Path, tags: list[str]):
        self.tags, self.writer = tags, None
        if distributed()[0] == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))

    def __call__(self, step: int, state: SwapState, evaluated: Evaluated) -> None:
        if self.writer is None:
            return
        for r, tag in enumerate(self.tags):
            self.writer.add_scalar(tag, state.trajectory[r][-1], step)
            if state.xent is not None:
                self.writer.add_scalar(tag.replace("/activation", "/xent"), float(state.xent[r]), step)
        self.writer.add_scalar("search/evaluations_per_problem", float(state.evaluations.float().mean()), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
