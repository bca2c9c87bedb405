"""The text side of a model view: its tokenizer, the `--bos` setting and the context length, as
`ModelAdapter` offers them (a base class, so that this idea reads in one place)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from featopt.errors import FeatoptError


class InputText:
    """Encoding and decoding text for a model, with the run's BOS token; needs `tokenizer`,
    `name` and `model` (for the context length) on the instance."""

    @property
    def bos(self) -> bool:
        """The run's `--bos`: :meth:`encode` starts texts with the tokenizer's BOS token (the
        searches' prefix), and the continuous methods run it first (:meth:`run` with `bos=True`)."""
        return self._bos

    @bos.setter
    def bos(self, value: bool) -> None:
        if value:
            self.bos_token_id()
        self._bos = bool(value)

    def bos_token_id(self) -> int:
        """The tokenizer's BOS id; one clear error when there is none."""
        bos = getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None
        if bos is None:
            raise FeatoptError(f"--bos was given but the tokenizer of model {self.name!r} has no BOS token: "
                               f"drop --bos for this model.")
        return bos

    @property
    def context_limit(self) -> int | None:
        """The most positions the model takes (None when its config does not say)."""
        for name in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(self.model.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def check_positions(self, positions: int, what: str, fix: str) -> None:
        """One check for every command: `positions` (everything the model will run, the BOS token
        of `--bos` included) must fit the context; else one sentence naming `what` needs them and
        how to `fix` it."""
        limit = self.context_limit
        if limit is not None and positions > limit:
            bos = " (the BOS token of --bos included)" if self.bos else ""
            raise FeatoptError(f"{what} needs {positions} positions{bos}, but {self.name} takes at most {limit}: {fix}.")

    def encode(self, text: str, *, bos: bool | None = None) -> Tensor:
        """Text -> token ids `[tokens]`: the tokenizer's ids without special tokens, after the BOS
        token when `bos` (default: :attr:`bos`, the run's `--bos`). Pass `bos=False` for pieces
        that are not a model input's start (a word to look up, the searched tokens' initial text).
        The empty text gives `[BOS]` with BOS and no ids without."""
        ids = [self.bos_token_id()] if (self.bos if bos is None else bos) else []
        if text:
            if self.tokenizer is None:
                raise FeatoptError(f"model {self.name!r} has no tokenizer, so text cannot be encoded.")
            ids += self.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids)) if self.tokenizer is not None else " ".join(map(str, ids))
