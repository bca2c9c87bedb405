"""Objectives as values: small scored terms that compose with `+`, `-` and scalar `*`, and run under
every method.

An objective maps the activations of some inputs to a loss per problem (lower is better) and
carries a readable description, so `l1_target(sel, 100) - 0.5 * maximize(other)` is itself an
objective that says what it is. The same value is differentiated by the gradient methods (ascent,
the simplex prior, inversion) and scored exactly on real token sequences by the discrete ones (the
exhaustive sweep, greedy, GCG, EPO, discrete inversion). A new objective is one subclass that
sets `sites` and implements :meth:`Objective.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site


@dataclass
class Context:
    """What an objective sees: the activations of a batch of inputs.

    Attributes:
        acts: `{site: [rows, tokens, width]}` for every site in `objective.sites`. Gradient
            methods give the optimized tokens' positions (after a `--bos` token, which is run but
            not shown); discrete methods give the whole sequence, a fixed prefix included, so
            positions index the model input as the feature spec's positions do there.
        embeds: the input embeddings `[rows, tokens, d_model]` for objectives that read the input
            itself (penalties; gradient methods only), None in discrete methods.
        rows: the problem each row is scored for, `[rows]` (indices into the run's problems);
            None in :meth:`Objective.loss_all`, which scores every row for every problem.
        adapter: the model, for objectives that need more than activations.
    """

    acts: dict[Site, Tensor]
    embeds: Tensor | None
    rows: Tensor | None
    adapter: ModelAdapter | None = None

    @property
    def batch(self) -> int:
        first = next(iter(self.acts.values()), None)
        return len(first) if first is not None else len(self.embeds)


class Objective:
    """Base class. Subclasses set `sites` and `description` and implement `loss`.

    Attributes:
        sites: the activations the objective reads; a forward stops once the deepest is read.
        description: what it is, as results record it (name the settings).
        reads_input: True when it scores the continuous input (`ctx.embeds`): the discrete
            methods have no continuous input and refuse such an objective.
        n_problems: how many problems it scores (its selection's length), or None when it scores
            every problem alike (a penalty on the input).
    """

    sites: tuple[Site, ...] = ()
    description: str = "objective"
    reads_input: bool = False
    n_problems: int | None = None

    def loss(self, ctx: Context) -> Tensor:
        """Loss per row `[rows]` for the problems `ctx.rows`; lower is better."""
        raise NotImplementedError

    def loss_all(self, ctx: Context) -> Tensor:
        """Every problem's loss of every row, `[rows, problems]` (`ctx.rows` is ignored).

        The discrete methods score one candidate for every problem from one forward with it
        (pooled GCG, the exhaustive sweep of a whole layer). This default calls :meth:`loss` once
        per problem; the built-in objectives compute it at once."""
        if self.n_problems is None:
            raise FeatoptError(f"{self.description} scores no problem of its own: add it to an objective that does.")
        batch = ctx.batch
        device = next(iter(ctx.acts.values())).device if ctx.acts else None
        return torch.stack([self.loss(replace(ctx, rows=torch.full((batch,), p, dtype=torch.long, device=device)))
                            for p in range(self.n_problems)], dim=1)

    def bind(self, adapter: ModelAdapter) -> Objective:
        """Check the objective against a model (sites exist, features are in range) and resolve
        what was given by name; returns the objective. Methods call it before the first forward."""
        return self

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


def _problems(objectives) -> int | None:
    """The number of problems of terms scored together: one count, or one problem for all (a
    one-problem term counts for every problem of the others); None when no term has problems."""
    counts = {o.n_problems for o in objectives} - {None}
    if len(counts) > 1 and 1 in counts:
        counts.discard(1)
    if len(counts) > 1:
        raise FeatoptError(f"the terms of an objective score different numbers of problems ({sorted(counts)}): "
                           "give every term the same features, or one feature for all.")
    return counts.pop() if counts else None


class Sum(Objective):
    """A weighted sum of objectives; nested sums are flattened so descriptions stay readable."""

    def __init__(self, terms: list[tuple[float, Objective]]):
        self.terms = terms
        self._refresh()

    def _refresh(self) -> None:
        terms = self.terms
        self.sites = tuple(dict.fromkeys(s for _, term in terms for s in term.sites))
        self.description = _describe(terms)
        self.reads_input = any(term.reads_input for _, term in terms)
        self.n_problems = _problems([term for _, term in terms])

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
        return sum(w * term.loss(_for_term(term, ctx)) for w, term in self.terms)

    def loss_all(self, ctx: Context) -> Tensor:
        n = self.n_problems
        parts = []
        for w, term in self.terms:
            part = term.loss_all(ctx) if term.n_problems is not None else term.loss(_for_term(term, ctx))[:, None]
            if part.shape[1] == 1 and n is not None and n > 1:
                part = part.expand(-1, n)  # a one-problem term counts for every problem
            parts.append(w * part)
        return sum(parts)

    def bind(self, adapter: ModelAdapter) -> Sum:
        self.terms = [(w, term.bind(adapter)) for w, term in self.terms]
        self._refresh()
        return self


def _for_term(term: Objective, ctx: Context) -> Context:
    """The context a term sees: a one-problem term scores problem 0 whatever the row's problem."""
    if term.n_problems == 1 and ctx.rows is not None:
        return replace(ctx, rows=torch.zeros_like(ctx.rows))
    return ctx


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


class Stack(Objective):
    """The problems of several objectives one after another: problem ids count through `parts` in
    order (a run over several layers stacks one objective per layer). One forward reads every
    part's sites, so all layers of a run share their candidates' forwards."""

    def __init__(self, parts: list[Objective]):
        if not parts or any(p.n_problems is None for p in parts):
            raise FeatoptError("a stack needs objectives that each score their own problems.")
        self.parts = list(parts)
        self._refresh()

    def _refresh(self) -> None:
        self.sites = tuple(dict.fromkeys(s for part in self.parts for s in part.sites))
        self.reads_input = any(part.reads_input for part in self.parts)
        self.n_problems = sum(part.n_problems for part in self.parts)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + part.n_problems)
        self.description = self.parts[0].description if len(self.parts) == 1 else \
            "stack(" + "; ".join(p.description for p in self.parts) + ")"

    def part_of(self, problem: int) -> tuple[int, int]:
        """`(part, its local problem)` of a run's problem id."""
        for i, (lo, hi) in enumerate(zip(self.offsets, self.offsets[1:])):
            if lo <= problem < hi:
                return i, problem - lo
        raise IndexError(problem)

    def loss(self, ctx: Context) -> Tensor:
        out = None
        for i, part in enumerate(self.parts):
            lo, hi = self.offsets[i], self.offsets[i + 1]
            mine = ((ctx.rows >= lo) & (ctx.rows < hi)).nonzero()[:, 0]
            if not len(mine):
                continue
            acts = {site: a[mine] for site, a in ctx.acts.items()}
            embeds = ctx.embeds[mine] if ctx.embeds is not None else None
            value = part.loss(Context(acts, embeds, ctx.rows[mine] - lo, ctx.adapter))
            out = value.new_zeros(len(ctx.rows)) if out is None else out
            out = out.index_put((mine,), value.to(out.dtype))  # out of place: gradients flow
        return out

    def loss_all(self, ctx: Context) -> Tensor:
        return torch.cat([part.loss_all(ctx) for part in self.parts], dim=1)

    def bind(self, adapter: ModelAdapter) -> Stack:
        self.parts = [part.bind(adapter) for part in self.parts]
        self._refresh()
        return self


def stack(parts: list[Objective]) -> Objective:
    """One objective over the problems of `parts` in order (the part itself when there is one)."""
    return parts[0] if len(parts) == 1 else Stack(parts)
