"""The `featopt` command: flags, YAML recipes, output and bad input (exit 2, one sentence)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from featopt.cli import build_parser, main
from featopt.results import read_results

RECIPES = sorted(r for r in (Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml") if not r.name.startswith("sae-"))
SAE_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("sae-*.yaml"))
TINY = ["--model", "tiny-gpt2", "--layer", "1", "--tokens", "3", "--steps", "5", "--no_progress"]


def test_optimize_prints_one_line_per_problem_and_writes_results(tmp_path, capsys):
    assert main(["optimize", *TINY, "--features", "[:, :, 0-2]", "--out", str(tmp_path)]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[:")]
    assert [l[: len(f"[:, :, {i}]")] for i, l in enumerate(lines)] == ["[:, :, 0]", "[:, :, 1]", "[:, :, 2]"]
    document = json.loads((tmp_path / "results.json").read_text())
    assert [r["spec"] for r in document["results"]] == ["[:, :, 0]", "[:, :, 1]", "[:, :, 2]"]
    for line, r in zip(lines, document["results"]):
        assert repr(r["text"]) in line and f"activation {r['activation']:.4g}" in line


def test_a_yaml_recipe_gives_the_same_run_as_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: tiny-gpt2\nlayer: 1\ntokens: 3\nsteps: 5\nprogress: false\nfeatures: '[:, 1, 0:4]'\nout: {tmp_path / 'a'}\n")
    assert main(["optimize", "--config", str(recipe)]) == 0
    assert main(["optimize", *TINY, "--features", "[:, 1, 0:4]", "--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())["results"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b] and a[0]["spec"] == "[:, 1, 0:4]"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_shipped_recipes_parse(recipe):
    args = build_parser().parse_args(["optimize", "--config", str(recipe)])
    assert args.optimize.model and args.optimize.features


@pytest.mark.parametrize("recipe", SAE_RECIPES, ids=[r.name for r in SAE_RECIPES])
def test_shipped_sae_recipes_parse(recipe):
    args = build_parser().parse_args(["sae", "train", "--config", str(recipe)])
    assert args.sae.train.model and args.sae.train.site and args.sae.train.tokens >= 1_000_000


@pytest.mark.parametrize("argv, words", [
    (["optimize", "--model", "tiny-gpt2", "--features", "[:, :, 9999]"], "out of range"),
    (["optimize", "--model", "tiny-gpt2", "--layer", "7"], "3 layers"),
    (["optimize", "--model", "tiny-gpt2", "--features", "[:, :"], "malformed feature spec"),
    (["optimize", "--model", "tiny-gpt2", "--site", "nowhere"], "allowed kinds"),
    (["optimize", "--model", "no-such-model-here"], "Cannot load model"),
    (["optimize", "--layer", "x"], "layer"),
    (["optimize", "--precision", "fp8"], "allowed are"),
])
def test_bad_input_exits_2_with_one_sentence_and_no_result_file(tmp_path, argv, words):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "featopt", *argv, "--out", str(out)], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("featopt: error:")]
    assert len(errors) == 1 and words in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "results.json").exists()


def test_demo_without_the_real_model_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEATOPT_MODEL_PATH", str(tmp_path / "empty"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "tiny-llama" in out and "FEATOPT_MODEL_PATH" in out
    # the same features answered three ways: the sweep's exact optimum, gradient ascent and GCG
    document = json.loads((tmp_path / "demo" / "1-compare" / "compare.json").read_text())
    assert set(document["features"][0]["methods"]) == {"embedding-pinv", "simplex-argmax", "gcg"}
    _, ascent = read_results(tmp_path / "demo" / "2-ascent")
    _, gcg = read_results(tmp_path / "demo" / "2-gcg")
    assert [r.spec for r in ascent] == [r.spec for r in gcg] == [f"[:, :, {f}]" for f in range(5)]
    for a, g in zip(ascent, gcg):  # the printed side-by-side table holds the re-measured activations
        assert f"{a.activation:.4g}" in out and f"{g.activation:.4g}" in out
    assert out.count("results:") == 0 or "Runs:" in out


def test_compare_runs_with_its_default_methods(tmp_path):
    # `methods` has a default_factory: the flag's default must be the built list, not a placeholder.
    assert main(["compare", "--model", "tiny-gpt2", "--steps", "2", "--features", "[:, :, 0]", "--out", str(tmp_path),
                 "--no_progress"]) == 0
    document = json.loads((tmp_path / "compare.json").read_text())
    assert set(document["features"][0]["methods"]) == {"embedding-pinv", "embedding-nearest", "simplex-argmax", "gcg"}
