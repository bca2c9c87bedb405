"""The exhaustive search writes `results.json` with `write_plain_results`: byte for byte what
`featopt.results.write_results` writes, without its deep copy."""

from __future__ import annotations

from featopt.results import FeatureResult, read_results, write_results
from featopt.results import write_plain_results


def _results():
    stamp = {"torch": "x", "python": "3"}
    return [
        FeatureResult(spec="[:, :, 3]", site="blocks.0.resid_post", method="exhaustive", objective="maximize(...)",
                      token_ids=[5, 17], tokens=[" the", "海"], text=" the海", activation=1.25, model="m", seed=0,
                      dtype="float32", versions=stamp, feature_map={"kind": "sae", "k": None, "shape": (2, 3)},
                      extra={"prefix_length": 1, "sweep_activation": -0.0, "top_k": {
                          "token_ids": [17, 4, -1], "tokens": ["海", "\n", ""],
                          "activations": [1.25, 1e-300, float("-inf")],
                      }}),
        FeatureResult(spec="[:, 0, [0-3]]", site="blocks.1.mlp_out", method="exhaustive", objective="o",
                      token_ids=[2], tokens=['"q"'], text='"q"', activation=float("nan"), token_cosine=[0.5, 1.0],
                      versions=stamp, extra={}),
    ]


def test_the_same_bytes_as_write_results(tmp_path):
    run = {"method": "exhaustive", "config": {"features": "[:, :, 0-3]", "prefix": None}, "sites": ["a"]}
    write_results(tmp_path / "a", _results(), run)
    written = write_plain_results(tmp_path / "b", _results(), run)
    assert written == tmp_path / "b" / "results.json"
    assert (tmp_path / "a" / "results.json").read_bytes() == written.read_bytes()
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["results.json"]  # no temporary file left
    back = read_results(tmp_path / "b")[1]
    assert back[0].tokens == [" the", "海"] and back[0].extra["top_k"]["token_ids"] == [17, 4, -1]


def test_dumps_indented_is_json_dumps():
    import json
    import random

    from featopt.results import dumps_indented

    rng = random.Random(0)
    leaves = ["", "a\"b\\c\n\t\u2028", "海", "\x00\x1f", 0, -7, 2**70, True, False, None, 0.1, -0.0, 1e300, 5e-324,
              float("nan"), float("inf"), float("-inf"), 3.0]

    def make(depth):
        kind = rng.random()
        if depth > 3 or kind < 0.4:
            return rng.choice(leaves)
        if kind < 0.7:
            return [make(depth + 1) for _ in range(rng.randint(0, 4))] if rng.random() < 0.8 else ()
        keys = ["k", "", "海", 1, 2.5, True, False, None, "x y"]
        return {rng.choice(keys): make(depth + 1) for _ in range(rng.randint(0, 4))}

    for _ in range(300):
        value = make(0)
        assert dumps_indented(value) == json.dumps(value, indent=2, ensure_ascii=False)
    odd = {"a": {1, 2}}  # not JSON: left to json.dumps, which raises as it would
    try:
        dumps_indented(odd)
    except TypeError:
        pass
    else:
        raise AssertionError("a set was written")
