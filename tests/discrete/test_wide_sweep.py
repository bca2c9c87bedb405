"""The exhaustive sweep over every latent of an SAE, scored chunk by chunk of latents (forced small
with `latent_chunk`), against a brute force: every vocabulary token through the plain HF forward,
the dense `sae.encode` (or readout), and per latent a stable sort (ties, such as the many latents
that are 0, to the lower token id)."""

from __future__ import annotations

import pytest
import torch
from search_reference import resid_post

from featopt.discrete import wide_scoring
from featopt.discrete.exhaustive import exhaustive
from featopt.discrete.objective_scoring import sweep_scorers
from featopt.models.sae import SAEConfig, SparseAutoencoder
from featopt.objectives import Selection, latent, maximize

LAYER, D_SAE, K = 1, 3001, 5
SITE = f"blocks.{LAYER}.resid_post"


def _sae(arch, seed=0):
    extra = {"k": 4} if arch == "topk" else {}
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=D_SAE, architecture=arch, hook_name=SITE, **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * (0.5 if name == "b_enc" else 1.0))
        if arch == "jumprelu":  # high thresholds: most latents never fire on a one-token input
            sae.threshold.copy_(torch.rand(D_SAE, generator=gen) * 12)
    return sae.double()


@pytest.fixture(scope="module")
def acts(tiny64):
    """`[vocab, d_model]`: every token alone through the plain HF forward, at SITE."""
    with torch.no_grad():
        return resid_post(tiny64.model, torch.arange(tiny64.vocab_size)[:, None], LAYER)[:, 0]


def _brute(z, features, k=K):
    """Per problem (a latent of `features`), the k best `(ids, values)` of `z [vocab, d_sae]`."""
    z = z[:, features].double()
    order = torch.sort(z, dim=0, descending=True, stable=True).indices[:k]
    return order, z.gather(0, order)


def _check(topk, want_ids, want_values):
    assert torch.equal(topk.ids.cpu(), want_ids)
    torch.testing.assert_close(topk.values.cpu(), want_values, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
@pytest.mark.parametrize("spec, features", [(f"[:, :, 0-{D_SAE - 1}]", list(range(D_SAE))),
                                             ("[:, :, 2000-2999]", list(range(2000, 3000))),
                                             ("[:, :, [2900, 7, 7, 31]]", [2900, 7, 7, 31])])
def test_every_latent_in_chunks_equals_brute_force(tiny64, acts, arch, spec, features):
    sae = _sae(arch)
    view = tiny64.with_features(SITE, sae)
    with torch.no_grad():
        z = sae.encode(acts)
    if arch != "relu":  # the fill: latents that never fire, and latents that fire on fewer than K tokens
        fired = (z > 0).sum(0)
        assert (fired == 0).any() and ((fired > 0) & (fired < K)).any()
    objective = maximize(Selection(SITE, spec)).bind(view)
    topk = exhaustive(view, objective, k=K, batch_size=100, latent_chunk=701, progress=False)
    _check(topk, *_brute(z, features))
    ordinary = exhaustive(view, objective, k=K, batch_size=100, progress=False)  # 3001 latents: not wide
    _check(ordinary, *_brute(z, features))


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_latent_objective_in_chunks(tiny64, acts, arch):
    """`latent(sae)` names its site as a string (as `search exhaustive --sae` builds it): the same answer."""
    sae = _sae(arch)
    with torch.no_grad():
        z = sae.encode(acts)
    topk = exhaustive(tiny64, latent(sae, f"[:, :, 0-{D_SAE - 1}]"), k=K, batch_size=100, latent_chunk=701,
                      progress=False)
    _check(topk, *_brute(z, list(range(D_SAE))))


@pytest.mark.parametrize("readout", ["firing", "pre"])
@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_readouts_in_chunks(tiny64, acts, readout, arch):
    """A selection's own feature map (an SAE readout, below 0 where a latent is off): general mode."""
    sae = _sae(arch)
    feature_map = sae.firing_map() if readout == "firing" else sae.pre_activation_map()
    objective = maximize(Selection(SITE, "[:, :, 0-3000]", feature_map=feature_map)).bind(tiny64)
    topk = exhaustive(tiny64, objective, k=K, batch_size=64, latent_chunk=1000, progress=False)
    with torch.no_grad():
        z = sae.firing_score(acts) if readout == "firing" else sae.pre_acts(acts)
    _check(topk, *_brute(z, list(range(D_SAE))))


def test_after_a_prefix(tiny64):
    """With a prefix the scores carry its constant (the mean over positions): the fill scores a 0 with it."""
    sae = _sae("topk")
    view = tiny64.with_features(SITE, sae)
    prefix = tiny64.encode(" the sea")
    objective = maximize(Selection(SITE, f"[:, :, 0-{D_SAE - 1}]")).bind(view)
    topk = exhaustive(view, objective, prefix=prefix, k=K, batch_size=128, latent_chunk=999, progress=False)
    want = exhaustive(view, objective, prefix=prefix, k=K, batch_size=128, progress=False)
    _check(topk, want.ids.cpu(), want.values.cpu())
    with torch.no_grad():
        full = torch.cat([prefix.expand(tiny64.vocab_size, -1), torch.arange(tiny64.vocab_size)[:, None]], 1)
        z = sae.encode(resid_post(tiny64.model, full, LAYER)).double().mean(1)  # mean over the positions
    ids, values = _brute(z, list(range(D_SAE)))
    assert torch.equal(topk.ids.cpu(), ids)
    torch.testing.assert_close(topk.values.cpu(), values, rtol=1e-9, atol=1e-9)


def test_wide_only_where_dense_does_not_fit(tiny64, monkeypatch):
    sae = _sae("topk")
    view = tiny64.with_features(SITE, sae)
    objective = maximize(Selection(SITE, f"[:, :, 0-{D_SAE - 1}]")).bind(view)
    (site, scorer), = sweep_scorers(objective, view, 1)
    assert wide_scoring.plan(view, site, scorer, 512) is None
    monkeypatch.setattr(wide_scoring, "WIDE_BYTES", 1000)
    planned = wide_scoring.plan(view, site, scorer, 512)
    assert planned is not None and planned.attached and planned.chunk >= 1


@pytest.mark.parametrize("prefix", ["", " the sea"])
def test_records_measured_in_chunks(tiny64, prefix):
    """The records re-measure each problem's best input chunk by chunk: the same as the dense re-measure."""
    from featopt.discrete.exhaustive import records

    sae = _sae("jumprelu")
    view = tiny64.with_features(SITE, sae)
    prefix = tiny64.encode(prefix)
    objective = maximize(Selection(SITE, "[:, :, 0-1500]")).bind(view)
    topk = exhaustive(view, objective, prefix=prefix, k=K, batch_size=128, latent_chunk=333, progress=False)
    chunked = records(view, objective, topk, prefix, seed=0, latent_chunk=333)
    dense = records(view, objective, topk, prefix, seed=0)
    assert [r.token_ids for r in chunked] == [r.token_ids for r in dense]
    assert [r.spec for r in chunked] == [r.spec for r in dense]
    for a, b in zip(chunked, dense):
        assert a.activation == pytest.approx(b.activation, rel=1e-9, abs=1e-9)
        assert a.extra["score"] == pytest.approx(b.extra["score"], rel=1e-9, abs=1e-9)
        assert a.extra["top_k"] == b.extra["top_k"]
    assert any(r.activation > 0 for r in chunked)


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_narrower_model_than_sae_takes_the_latents_path(arch):
    """A float32 model with a float64 SAE: the latents are cast to float32 before they are compared,
    so the sweep forms them (`activate_columns`) rather than comparing pre-activations; the same
    top-k as the ordinary path."""
    from featopt.models import ModelAdapter
    from featopt.models.tiny import build_tiny

    model, tok = build_tiny("tiny-llama")
    adapter = ModelAdapter(model, tok, name="tiny-llama")
    sae = _sae(arch)
    view = adapter.with_features(SITE, sae)
    objective = maximize(Selection(SITE, f"[:, :, 0-{D_SAE - 1}]")).bind(view)
    chunked = exhaustive(view, objective, k=K, batch_size=200, latent_chunk=640, progress=False)
    ordinary = exhaustive(view, objective, k=K, batch_size=200, progress=False)
    _check(chunked, ordinary.ids.cpu(), ordinary.values.cpu())
