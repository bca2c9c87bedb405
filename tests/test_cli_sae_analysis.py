"""`featopt sae features|lens|ablate|mcs|dashboard` on the command line, end to end on a tiny model.
The numbers are checked against independent computations in tests/sae (corpus statistics, lens,
ablations, MCS, the pages); here: that each command writes what it says, that its records agree
with a plain recomputation where cheap, and that bad input ends in one sentence and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featopt.cli import main
from featopt.commands.sae_dashboard import DashboardRun
from featopt.models import load_model
from featopt.models.sae.formats import load_sae, save_sae
from featopt.models.sae.model import SAEConfig, SparseAutoencoder

TEXT = ("The cat sat on the mat. The dog ran to the park and back again. " * 30)
CTX = ["--context_length", "16"]
INPUTS = ["--input_tokens", "3", "--input_steps", "2", "--input_width", "4"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae-analysis")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "b.txt").write_text(TEXT.upper())
    saes = []
    for d_sae, seed in ((32, 0), (64, 1)):
        sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=d_sae, architecture="topk", k=4,
                                          hook_name="blocks.1.hook_resid_post"))
        sae.init_weights(torch.Generator().manual_seed(seed))
        saes.append(save_sae(sae, root / f"sae-{d_sae}"))
    return {"root": root, "corpus": corpus, "small": saes[0], "big": saes[1]}


def test_features_then_dashboard_reuses_the_statistics(files, tmp_path, capsys):
    feats = tmp_path / "features"
    assert main(["sae", "features", "--model", "tiny-llama", "--sae", str(files["big"]), "--corpus", str(files["corpus"]),
                 *CTX, "--top_k", "3", "--out", str(feats), "--no_progress"]) == 0
    meta = json.loads((feats / "features.json").read_text())
    assert (feats / "features.safetensors").is_file() and meta["meta"]["seed"] == 0
    assert "latents fired" in capsys.readouterr().out
    dash = tmp_path / "dash"
    assert main(["sae", "dashboard", "--model", "tiny-llama", "--sae", str(files["big"]), "--stats", str(feats),
                 "--features", "[:, :, 0-3]", *INPUTS, "--search_top", "5", "--ablate_examples", "1",
                 "--out", str(dash), "--no_progress"]) == 0
    records = json.loads((dash / "records.json").read_text())["latents"]
    assert [r["latent"] for r in records] == [0, 1, 2, 3]
    assert sorted(p.name for p in dash.glob("latent-*.html")) == [f"latent-{i}.html" for i in range(4)]
    shown = DashboardRun(records, dash)._repr_html_()  # in a notebook: the table, then latent 0's page inline
    assert "4 latents" in shown and "<iframe srcdoc=" in shown and "Latent 0" in shown and "style.css" not in shown
    page = DashboardRun(records, dash).page(2)
    assert "<h1>Latent 2</h1>" in str(page) and "<style>" in str(page) and "<iframe" in page._repr_html_()
    # The best exhaustive token after the prefix (the end-of-text token), and the searched input
    # (its exact ids, the prefix first), re-measured here by a plain HF forward and the SAE.
    adapter, sae = load_model("tiny-llama"), load_sae(files["big"])
    checked = 0
    for record in records:
        token, value = record["max_inputs"]["exhaustive"][0]
        prefix = adapter.encode(record["max_inputs"]["prefix"])
        assert prefix.tolist() == [adapter.tokenizer.eos_token_id]
        best = record["inputs"]["best"]
        assert best["token_ids"][0] == adapter.tokenizer.eos_token_id and len(best["token_ids"]) == 4
        cases = ((torch.cat([prefix, adapter.encode(token)]), value, 2),
                 (torch.tensor(best["token_ids"]), best["activation"], 4))
        for ids, want, length in cases:
            if len(ids) != length:
                continue  # byte-level pieces that do not re-encode to the same tokens
            with torch.no_grad():
                hidden = adapter.model(input_ids=ids[None], output_hidden_states=True).hidden_states[2]
                assert want == pytest.approx(float(sae.encode(hidden)[0, -1, record["latent"]]), abs=1e-4)
            checked += 1
        # Top examples: the window's target activation is the example's activation.
        for ex in record["top_examples"]:
            assert ex["acts"][ex["target"]] == pytest.approx(ex["activation"])
    assert checked > 0


def test_lens_ablate_and_mcs_write_their_records(files, tmp_path, capsys):
    assert main(["sae", "lens", "--model", "tiny-llama", "--sae", str(files["small"]), "--features", "0-2", "--k", "4",
                 "--out", str(tmp_path / "lens")]) == 0
    lens = json.loads((tmp_path / "lens" / "lens.json").read_text())
    assert [r["latent"] for r in lens["latents"]] == [0, 1, 2] and len(lens["latents"][0]["top"]) == 4
    assert lens["run"]["sae"]["sha256"] == load_sae(files["small"]).describe()["sha256"]
    assert main(["sae", "ablate", "--model", "tiny-llama", "--sae", str(files["small"]), "--latent", "5",
                 "--text", "The cat sat on the mat.", "--position", "4", "--out", str(tmp_path / "ablate")]) == 0
    ablate = json.loads((tmp_path / "ablate" / "ablate.json").read_text())
    assert ablate["position"] == 4 and len(ablate["ablated_text"]["change"]) == 4
    assert main(["sae", "mcs", "--sae", f"{files['small']},{files['big']}", "--out", str(tmp_path / "mcs")]) == 0
    rows = json.loads((tmp_path / "mcs" / "mcs.json").read_text())["rows"]
    assert {(r["a"], r["b"]) for r in rows} == {("sae-32", "sae-64"), ("sae-64", "sae-32")}
    assert (tmp_path / "mcs" / "mcs.png").stat().st_size > 0
    assert "sae-32" in capsys.readouterr().out


def _latent(adapter, sae, ids, latent):
    """The latent at every position of `ids`, from a plain HF forward (resid_post of block 1)."""
    with torch.no_grad():
        hidden = adapter.model(input_ids=torch.as_tensor(ids)[None], output_hidden_states=True).hidden_states[2]
        return sae.encode(hidden)[0, :, latent]


def test_with_bos_ablate_and_dashboard_run_every_input_after_the_bos(files, tmp_path, capsys):
    adapter, sae = load_model("tiny-llama"), load_sae(files["small"])
    bos, text = adapter.tokenizer.bos_token_id, "The cat sat on the mat."
    ids = [bos] + adapter.tokenizer.encode(text, add_special_tokens=False)
    latent = int(_latent(adapter, sae, ids[:5], slice(None))[4].argmax())  # one that fires at position 4
    assert main(["sae", "ablate", "--model", "tiny-llama", "--bos", "--sae", str(files["small"]), "--latent", str(latent),
                 "--text", text, "--position", "4", "--out", str(tmp_path / "ablate")]) == 0
    ablate = json.loads((tmp_path / "ablate" / "ablate.json").read_text())
    assert ablate["run"]["config"]["bos"] is True and ablate["position"] == 4
    np.testing.assert_allclose(ablate["activations"], _latent(adapter, sae, ids, latent).numpy(), atol=1e-5)
    ablated = ablate["ablated_text"]  # the BOS token (position 0) is kept: tokens 1-3 are removed in turn
    assert ablated["first"] == 1 and ablated["tokens"] == [adapter.decode([t]) for t in ids[:5]]
    assert ablated["base"] > 0
    for j, change in zip(range(1, 4), ablated["change"], strict=True):
        shorter = ids[:j] + ids[j + 1:5]
        assert change == pytest.approx(float(_latent(adapter, sae, shorter, latent)[-1]) - ablated["base"], abs=1e-4)
    assert "(the BOS token at position 0 kept)" in capsys.readouterr().out

    dash = tmp_path / "dash"
    assert main(["sae", "dashboard", "--model", "tiny-llama", "--bos", "--sae", str(files["small"]), "--corpus",
                 str(files["corpus"]), *CTX, "--features", "[:, :, 0-2]", *INPUTS, "--search_top", "5",
                 "--ablate_examples", "1", "--out", str(dash), "--no_progress"]) == 0
    document = json.loads((dash / "records.json").read_text())
    assert document["run"]["config"]["bos"] is True
    checked = 0
    for record in document["latents"]:
        latent, found = record["latent"], record["max_inputs"]
        assert found["prefix"] == ""  # the BOS token is the input's start: the sweep's token is at position 1
        token, value = found["exhaustive"][0]
        best = record["inputs"]["best"]
        assert best["token_ids"][0] == bos  # the searched input follows the BOS token
        cases = (([bos] + adapter.tokenizer.encode(token), value, 2), (best["token_ids"], best["activation"], 4))
        for run_ids, want, length in cases:
            if len(run_ids) == length:  # else byte-level pieces that do not re-encode to the same tokens
                assert want == pytest.approx(float(_latent(adapter, sae, run_ids, latent)[-1]), abs=1e-4)
                checked += 1
        for example in record["ablated_text"]:  # every window runs after the BOS token, which is kept
            assert example["first"] == 1 and example["tokens"][0] == adapter.decode([bos])
        for ex in record["top_examples"]:
            assert ex["acts"][ex["target"]] == pytest.approx(ex["activation"])
    assert checked > 0 and any(record["ablated_text"] for record in document["latents"])
    # statistics taken without --bos index other contexts: refused
    assert main(["sae", "features", "--model", "tiny-llama", "--sae", str(files["small"]), "--corpus", str(files["corpus"]),
                 *CTX, "--top_k", "2", "--out", str(tmp_path / "features"), "--no_progress"]) == 0
    capsys.readouterr()
    assert main(["sae", "dashboard", "--model", "tiny-llama", "--bos", "--sae", str(files["small"]), "--stats",
                 str(tmp_path / "features"), "--features", "0", "--out", str(tmp_path / "dash2"), "--no_progress"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "without --bos" in errors[0] and not (tmp_path / "dash2").exists()


@pytest.mark.parametrize("argv, words", [
    (["sae", "lens", "--sae", "{small}", "--features", "[:, :, 40]"], "out of range"),
    (["sae", "lens", "--sae", "{small}", "--features", "[:, :, 0:3]"], "single latents"),
    (["sae", "lens", "--sae", "{small}", "--norm", "rms"], "norm"),
    (["sae", "features", "--sae", "{small}", "--corpus", "{corpus}", "--context_length", "4096"], "positions"),
    (["sae", "features", "--sae", "{small}", "--corpus", "{short}", "--context_length", "60"], "fewer than one context"),
    (["sae", "features", "--sae", "{small}", "--corpus", "{corpus}", "--top_k", "0"], "at least 1"),
    (["sae", "ablate", "--sae", "{small}", "--text", "The cat sat", "--position", "40"], "out of range"),
    (["sae", "ablate", "--sae", "{small}", "--text", "   "], "empty"),
    (["sae", "ablate", "--sae", "{small}", "--text", "The cat", "--latent", "32"], "out of range"),
    (["sae", "ablate", "--sae", "{small}", "--text", "The cat sat", "--mode", "zero"], "mode"),
    (["sae", "mcs", "--sae", "{small}"], "at least two"),
    (["sae", "mcs", "--sae", "{small},{small}", "--threshold", "1.5"], "between 0 and 1"),
    (["sae", "dashboard", "--sae", "{small}", "--corpus", "{corpus}", "--features", "[:, :, 99]"], "out of range"),
    (["sae", "dashboard", "--sae", "{small}", "--corpus", "{corpus}", "--out", "{foreign}"], "not featopt's"),
    (["sae", "dashboard", "--sae", "{small}", "--corpus", "{corpus}", "--out", "{file}"], "is a file"),
    (["sae", "dashboard", "--sae", "{small}", "--stats", "{corpus}"], "features"),
])
def test_bad_input_exits_2_with_one_sentence_and_nothing_written(files, tmp_path, argv, words, capsys):
    (tmp_path / "short.txt").write_text("The cat.")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    paths = {**files, "short": tmp_path / "short.txt", "foreign": foreign, "file": tmp_path / "file"}
    argv = [a.format(**paths) for a in argv]
    if argv[1] != "mcs":
        argv = argv[:2] + ["--model", "tiny-llama"] + argv[2:]
    if "--context_length" not in argv and argv[1] in ("features", "dashboard"):
        argv += CTX
    out = tmp_path / "out"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("featopt: error:")]
    assert code == 2
    assert len(errors) == 1 and words in errors[0], errors
    assert not out.exists()
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    assert (tmp_path / "file").read_text() == "a file"
