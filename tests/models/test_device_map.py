"""`--device_map` / `--max_memory`: a model dispatched by accelerate (layers offloaded to the disk, or
spilled there by a small `max_memory`) gives the same activations as the plain load, inputs go to the
embedding's device, and the early exit still skips the blocks after the deepest site read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.models import Site, load_model
from featopt.models.placement import is_dispatched
from featopt.models.tiny import build_tiny

SITES = [Site(0, "resid_post"), Site(1, "mlp_hidden"), Site(1, "attn_out"), Site(2, "mlp_out")]
DISK_MAP = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk"}


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FEATOPT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tok = build_tiny("tiny-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 99, 7, 300], [1, 2, 3, 4, 5, 6]])


def _dispatched(folder: Path, how: str):
    if how == "disk":
        return load_model(str(folder), device_map=DISK_MAP)
    if how == "max_memory":  # auto with a tiny CPU budget: accelerate puts the rest on the disk
        return load_model(str(folder), device_map="auto", max_memory='{"cpu": 150000}')
    return load_model("tiny-llama", device_map=DISK_MAP)  # built in memory, then dispatched


@pytest.mark.parametrize("how", ["disk", "max_memory", "built-in"])
def test_dispatched_model_reads_the_same_activations(folder, how):
    plain = load_model(str(folder))
    adapter = _dispatched(folder, how)
    assert adapter.dispatched and is_dispatched(adapter.model)
    assert "disk" in adapter.info.device_map.values()
    assert adapter.model.get_input_embeddings().weight.is_meta or how == "max_memory"
    ids = _ids()
    want, got = plain.run(SITES + ["logits"], input_ids=ids), adapter.run(SITES + ["logits"], input_ids=ids)
    for site in want:
        torch.testing.assert_close(got[site], want[site], rtol=1e-5, atol=1e-5)
    # The plain HF forward of the dispatched model (accelerate's own hooks) agrees with featopt's logits.
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(ids), plain.model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # Continuous inputs: the embedding rows (loaded from the disk) and a gradient through them.
    torch.testing.assert_close(adapter.embedding, plain.embedding)
    embeds = adapter.embedding[ids].clone().requires_grad_(True)
    adapter.run([Site(2, "resid_post")], inputs_embeds=embeds)[Site(2, "resid_post")].sum().backward()
    ref = plain.embedding[ids].clone().requires_grad_(True)
    plain.run([Site(2, "resid_post")], inputs_embeds=ref)[Site(2, "resid_post")].sum().backward()
    torch.testing.assert_close(embeds.grad, ref.grad, rtol=1e-4, atol=1e-5)
    # Weights read directly: MLP rows and the LM head, loaded although offloaded.
    torch.testing.assert_close(adapter.mlp_up_weight(2), plain.mlp_up_weight(2))
    torch.testing.assert_close(adapter.mlp_gate_weight(1), plain.mlp_gate_weight(1))
    # Nothing stays loaded after a forward that stopped inside an offloaded block.
    assert all(p.is_meta for p in adapter.blocks[1].parameters()) or how == "max_memory"


@pytest.mark.parametrize("how", ["disk", "max_memory"])
def test_early_exit_skips_later_blocks_when_dispatched(folder, how):
    adapter = _dispatched(folder, how)
    calls = {i: 0 for i in range(adapter.n_layers)}
    handles = [block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(adapter.blocks)]
    try:
        adapter.run([Site(0, "mlp_out")], input_ids=_ids())
        assert calls == {0: 1, 1: 0, 2: 0}
        adapter.run([Site(1, "mlp_hidden")], input_ids=_ids())
        assert calls == {0: 2, 1: 1, 2: 0}
    finally:
        for handle in handles:
            handle.remove()
    # The block cut short offloads again: its weights are back on the meta device.
    if how == "disk":
        assert all(p.is_meta for p in adapter.blocks[1].parameters())


def test_write_hooks_and_to_on_a_dispatched_model(folder):
    plain, adapter = load_model(str(folder)), load_model(str(folder), device_map=DISK_MAP)
    site = Site(1, "mlp_out")
    write = {site: lambda act, s: act * 0}
    want = plain.run([Site(2, "resid_post")], input_ids=_ids(), write=write)
    got = adapter.run([Site(2, "resid_post")], input_ids=_ids(), write=write)
    torch.testing.assert_close(got[Site(2, "resid_post")], want[Site(2, "resid_post")], rtol=1e-5, atol=1e-5)
    assert adapter.to("cpu") is adapter  # placed by accelerate: a move is a no-op
    with pytest.raises(FeatoptError, match="--dtype"):
        adapter.to(torch.float64)


def test_device_map_from_a_json_file_and_bf16(folder, tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(DISK_MAP))
    adapter = load_model(str(folder), device_map=str(path), dtype=torch.bfloat16)
    plain = load_model(str(folder), dtype=torch.bfloat16)
    assert adapter.dtype == torch.bfloat16
    want, got = plain.run(SITES, input_ids=_ids()), adapter.run(SITES, input_ids=_ids())
    for site in want:
        torch.testing.assert_close(got[site], want[site])


@pytest.mark.parametrize("kwargs, words", [
    (dict(device_map="everywhere"), "neither a strategy nor a file"),
    (dict(device_map='{"model.layers.0": "gpu7"}'), "not a device"),
    (dict(device_map='{"model.layers.0": 3}'), "GPU"),
    (dict(device_map="[1, 2]"), "not a JSON object"),
    (dict(device_map="auto", max_memory="20GiB"), "not JSON"),
    (dict(device_map="auto", max_memory='{"tpu": "1GiB"}'), "allowed are GPU indices"),
    (dict(device_map="auto", max_memory='{"cpu": "lots"}'), "size"),
    (dict(max_memory='{"cpu": "1GiB"}'), "only applies with --device_map"),
])
def test_bad_device_map_values_are_one_sentence(folder, kwargs, words):
    if kwargs.get("device_map") == "[1, 2]":
        kwargs = {**kwargs, "device_map": str(folder / "map.json")}
        (folder / "map.json").write_text("[1, 2]")
    with pytest.raises(FeatoptError, match=words.replace("[", r"\[")):
        load_model(str(folder), **kwargs)


def test_a_map_that_misses_a_module_is_one_sentence(folder):
    with pytest.raises(FeatoptError, match="--device_map"):
        load_model(str(folder), device_map={"model.layers.0": "cpu", "lm_head": "disk"})


def test_weight_readers_of_a_dispatched_model(folder):
    """Neuron decoding through an offloaded LM head, and the embedding read again in inference mode
    (where offloaded weights come back as meta tensors without a version counter)."""
    from featopt.weights.neurons import decode_model

    plain, adapter = load_model(str(folder)), load_model(str(folder), device_map=DISK_MAP)
    want = decode_model(plain, [0, 2], norm="apply", progress=False)
    got = decode_model(adapter, [0, 2], norm="apply", progress=False)
    for layer in want:
        assert torch.equal(got[layer].ids, want[layer].ids)
        torch.testing.assert_close(got[layer].probs, want[layer].probs)
    with torch.inference_mode():
        adapter.run([Site(2, "mlp_out")], input_ids=_ids())
        torch.testing.assert_close(adapter.embedding, plain.embedding)
        torch.testing.assert_close(adapter.embedding, plain.embedding)
