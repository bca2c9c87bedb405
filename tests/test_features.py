"""Tests for featopt.specs: the feature-spec notation and the masks built from it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featopt.errors import FeatoptError
from featopt.specs import Problem, parse_features, selection_masks

SITE = "blocks.0.resid_post"
N_TOKENS, WIDTH = 16, 576


def parse(spec: str, **kw) -> list[Problem]:
    return parse_features(spec, **kw)


def feats(problems: list[Problem]) -> list:
    return [p.features for p in problems]


# ----------------------------------------------------------------- the document's examples


def test_range_is_a_sweep_of_five():
    probs = parse("[:, :, 2000-2004]")
    assert feats(probs) == [(2000,), (2001,), (2002,), (2003,), (2004,)]
    assert all(p.positions is None for p in probs)
    assert [p.spec for p in probs] == [f"[:, :, {i}]" for i in range(2000, 2005)]


def test_slice_is_one_combined_problem():
    assert parse("[:, :, 2000:2004]") == [Problem("[:, :, 2000:2004]", None, (2000, 2001, 2002, 2003))]


def test_position_sweep():
    probs = parse("[:, 0-4, 2000]")
    assert [p.positions for p in probs] == [(i,) for i in range(5)]
    assert feats(probs) == [(2000,)] * 5
    assert probs[0].spec == "[:, 0, 2000]"


def test_all_features_at_one_position():
    assert parse("[:, 2, :]") == [Problem("[:, 2, :]", (2,), None)]


def test_single_index_and_batch_zero():
    assert parse("[0, :, 7]") == [Problem("[:, :, 7]", None, (7,))]


def test_list_is_a_sweep_over_mixed_items():
    probs = parse("[:, :, [3, 7-9, 10:12]]")
    assert feats(probs) == [(3,), (7,), (8,), (9,), (10, 11)]
    assert probs[-1].spec == "[:, :, 10:12]"


def test_cartesian_product_is_position_major():
    probs = parse("[:, [0, 2], [5, 6:8]]")
    assert [(p.positions, p.features) for p in probs] == [
        ((0,), (5,)),
        ((0,), (6, 7)),
        ((2,), (5,)),
        ((2,), (6, 7)),
    ]


def test_whitespace_is_free():
    assert parse("  [ : ,0 - 1,[ 3 ,4 : 6 ] ]  ") == parse("[:, 0-1, [3, 4:6]]")
    assert parse("[:,\t:,\n5]") == parse("[:, :, 5]")


def test_open_slices():
    assert feats(parse("[:, :, :3]")) == [(0, 1, 2)]
    assert feats(parse("[:, :, 570:]", width=WIDTH)) == [tuple(range(570, 576))]
    # "0:" means ":" and needs no size.
    assert parse("[:, :, 0:]") == parse("[:, :, :]") == [Problem("[:, :, :]", None, None)]


def test_slice_end_may_equal_the_size():
    assert feats(parse("[:, :, 570:576]", width=WIDTH)) == [tuple(range(570, 576))]
    assert parse("[:, 15, 0]", n_tokens=N_TOKENS)[0].positions == (15,)


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "spec, kw, needles",
    [
        ("[:, :, 3000]", {"width": WIDTH}, ["feature index 3000", SITE, "576 features", "0-575"]),
        ("[:, :, 570-576]", {"width": WIDTH}, ["feature range 570-576", "0-575"]),
        ("[:, :, 570:577]", {"width": WIDTH}, ["feature slice 570:577", "0-575", "end at 576"]),
        ("[:, :, 600:]", {"width": WIDTH}, ["feature slice 600:", "0-575"]),
        ("[:, 16, 0]", {"n_tokens": N_TOKENS}, ["position index 16", "16 positions", "0-15"]),
        ("[:, [1, 20], 0]", {"n_tokens": N_TOKENS}, ["position index 20", "0-15"]),
        ("[:, -1, 0]", {"n_tokens": N_TOKENS}, ["negative", "0-15"]),
        ("[:, :, 3--1]", {"width": WIDTH}, ["negative", "0-575"]),
        ("[:, :, -3:]", {}, ["negative", "start at 0"]),
    ],
)
def test_out_of_range_names_the_allowed_range(spec, kw, needles):
    with pytest.raises(FeatoptError) as exc:
        parse_features(spec, site=SITE, **kw)
    msg = str(exc.value)
    assert spec in msg
    for needle in needles:
        assert needle in msg


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("[:, :", ["malformed feature spec", "three comma-separated fields", '"[:, :, 0-4]"']),
        ("[:, :, 1, 2]", ["three comma-separated fields"]),
        (":, :, 1", ["three comma-separated fields"]),
        ("", ["three comma-separated fields"]),
        ("[:, 4-2, 0]", ["position range 4-2", "is empty", "a <= b"]),
        ("[:, :, 5:5]", ["feature slice 5:5", "is empty", "a < b"]),
        ("[:, :, 9:3]", ["is empty", "a < b"]),
        ("[1, :, 0]", ["batch field", "one-element batches", '":" or "0"']),
        ("[0:1, :, 0]", ["batch field"]),
        ("[:, a, 0]", ["position field item", "malformed", '"3-9"']),
        ("[:, :, 1.5]", ["feature field item", "malformed"]),
        ("[:, , 0]", ["position field", "is empty"]),
        ("[:, :, []]", ["empty item"]),
        ("[:, :, [1,,2]]", ["empty item"]),
        ("[:, :, [1, [2]]]", ["never nest"]),
        ("[:, :, 5:]", ["needs an explicit end", "5:b"]),
        ("[:, :, 0-99999999]", ["not supported"]),
        ("[:, :, 1" + "0" * 5000 + "]", ["not supported"]),
    ],
)
def test_malformed_specs(spec, needles):
    with pytest.raises(FeatoptError) as exc:
        parse(spec)
    msg = str(exc.value)
    assert "\n" not in msg and len(msg) < 400
    for needle in needles:
        assert needle in msg


def test_non_string_spec():
    with pytest.raises(FeatoptError, match="must be a string"):
        parse_features(2000)  # type: ignore[arg-type]


def test_masks_check_unvalidated_problems():
    (prob,) = parse("[:, :, 600]")  # parsed without a width, so unchecked until now
    with pytest.raises(FeatoptError, match="0-575"):
        selection_masks([prob], N_TOKENS, WIDTH)


# ------------------------------------------------------------------------------ masks


def test_selection_masks_example():
    pos, feat = selection_masks(parse("[:, [0, 3:5], [1, :]]"), 6, 4)
    assert pos.shape == (4, 6) and feat.shape == (4, 4) and pos.dtype == feat.dtype == torch.bool
    assert pos.tolist() == [[1, 0, 0, 0, 0, 0]] * 2 + [[0, 0, 0, 1, 1, 0]] * 2
    assert feat.tolist() == [[0, 1, 0, 0], [1, 1, 1, 1]] * 2
    cells = pos[:, :, None] & feat[:, None, :]
    assert cells.sum(dim=(1, 2)).tolist() == [1, 4, 2, 8]


def test_selection_masks_empty():
    pos, feat = selection_masks([], 3, 5)
    assert pos.shape == (0, 3) and feat.shape == (0, 5)


# ------------------------------------------------------------------------- properties

idx = st.integers(min_value=0, max_value=3000)


@given(idx, idx)
def test_prop_range_sweeps(a, b):
    a, b = min(a, b), max(a, b)
    probs = parse(f"[:, :, {a}-{b}]")
    assert len(probs) == b - a + 1
    assert feats(probs) == [(i,) for i in range(a, b + 1)]


@given(idx, idx.filter(lambda x: x > 0))
def test_prop_slice_is_together(a, b):
    a, b = min(a, b), max(a, b)
    if a == b:
        b += 1
    assert feats(parse(f"[:, :, {a}:{b}]")) == [tuple(range(a, b))]


def _item(size: int) -> st.SearchStrategy[str]:
    """One valid item for an axis of this size."""
    i = st.integers(0, size - 1)
    ranges = st.tuples(i, i).map(lambda t: f"{min(t)} - {max(t)}")
    slices = st.tuples(i, st.integers(1, size)).filter(lambda t: t[0] < t[1]).map(lambda t: f"{t[0]}:{t[1]}")
    opens = st.sampled_from([":", "0:", ":3", "2:"])
    return st.one_of(i.map(str), ranges, slices, opens)


def _field(size: int) -> st.SearchStrategy[str]:
    items = _item(size)
    return st.one_of(items, st.lists(items, min_size=1, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"))


specs = st.builds(
    lambda b, p, f: f"[{b}, {p}, {f}]", st.sampled_from([":", "0", " : "]), _field(N_TOKENS), _field(40)
)


# deadline=None: hypothesis' 200 ms per example fails on a loaded machine (a CI run hit it once);
# what these check is the answer, not the time.
@settings(max_examples=200, deadline=None)
@given(specs)
def test_prop_canonical_spec_round_trips(spec):
    probs = parse_features(spec, n_tokens=N_TOKENS, width=40)
    assert probs
    for prob in probs:
        assert parse_features(prob.spec, n_tokens=N_TOKENS, width=40) == [prob]
        assert prob.spec.startswith("[:, ")


@settings(max_examples=200, deadline=None)
@given(specs)
def test_prop_masks_match_brute_force(spec):
    width = 40
    probs = parse_features(spec, n_tokens=N_TOKENS, width=width)
    pos, feat = selection_masks(probs, N_TOKENS, width)
    assert pos.shape == (len(probs), N_TOKENS) and feat.shape == (len(probs), width)
    for p, prob in enumerate(probs):
        want = [
            [
                (prob.positions is None or t in prob.positions) and (prob.features is None or f in prob.features)
                for f in range(width)
            ]
            for t in range(N_TOKENS)
        ]
        assert (pos[p, :, None] & feat[p, None, :]).tolist() == want


garbage = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="[]:,- 0123456789\t٣x", max_size=40),
    st.text(alphabet=":,- 0123456789[]", max_size=20).map(lambda s: f"[:, {s}]"),
    st.text(alphabet=":- 0123456789,", max_size=12).map(lambda s: f"[:, :, [{s}]]"),
)


# deadline=None: a valid open slice like ":4000000" legitimately builds a 4M-index tuple.
@settings(max_examples=500, deadline=None)
@given(garbage, st.sampled_from([None, 8]), st.sampled_from([None, 50]))
def test_prop_garbage_parses_or_raises_featopt_error(spec, n_tokens, width):
    try:
        probs = parse_features(spec, n_tokens=n_tokens, width=width, site=SITE)
    except FeatoptError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    for prob in probs:  # whatever parsed is well-formed
        assert isinstance(prob, Problem)
        assert parse_features(prob.spec, n_tokens=n_tokens, width=width) == [prob]
