"""`featopt search gcg|epo` and `featopt invert --method gcg` on the command line: bad input ends
in one sentence naming the flag, exit status 2 and no output folder; a tiny run of each prints
its table, checked against results.json and a plain forward."""

from __future__ import annotations

import json

import pytest
import torch

from featopt.cli import main
from featopt.models import load_model

TINY = ["--model", "tiny-gpt2", "--no_progress"]
GCG = ["search", "gcg", *TINY]
EPO = ["search", "epo", *TINY]
INVERT = ["invert", "--model", "tiny-llama", "--no_progress", "--text", "the sea", "--method", "gcg"]


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as stop:  # malformed flags end in the parser, with the same one-line message
        return stop.code


BAD = [
    # (argv, words the one line must hold)
    (GCG + ["--tokens", "100000"], "--tokens 100000"),
    (EPO + ["--tokens", "100000"], "--tokens 100000"),
    (GCG + ["--tokens", "65"], "at most 64"),
    (GCG + ["--prefix", "the sea", "--tokens", "61"], "--tokens 61 after a 4-token prefix"),
    (GCG + ["--tokens", "0"], "--tokens"),
    (GCG + ["--allow", "ascii", "--candidates", "0"], "--allow ascii"),
    (EPO + ["--allow", "ascii", "--candidates", "0"], "--allow ascii"),
    (GCG + ["--candidates", "0"], "--allow no-special"),  # 0 is <|endoftext|>
    (EPO + ["--lambdas", "[.nan]"], "--lambdas"),
    (EPO + ["--lambdas", "[0, .inf]"], "--lambdas"),
    (EPO + ["--lambdas", "[0, -1]"], "--lambdas"),
    (EPO + ["--lambdas", "[]"], "--lambdas"),
    (EPO + ["--lambdas", "[0, 1, 1]"], "--lambdas"),
    (EPO + ["--lambdas", "[zero]"], "lambdas"),
    (GCG + ["--search_width", "0"], "--search_width"),
    (EPO + ["--search_width", "0"], "--search_width"),
    (INVERT + ["--search_width", "0"], "--search_width"),
    (GCG + ["--topk", "0"], "--topk"),
    (EPO + ["--topk", "0"], "--topk"),
    (INVERT + ["--topk", "0"], "--topk"),
    (GCG + ["--n_replace", "0"], "--n_replace"),
    (EPO + ["--n_replace", "0"], "--n_replace"),
    (INVERT + ["--n_replace", "0"], "--n_replace"),
    (GCG + ["--steps", "0"], "--steps"),
    (EPO + ["--steps", "0"], "--steps"),
    (INVERT + ["--steps", "0"], "--steps"),
    (GCG + ["--buffer_size", "0"], "--buffer_size"),
    (EPO + ["--front_size", "0"], "--front_size"),
    (GCG + ["--allow", "printable"], "--allow 'printable'"),
    (EPO + ["--allow", "printable"], "--allow 'printable'"),
    (INVERT + ["--allow", "printable"], "--allow 'printable'"),
    (GCG + ["--variant", "middle"], "--variant 'middle'"),
    (EPO + ["--variant", "middle"], "--variant 'middle'"),
    (GCG + ["--init", ""], "--init"),
    (EPO + ["--init", "  "], "--init"),
    (GCG + ["--init", "the sea", "--tokens", "5"], "--tokens"),
    (GCG + ["--init", "ids:1,2,x"], "--init"),
    (GCG + ["--init", "ids:1,99999"], "--init"),
    (EPO + ["--init", "the sea", "--tokens", "2"], "--init"),
    (GCG + ["--features", "[:, 0, 1]"], "--variant"),
    (EPO + ["--tokens", "1"], "--prefix"),
    (EPO + ["--init", "x"], "--prefix"),
    (GCG + ["--steps", "many"], "steps"),
    (["invert", "--model", "tiny-llama", "--no_progress", "--text", "the sea", "--method", "bogus"], "--method 'bogus'"),
    (INVERT + ["--causal_topk", "-1"], "--causal_topk"),
    (INVERT + ["--devices", "2"], "--devices"),
    (INVERT + ["--isolated"], "--isolated"),
]


@pytest.mark.parametrize("argv, words", BAD, ids=[" ".join(a[1:2] + a[-2:]) for a, _ in BAD])
def test_bad_input_exits_2_with_one_sentence_naming_the_flag_and_no_output(tmp_path, capsys, argv, words):
    out = tmp_path / "x"
    assert _exit_code([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1, captured.err
    assert errors[0].startswith("featopt: error:") and words in errors[0], errors[0]
    assert "Traceback" not in captured.err and not out.exists()


def _table_cells(out_text, records, prefix_length=0):
    for r in records:
        text = "".join(r["tokens"][prefix_length:]) if prefix_length else r["text"]
        assert f"{text!r} {r['activation']:.4g}" in out_text


def test_search_gcg_prints_the_table_of_results_json_and_re_measures(tmp_path, capsys):
    assert main([*GCG, "--layer", "1", "--features", "[:, :, 0-1]", "--tokens", "2", "--steps", "3",
                 "--search_width", "16", "--topk", "16", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    records = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["method"] for r in records] == ["gcg", "gcg"] and [r["spec"] for r in records] == ["[:, :, 0]", "[:, :, 1]"]
    lines = out.splitlines()
    assert "[:, :, 0]" in lines[0] and "[:, :, 1]" in lines[0] and lines[1].startswith("blocks.1.resid_post")
    _table_cells(lines[1], records)
    assert f"results: {tmp_path}" in out
    adapter = load_model("tiny-gpt2")
    for r, feature in zip(records, (0, 1)):
        ids = torch.tensor([r["token_ids"]])
        assert len(r["token_ids"]) == 2 and r["extra"]["steps"] == 3
        with torch.no_grad():  # hidden_states[2]: the output of block 1 (not the last block, so no final norm)
            expected = float(adapter.model(input_ids=ids, output_hidden_states=True).hidden_states[2][0, -1, feature])
        assert r["activation"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_search_epo_prints_its_fronts_and_writes_the_files(tmp_path, capsys):
    assert main([*EPO, "--layer", "1", "--features", "[:, :, 3]", "--tokens", "2", "--prefix", " the", "--steps", "2",
                 "--search_width", "8", "--topk", "8", "--lambdas", "[0, 2]", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (record,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert record["method"] == "epo" and [m["lambda"] for m in record["extra"]["members"]] == [0, 2]
    _table_cells(out, [record], record["extra"]["prefix_length"])
    front = record["extra"]["front"]
    assert f"blocks.1.resid_post [:, :, 3]: front of {len(front)}" in out
    for q in front:  # one line per point: xent, activation, text
        assert f"  {q['xent']:7.3f}  {q['activation']:9.4g}  {q['text']!r}" in out
    assert max(q["activation"] for q in front) == record["activation"]
    assert json.loads((tmp_path / "fronts.json").read_text())["fronts"][0]["front"] == front
    assert (tmp_path / "fronts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"results: {tmp_path}" in out


def test_invert_gcg_prints_the_token_recovery(tmp_path, capsys):
    texts = ["the sea", "a small town"]
    assert main(["invert", "--model", "tiny-llama", "--no_progress", "--method", "gcg", "--layer", "0", "--steps", "5",
                 "--text", texts[0], "--text", texts[1], "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    document = json.loads((tmp_path / "results.json").read_text())
    records = document["results"]
    assert document["run"]["method"] == "gcg-inversion" and [r["spec"] for r in records] == texts
    tokenizer = load_model("tiny-llama").tokenizer
    hits = total = 0
    for r, text in zip(records, texts):
        original = tokenizer.encode(text, add_special_tokens=False)
        hit = sum(a == b for a, b in zip(r["token_ids"], original))
        hits, total = hits + hit, total + len(original)
        line = next(line for line in out if line.startswith(repr(text)))
        assert f"->  {r['text']!r}" in line and f"({hit}/{len(original)})" in line
    summary = next(line for line in out if line.startswith("token recovery"))
    assert f"({hits}/{total} tokens)" in summary and f"{hits / total:.1%}" in summary
    assert hits == total  # the causal pass over every token inverts layer 0 exactly
