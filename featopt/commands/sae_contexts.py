"""What the SAE commands that run the model over corpus contexts share: `--bos` as they mean it
(the first token of every context), the id that starts each context, the check that a context
fits the model, and the model loaded without the `--sae` the commands read themselves."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from featopt.commands.loading import load_for
from featopt.commands.settings import InputSettings
from featopt.models import ModelAdapter


@dataclass
class ContextSettings(InputSettings):
    """A model run on corpus contexts."""

    bos: bool = False
    """start every context with the model's BOS token, counted in --context_length (off: as the source documents encode)"""


def bos_id(adapter: ModelAdapter) -> int | None:
    """The id that starts every corpus context under the run's `--bos` (None without it)."""
    return adapter.bos_token_id() if adapter.bos else None


def check_context(adapter: ModelAdapter, length: int) -> None:
    """One sentence when contexts of `length` tokens do not fit the model's positions."""
    adapter.check_positions(length, f"--context_length {length}", f"give at most {adapter.context_limit}")


def load_plain(config, adapter: ModelAdapter | None = None) -> ModelAdapter:
    """The config's model (or `adapter`, seen with its `--bos`) without its `--sae` attached: these
    commands run their SAEs themselves on the model's activations."""
    return load_for(dataclasses.replace(config, sae=""), adapter)
