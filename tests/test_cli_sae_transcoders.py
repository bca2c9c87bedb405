"""`featopt sae train` for the new architectures and for transcoders on the command line: per-layer
transcoders from one pass (and from a cache of input/output pairs), saved in SAELens' format,
loaded back and evaluated with the MLP replaced; bad flags end in one sentence, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from featopt.cli import main
from featopt.models import load_model
from featopt.models.sae.formats import load_sae

TEXT = ("The cat sat on the mat. The dog ran to the park and back again. " * 30)
BASE = ["--model", "tiny-llama", "--context_length", "16", "--batch_size", "128", "--tokens", "1280",
        "--buffer_batches", "2", "--k", "4", "--eval_contexts", "4", "--no_progress"]
LAYERS = ["--site", "blocks.0-1.mlp_in", "--target_site", "mlp_out"]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    return folder


def test_per_layer_skip_transcoders_from_one_pass_save_load_and_replace_the_mlp(tmp_path, corpus):
    out = tmp_path / "tc"
    assert main(["sae", "train", *BASE, *LAYERS, "--architecture", "batchtopk", "--skip", "--corpus", str(corpus),
                 "--out", str(out)]) == 0
    folders = sorted(p for p in out.iterdir() if (p / "cfg.json").exists())
    assert [p.name.split("-")[0] for p in folders] == ["blocks.0.mlp_in", "blocks.1.mlp_in"]
    adapter = load_model("tiny-llama")
    training = json.loads((out / "training.json").read_text())
    for layer, folder in enumerate(folders):
        cfg = json.loads((folder / "cfg.json").read_text())
        # sae-lens' names: a batchtopk transcoder infers as a JumpReLU one, with its skip connection
        assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["apply_b_dec_to_input"] is False
        assert cfg["metadata"]["hook_name_out"] == f"blocks.{layer}.hook_mlp_out" and cfg["d_out"] == cfg["d_in"]
        assert cfg["metadata"]["training_architecture"] == "batchtopk"
        sae = load_sae(folder)
        assert sae.cfg.architecture == "batchtopk" and sae.is_transcoder and sae.cfg.skip
        assert float(sae.threshold.min()) > 0 and sae.W_skip.abs().sum() > 0  # learned, not the start
        # the transcoder stands in for the MLP: check its output against the MLP's on fresh tokens
        ids = torch.randint(0, adapter.vocab_size, (2, 12), generator=torch.Generator().manual_seed(layer))
        acts = adapter.run([f"blocks.{layer}.mlp_in"], input_ids=ids)
        x = acts[adapter.site(f"blocks.{layer}.mlp_in")]
        pre = x @ sae.W_enc + sae.b_enc
        by_hand = torch.relu(pre) * (pre > sae.threshold) @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T
        torch.testing.assert_close(sae(x), by_hand, rtol=1e-5, atol=1e-5)
        metrics = training["saes"][layer]["metrics"]
        assert 0 < metrics["fvu"] < 1 and metrics["kl_div"] > 0
    evaluated = tmp_path / "eval"
    assert main(["sae", "eval", "--model", "tiny-llama", "--sae", str(folders[1]), "--corpus", str(corpus),
                 "--split", "eval", "--context_length", "16", "--contexts", "4", "--out", str(evaluated),
                 "--no_progress"]) == 0
    again = json.loads((evaluated / "metrics.json").read_text())["saes"][0]["metrics"]
    assert again["fvu"] == pytest.approx(training["saes"][1]["metrics"]["fvu"], rel=1e-4)
    # its latents are features of the methods: the sweep reads them at the MLP's input
    swept = tmp_path / "sweep"
    assert main(["search", "exhaustive", "--model", "tiny-llama", "--sae", str(folders[1]), "--features", "[:, :, 0-3]",
                 "--out", str(swept), "--no_progress"]) == 0
    found = json.loads((swept / "results.json").read_text())["results"]
    assert len(found) == 4 and all(r["site"] == "blocks.1.mlp_in" for r in found)
    assert found[0]["feature_map"]["target_hook_name"] == "blocks.1.hook_mlp_out"
    sae = load_sae(folders[1])
    for r in found:  # the recorded activation is the latent of the found token, computed here
        x = adapter.run(["blocks.1.mlp_in"], input_ids=torch.tensor([r["token_ids"]]))[adapter.site("blocks.1.mlp_in")]
        want = float(sae.encode(x)[0, -1, int(r["spec"].split(",")[-1].strip(" ]"))])
        assert r["activation"] == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_transcoders_from_a_cache_of_input_output_pairs_equal_those_from_the_model(tmp_path, corpus):
    assert main(["sae", "train", *BASE, *LAYERS, "--corpus", str(corpus), "--out", str(tmp_path / "model")]) == 0
    assert main(["sae", "cache", "--model", "tiny-llama", "--site", "blocks.0-1.mlp_in,blocks.0-1.mlp_out",
                 "--context_length", "16", "--corpus", str(corpus), "--out", str(tmp_path / "cache"), "--no_progress"]) == 0
    assert main(["sae", "train", *BASE, *LAYERS, "--activations", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "cached")]) == 0
    folders = sorted(p for p in (tmp_path / "model").iterdir() if (p / "cfg.json").exists())
    assert len(folders) == 2
    for folder in folders:
        a, b = load_sae(folder), load_sae(tmp_path / "cached" / folder.name)
        assert a.cfg.architecture == "topk" and a.cfg.target_hook_name.endswith("hook_mlp_out")
        assert json.loads((folder / "cfg.json").read_text())["architecture"] == "topk_transcoder"
        for name, value in a.state_dict().items():
            torch.testing.assert_close(b.state_dict()[name], value, msg=name)


@pytest.mark.parametrize("arch,extra", [("matryoshka", ["--matryoshka", "0.25,1"]), ("jumprelu", ["--l0_coef", "0.1"])])
def test_new_architectures_train_save_and_load(tmp_path, corpus, arch, extra):
    out = tmp_path / arch
    assert main(["sae", "train", *BASE, "--site", "blocks.1.resid_post", "--architecture", arch, *extra,
                 "--corpus", str(corpus), "--out", str(out)]) == 0
    sae = load_sae(out)
    assert sae.cfg.architecture == arch and json.loads((out / "cfg.json").read_text())["architecture"] == "jumprelu"
    if arch == "matryoshka":
        assert sae.cfg.matryoshka == (64, 256) and sae.cfg.k == 4


@pytest.mark.parametrize("flags,message", [
    (["--site", "blocks.1.resid_post", "--skip"], "--skip adds a skip connection to transcoders"),
    (["--site", "blocks.0-1.mlp_in", "--target_site", "blocks.1.mlp_out"], "--target_site names 1 sites for the 2"),
    (["--site", "blocks.1-0.mlp_in"], "runs backwards"),
    (["--site", "blocks.1.resid_post", "--architecture", "matryoshka", "--matryoshka", "0.5,0.25"],
     "must be increasing fractions"),
    (["--site", "blocks.1.resid_post", "--architecture", "jumprelu", "--bandwidth", "0"], "--bandwidth must be positive"),
])
def test_bad_flags_end_in_one_sentence(tmp_path, corpus, capsys, flags, message):
    out = tmp_path / "bad"
    assert main(["sae", "train", *BASE, *flags, "--corpus", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_ablating_a_transcoder_latent_edits_the_mlp_output_as_a_hand_hook_does():
    from featopt.dictionaries.ablation import direction_ablation
    from featopt.models.sae import SAEConfig, SparseAutoencoder

    adapter = load_model("tiny-llama")
    d = adapter.d_model
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=32, architecture="relu", hook_name="blocks.1.mlp_in",
                                      target_hook_name="blocks.1.mlp_out", d_out=d, apply_b_dec_to_input=False))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    ids = torch.randint(0, adapter.vocab_size, (2, 9), generator=gen)
    got = direction_ablation(adapter, sae, 3, ids)
    mlp = adapter.model.model.layers[1].mlp

    def edit(module, args, output):  # the MLP's output minus latent 3's share, z from the MLP's own input
        z = torch.relu(args[0] @ sae.W_enc + sae.b_enc)[..., 3:4]
        return output - z * sae.W_dec[3]

    with torch.no_grad():
        clean = torch.log_softmax(adapter.model(ids).logits.float(), -1)
        handle = mlp.register_forward_hook(edit)
        try:
            ablated = torch.log_softmax(adapter.model(ids).logits.float(), -1)
        finally:
            handle.remove()
    want = (ablated - clean)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got.delta, want, rtol=1e-4, atol=1e-5)
    assert want.abs().max() > 1e-4  # the edit changes the predictions: the check is not vacuous


def test_a_transcoder_dashboard_reads_its_latents_from_the_mlp_input(tmp_path, corpus):
    """`sae dashboard` on a transcoder: every activation it shows (top examples, the exhaustive
    sweep's best token) is the latent of the MLP's own input, re-measured by a plain HF hook."""
    from featopt.models.sae import SAEConfig, SparseAutoencoder
    from featopt.models.sae.formats import save_sae

    adapter = load_model("tiny-llama")
    d = adapter.d_model
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=16, architecture="topk", k=4, hook_name="blocks.1.mlp_in",
                                      target_hook_name="blocks.1.mlp_out", d_out=d))
    sae.init_weights(torch.Generator().manual_seed(3))
    sae.requires_grad_(False)
    folder = save_sae(sae, tmp_path / "transcoder")
    dash = tmp_path / "dash"
    assert main(["sae", "dashboard", "--model", "tiny-llama", "--sae", str(folder), "--corpus", str(corpus),
                 "--context_length", "16", "--features", "[:, :, 0-2]", "--input_tokens", "3", "--input_steps", "2",
                 "--input_width", "4", "--search_top", "5", "--ablate_examples", "1", "--out", str(dash),
                 "--no_progress"]) == 0
    records = json.loads((dash / "records.json").read_text())["latents"]
    assert [r["latent"] for r in records] == [0, 1, 2] and (dash / "latent-0.html").is_file()

    def latent(ids, i):  # the MLP's input of block 1, read by a plain forward hook, through the transcoder
        seen = {}
        handle = adapter.model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0]))
        try:
            with torch.no_grad():
                adapter.model(input_ids=torch.as_tensor(ids)[None])
        finally:
            handle.remove()
        return sae.encode(seen["x"])[0, :, i]

    from featopt.commands.sae_dashboard import DashboardConfig
    from featopt.data import corpus_contexts

    c = DashboardConfig()
    contexts = corpus_contexts(adapter.tokenizer, str(corpus), 16, split=c.split, eval_fraction=c.eval_fraction,
                               max_tokens=c.tokens)
    checked = 0
    for record in records:
        i = record["latent"]
        assert record["top_examples"]
        for ex in record["top_examples"]:
            assert ex["activation"] == pytest.approx(float(latent(contexts[ex["context"]], i)[ex["index"]]), abs=1e-4)
        token, value = record["max_inputs"]["exhaustive"][0]
        ids = torch.cat([adapter.encode(record["max_inputs"]["prefix"]), adapter.encode(token)])
        if len(ids) == 2:  # else a byte-level piece that does not re-encode to one token
            assert value == pytest.approx(float(latent(ids, i)[-1]), abs=1e-4)
            checked += 1
    assert checked > 0
