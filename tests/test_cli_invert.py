"""`featopt invert`: repeated --text, the side-by-side table, YAML recipes, bad input (exit 2)."""

from __future__ import annotations

import json

import pytest

from featopt.cli import main

TINY = ["invert", "--model", "tiny-llama", "--layer", "0", "--steps", "20", "--objective", "cosine", "--no_progress"]
TEXTS = ["the sea", "a small town by"]


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def test_invert_prints_each_text_beside_its_recovery_and_writes_results(tmp_path, capsys):
    argv = [*TINY, "--text", TEXTS[0], "--text", TEXTS[1], "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    document = _results(tmp_path)
    records = document["results"]
    assert [r["spec"] for r in records] == TEXTS
    for r in records:
        line = next(line for line in out if line.startswith(repr(r["spec"])))
        n, hit = len(r["token_ids"]), r["extra"]["tokens_recovered"]
        assert f"->  {r['text']!r}" in line and f"({hit}/{n})" in line
    total = sum(len(r["token_ids"]) for r in records)
    hits = sum(a == b for r in records for a, b in zip(r["token_ids"], r["extra"]["original_token_ids"]))
    summary = next(line for line in out if line.startswith("token recovery"))
    assert f"({hits}/{total} tokens)" in summary and f"{hits / total:.1%}" in summary
    assert document["run"]["config"]["texts"] == TEXTS and document["run"]["method"] == "output-matching-inversion"


def test_a_yaml_recipe_gives_the_same_run_as_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\nlayer: 0\nsteps: 20\nobjective: cosine\nprogress: false\n"
                      f"texts: {json.dumps(TEXTS)}\nout: {tmp_path / 'a'}\n")
    assert main(["invert", "--config", str(recipe)]) == 0
    assert main([*TINY, "--text", TEXTS[0], "--text", TEXTS[1], "--out", str(tmp_path / "b")]) == 0
    a, b = _results(tmp_path / "a")["results"], _results(tmp_path / "b")["results"]
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b] and [r["spec"] for r in a] == TEXTS


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as stop:  # malformed flags end in the parser, with the same one-line message
        return stop.code


@pytest.mark.parametrize("argv, words", [
    (["--text", ""], "text 1 is empty"),
    (["--text", "fine", "--text", ""], "text 2 is empty"),
    ([], "no text to invert"),
    (["--text", "the sea", "--objective", "l2"], "allowed are l1, cosine"),
    (["--text", "the sea", "--prior", "gaussian"], "allowed are embedding, simplex"),
    (["--text", "the sea", "--steps", "x"], "steps"),
])
def test_bad_input_exits_2_with_one_sentence_and_no_result_file(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    assert _exit_code(["invert", "--model", "tiny-llama", *argv, "--out", str(out)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("featopt: error:") and words in errors[0]
    assert not (out / "results.json").exists()
