"""`--objective` means the same in every command that scores features, and a composed objective
runs from a YAML recipe exactly as the same value does from Python."""

from __future__ import annotations

import json

import pytest

import featopt
from featopt.cli import main
from featopt.results import read_results

COMPOSED = "l1_target(C=0.5) - 0.5 * maximize(site='blocks.2.mlp_out', features='[:, :, 7]')"
DESCRIBED = "l1_target(blocks.1.resid_post, C=0.5) - 0.5 * maximize(blocks.2.mlp_out)"
# greedy, GCG and EPO read positions by --variant (default last): the terms say so
DESCRIBED_LAST = "l1_target(blocks.1.resid_post, last position, C=0.5) - 0.5 * maximize(blocks.2.mlp_out, last position)"
TINY = ["--model", "tiny-llama", "--no_progress"]

COMMANDS = {
    "search exhaustive": ["--layer", "1", "--features", "[:, :, 0-1]", "--top_k", "2"],
    "search greedy": ["--layer", "1", "--features", "[:, :, 0-1]", "--tokens", "2", "--candidates", "0-63"],
    "search gcg": ["--layer", "1", "--features", "[:, :, 0-1]", "--tokens", "2", "--steps", "2", "--search_width", "16"],
    "search epo": ["--layer", "1", "--features", "[:, :, 0-1]", "--tokens", "2", "--steps", "2", "--search_width", "8",
                   "--lambdas", "[0, 1]"],
    "optimize": ["--layer", "1", "--features", "[:, :, 0-1]", "--tokens", "2", "--steps", "3"],
}


def _objectives(out) -> tuple[str, list[str]]:
    run, results = read_results(out)
    return run["objective"], [r.objective for r in results]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_search_takes_the_objective_expression(name, tmp_path):
    out = tmp_path / "run"
    assert main([*name.split(), *TINY, *COMMANDS[name], "--objective", COMPOSED, "--out", str(out)]) == 0
    described, per_problem = _objectives(out)
    expected = DESCRIBED_LAST if name in ("search greedy", "search gcg", "search epo") else DESCRIBED
    assert described == expected
    assert all(d.startswith(expected) for d in per_problem) and len(per_problem) == 2


def test_compare_and_align_take_the_objective(tmp_path):
    assert main(["compare", *TINY, "--layer", "1", "--features", "[:, :, 0-1]", "--steps", "3", "--gcg_steps", "1",
                 "--methods", "[embedding-pinv, gcg]", "--objective", COMPOSED, "--out", str(tmp_path / "c")]) == 0
    document = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert document["run"]["config"]["objective"] == COMPOSED
    _, results = read_results(tmp_path / "c" / "exhaustive")
    assert results[0].objective == DESCRIBED
    assert main(["align", *TINY, "--layer", "0,1", "--features", "[:, :, 0-3]", "--objective", "l1",
                 "--out", str(tmp_path / "a")]) == 0
    _, results = read_results(tmp_path / "a" / "exhaustive")
    assert results[0].objective == "l1_target(blocks.0.resid_post, C=100)"


def test_invert_takes_the_objective(tmp_path):
    assert main(["invert", *TINY, "--text", "the sea", "--steps", "3", "--objective", "cosine + 0.1 * maximize",
                 "--out", str(tmp_path / "i")]) == 0
    run, _ = read_results(tmp_path / "i")
    assert run["objective"] == "match_cosine(blocks.0.resid_post) + 0.1 * maximize(blocks.0.resid_post)"


def test_a_composed_objective_runs_under_gcg_from_a_yaml_recipe_as_from_python(tmp_path):
    from featopt.objectives import Selection, l1_target, maximize

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: tiny-llama\nlayer: 1\nfeatures: '[:, :, [0, 3, 8]]'\nobjective: \"{COMPOSED}\"\n"
                      "tokens: 3\nsteps: 4\nsearch_width: 32\nseed: 5\nprogress: false\n")
    assert main(["search", "gcg", "--config", str(recipe), "--out", str(tmp_path / "cli")]) == 0
    _, from_cli = read_results(tmp_path / "cli")
    value = (l1_target(Selection("blocks.1.resid_post", "[:, :, [0, 3, 8]]", over="last"), 0.5)
             - 0.5 * maximize(Selection("blocks.2.mlp_out", "[:, :, 7]", over="last")))
    from_python = featopt.search.gcg(value, model="tiny-llama", tokens=3, steps=4, search_width=32, seed=5,
                                     progress=False, out=str(tmp_path / "py")).results
    assert [r.token_ids for r in from_cli] == [r.token_ids for r in from_python]
    assert [r.extra["score"] for r in from_cli] == pytest.approx([r.extra["score"] for r in from_python], rel=1e-6)
    assert from_cli[0].objective == from_python[0].objective == DESCRIBED_LAST


@pytest.mark.parametrize("objective, words", [
    ("maximize(", "is malformed"),
    ("l2", "'l2' is not an objective: allowed are l1, maximize"),
    ("maximize(site='blocks.9.resid_post')", "layer 9 is out of range"),
    ("maximize(features='[:, :, 999]')", "out of range"),
    ("__import__('os')", "is not an objective"),
    ("maximize * maximize", "a product needs a number"),
    ("logit(token='the sea')", "tokens for model 'tiny-llama': give one token"),
])
def test_a_bad_objective_ends_in_one_line_and_status_2(objective, words, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "exhaustive", *TINY, "--layer", "1", "--objective", objective, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("featopt: error:") and words in err[0], err
    assert not out.exists()
