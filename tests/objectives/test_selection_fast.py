"""`Selection.position_weights`, made per group of equal positions, against a plain loop over the
problems (the former implementation, written out here); and `bind`, which parses a spec a second
time only where that can change its problems or its error message."""

from __future__ import annotations

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny
from featopt.objectives import Selection
from featopt.objectives import selection as selection_module
from featopt.specs import Problem, parse_features

SITE = "blocks.1.resid_post"  # 64 features on the tiny model
SPECS = [
    "[:, :, 0-9]",                  # a feature sweep over every position
    "[:, :, 3:9]",                  # a slice: one problem
    "[:, 0, 0-4]",                  # one position
    "[0, 3, 0-2]",                  # the last position of 4
    "[:, 0-3, [1, 5:8, 9]]",        # a positions sweep times a list
    "[:, [0, 2:4, 1], 7]",          # a list of positions, a slice among them
    "[:, 1:3, :]",                  # a slice of positions, every feature
    "[:, [2-3, 0:2], [0, 3:5]]",    # sweeps and slices on both axes
    "[:, :, [2, 2, 0:64]]",         # a repeated feature
]
LENGTHS = [4, 5, 8]  # the input alone, and after prefixes of 1 and 4 tokens


def _reference(problems, n_tokens: int, over: str) -> torch.Tensor:
    """`[P, n_tokens]` float64: one problem at a time."""
    weights = torch.zeros(len(problems), n_tokens, dtype=torch.float64)
    for p, problem in enumerate(problems):
        positions = problem.positions
        if positions is not None and max(positions) >= n_tokens:
            raise FeatoptError(f"{problem.spec} selects position {max(positions)}, but the input has "
                               f"{n_tokens} positions (0-{n_tokens - 1}).")
        if positions is None and over == "last":
            weights[p, -1] = 1.0
            continue
        chosen = list(range(n_tokens)) if positions is None else list(positions)
        weights[p, chosen] = 1.0 if over == "sum" else 1.0 / len(chosen)
    return weights


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model, tok, name="tiny-llama")


@pytest.mark.parametrize("over", ["mean", "sum", "last"])
@pytest.mark.parametrize("spec", SPECS)
def test_position_weights_equal_a_loop(tiny, spec, over):
    sel = Selection(SITE, spec, over=over).bind(tiny)
    for n_tokens in LENGTHS:
        want = _reference(sel.problems, n_tokens, over)
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            got = sel.position_weights(n_tokens, dtype=dtype)
            assert got.dtype == dtype and got.shape == want.shape
            assert torch.equal(got, want.to(dtype)), (spec, over, n_tokens, dtype)


@pytest.mark.parametrize("over", ["mean", "sum", "last"])
def test_hand_built_problems_in_any_order(over):
    """Equal positions apart, unsorted and repeated positions, and an empty list of problems."""
    problems = [Problem("a", (0,), (1,)), Problem("b", None, (2,)), Problem("c", (0,), (3,)),
                Problem("d", (1, 1), (0,)), Problem("e", (2, 0), (4, 5)), Problem("f", None, None),
                Problem("g", (0, 2), (6,)), Problem("h", (0,), (1,))]
    sel = Selection(SITE, problems, width=64, over=over)
    for n_tokens in (3, 6):
        assert torch.equal(sel.position_weights(n_tokens, dtype=torch.float64), _reference(problems, n_tokens, over))
    assert Selection(SITE, [], width=64, over=over).position_weights(5).shape == (0, 5)


@pytest.mark.parametrize("problems", [
    parse_features("[:, [1, 5, 2, 9], 0-2]"),
    [Problem("first", (1,), (0,)), Problem("second", (7,), (0,)), Problem("third", (1,), (1,)),
     Problem("fourth", (9,), (0,)), Problem("fifth", (7,), (2,))],
])
def test_position_out_of_range_names_the_first_problem(problems):
    sel = Selection(SITE, problems, width=64)
    with pytest.raises(FeatoptError) as want:
        _reference(problems, 4, "mean")
    with pytest.raises(FeatoptError) as got:
        sel.position_weights(4)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("spec", SPECS)
def test_feature_index_equals_a_loop(tiny, spec):
    sel = Selection(SITE, spec).bind(tiny)
    single = all(p.features is not None and len(p.features) == 1 for p in sel.problems)
    got = sel.feature_index()
    if not single:
        assert got is None
    else:
        assert torch.equal(got, torch.tensor([p.features[0] for p in sel.problems]))


@pytest.mark.parametrize("spec", SPECS + ["[:, :, 60:]", "[:, 0:2, 5:]"])
@pytest.mark.parametrize("width", [None, 64, 100])
def test_bind_gives_the_problems_of_a_parse_against_the_width(tiny, spec, width):
    """An open-ended slice parsed against another width is parsed again against the site's."""
    try:
        sel = Selection(SITE, spec, width=width)
    except FeatoptError:  # an open-ended slice needs a width
        assert width is None
        return
    assert sel.bind(tiny).problems == parse_features(spec, width=64, site=SITE)


def test_bind_parses_once(tiny, monkeypatch):
    sel = Selection(SITE, "[:, 0-1, 0-63]")
    calls = []
    monkeypatch.setattr(selection_module, "parse_features", lambda *a, **k: calls.append(a) or parse_features(*a, **k))
    sel.bind(tiny)
    assert calls == [] and len(sel) == 128


def test_a_feature_out_of_range_keeps_the_spec_message(tiny):
    spec = "[:, 0, [3, 70-80]]"
    with pytest.raises(FeatoptError) as want:
        parse_features(spec, width=64, site=SITE)
    with pytest.raises(FeatoptError) as got:
        Selection(SITE, spec).bind(tiny)
    assert str(got.value) == str(want.value)
    problems = [Problem("[:, 0, 3]", (0,), (3,)), Problem("[:, 0, 70:72]", (0,), (70, 71))]
    with pytest.raises(FeatoptError, match=r"feature 71 in \[:, 0, 70:72\] is out of range"):
        Selection(SITE, problems).bind(tiny)
