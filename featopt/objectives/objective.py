"""Objectives as values: small scored terms that compose with `+`, `-` and scalar `*`.

An objective maps the activations of one step to a loss per problem (`[rows]`, lower is
better) and carries a readable description, so `l1_target(sel, 100) - 0.5 * maximize(other)`
is itself an objective that says what it is. A new method is one subclass overriding
:meth:`Objective.loss` (see :mod:`featopt.objectives.targets` for the built-in ones).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from featopt.models.adapter import ModelAdapter
from featopt.models.sites import Site


@dataclass
class Context:
    """What an objective sees in one step, for the problems (`rows`) this process computes.

    Attributes:
        acts: `{site: [rows, tokens, width]}` for every site in `objective.sites`.
        embeds: the input embeddings `[rows, tokens, d_model]` (for penalties on the input).
        rows: problem indices `[rows]` into the run's problems.
        adapter: the model, for objectives that need more than activations.
    """

    acts: dict[Site, Tensor]
    embeds: Tensor
    rows: Tensor
    adapter: ModelAdapter


class Objective:
    """Base class. Subclasses set `sites` and `description` and implement `loss`."""

    sites: tuple[Site, ...] = ()
    description: str = "objective"

    def loss(self, ctx: Context) -> Tensor:
        """Loss per problem `[rows]`; the optimizer minimizes its sum."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.description

    def __add__(self, other: Objective) -> Objective:
        return Sum.of((1.0, self), (1.0, other))

    def __sub__(self, other: Objective) -> Objective:
        return Sum.of((1.0, self), (-1.0, other))

    def __mul__(self, weight: float) -> Objective:
        return Sum.of((float(weight), self))

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return Sum.of((-1.0, self))


class Sum(Objective):
    """A weighted sum of objectives; nested sums are flattened so descriptions stay readable."""

    def __init__(self, terms: list[tuple[float, Objective]]):
        self.terms = terms
        self.sites = tuple(dict.fromkeys(s for _, term in terms for s in term.sites))
        self.description = _describe(terms)

    @classmethod
    def of(cls, *terms: tuple[float, Objective]) -> Sum:
        flat: list[tuple[float, Objective]] = []
        for weight, term in terms:
            if isinstance(term, Sum):
                flat.extend((weight * w, t) for w, t in term.terms)
            else:
                flat.append((weight, term))
        return cls(flat)

    def loss(self, ctx: Context) -> Tensor:
        return sum(w * term.loss(ctx) for w, term in self.terms)


def _describe(terms: list[tuple[float, Objective]]) -> str:
    text = ""
    for i, (weight, term) in enumerate(terms):
        sign = "-" if weight < 0 else "+"
        magnitude = abs(weight)
        body = term.description if magnitude == 1 else f"{magnitude:g} * {term.description}"
        if i == 0:
            text = body if sign == "+" else f"-{body}"
        else:
            text += f" {sign} {body}"
    return text
