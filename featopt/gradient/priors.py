"""Choosing a parametrization by name: the `--prior` flag of every gradient method."""

from __future__ import annotations

from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models.adapter import ModelAdapter
from featopt.gradient.parametrization import FreeEmbeddings, Parametrization

PRIORS = ("embedding", "simplex")
SIMPLEX_MODES = ("softmax", "projected")


def make_parametrization(
    prior: str,
    adapter: ModelAdapter,
    problems: int,
    tokens: int,
    seed: int,
    *,
    init_ids: Tensor | None = None,
    temperature: float = 1.0,
    temperature_end: float | None = None,
    simplex_mode: str = "softmax",
) -> Parametrization:
    """The learnable input for `problems` rows of `tokens` tokens.

    `embedding`: free input embeddings `[problems, tokens, d_model]` (the documents' method);
    `simplex`: vocabulary-space logits `[problems, tokens, vocab]` mapped through a softmax onto
    the embedding matrix (the documents' prior). `init_ids [tokens]` starts every row from those
    tokens instead of at random.
    """
    if prior not in PRIORS:
        raise FeatoptError(f"--prior {prior!r} is not known: allowed are {', '.join(PRIORS)}.")
    if prior == "embedding":
        if init_ids is not None:
            return FreeEmbeddings.from_ids(adapter.embedding, init_ids, problems)
        return FreeEmbeddings.random(adapter.embedding, problems, tokens, seed)
    if simplex_mode not in SIMPLEX_MODES:
        raise FeatoptError(f"--simplex_mode {simplex_mode!r} is not known: allowed are {', '.join(SIMPLEX_MODES)}.")
    from featopt.gradient.simplex import SimplexEmbeddings

    options = dict(temperature=temperature, temperature_end=temperature_end, mode=simplex_mode)
    if init_ids is not None:
        simplex = SimplexEmbeddings.from_ids(init_ids, problems, adapter.vocab_size, **options)
    else:
        simplex = SimplexEmbeddings.uniform(problems, tokens, adapter.vocab_size, seed, **options)
    simplex.bind(adapter)
    return simplex
