"""SAE latents as the features of every method: the searches and the gradient methods, run through
`attach`, agree with brute force (a plain HF forward, then the SAE's formula written out here)."""

from __future__ import annotations

import pytest
import torch

from featopt.commands.optimize import AscentConfig, optimize
from featopt.commands.search import ExhaustiveConfig, GreedyConfig, exhaustive, greedy
from featopt.models import ModelAdapter
from featopt.models.sae.attach import attach
from featopt.models.sae.model import SAEConfig, SparseAutoencoder
from featopt.models.tiny import build_tiny
from tests.discrete.search_reference import resid_post

LAYER = 1


@pytest.fixture(scope="module")
def tiny64():
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model.double(), tok, name="tiny-llama")


@pytest.fixture(scope="module")
def sae(tiny64):
    cfg = SAEConfig(d_in=tiny64.d_model, d_sae=40, architecture="relu", hook_name=f"blocks.{LAYER}.hook_resid_post")
    sae = SparseAutoencoder(cfg)
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.2, 0.3, 40))
        sae.b_dec.copy_(torch.randn(tiny64.d_model, generator=torch.Generator().manual_seed(1)) * 0.1)
    sae.source = "in-memory"
    return sae.double()


def _latents(adapter, sae, ids):
    """Brute force: the plain HF forward's block output, then relu((x - b_dec) W_enc + b_enc)."""
    with torch.no_grad():
        x = resid_post(adapter.model, ids, LAYER)
        return torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)


def test_attach_reads_the_sae_site_and_refuses_a_wrong_width(tiny64, sae):
    view, site = attach(tiny64, sae)
    assert site.name == f"blocks.{LAYER}.resid_post" and view.width(site) == 40
    assert tiny64.width(site) == tiny64.d_model  # the original adapter is untouched
    ids = torch.tensor([[3, 17, 9]])
    torch.testing.assert_close(view.run([site], input_ids=ids)[site], _latents(tiny64, sae, ids))
    wrong = SparseAutoencoder(SAEConfig(d_in=tiny64.d_model + 1, d_sae=8, architecture="relu", hook_name=site.name))
    with pytest.raises(ValueError, match="wide"):
        attach(tiny64, wrong)


def test_exhaustive_sweep_of_every_latent_equals_brute_force(tiny64, sae, tmp_path):
    view, site = attach(tiny64, sae)
    config = ExhaustiveConfig(model="tiny-llama", layer=LAYER, features="[:, :, 0-39]",
                              top_k=3, progress=False, out=str(tmp_path), dtype="float64")
    results = exhaustive(config, view).results
    ids = torch.arange(tiny64.vocab_size)[:, None]
    brute = _latents(tiny64, sae, ids)[:, 0]  # [vocab, 40]
    assert len(results) == 40
    for f, result in enumerate(results):
        best = int(torch.argmax(brute[:, f]))  # first maximum: the lower id among ties, as the sweep
        assert result.token_ids == [best], f
        assert result.activation == pytest.approx(float(brute[best, f]), abs=1e-9)
        assert result.feature_map["path"] == "in-memory" and result.feature_map["sha256"] == sae.content_hash()


def test_greedy_with_an_sae_equals_brute_force(tiny64, sae, tmp_path):
    view, _ = attach(tiny64, sae)
    config = GreedyConfig(model="tiny-llama", layer=LAYER, features="[:, :, 5]", tokens=2, variant="last",
                          progress=False, out=str(tmp_path), dtype="float64")
    result = greedy(config, view).results[0]
    first = int(torch.argmax(_latents(tiny64, sae, torch.arange(tiny64.vocab_size)[:, None])[:, -1, 5]))
    pairs = torch.stack([torch.full((tiny64.vocab_size,), first), torch.arange(tiny64.vocab_size)], 1)
    second = int(torch.argmax(_latents(tiny64, sae, pairs)[:, -1, 5]))
    assert result.token_ids == [first, second]


def test_embedding_ascent_on_a_latent_re_measures_the_decoded_tokens(tiny64, sae, tmp_path):
    view, _ = attach(tiny64, sae)
    config = AscentConfig(model="tiny-llama", layer=LAYER, features="[:, :, 0-2]", tokens=3, steps=15,
                          progress=False, out=str(tmp_path), decode_every=100)
    run = optimize(config, view)
    for f, result in enumerate(run.results):
        brute = _latents(tiny64, sae, torch.tensor([result.token_ids]))[0, :, f].mean()
        assert result.activation == pytest.approx(float(brute), abs=1e-6)
        assert result.feature_map["d_sae"] == 40
    # the continuous input's activation is the latent of the optimized embeddings
    embeds = run.module.parametrization(None).detach()
    with torch.no_grad():
        x = view.run([f"blocks.{LAYER}.resid_post"], inputs_embeds=embeds)
    assert run.results[0].continuous_activation == pytest.approx(float(list(x.values())[0][0, :, 0].mean()), abs=1e-6)
