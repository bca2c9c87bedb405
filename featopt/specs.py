"""Parse feature specs like ``[:, 0-4, 2000:2004]`` into optimization problems.

Activations of a site have shape ``[batch, position, feature]`` and a spec names one field
per axis. The notation separates two intents that look alike: a range ``a-b`` (inclusive)
is a *sweep*, one problem per index, while a slice ``a:b`` (exclusive, Python-style) is
*together*, one problem whose objective covers every index at once. A bracketed list
``[3, 7, 10:12]`` is a sweep over its items. The problems of a spec are the cartesian
product of the position sweep and the feature sweep, position-major.

Runs optimise one input at a time, so the batch field must be ``:`` or ``0``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING
from dataclasses import dataclass

import torch
from torch import Tensor

from featopt.errors import FeatoptError

if TYPE_CHECKING:
    from featopt.models import ModelAdapter, Site

# Bounds the work a typo can cause (``0-99999999`` with no size to check against) while
# leaving room for the largest SAE dictionaries in use (2**24 latents).
MAX_INDEX = 2**24
MAX_PROBLEMS = 2**20

_EXAMPLE = '"[:, :, 0-4]"'
# [0-9], not \d: \d also matches other scripts' digits, which int() would then accept.
_ITEM = re.compile(
    r"\s*(?:(?P<one>-?[0-9]+)|(?P<a>-?[0-9]+)\s*-\s*(?P<b>-?[0-9]+)"
    r"|(?P<lo>-?[0-9]*)\s*:\s*(?P<hi>-?[0-9]*))\s*"
)

# One sweep item: None selects the whole axis, a tuple selects those indices together.
_Choice = tuple[int, ...] | None


@dataclass(frozen=True)
class Problem:
    """One optimisation target: the cells ``positions x features`` of activations
    ``[batch, n_tokens, width]``, optimised together; None on an axis means all of it.

    ``spec`` is the canonical one-problem spec (``"[:, 0, 2000]"``, ``"[:, :, 2000:2004]"``),
    which parses back to exactly this problem. Parsed index tuples are sorted and contiguous.
    """

    spec: str
    positions: tuple[int, ...] | None
    features: tuple[int, ...] | None


def _fmt(choice: _Choice) -> str:
    if choice is None:
        return ":"
    if len(choice) == 1:
        return str(choice[0])
    # Parsed choices are always contiguous, so a slice renders them exactly.
    return f"{choice[0]}:{choice[-1] + 1}"


def _q(text: str) -> str:
    """Quote user text for a message, kept to one short line however it was pasted."""
    text = " ".join(text.split())  # whitespace is free, so this shows the same spec
    return f'"{text}"' if len(text) <= 80 else f'"{text[:77]}..."'


@dataclass(frozen=True)
class _Ctx:
    """What every error message needs: the spec, the axis and its size, the site name."""

    spec: str
    noun: str
    size: int | None
    site: str

    def allowed(self) -> str:
        if self.size is None:
            return f"{self.noun} indices start at 0"
        span = f"0-{self.size - 1}" if self.size > 0 else "none"
        return f"{self.site} has {self.size} {self.noun}s ({span})"

    def fail(self, what: str, why: str) -> FeatoptError:
        return FeatoptError(f"{self.noun} {what} in {_q(self.spec)} {why}")

    def check(self, what: str, idx: int, hint: str = "") -> None:
        """Reject idx unless it is a valid index of this axis (when its size is known)."""
        if self.size is not None and idx >= self.size:
            raise self.fail(what, f"is out of range: {self.allowed()}{hint}")
        if idx >= MAX_INDEX:
            raise self.fail(what, f"is out of range: indices above {MAX_INDEX - 1} are not supported")


def _item(text: str, ctx: _Ctx) -> list[_Choice]:
    """Expand one item (int, range a-b, or slice a:b) into its sweep choices."""
    m = _ITEM.fullmatch(text)
    if m is None:
        why = 'is malformed: write an index "7", a range "3-9", a slice "3:9" or ":"'
        raise ctx.fail(f"field item {_q(text.strip())}", why)
    raw = {k: v for k, v in m.groupdict().items() if v}
    # Negative indices are rejected rather than read Python-style: "-1" next to the range
    # syntax "a-b" is too easy to misread, and the size is not always known here.
    if any(v.startswith("-") for v in raw.values()):
        raise ctx.fail(f"index {_q(text.strip())}", f"is not allowed: indices are never negative, {ctx.allowed()}")
    if any(len(v) > 12 for v in raw.values()):  # int() refuses very long digit strings
        raise ctx.fail(f"index {_q(text.strip())}", f"is out of range: indices above {MAX_INDEX - 1} are not supported")
    n = {k: int(v) for k, v in raw.items()}
    size = ctx.size
    if "one" in n:
        ctx.check(f"index {n['one']}", n["one"])
        return [(n["one"],)]
    if "a" in n:
        a, b = n["a"], n["b"]
        if a > b:
            raise ctx.fail(f"range {a}-{b}", "is empty: write a-b with a <= b")
        ctx.check(f"range {a}-{b}", b)
        if b - a >= MAX_PROBLEMS:
            raise ctx.fail(f"range {a}-{b}", f"is too long: a sweep may have at most {MAX_PROBLEMS} problems")
        return [(i,) for i in range(a, b + 1)]
    lo, hi = n.get("lo", 0), n.get("hi")
    shown = f"slice {raw.get('lo', '')}:{raw.get('hi', '')}"
    if hi is None:
        if lo == 0:
            return [None]  # "0:" is ":", and needs no size to mean it
        if size is None:
            raise ctx.fail(shown, f"needs an explicit end: the number of {ctx.noun}s is not known here, write {lo}:b")
        hi = size
    ctx.check(shown, lo)
    if lo >= hi:
        raise ctx.fail(shown, "is empty: write a:b with a < b")
    ctx.check(shown, hi - 1, f", so a slice may end at {size} at most")  # the end is exclusive
    return [tuple(range(lo, hi))]


def _field(text: str, ctx: _Ctx) -> list[_Choice]:
    """Expand a field (an item, or a bracketed list of items) into its sweep choices."""
    body = text.strip()
    if not body:
        raise ctx.fail("field", f"is empty: write an index, range, slice or list like {_EXAMPLE}")
    if not body.startswith("["):
        return _item(body, ctx)
    inner = body[1:-1]
    if not body.endswith("]") or "[" in inner or "]" in inner:
        raise ctx.fail(f"list {_q(body)}", 'is malformed: lists hold plain items and never nest, like "[3, 7-9]"')
    out: list[_Choice] = []
    for part in inner.split(","):
        if not part.strip():
            raise ctx.fail(f"list {_q(body)}", 'has an empty item: write items separated by commas, like "[3, 7-9]"')
        out.extend(_item(part, ctx))
    return out


def _split_fields(spec: str) -> list[str] | None:
    """Split "[b, p, f]" at top-level commas (lists may hold commas); None when malformed."""
    s = spec.strip()
    if not (s.startswith("[") and s.endswith("]")):
        return None
    fields, depth = [""], 0
    for ch in s[1:-1]:
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            return None
        if ch == "," and depth == 0:
            fields.append("")
        else:
            fields[-1] += ch
    return fields if depth == 0 and len(fields) == 3 else None


def parse_features(
    spec: str, *, n_tokens: int | None = None, width: int | None = None, site: str = "the site"
) -> list[Problem]:
    """Parse a ``[batch, position, feature]`` spec into its problems, in sweep order.

    Args:
        spec: e.g. ``"[:, :, 2000-2004]"`` (five problems) or ``"[:, 2, :]"`` (one).
        n_tokens: number of positions of the input; when given, positions must be below it.
        width: number of features of the site; when given, features must be below it.
        site: the site's name, used in error messages.

    Returns:
        Problems ordered position-major: for each position item, for each feature item.

    Raises:
        FeatoptError: the spec is malformed or names an index outside the allowed range.
    """
    if not isinstance(spec, str):
        raise FeatoptError(f"feature spec must be a string like {_EXAMPLE}, got {type(spec).__name__}")
    fields = _split_fields(spec)
    if fields is None:
        raise FeatoptError(f"malformed feature spec {_q(spec)}: expected three comma-separated fields like {_EXAMPLE}")
    batch = fields[0].strip()
    if batch not in (":", "0"):
        raise FeatoptError(
            f'batch field {_q(batch)} in {_q(spec)} is not allowed: runs use one-element batches, so write ":" or "0"'
        )
    pos = _field(fields[1], _Ctx(spec, "position", n_tokens, site))
    feat = _field(fields[2], _Ctx(spec, "feature", width, site))
    if len(pos) * len(feat) > MAX_PROBLEMS:
        raise FeatoptError(
            f"feature spec {_q(spec)} expands to {len(pos) * len(feat)} problems: at most {MAX_PROBLEMS} are allowed"
        )
    return _problems(pos, feat)


def _problems(pos: list[_Choice], feat: list[_Choice]) -> list[Problem]:
    """The problems of the position and feature sweeps, position-major. A sweep over every latent
    of a wide SAE makes a million of them: each item's text is formatted once, and the frozen
    dataclass' `__init__` (one `object.__setattr__` per field) is skipped for a plain fill of its
    `__dict__`, which makes the same object."""
    pos_text, feat_text = [_fmt(p) for p in pos], [_fmt(f) for f in feat]
    new = object.__new__
    out = []
    append = out.append
    for p, pt in zip(pos, pos_text):
        for f, ft in zip(feat, feat_text):
            problem = new(Problem)
            fields = problem.__dict__
            fields["spec"], fields["positions"], fields["features"] = f"[:, {pt}, {ft}]", p, f
            append(problem)
    return out


def _row(choice: tuple[int, ...] | None, ctx: _Ctx) -> Tensor:
    row = torch.zeros(ctx.size or 0, dtype=torch.bool)
    if choice:
        # Problems parsed without sizes (or built by hand) are only checked here.
        lo, hi = min(choice), max(choice)
        if lo < 0:
            raise ctx.fail(f"index {lo}", f"is not allowed: indices are never negative, {ctx.allowed()}")
        ctx.check(f"index {hi}", hi)
        row[list(choice)] = True
    return row.fill_(True) if choice is None else row


def selection_masks(problems: Sequence[Problem], n_tokens: int, width: int) -> tuple[Tensor, Tensor]:
    """Boolean masks of the cells each of the P problems selects.

    Returns ``pos_mask`` [P, n_tokens] and ``feat_mask`` [P, width], both bool; problem p
    selects ``pos_mask[p, :, None] & feat_mask[p, None, :]`` of a [n_tokens, width] activation.
    Raises FeatoptError when a problem names an index outside ``n_tokens`` or ``width``.
    """
    pos_mask = torch.zeros(len(problems), n_tokens, dtype=torch.bool)
    feat_mask = torch.zeros(len(problems), width, dtype=torch.bool)
    for p, prob in enumerate(problems):
        pos_mask[p] = _row(prob.positions, _Ctx(prob.spec, "position", n_tokens, "the site"))
        feat_mask[p] = _row(prob.features, _Ctx(prob.spec, "feature", width, "the site"))
    return pos_mask, feat_mask


# ----------------------------------------------------------------------------- layers, sites, token ids
_DIGITS = re.compile("[0-9]{1,9}")  # not \d: it also matches other scripts' digits


def parse_indices(value: int | str | list[int], size: int, flag: str, noun: str) -> list[int]:
    """`3`, `"3"`, `"0,3,7"`, `"0-3"` or `[0, 3]` -> sorted distinct indices, each below `size`."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    chosen: set[int] = set()
    for item in items:
        lo, dash, hi = str(item).strip().partition("-")
        if not _DIGITS.fullmatch(lo) or (dash and not _DIGITS.fullmatch(hi)) or int(hi or lo) < int(lo):
            raise FeatoptError(f"{flag} {value!r} is malformed: write an index, a list or a range, like 3, 0,3,7 or 0-3.")
        chosen.update(range(int(lo), int(hi or lo) + 1))
    if max(chosen) >= size:
        raise FeatoptError(f"{noun} {max(chosen)} is out of range: this model has {size} {noun}s (0-{size - 1}).")
    return sorted(chosen)


def parse_layers(layer: int | str | list[int], n_layers: int) -> list[int]:
    return parse_indices(layer, n_layers, "--layer", "layer")


def parse_sites(adapter: ModelAdapter, site: str, layer: int | str | list[int]) -> list[Site]:
    """Every kind of `site` (comma-separated; a full `blocks.L.KIND` name stands alone) at every
    layer of `layer`, kind-major: `"resid_post,mlp_out"` at `"0,3"` gives four sites."""
    layers = parse_layers(layer, adapter.n_layers)
    sites: list[Site] = []
    for kind in str(site).split(","):
        kind = kind.strip()
        sites += [adapter.site(kind)] if kind.startswith("blocks.") or kind == "logits" else [adapter.site(kind, lay) for lay in layers]
    return list(dict.fromkeys(sites))


def parse_candidates(candidates: str | None, vocab_size: int) -> torch.Tensor | None:
    """The token ids to try (`"0-4095"`, `"17,42"`), or None for the whole vocabulary."""
    if candidates is None:
        return None
    return torch.tensor(parse_indices(candidates, vocab_size, "--candidates", "token id"), dtype=torch.long)
