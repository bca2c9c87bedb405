"""Which `--out` folders featopt may write into.

The rule: featopt writes into a missing or empty folder, or into one that holds a previous
featopt run (a file or folder featopt writes, such as `results.json`, at its top or one level
down, as `featopt demo` and multi-size `sae train` nest runs), and refuses any other, so that a
typo never mixes results into, or replaces, someone's unrelated folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from featopt.errors import FeatoptError

# What the commands write at the top of their folder (checkpoints/tensorboard: an interrupted run).
RUN_FILES = frozenset({
    "results.json", "embeddings.safetensors", "compare.json", "fronts.json", "metrics.json", "training.json",
    "cfg.json", "activations.json", "neurons.json", "neurons.safetensors", "find.json", "clamp.json",
    "features.json", "lens.json", "ablate.json", "mcs.json", "dashboard.json", "matches.json", "graph.json",
    "groups.json", "deactivation.json", "transition.json", "run.json", "records.json", "align.json", "intervention.json",
    "checkpoints",
    "tensorboard",
})


def _holds_run(folder: Path) -> bool:
    return any(entry.name in RUN_FILES for entry in folder.iterdir())


def is_featopt_folder(folder: Path) -> bool:
    """Whether `folder` (an existing directory) holds a previous featopt run, at its top or one level down."""
    return _holds_run(folder) or any(sub.is_dir() and _holds_run(sub) for sub in folder.iterdir())


def check_out(out: str | Path | None) -> None:
    """Raise FeatoptError when featopt must not write into `out` (see the module docstring)."""
    if not out:
        return  # a fresh featopt-runs/<time> folder
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise FeatoptError(f"--out {str(path)!r} is a file: give a new or empty folder, or one featopt wrote.")
    if path.is_dir() and any(path.iterdir()) and not is_featopt_folder(path):
        raise FeatoptError(f"--out {str(path)!r} is a folder with other files, not featopt's: give a new or empty "
                           "folder, or one featopt wrote.")


def out_folder(out: str | Path | None) -> Path:
    """The folder a run writes into: `out`, or a new `featopt-runs/<time>` when none is given."""
    return Path(out or Path("featopt-runs") / time.strftime("%Y%m%d-%H%M%S"))
