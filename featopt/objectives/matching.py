"""Output matching (source document 000, "Complete Search Features"): an input whose output at a
site matches a target output `O(e)` of real text, by the documents' L1 distance
`||O(e_n) - O(e)||_1` or by the cosine of the flattened outputs. Both inversion methods (gradient
and discrete) score these objectives, on the texts as :func:`encode_texts` pads them.

Targets are per problem (one text per row) and padded to one length; `token_mask` marks the
real positions, and padded positions count nowhere (in a causal model they cannot change the
activations of the positions before them, so masking them is exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.models.sites import Site
from featopt.objectives.objective import Context, Objective


@dataclass
class Batch:
    """The texts as one padded batch: `ids [P, T]` (pad id after the end) and `mask [P, T]`."""

    texts: list[str]
    ids: Tensor
    mask: Tensor


def check_texts(texts: list[str]) -> list[str]:
    """The texts to invert, each holding visible text; one sentence otherwise."""
    if not texts:
        raise FeatoptError("no text to invert: give at least one --text.")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():  # whitespace alone is no text to recover
            raise FeatoptError(f"text {i + 1} is empty or only whitespace: every --text must hold visible text.")
    return texts


def encode_texts(adapter: ModelAdapter, texts: list[str]) -> Batch:
    """Tokenize (no special tokens) and right-pad to the longest text. With the run's `--bos` the
    BOS token is not part of the rows: it is run before them, a fixed token never recovered, but
    it takes a position, so the length check counts it."""
    rows = [adapter.encode(t, bos=False) for t in texts]
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise FeatoptError(f"text {i + 1} ({texts[i]!r}) encodes to no token: give text with at least one token.")
    longest = max(len(r) for r in rows)
    adapter.check_positions(longest + int(adapter.bos), f"a text of {longest} tokens", "shorten it")
    tok = adapter.tokenizer
    pad = next((t for t in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)) if t is not None), 0)
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, True
    return Batch(texts, ids, mask)


DISTANCES = ("l1", "cosine")


def _check(x: Tensor, y: Tensor, mask: Tensor, dims: int) -> None:
    if x.shape != y.shape or x.dim() != dims or tuple(mask.shape) != tuple(x.shape[:2]):
        raise FeatoptError(f"shapes do not match: {tuple(x.shape)} and {tuple(y.shape)} with a mask of "
                           f"{tuple(mask.shape)}; expected two {'[N, T, W]' if dims == 3 else '[N, T]'} and a [N, T] mask.")


def masked_l1(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """`sum |x - y|` over the valid positions: x, y `[N, T, W]`, mask `[N, T]` -> `[N]`."""
    _check(x, y, mask, 3)
    # where, not a product: a padded inf or nan must not leak in, not even as 0 * inf.
    diff = torch.where(mask[..., None].to(x.device), x - y, 0.0)
    return diff.abs().sum(dim=(1, 2))


def masked_cosine_distance(x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """`1 - cos(x[valid].flatten(), y[valid].flatten())` per row: `[N, T, W]` x2, `[N, T]` -> `[N]`.

    Zeroing the padded positions in both leaves the dot product and both norms those of the
    valid positions alone."""
    _check(x, y, mask, 3)
    dtype = torch.promote_types(x.dtype, y.dtype)
    keep = mask[..., None].to(x.device)
    a = torch.where(keep, x.to(dtype), 0.0).flatten(1)
    b = torch.where(keep, y.to(dtype), 0.0).flatten(1)
    return 1.0 - F.cosine_similarity(a, b, dim=1)


DISTANCE_FNS = {"l1": masked_l1, "cosine": masked_cosine_distance}


def token_matches(preds: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Recovered ids vs original ids `[N, T]` -> (matching valid positions `[N]`, valid positions `[N]`)."""
    _check(preds, target, mask, 2)
    mask = mask.to(preds.device).bool()
    correct = ((preds == target.to(preds.device)) & mask).sum(dim=1)
    return correct, mask.sum(dim=1)


class Match(Objective):
    """Base of the distances to the texts' outputs; `kind` names the distance ("l1", "cosine")."""

    kind = ""

    def __init__(self, site: Site, target: Tensor, token_mask: Tensor):
        """site: where outputs are compared; target: `O(e)` `[P, T, W]` for every problem of the
        run; token_mask: `[P, T]` bool, True at real (unpadded) positions."""
        if target.dim() != 3 or tuple(token_mask.shape) != tuple(target.shape[:2]):
            raise FeatoptError(f"target must be [problems, tokens, width] with a [problems, tokens] mask, "
                               f"got {tuple(target.shape)} and {tuple(token_mask.shape)}.")
        self.site = site
        self.sites = (site,)
        self.n_problems = target.shape[0]
        self.target = target.detach()
        self.token_mask = token_mask.bool()
        self.description = f"match_{self.kind}({site})"

    def _rows(self, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        """This process's activations `[rows, T, W]`, with their own targets and masks."""
        acts = ctx.acts[self.site]
        if self.target.device != acts.device:  # once: the target then lives where the model runs
            self.target, self.token_mask = self.target.to(acts.device), self.token_mask.to(acts.device)
        rows = ctx.rows.to(acts.device)
        return acts, self.target[rows], self.token_mask[rows]


class MatchL1(Match):
    """`sum over valid positions and features |O(e_n) - O(e)|` per problem."""

    kind = "l1"

    def loss(self, ctx: Context) -> Tensor:
        return masked_l1(*self._rows(ctx))


class MatchCosine(Match):
    """`1 - cos(O(e_n)[valid].flatten(), O(e)[valid].flatten())` per problem."""

    kind = "cosine"

    def loss(self, ctx: Context) -> Tensor:
        return masked_cosine_distance(*self._rows(ctx))


OBJECTIVES = DISTANCES  # ("l1", "cosine")


def match(kind: str, site: Site, target: Tensor, token_mask: Tensor) -> Match:
    """The matching objective named `kind` ("l1" or "cosine")."""
    classes = {"l1": MatchL1, "cosine": MatchCosine}
    if kind not in classes:
        raise FeatoptError(f"objective {kind!r} is not known: allowed are {', '.join(classes)}.")
    return classes[kind](site, target, token_mask)
