"""`featopt flow match|graph|groups|transition|deactivate|steer` end to end on tiny-llama with tiny
SAEs saved to disk. The methods are checked against independent computations in tests/feature_flow; here:
that each command writes what it says, that its records agree with a plain recomputation where
cheap, and that bad input ends in one sentence and exit 2 with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from featopt.cli import main
from featopt.models import load_model
from featopt.models.sae.formats import save_sae
from featopt.models.sae.model import SAEConfig, SparseAutoencoder

KEYS = [(0, "res"), (1, "res"), (2, "res"), (1, "mlp"), (2, "mlp"), (1, "att"), (2, "att")]
KINDS = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_out"}
TEXT = "The cat sat on the mat. The dog ran to the park and back again. " * 20
SMALL = ["--tokens", "512", "--context_length", "16", "--no_progress"]


def sae_at(hook, seed, d_in=64, d_sae=32):
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=4, hook_name=hook))
    sae.init_weights(torch.Generator().manual_seed(seed))
    return sae


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-cli")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text(TEXT)
    for i, (layer, module) in enumerate(KEYS):
        save_sae(sae_at(f"blocks.{layer}.{KINDS[module]}", i), root / "saes" / f"{layer}-{module}")
    save_sae(sae_at("blocks.1.resid_post", 9, d_in=32), root / "narrow")
    save_sae(sae_at("blocks.5.resid_post", 9), root / "deep")
    return {"root": root, "saes": root / "saes", "corpus": root / "corpus", "narrow": root / "narrow",
            "deep": root / "deep", "res0": root / "saes" / "0-res", "res1": root / "saes" / "1-res"}


def decoder(files, key):
    from featopt.models.sae.formats import load_sae

    return load_sae(files["saes"] / f"{key[0]}-{key[1]}").W_dec.detach().double()


def cos(A, B):
    return (A / A.norm(dim=1, keepdim=True)) @ (B / B.norm(dim=1, keepdim=True)).T


def test_match_writes_dense_top1(files, tmp_path, capsys):
    from safetensors.torch import load_file

    assert main(["flow", "match", "--saes", str(files["saes"]), "--k", "2", "--out", str(tmp_path)]) == 0
    assert "2/res" in capsys.readouterr().out
    tensors = load_file(tmp_path / "matches.safetensors")
    want = cos(decoder(files, (2, "res")), decoder(files, (2, "mlp"))).topk(2, dim=1)
    torch.testing.assert_close(tensors["2.res-2.mlp.scores"].double(), want.values, atol=1e-5, rtol=0)
    assert torch.equal(tensors["2.res-2.mlp.indices"], want.indices)
    pairs = json.loads((tmp_path / "matches.json").read_text())["pairs"]
    assert {(p["target"], p["candidate"]) for p in pairs} >= {("2/res", "1/res"), ("2/res", "2/att"), ("1/mlp", "0/res")}
    assert (tmp_path / "matches.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_graph_edges_score_their_decoder_cosines(files, tmp_path):
    assert main(["flow", "graph", "--saes", str(files["saes"]), "--feature", "2/res/3", "--threshold", "0.2",
                 "--model", "tiny-llama", "--out", str(tmp_path)]) == 0
    graph = json.loads((tmp_path / "graph.json").read_text())
    assert {"2/res/3"} <= {n["id"] for n in graph["nodes"]} and graph["edges"]
    for edge in graph["edges"]:
        (la, ma, ia), (lb, mb, ib) = (e.split("/") for e in (edge["source"], edge["target"]))
        value = cos(decoder(files, (int(la), ma))[[int(ia)]], decoder(files, (int(lb), mb))[[int(ib)]])
        assert edge["score"] >= 0.2 and abs(float(value) - edge["score"]) < 1e-5
    assert all(n["label"] for n in graph["nodes"])  # labelled by the logit lens
    assert (tmp_path / "graph.graphml").is_file() and (tmp_path / "graph.png").is_file()


def test_groups_count_every_active_target_event(files, tmp_path):
    from featopt.data import corpus_contexts
    from featopt.models.sae.formats import load_sae

    assert main(["flow", "groups", "--model", "tiny-llama", "--saes", str(files["saes"]), "--corpus",
                 str(files["corpus"]), *SMALL, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "groups.json").read_text())
    adapter = load_model("tiny-llama")
    contexts = corpus_contexts(adapter.tokenizer, files["corpus"], 16, split="all", max_tokens=512)
    sae = load_sae(files["saes"] / "2-res")
    with torch.no_grad():
        acts = next(iter(adapter.run(["blocks.2.resid_post"], input_ids=contexts).values()))
    active = int((sae.encode(acts)[:, 1:] > 0).sum())  # skip_first 1
    assert sum(record["layers"]["2"]["counts"]) == record["layers"]["2"]["events"] == active
    assert (tmp_path / "groups.png").is_file() and (tmp_path / "transitions.png").is_file()


def test_transition_and_deactivate_write_records(files, tmp_path):
    args = ["--model", "tiny-llama", "--saes", str(files["saes"]), "--corpus", str(files["corpus"]), *SMALL]
    assert main(["flow", "transition", *args, "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "transition.json").read_text())
    assert main(["flow", "deactivate", *args, "--events", "12", "--rs", "0,1", "--out", str(tmp_path / "d")]) == 0
    record = json.loads((tmp_path / "d" / "deactivation.json").read_text())
    assert record and (tmp_path / "d" / "deactivation.png").is_file() and (tmp_path / "d" / "r_sweep.png").is_file()


def test_steer_with_r_one_generates_the_baseline(files, tmp_path):
    assert main(["flow", "steer", "--model", "tiny-llama", "--saes", str(files["saes"]), "--feature", "2/res/3",
                 "--threshold", "0.2", "--mode", "scale", "--rs", "1", "--tokens", "6", "--prompts", '["The cat", "A dog"]',
                 "--no_progress", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "steering.json").read_text())
    texts = {s["name"]: [g["ids"] for g in s["generations"]] for s in record["settings"]}
    assert texts["single r=1"] == texts["unsteered"] == texts["multi r=1"]
    assert (tmp_path / "steering.png").is_file() and (tmp_path / "graph" / "graph.json").is_file()



def test_python_api_runs_on_a_loaded_model(files, tmp_path):
    """`featopt.flow.*(adapter=...)`: the graph is labelled by that model without --model; a corpus
    command sees it with its own --bos and leaves the caller's as it was; the records match the CLI's."""
    import featopt.flow

    adapter = load_model("tiny-llama")
    run = featopt.flow.graph(saes=str(files["saes"]), feature="2/res/3", threshold="0.2", adapter=adapter,
                             out=str(tmp_path / "g"))
    assert run.graph.nodes and all(attrs["label"] for attrs in run.graph.nodes.values())
    assert json.loads((tmp_path / "g" / "graph.json").read_text())["settings"]["run"]["model"] == "tiny-llama"
    args = dict(saes=str(files["saes"]), corpus=str(files["corpus"]), tokens=512, context_length=16, progress=False)
    run = featopt.flow.groups(**args, bos=True, adapter=adapter, out=str(tmp_path / "api"))
    assert adapter.bos is False and "From RES" in run.table()
    assert main(["flow", "groups", "--model", "tiny-llama", "--bos", "--saes", str(files["saes"]), "--corpus",
                 str(files["corpus"]), *SMALL, "--out", str(tmp_path / "cli")]) == 0
    api, cli = (json.loads((tmp_path / name / "groups.json").read_text()) for name in ("api", "cli"))
    assert api["layers"] == cli["layers"]

def _block_out(model, ids, layer):
    """The output of HF block `layer` for `ids [N, T]`, from a plain forward with a hook."""
    seen = []
    hook = model.model.layers[layer].register_forward_hook(
        lambda module, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        hook.remove()
    return seen[0]


def test_groups_with_bos_count_the_events_of_a_plain_forward_after_the_bos(files, tmp_path):
    """--bos: the contexts are [BOS] + 15 corpus tokens (the tokenizer's stream, cut here); the
    events are the 2/res latents (topk written out) firing after position 0 of a plain forward."""
    from featopt.models.sae.formats import load_sae

    assert main(["flow", "groups", "--model", "tiny-llama", "--bos", "--saes", str(files["saes"]), "--corpus",
                 str(files["corpus"]), *SMALL, "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "groups.json").read_text())
    assert record["run"]["config"]["bos"] is True
    adapter = load_model("tiny-llama")
    tok = adapter.tokenizer
    stream = tok.encode(TEXT, add_special_tokens=False) + [tok.eos_token_id]
    n = min(len(stream) // 15, 512 // 16)
    ids = torch.tensor([[tok.bos_token_id] + stream[i * 15:(i + 1) * 15] for i in range(n)])
    x = _block_out(adapter.model, ids, 2)[:, 1:]  # skip_first 1: the BOS position
    sae = load_sae(files["saes"] / "2-res")
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    active = int((pre.topk(sae.cfg.k, dim=-1).values > 0).sum())
    assert sum(record["layers"]["2"]["counts"]) == record["layers"]["2"]["events"] == active > 0


def test_steer_with_bos_starts_every_prompt_with_it(files, tmp_path):
    """--bos: each prompt is [BOS] + its tokens, the unsteered generation is a plain greedy loop
    from there, and the theme words' ids are the words' own first tokens (never the BOS)."""
    assert main(["flow", "steer", "--model", "tiny-llama", "--bos", "--saes", str(files["saes"]), "--feature", "2/res/3",
                 "--threshold", "0.2", "--mode", "scale", "--rs", "1", "--tokens", "5", "--theme_words", "dog",
                 "--prompts", '["The cat", "A dog"]', "--no_progress", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "steering.json").read_text())
    assert json.loads((tmp_path / "run.json").read_text())["config"]["bos"] is True
    adapter = load_model("tiny-llama")
    tok = adapter.tokenizer
    prompts = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in ("The cat", "A dog")]
    assert record["prompts"] == prompts
    assert record["theme_ids"] == list(dict.fromkeys([tok.encode(" dog")[0], tok.encode("dog")[0]]))
    unsteered = next(s for s in record["settings"] if s["name"] == "unsteered")
    for prompt, generation in zip(prompts, unsteered["generations"], strict=True):
        ids = list(prompt)
        for _ in range(5):
            with torch.no_grad():
                ids.append(int(adapter.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] == tok.eos_token_id:
                break
        assert generation["ids"] == ids[len(prompt):]


@pytest.mark.parametrize("argv, words", [
    (["match", "--saes", "{res0},{narrow}"], "different widths"),
    (["match", "--saes", "{saes},{narrow}"], "two SAEs for 1/res"),
    (["match", "--saes", "{saes}", "--k", "0"], "at least 1"),
    (["match", "--saes", "{saes}", "--baseline", "shuffle"], "baseline"),
    (["match", "--saes", "{saes}", "--target", "7/res"], "no SAE for 7/res"),
    (["match", "--saes", "{corpus}"], "no cfg.json"),
    (["match", "--saes", "{saes}", "--out", "{file}"], "is a file"),
    (["graph", "--saes", "{saes}", "--feature", "2/res/32"], "out of range"),
    (["graph", "--saes", "{saes}", "--feature", "2/resid/3"], "malformed"),
    (["graph", "--saes", "{saes}", "--feature", "2/res/3", "--threshold", "nan"], "finite"),
    (["graph", "--saes", "{saes}", "--feature", "2/res/3", "--threshold", "high"], "malformed"),
    (["graph", "--saes", "{saes}", "--feature", "2/res/3", "--direction", "up"], "direction"),
    (["groups", "--saes", "{res0},{deep}", "--corpus", "{corpus}"], "3 layers"),
    (["groups", "--saes", "{saes}", "--corpus", "{corpus}", "--method", "best"], "method"),
    (["groups", "--saes", "{saes}", "--corpus", "{corpus}", "--layers", "0"], "layer 0"),
    (["groups", "--saes", "{saes}", "--corpus", "{root}/nothing"], "does not exist"),
    (["groups", "--saes", "{saes}", "--corpus", "{corpus}", "--skip_first", "16"], "skip_first"),
    (["transition", "--saes", "{res0},{res1}", "--corpus", "{corpus}", "--context_length", "1"], "context length"),
    (["deactivate", "--saes", "{saes}", "--corpus", "{corpus}", "--r", "nan"], "float"),
    (["deactivate", "--saes", "{saes}", "--corpus", "{corpus}", "--rs", "0,inf"], "finite"),
    (["deactivate", "--saes", "{saes}", "--corpus", "{corpus}", "--events", "0"], "at least 1"),
    (["steer", "--saes", "{saes}", "--feature", "2/res/3", "--rs", "1,nan"], "finite"),
    (["steer", "--saes", "{saes}", "--feature", "2/res/3", "--mode", "boost"], "mode"),
    (["steer", "--saes", "{saes}", "--feature", "2/res/3", "--prompts", '[" "]'], "non-empty"),
    (["steer", "--saes", "{saes}", "--feature", "2/res/3", "--graph", "{root}/nothing"], "does not exist"),
    (["steer", "--saes", "{saes}", "--feature", "2/res/3", "--layers", "9"], "keeps no feature"),
])
def test_bad_input_exits_2_with_one_sentence_and_nothing_written(files, tmp_path, argv, words, capsys):
    (tmp_path / "file").write_text("a file")
    argv = ["flow", *(a.format(**files, file=tmp_path / "file") for a in argv)]
    if argv[1] != "match" and argv[1] != "graph":
        argv += ["--model", "tiny-llama", "--no_progress"]
    if argv[1] in ("groups", "transition", "deactivate") and "--context_length" not in argv:
        argv += ["--context_length", "16", "--tokens", "256"]
    out = tmp_path / "out"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("featopt: error:")]
    assert code == 2
    assert len(errors) == 1 and words in errors[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert (tmp_path / "file").read_text() == "a file"
