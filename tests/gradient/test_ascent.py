"""Embedding ascent on tiny models: gradients, results and re-measured activations checked
against the plain HF forward."""

from __future__ import annotations

import json

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.models import ModelAdapter
from featopt.models.tiny import build_tiny
from featopt.commands.optimize import AscentConfig, build
from featopt.commands.optimize import optimize as run


@pytest.fixture(scope="module")
def tiny():
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model, tok, name="tiny-llama")


def _config(tmp_path, **kw):
    base = dict(model="tiny-llama", layer=1, features="[:, :, 0-2]", tokens=4, steps=30, lr=0.05,
                out=str(tmp_path / "run"), progress=False, decode_every=10)
    return AscentConfig(**{**base, **kw})


def _hf_resid_post(adapter, layer, ids=None, embeds=None):
    out = adapter.model(input_ids=ids, inputs_embeds=embeds, output_hidden_states=True)
    return out.hidden_states[layer + 1]


def test_loss_and_gradient_match_a_plain_hf_computation(tiny, tmp_path):
    module = build(_config(tmp_path), tiny)
    module.trainer = None
    rows = torch.arange(3)
    losses, _ = module.step_losses(rows)
    module.zero_grad()
    losses.sum().backward()
    got = module.parametrization.embeds.grad.clone()

    embeds = module.parametrization.embeds.detach().clone().requires_grad_(True)
    hidden = _hf_resid_post(tiny, 1, embeds=embeds)
    want = sum((100.0 - hidden[p, :, p]).abs().sum() for p in range(3))
    want.backward()
    torch.testing.assert_close(losses.sum(), want.detach())
    torch.testing.assert_close(got, embeds.grad)


def test_run_raises_activations_and_records_re_measured_tokens(tiny, tmp_path):
    config = _config(tmp_path)
    start = build(config, tiny)
    start.trainer = None
    _, before = start.step_losses(torch.arange(3))
    result = run(config, tiny)
    assert [r.spec for r in result.results] == ["[:, :, 0]", "[:, :, 1]", "[:, :, 2]"]
    for p, r in enumerate(result.results):
        assert r.continuous_activation > before[p].item()
        # the recorded activation is the decoded tokens' own, measured independently here
        ids = torch.tensor([r.token_ids])
        assert r.activation == pytest.approx(_hf_resid_post(tiny, 1, ids=ids)[0, :, p].mean().item(), abs=1e-4)
        assert r.text == tiny.tokenizer.decode(r.token_ids)
        nearest = torch.tensor([r.nearest_token_ids])
        assert r.extra["nearest_activation"] == pytest.approx(_hf_resid_post(tiny, 1, ids=nearest)[0, :, p].mean().item(), abs=1e-4)
        assert r.extra["pinv_token_ids"] == r.token_ids and r.extra["decoded_by"] == "pinv"
        assert len(r.token_cosine) == 4 and 0 <= r.pinv_nearest_agreement <= 1
        assert r.seed == 0 and r.dtype == "float32" and r.model == "tiny-llama" and "torch" in r.versions

    document = json.loads((result.out / "results.json").read_text())
    assert document["run"]["config"]["features"] == "[:, :, 0-2]"
    assert len(document["results"]) == 3
    from safetensors.torch import load_file

    tensors = load_file(result.out / "embeddings.safetensors")
    assert tensors["embeddings"].shape == (3, 4, tiny.d_model)
    assert tensors["token_ids"].tolist() == [r.token_ids for r in result.results]


def test_the_language_model_stays_out_of_the_state_dict(tiny, tmp_path):
    module = build(_config(tmp_path), tiny)
    assert list(module.state_dict()) == ["parametrization.embeds"]


def test_same_seed_same_answer(tiny, tmp_path):
    a = run(_config(tmp_path / "a", steps=10), tiny)
    b = run(_config(tmp_path / "b", steps=10), tiny)
    assert [r.token_ids for r in a.results] == [r.token_ids for r in b.results]
    torch.testing.assert_close(a.module.parametrization.embeds, b.module.parametrization.embeds)


def test_isolated_uses_the_block_alone(tiny, tmp_path):
    result = run(_config(tmp_path, isolated=True, layer=2, steps=5, features="[:, 1, 7]"), tiny)
    r = result.results[0]
    ids = torch.tensor([r.token_ids])
    # independent: block 2 of the HF model applied directly to the token embeddings
    layer = tiny.model.model
    embeds = layer.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    rope = layer.rotary_emb(embeds, position_ids=pos)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    out = layer.layers[2](embeds, attention_mask=mask, position_embeddings=rope, position_ids=pos)
    out = out[0] if isinstance(out, tuple) else out
    assert r.activation == pytest.approx(out[0, 1, 7].item(), abs=1e-4)


def test_init_from_text_and_bad_input(tiny, tmp_path):
    text = "the sea"
    n = len(tiny.encode(text))
    module = build(_config(tmp_path, init=text, tokens=n), tiny)
    torch.testing.assert_close(module.parametrization.embeds[1], tiny.embedding[tiny.encode(text)])
    with pytest.raises(FeatoptError, match="--tokens"):
        build(_config(tmp_path, init=text, tokens=n + 1), tiny)
    with pytest.raises(FeatoptError, match="out of range"):
        build(_config(tmp_path, features="[:, :, 64]"), tiny)
    with pytest.raises(FeatoptError, match="3 layers"):
        build(_config(tmp_path, layer=3), tiny)
    with pytest.raises(FeatoptError, match="precision"):
        build(_config(tmp_path, precision="fp8"), tiny)
    assert not (tmp_path / "run" / "results.json").exists()


def test_simplex_prior_reports_its_argmax_and_the_pinv_decoding(tiny, tmp_path):
    result = run(_config(tmp_path, prior="simplex", steps=10, features="[:, :, 0-1]"), tiny)
    logits = result.module.parametrization.logits.detach()
    for p, r in enumerate(result.results):
        assert r.method == "simplex-softmax" and r.extra["decoded_by"] == "simplex-argmax"
        assert r.token_ids == logits[p].argmax(-1).tolist()
        ids = torch.tensor([r.token_ids])
        assert r.activation == pytest.approx(_hf_resid_post(tiny, 1, ids=ids)[0, :, p].mean().item(), abs=1e-4)
        pinv = torch.tensor([r.extra["pinv_token_ids"]])
        assert r.extra["pinv_activation"] == pytest.approx(_hf_resid_post(tiny, 1, ids=pinv)[0, :, p].mean().item(), abs=1e-4)
    assert list(result.module.state_dict()) == ["parametrization.logits"]


def test_bos_is_a_fixed_first_input_and_is_recorded(tmp_path):
    """With --bos the optimized tokens follow the BOS token: the loss is the plain HF forward of
    [BOS row, embeds], and the recorded activation that of [BOS] + the decoded ids."""
    model, tok = build_tiny("tiny-llama")
    adapter = ModelAdapter(model, tok, name="tiny-llama", bos=True)
    bos = tok.bos_token_id
    config = _config(tmp_path, bos=True, steps=5)
    module = build(config, adapter)
    module.trainer = None
    losses, _ = module.step_losses(torch.arange(3))
    embeds = module.parametrization.embeds.detach()
    row = model.get_input_embeddings()(torch.tensor([[bos]])).expand(3, 1, -1)
    hidden = _hf_resid_post(adapter, 1, embeds=torch.cat([row, embeds], 1))[:, 1:]
    torch.testing.assert_close(losses.sum(), sum((100.0 - hidden[p, :, p]).abs().sum() for p in range(3)))
    result = run(config, adapter)
    for p, r in enumerate(result.results):
        assert r.bos and len(r.token_ids) == 4  # the BOS is not one of the optimized tokens
        ids = torch.tensor([[bos, *r.token_ids]])
        assert r.activation == pytest.approx(_hf_resid_post(adapter, 1, ids=ids)[0, 1:, p].mean().item(), abs=1e-4)
    assert json.loads((result.out / "results.json").read_text())["run"]["config"]["bos"] is True
