"""`featopt sae train|cache|eval` and `--sae` on the methods, on the command line (the numbers
themselves are checked against independent computations in tests/sae)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from featopt.cli import main
from featopt.models.sae.formats import load_sae

TEXT = ("The cat sat on the mat. The dog ran to the park and back again. " * 30)
TRAIN = ["--model", "tiny-llama", "--site", "blocks.1.resid_post", "--context_length", "16", "--batch_size", "128",
         "--tokens", "1280", "--buffer_batches", "2", "--k", "4", "--eval_contexts", "4", "--no_progress"]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.txt").write_text(TEXT.upper())
    return folder


def test_train_writes_a_saelens_folder_with_metrics(tmp_path, corpus, capsys):
    out = tmp_path / "sae"
    assert main(["sae", "train", *TRAIN, "--corpus", str(corpus), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fvu" in printed and "ce_loss_recovered" in printed
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_sae"] == 4 * cfg["d_in"]
    assert cfg["hook_name"] == "blocks.1.hook_resid_post"
    sae = load_sae(out)
    training = json.loads((out / "training.json").read_text())
    assert training["saes"][0]["hash"] == sae.content_hash()
    assert 0 <= training["saes"][0]["metrics"]["dead_fraction"] <= 1
    assert training["saes"][0]["metrics"]["kl_div"] > 0
    assert (out / "latent_density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # beside the SAE
    assert (out / "tensorboard").is_dir()


def test_several_sizes_from_one_pass_and_the_cache_gives_the_same_saes(tmp_path, corpus):
    sizes = ["--expansion", "1,2"]
    assert main(["sae", "train", *TRAIN, *sizes, "--corpus", str(corpus), "--out", str(tmp_path / "model")]) == 0
    folders = sorted(p for p in (tmp_path / "model").iterdir() if (p / "cfg.json").exists())
    assert sorted(load_sae(p).d_sae for p in folders) == [64, 128]
    assert main(["sae", "cache", "--model", "tiny-llama", "--site", "blocks.1.resid_post", "--context_length", "16",
                 "--corpus", str(corpus), "--out", str(tmp_path / "cache"), "--no_progress"]) == 0
    assert main(["sae", "train", *TRAIN, *sizes, "--activations", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "cached")]) == 0
    for folder in folders:
        a, b = load_sae(folder), load_sae(tmp_path / "cached" / folder.name)
        for name, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], value, msg=name)


def test_eval_writes_metrics_and_methods_take_the_sae(tmp_path, corpus, capsys):
    out = tmp_path / "sae"
    assert main(["sae", "train", *TRAIN, "--corpus", str(corpus), "--out", str(out)]) == 0
    assert main(["sae", "eval", "--model", "tiny-llama", "--sae", str(out), "--corpus", str(corpus),
                 "--context_length", "16", "--contexts", "4", "--out", str(tmp_path / "eval"), "--no_progress"]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["saes"][0]
    metrics = evaluated["metrics"]
    trained = json.loads((out / "training.json").read_text())["saes"][0]["metrics"]
    assert metrics["fvu"] == pytest.approx(trained["fvu"], rel=1e-5)  # the same held-out contexts
    assert metrics["kl_div"] == pytest.approx(trained["kl_div"], rel=1e-5)
    assert evaluated["density_plot"] == "sae_density.png" and (tmp_path / "eval" / "sae_density.png").is_file()
    assert main(["search", "exhaustive", "--model", "tiny-llama", "--sae", str(out), "--features", "[:, :, 0-3]",
                 "--out", str(tmp_path / "x"), "--no_progress"]) == 0
    result = json.loads((tmp_path / "x" / "results.json").read_text())["results"][0]
    assert result["site"] == "blocks.1.resid_post" and result["feature_map"]["path"] == str(out)
    assert result["feature_map"]["sha256"] == load_sae(out).content_hash()
    assert main(["optimize", "--model", "tiny-llama", "--sae", str(out), "--features", "[:, :, 0-1]", "--tokens", "2",
                 "--steps", "3", "--out", str(tmp_path / "o"), "--no_progress"]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["run"]["feature_map"]["d_sae"] == 256


def test_train_with_bos_reads_bos_contexts_and_eval_with_bos_agrees(tmp_path, corpus):
    """`sae train --bos` trains on [BOS] + 15 tokens of each document's train part (cut here from
    the tokenizer's stream) and evaluates on such held-out contexts: `sae eval --bos` finds the
    same numbers there, and the SAE records the setting."""
    from featopt.models import load_model
    from featopt.commands.sae_train import TrainConfig, train

    out = tmp_path / "sae"
    config = TrainConfig(model="tiny-llama", bos=True, site="blocks.1.resid_post", corpus=str(corpus), context_length=16,
                         batch_size=128, tokens=1280, buffer_batches=2, k=4, eval_contexts=4, progress=False, out=str(out))
    run = train(config)
    tok = load_model("tiny-llama").tokenizer
    stream = []
    for name in ("a.txt", "b.txt"):
        ids = tok.encode((corpus / name).read_text(), add_special_tokens=False, verbose=False)
        stream += ids[: len(ids) - round(len(ids) * 0.05)] + [tok.eos_token_id]
    expected = torch.tensor([[tok.bos_token_id] + stream[i * 15:(i + 1) * 15] for i in range(len(stream) // 15)])
    assert torch.equal(run.module.make_source.keywords["contexts"], expected)
    assert load_sae(out).cfg.metadata["bos"] is True
    trained = json.loads((out / "training.json").read_text())["saes"][0]["metrics"]
    common = ["sae", "eval", "--model", "tiny-llama", "--sae", str(out), "--corpus", str(corpus), "--context_length", "16",
              "--contexts", "4", "--no_progress"]
    assert main([*common, "--bos", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["saes"][0]["metrics"]
    assert metrics["fvu"] == pytest.approx(trained["fvu"], rel=1e-5)  # the same held-out contexts, BOS first
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())["saes"][0]["metrics"]
    assert plain["fvu"] != pytest.approx(trained["fvu"], rel=1e-5)


def _bad_sae(tmp_path):
    folder = tmp_path / "bad-sae"
    folder.mkdir()
    (folder / "cfg.json").write_text("{not json")
    (folder / "sae_weights.safetensors").write_text("nope")
    return folder


def _sae(tmp_path, name, d_in):
    from featopt.models.sae.formats import save_sae
    from featopt.models.sae.model import SAEConfig, SparseAutoencoder

    cfg = SAEConfig(d_in=d_in, d_sae=8, architecture="relu", hook_name="blocks.1.hook_resid_post")
    return save_sae(SparseAutoencoder(cfg), tmp_path / name)


@pytest.mark.parametrize("argv, words", [
    (["sae", "train", "--architecture", "gated"], "unknown SAE architecture"),
    (["sae", "train", "--expansion", "0"], "positive"),
    (["sae", "train", "--expansion", "two"], "malformed"),
    (["sae", "train", "--k", "0"], "at least 1"),
    (["sae", "train", "--l1", "nan"], "l1"),
    (["sae", "train", "--lr", "inf"], "lr"),
    (["sae", "train", "--corpus", "{empty}"], "holds no text"),
    (["sae", "train", "--corpus", "{missing}"], "does not exist"),
    (["sae", "train", "--corpus", "{corpus}", "--site", "blocks.9.resid_post"], "out of range"),
    (["sae", "train", "--corpus", "{corpus}", "--k", "999"], "d_sae"),
    (["sae", "train", "--corpus", "{corpus}", "--architecture", "jumprelu", "--l0_coef", "-1"], "--l0_coef must be"),
    (["sae", "train", "--activations", "{missing}"], "not a featopt activation cache"),
    (["sae", "eval", "--sae", "{missing}", "--corpus", "{corpus}"], "SAE path"),
    (["sae", "eval", "--sae", "{bad}", "--corpus", "{corpus}"], "cfg.json"),
    (["sae", "eval", "--sae", "{wide}", "--corpus", "{corpus}"], "wide"),
    (["sae", "eval", "--sae", "{good}", "--corpus", "{corpus}", "--context_length", "900"], "positions"),
    (["sae", "eval", "--sae", "{good}", "--corpus", "{corpus}", "--context_length", "64", "--split", "eval",
      "--eval_fraction", "0.01"], "fewer than one context"),
    (["search", "exhaustive", "--sae", "{missing}"], "SAE path"),
    (["optimize", "--sae", "{bad}"], "cfg.json"),
])
def test_bad_input_exits_2_with_one_sentence_and_nothing_written(tmp_path, corpus, argv, words, capsys):
    (tmp_path / "empty").mkdir()
    paths = {"empty": tmp_path / "empty", "missing": tmp_path / "missing", "corpus": corpus,
             "bad": _bad_sae(tmp_path), "wide": _sae(tmp_path, "wide", 7), "good": _sae(tmp_path, "good", 64)}
    argv = [a.format(**paths) for a in argv]
    if argv[0] == "sae" and "--model" not in argv:
        argv = argv[:2] + ["--model", "tiny-llama"] + argv[2:]
    if argv[0] == "sae" and "--context_length" not in argv:  # the tiny model takes 64 positions
        argv += ["--context_length", "16"]
    out = tmp_path / "out"
    try:  # in-process (an exception other than the exit would fail the test); see below for a real process
        code = main([*argv, "--out", str(out)])
    except SystemExit as exit_:
        code = exit_.code
    errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith("featopt: error:")]
    assert code == 2
    assert len(errors) == 1 and words in errors[0], errors
    assert not out.exists() or not any(out.iterdir())


def test_a_real_process_ends_bad_input_with_one_line_and_status_2(tmp_path, corpus):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "featopt", "sae", "train", "--model", "tiny-llama", "--corpus", str(corpus),
                           "--context_length", "16", "--k", "999", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.startswith("featopt: error:")] == [
        "featopt: error: --k 999 is more than the 256 latents of the SAE: give k <= d_sae."]
    assert not out.exists()


def test_compare_takes_the_sae(tmp_path, corpus):
    out = tmp_path / "sae"
    assert main(["sae", "train", *TRAIN, "--corpus", str(corpus), "--out", str(out)]) == 0
    assert main(["compare", "--model", "tiny-llama", "--sae", str(out), "--features", "[:, :, 0-1]", "--steps", "3",
                 "--out", str(tmp_path / "c"), "--no_progress"]) == 0
    document = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert document["run"]["sites"] == ["blocks.1.resid_post"] and document["run"]["feature_map"]["d_sae"] == 256
    # the sweep's optimum is over latents: it can only be >= what any method's token reaches (up to float32
    # rounding: the sweep and the re-measure encode in batches of different sizes)
    for feature in document["features"]:
        for method in feature["methods"].values():
            assert method["activation"] <= feature["optimum_activation"] + 1e-6 * (1 + abs(feature["optimum_activation"]))
