"""Which tokens a discrete search may place: the whole vocabulary, no special tokens, or only
tokens that decode to printable ASCII (nanoGCG's `allow_non_ascii=False`), optionally narrowed
to explicit ids (`--candidates`)."""

from __future__ import annotations

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter

ALLOW = ("all", "no-special", "ascii")


def _special_ids(adapter: ModelAdapter) -> set[int]:
    tok = adapter.tokenizer
    special = set(getattr(tok, "all_special_ids", []) or [])
    # Ids the embedding has but the tokenizer never produces (padding rows of the matrix) are
    # not text: a search that picks them finds an input no user can type.
    special.update(range(len(tok), adapter.vocab_size))
    return special


def allowed_ids(adapter: ModelAdapter, allow: str = "no-special", candidates: Tensor | None = None) -> Tensor:
    """The sorted token ids a search may use, `[K]` (K >= 1).

    Args:
        allow: "all", "no-special" (drop the tokenizer's special and added-padding ids) or
            "ascii" (also drop tokens whose text is empty or not printable ASCII).
        candidates: `[C]` ids to intersect with (None: the whole vocabulary).
    """
    if allow not in ALLOW:
        raise FeatoptError(f"--allow {allow!r} is not known: allowed are {', '.join(ALLOW)}.")
    ids = torch.arange(adapter.vocab_size) if candidates is None else torch.unique(candidates.cpu())
    if allow != "all" and adapter.tokenizer is not None:
        special = _special_ids(adapter)
        keep = []
        for t in ids.tolist():
            if t in special:
                continue
            if allow == "ascii":
                text = adapter.decode([t])
                if not text or not (text.isascii() and text.isprintable()):
                    continue
            keep.append(t)
        ids = torch.tensor(keep, dtype=torch.long)
    if len(ids) == 0:
        where = "" if candidates is None else " among the given --candidates"
        raise FeatoptError(f"no token is allowed: --allow {allow}{where} leaves an empty set; "
                           "widen --candidates or use --allow all.")
    return ids


def check_length(adapter: ModelAdapter, prefix_len: int, tokens: int) -> None:
    """`prefix_len` (the BOS token of `--bos` included) plus `tokens` searched must fit the context."""
    after = f" after a {prefix_len}-token prefix" if prefix_len else ""
    limit = adapter.context_limit or 0
    adapter.check_positions(prefix_len + tokens, f"--tokens {tokens}{after}",
                            f"use at most {max(0, limit - prefix_len)} tokens")
