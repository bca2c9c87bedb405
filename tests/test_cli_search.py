"""`featopt search exhaustive|greedy` and `featopt compare` on the command line."""

from __future__ import annotations

import json

import pytest
import torch

from featopt.cli import main
from featopt.models import load_model

TINY = ["--model", "tiny-gpt2", "--no_progress"]


def test_search_exhaustive_prints_a_row_per_block_and_finds_the_brute_force_optimum(tmp_path, capsys):
    assert main(["search", "exhaustive", *TINY, "--layer", "0,1", "--features", "[:, :, 0-1]", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "blocks.0.resid_post" in out and "blocks.1.resid_post" in out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    adapter = load_model("tiny-gpt2")
    every = torch.arange(adapter.vocab_size)[:, None]
    hidden = adapter.model(input_ids=every, output_hidden_states=True).hidden_states
    for r in results:
        layer = int(r["site"].split(".")[1])
        feature = int(r["spec"].strip("[]").split(",")[2])
        assert r["token_ids"] == [int(hidden[layer + 1][:, 0, feature].argmax())]


def test_search_greedy_both_variants(tmp_path, capsys):
    assert main(["search", "greedy", *TINY, "--layer", "1", "--features", "[:, :, 3]", "--tokens", "2",
                 "--variant", "both", "--out", str(tmp_path)]) == 0
    assert "greedy-last" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {r["method"] for r in results} == {"greedy-last", "greedy-sum"}
    adapter = load_model("tiny-gpt2")
    # brute force, the document's way: every token after the chosen prefix, last position's feature
    every = torch.arange(adapter.vocab_size)[:, None]
    first = int(adapter.model(input_ids=every, output_hidden_states=True).hidden_states[2][:, -1, 3].argmax())
    pairs = torch.cat([torch.full_like(every, first), every], dim=1)
    second = int(adapter.model(input_ids=pairs, output_hidden_states=True).hidden_states[2][:, -1, 3].argmax())
    last = next(r for r in results if r["method"] == "greedy-last")
    assert last["token_ids"] == [first, second]


def test_compare_on_the_command_line(tmp_path, capsys):
    assert main(["compare", *TINY, "--layer", "1", "--features", "[:, :, 0-1]", "--steps", "5",
                 "--methods", '["embedding-pinv"]', "--out", str(tmp_path)]) == 0
    assert "exhaustive" in capsys.readouterr().out
    document = json.loads((tmp_path / "compare.json").read_text())
    assert len(document["features"]) == 2


def test_search_bad_input_exits_2(capsys):
    assert_exit = pytest.raises(SystemExit)
    with assert_exit as exc:
        main(["search", "sideways"])
    assert exc.value.code == 2
    assert main(["search", "greedy", *TINY, "--variant", "middle"]) == 2
    assert "allowed are last, sum, both" in capsys.readouterr().err
