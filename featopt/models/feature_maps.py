"""Feature maps: what turns a site's activation into the features the methods score.

A feature map sits between a site's activation and the objective: an SAE's or transcoder's
encoder (`featopt.models.sae`), a set of directions, the log-probabilities of the logits. It is
attached to a model view (`ModelAdapter.with_features`: every method then sees the map's features
at that site) or to one selection of an objective (`featopt.objectives.Selection(..., feature_map=)`:
that term alone reads through it).
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch
from torch import Tensor

from featopt.errors import FeatoptError


class FeatureMap(Protocol):
    """`features(acts [..., d_in]) -> [..., width]`, differentiable, in the activation's dtype;
    `describe()` says what it is, for the records (kind, path, content hash, ...)."""

    d_in: int
    width: int

    def features(self, acts: Tensor) -> Tensor: ...

    def describe(self) -> dict: ...


class Directions:
    """Projections on directions: `acts [..., d_in]` -> `acts @ vectors.T`, `[..., K]`.

    Args:
        vectors: `[K, d_in]` (or `[d_in]`: one direction); used as given (normalize them first
            for a plain cosine-like read-out).
        name: how records name them (a file name, say).
    """

    def __init__(self, vectors: Tensor, name: str = "directions"):
        vectors = torch.as_tensor(vectors).detach()
        if vectors.dim() == 1:
            vectors = vectors[None]
        if vectors.dim() != 2 or not torch.isfinite(vectors).all():
            raise FeatoptError(f"directions must be a finite [K, d_in] or [d_in] tensor, got shape {list(vectors.shape)}.")
        self.vectors, self.name = vectors.to(torch.promote_types(vectors.dtype, torch.float32)), name
        self.width, self.d_in = vectors.shape

    def features(self, acts: Tensor) -> Tensor:
        return acts @ self.vectors.to(acts.device, acts.dtype).T

    def describe(self) -> dict:
        digest = hashlib.sha256(self.vectors.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        return {"kind": "directions", "name": self.name, "count": self.width, "sha256": digest}


class LogProbs:
    """The next-token log-probabilities of logits: `log_softmax(logits [..., V])` in float32 (a
    softmax over a large vocabulary in bfloat16 is too coarse), returned in at least float32."""

    def __init__(self, vocab: int):
        self.d_in = self.width = vocab

    def features(self, acts: Tensor) -> Tensor:
        return torch.log_softmax(acts.to(torch.promote_types(acts.dtype, torch.float32)), dim=-1)

    def describe(self) -> dict:
        return {"kind": "log_probs"}
