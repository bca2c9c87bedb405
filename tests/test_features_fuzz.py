"""Property-based fuzzing of the feature notation: any string either parses to problems whose
indices are in range for the given width and token count, or raises FeatoptError with a
one-line message; never another exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from featopt.errors import FeatoptError
from featopt.specs import parse_features

NUMBER = st.integers(-5, 70).map(str)
ITEM = st.one_of(
    st.just(":"), NUMBER,
    st.tuples(NUMBER, NUMBER).map("-".join),  # a range a-b
    st.tuples(st.one_of(st.just(""), NUMBER), st.one_of(st.just(""), NUMBER)).map(":".join),  # a slice a:b
    st.lists(NUMBER, max_size=4).map(lambda items: f"[{', '.join(items)}]"),  # a list
    st.text(alphabet="0123456789-:[], x", max_size=6),
)
# Specs that look like the notation (three fields in brackets), so that many of them parse.
SPECS = st.one_of(
    st.tuples(st.sampled_from([":", "0", "1", " : "]), ITEM, ITEM).map(lambda f: f"[{f[0]}, {f[1]}, {f[2]}]"),
    st.text(max_size=40),  # anything at all, unicode digits and newlines included
    st.text(alphabet="[]:,-0123456789 \n\t", max_size=30),
)


@settings(max_examples=400, deadline=None)
@given(spec=SPECS, width=st.integers(1, 64), n_tokens=st.integers(1, 16))
def test_any_spec_parses_in_range_or_fails_with_one_line(spec, width, n_tokens):
    try:
        problems = parse_features(spec, n_tokens=n_tokens, width=width)
    except FeatoptError as error:
        message = str(error)
        assert message and "\n" not in message and "\r" not in message, repr(message)
        return
    assert problems
    for problem in problems:
        for indices, size in ((problem.positions, n_tokens), (problem.features, width)):
            assert indices is None or (len(indices) > 0 and all(0 <= i < size for i in indices)), (spec, problem)
        # the canonical spec of a problem parses back to exactly that problem
        assert parse_features(problem.spec, n_tokens=n_tokens, width=width) == [problem]
