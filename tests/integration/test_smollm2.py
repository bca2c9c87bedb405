"""featopt on a real trained model, SmolLM2-135M-Instruct (Llama architecture, 30 layers)."""

from __future__ import annotations

import pytest
import torch

from featopt.gradient.decoding import nearest_decode, pinv_decoder
from featopt.models import SITE_KINDS, Site
from featopt.commands.optimize import AscentConfig
from featopt.commands.optimize import optimize as run

pytestmark = pytest.mark.slow


def test_every_site_equals_the_hf_forward(smollm):
    model = smollm.model
    ids = smollm.encode("The capital of France is Paris, and")[None]
    seen, handles = {}, []
    for layer in (0, 14, 29):
        block = model.model.layers[layer]
        handles += [
            block.self_attn.register_forward_hook(lambda m, a, o, l=layer: seen.__setitem__((l, "attn_out"), o[0])),
            block.mlp.register_forward_hook(lambda m, a, o, l=layer: seen.__setitem__((l, "mlp_out"), o)),
            block.mlp.down_proj.register_forward_pre_hook(lambda m, a, l=layer: seen.__setitem__((l, "mlp_hidden"), a[0])),
            block.register_forward_hook(lambda m, a, o, l=layer: seen.__setitem__((l, "resid_post"), o)),
        ]
    try:
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for h in handles:
            h.remove()
    for layer in (0, 14, 29):
        acts = smollm.run([Site(layer, k) for k in SITE_KINDS], input_ids=ids)
        torch.testing.assert_close(acts[Site(layer, "resid_pre")], hidden[layer])
        expected_post = hidden[layer + 1] if layer < 29 else seen[(layer, "resid_post")]
        torch.testing.assert_close(acts[Site(layer, "resid_post")], expected_post)
        for kind in ("attn_out", "mlp_hidden", "mlp_out"):
            torch.testing.assert_close(acts[Site(layer, kind)], seen[(layer, kind)])


def test_pinv_decoding_on_the_real_vocabulary_matches_numpy_style_pinv(smollm):
    E = smollm.embedding.detach()
    gen = torch.Generator().manual_seed(0)
    queries = E[torch.randint(0, E.shape[0], (16,), generator=gen)] + 0.05 * torch.randn(16, E.shape[1], generator=gen)
    reference = (torch.linalg.pinv(E.double()).T @ queries.double().T).T  # [16, vocab]
    got = pinv_decoder(E).decode(queries)
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-6 * top2[:, 0].abs()
    assert torch.equal(got[clear], reference.argmax(-1)[clear])
    # exact token embeddings come back as themselves with nearest-cosine decoding
    ids = torch.tensor([464, 3000, 12345, 40000])
    assert torch.equal(nearest_decode(E, E[ids]), ids)


def test_optimize_layer_0_records_re_measured_activations(smollm, tmp_path):
    result = run(AscentConfig(model="smollm2-135m-instruct", layer=0, features="[:, :, 0-4]", tokens=5,
                              steps=60, out=str(tmp_path), progress=False), smollm)
    assert [r.spec for r in result.results] == [f"[:, :, {i}]" for i in range(5)]
    for f, r in enumerate(result.results):
        ids = torch.tensor([r.token_ids])
        hidden = smollm.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        assert r.activation == pytest.approx(hidden[0, :, f].mean().item(), rel=1e-4, abs=1e-4)
        assert r.continuous_activation > 50  # the optimized embeddings approach C = 100
        assert len(r.token_ids) == 5 and r.text == smollm.tokenizer.decode(r.token_ids)
    assert (tmp_path / "results.json").exists() and (tmp_path / "embeddings.safetensors").exists()
