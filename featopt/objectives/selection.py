"""`Selection`: which activations each problem of a run reads, at one site.

Problem p reads the positions `problems[p].positions` (None: all) and the mean of the features
`problems[p].features` (None: all) of the site's activation `[batch, tokens, width]`, optionally
seen through a feature map of its own (an SAE's latents, directions, log-probabilities). Over
positions it takes their mean (`over="mean"`, the sweep's and ascent's reading), their sum
(`"sum"`, greedy's and GCG's `--variant sum`) or, for the position field `:`, the last position
(`"last"`, `--variant last`). Nothing depends on the input length until activations arrive, so
one selection serves one-token sweeps and N-token searches alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from operator import attrgetter, itemgetter

import torch
from torch import Tensor

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, Site
from featopt.specs import Problem, parse_features, selection_masks

OVER = ("mean", "sum", "last")


class Selection:
    """The features each problem reads at `site`.

    Args:
        site: a `Site` or a site name (`"blocks.3.mlp_out"`, `"logits"`), resolved by :meth:`bind`.
        problems: parsed problems, or a feature spec (`"[:, :, 0-4]"`), parsed against the site's
            width and `n_tokens` when they are known (else when bound).
        n_tokens, width: the input length and the site's number of features, when known.
        feature_map: read the site through this map first (its width is the features' width).
        over: how positions combine: "mean", "sum", or "last" (see the module docstring).
    """

    def __init__(self, site: Site | str, problems: Sequence[Problem] | str, n_tokens: int | None = None,
                 width: int | None = None, *, feature_map=None, over: str = "mean"):
        if over not in OVER:
            raise FeatoptError(f"positions combine by {over!r}, which is not known: allowed are {', '.join(OVER)}.")
        self.site, self.n_tokens, self.feature_map, self.over = site, n_tokens, feature_map, over
        self.width = feature_map.width if feature_map is not None and width is None else width
        self.spec = problems if isinstance(problems, str) else None
        self._parsed_width = self.width  # the width the spec was parsed against (None: unknown)
        if isinstance(problems, str):
            problems = parse_features(problems, n_tokens=n_tokens, width=self.width, site=str(site))
        self.problems = list(problems)
        self._cache: dict = {}

    def __len__(self) -> int:
        return len(self.problems)

    def __repr__(self) -> str:
        return f"Selection({self.site}, {len(self)} problems)"

    # ----------------------------------------------------------------- binding to a model
    def bind(self, adapter: ModelAdapter) -> Selection:
        """Resolve the site, learn its width and check every problem's features against it."""
        site = adapter.site(self.site)
        view_map = adapter.feature_map(site)
        if self.feature_map is not None:
            if view_map is not None:
                raise FeatoptError(f"{site} is read through a feature map already (--sae): a term with its own "
                                   "feature map must read a site without one.")
            if self.feature_map.d_in != adapter.width(site):
                raise FeatoptError(f"the feature map reads {self.feature_map.d_in}-wide activations but {site} of "
                                   f"model {adapter.name!r} is {adapter.width(site)} wide: use one made for this site.")
            width = self.feature_map.width
        else:
            width = adapter.width(site)
        # A spec is parsed again only where that can change its problems: an open-ended slice
        # (`5:`) parsed against another width, or a feature out of range (the spec's own message).
        # Otherwise the problems already are the re-parse's: 1M of them cost seconds to make.
        if self.spec is not None and self._parsed_width not in (None, width):
            self.problems, self._parsed_width = self._parse(width, site), width
        if _max_feature(self.problems) >= width:
            if self.spec is not None:
                self._parse(width, site)  # raises
            problem = next(p for p in self.problems if p.features is not None and max(p.features) >= width)
            raise FeatoptError(f"feature {max(problem.features)} in {problem.spec} is out of range: {site} has "
                               f"{width} features (0-{width - 1}).")
        self.site, self.width = site, width
        self._cache = {}
        return self

    def _parse(self, width: int, site: Site) -> list[Problem]:
        return parse_features(self.spec, n_tokens=self.n_tokens, width=width, site=str(site))

    # ----------------------------------------------------------------- the old mask view
    @property
    def pos_mask(self) -> Tensor:
        """`[P, n_tokens]` bool: the positions each problem reads (needs `n_tokens`)."""
        return self._masks()[0]

    @property
    def feat_mask(self) -> Tensor:
        """`[P, width]` bool: the features each problem reads (needs `width`)."""
        return self._masks()[1]

    def _masks(self) -> tuple[Tensor, Tensor]:
        if "masks" not in self._cache:
            if self.n_tokens is None or self.width is None:
                raise FeatoptError("this selection has no fixed input length or width: use its per-length weights.")
            self._cache["masks"] = selection_masks(self.problems, self.n_tokens, self.width)
        return self._cache["masks"]

    def weights(self, rows: Tensor, like: Tensor) -> Tensor:
        """The 0/1 cells of `rows` as `[rows, tokens, width]`, on `like`'s device and dtype."""
        pos = self.pos_mask.to(like.device)[rows].to(like.dtype)
        feat = self.feat_mask.to(like.device)[rows].to(like.dtype)
        return pos[:, :, None] * feat[:, None, :]

    # ----------------------------------------------------------------- reading activations
    def read(self, acts: Tensor) -> Tensor:
        """The site's activation `[B, T, d]` seen through the selection's own feature map."""
        return acts if self.feature_map is None else self.feature_map.features(acts)

    def position_weights(self, n_tokens: int, device=None, dtype=torch.float32) -> Tensor:
        """`[P, n_tokens]`: each problem's weight of each position (see the module docstring).

        Problems share few distinct `positions` (a sweep over 1M latents: one), so each group's row
        is made once, `[G, n_tokens]`, and gathered to the problems: no per-problem Python."""
        key = ("positions", n_tokens, str(device), dtype)
        if key not in self._cache:
            groups, first, group_of = self._position_groups()
            table = torch.zeros(len(groups), n_tokens, dtype=torch.float64)
            for g, positions in enumerate(groups):
                if positions is not None and max(positions) >= n_tokens:
                    # groups come in order of first use: this is the first problem out of range
                    raise FeatoptError(f"{self.problems[first[g]].spec} selects position {max(positions)}, but the "
                                       f"input has {n_tokens} positions (0-{n_tokens - 1}).")
                if positions is None and self.over == "last":
                    table[g, -1] = 1.0
                    continue
                chosen = list(range(n_tokens)) if positions is None else list(positions)
                table[g, chosen] = 1.0 if self.over == "sum" else 1.0 / len(chosen)
            table = table.to(device, dtype)  # cast before the gather: the same values, G rows only
            self._cache[key] = table.index_select(0, group_of.to(table.device))
        return self._cache[key]

    def _position_groups(self) -> tuple[list[tuple[int, ...] | None], list[int], Tensor]:
        """`(groups, first, group_of)`: the distinct `positions` in order of first use, the first
        problem of each, and each problem's group `[P]` (long)."""
        if "groups" not in self._cache:
            index: dict = {}
            groups, first, run_group, run_length = [], [], [], []
            start = 0
            # A parsed spec is position-major: runs of equal positions, found in C by groupby.
            for positions, run in groupby(map(_POSITIONS, self.problems)):
                length = len(list(run))
                if positions is not None and len(positions) == 0:
                    raise FeatoptError(f"{self.problems[start].spec} selects no position: give it at least one.")
                hashable = None if positions is None else tuple(positions)
                if hashable not in index:
                    index[hashable] = len(groups)
                    groups.append(hashable)
                    first.append(start)
                run_group.append(index[hashable])
                run_length.append(length)
                start += length
            group_of = torch.repeat_interleave(torch.tensor(run_group, dtype=torch.long),
                                               torch.tensor(run_length, dtype=torch.long))
            self._cache["groups"] = (groups, first, group_of)
        return self._cache["groups"]

    def feature_index(self) -> Tensor | None:
        """`[P]` the feature of each problem when every problem reads one feature, else None."""
        if "index" not in self._cache:
            features = list(map(_FEATURES, self.problems))
            single = None not in features and set(map(len, features)) <= {1}  # in C: 1M problems are common
            self._cache["index"] = torch.tensor(list(map(_FIRST, features))) if single else None
        return self._cache["index"]

    def feature_weights(self, width: int, device=None, dtype=torch.float32) -> Tensor:
        """`[P, width]`: each problem's mean over its features."""
        key = ("features", width, str(device), dtype)
        if key not in self._cache:
            matrix = torch.zeros(len(self), width, dtype=torch.float64)
            for p, problem in enumerate(self.problems):
                chosen = list(range(width)) if problem.features is None else list(problem.features)
                matrix[p, chosen] = 1.0 / len(chosen)
            self._cache[key] = matrix.to(device, dtype)
        return self._cache[key]

    def per_position(self, acts: Tensor, rows: Tensor) -> Tensor:
        """Row b's problem `rows[b]` at each position: the mean of its features, `[B, T]`."""
        x = _wide(self.read(acts))
        index = self.feature_index()
        if index is not None:
            return x.gather(2, index.to(x.device)[rows.to(x.device)][:, None, None].expand(-1, x.shape[1], 1))[..., 0]
        f = self.feature_weights(x.shape[-1], x.device, x.dtype)[rows.to(x.device)]  # [B, W]
        return torch.bmm(x, f[:, :, None])[..., 0]

    def activation(self, acts: Tensor, rows: Tensor | None = None) -> Tensor:
        """Each row's problem's activation `[B]` (float32 or wider): the weighted positions of
        the mean of its features. `rows` None: row p is problem p."""
        if rows is None:
            rows = torch.arange(len(acts), device=acts.device)
        per_pos = self.per_position(acts, rows)
        weights = self.position_weights(per_pos.shape[1], per_pos.device, per_pos.dtype)[rows.to(per_pos.device)]
        return (per_pos * weights).sum(dim=1)

    def activation_all(self, acts: Tensor) -> Tensor:
        """Every problem's activation of every row: `acts [B, T, d]` -> `[B, P]`."""
        x = _wide(self.read(acts))
        weights = self.position_weights(x.shape[1], x.device, x.dtype)  # [P, T]
        index = self.feature_index()
        if index is not None:
            picked = x.index_select(2, index.to(x.device))  # [B, T, P]
            return (picked * weights.T[None]).sum(dim=1)
        f = self.feature_weights(x.shape[-1], x.device, x.dtype)
        return torch.einsum("btw,pw,pt->bp", x, f, weights)


_POSITIONS, _FEATURES, _FIRST = attrgetter("positions"), attrgetter("features"), itemgetter(0)


def _max_feature(problems: Sequence[Problem]) -> int:
    """The largest feature any problem reads (-1 where none names one): `map` runs in C."""
    return max(map(max, filter(None, map(_FEATURES, problems))), default=-1)


def _wide(x: Tensor) -> Tensor:
    """At least float32: a bfloat16 sum over positions and features is too coarse."""
    return x.to(torch.promote_types(x.dtype, torch.float32))

