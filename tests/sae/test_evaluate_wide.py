"""`evaluate` of a dictionary encoded sparsely (forced with `latent_chunk`, or where the dense
latents do not fit) against the dense evaluation of the same SAE: every metric, the firing
frequencies and the spliced forward's CE and KL; and the sparse updates of the latent metrics
against their dense updates."""

from __future__ import annotations

import warnings

import pytest
import torch

from featopt.dictionaries import evaluate as evaluate_module
from featopt.dictionaries.evaluate import decode_sparse, evaluate
from featopt.dictionaries.metrics import DeadFraction, FiringFrequency, MeanL0
from featopt.errors import FeatoptError
from featopt.models import ModelAdapter, load_model
from featopt.models.sae import wide
from featopt.models.sae.model import SAEConfig, SparseAutoencoder
from featopt.models.tiny import build_tiny

D, D_SAE, DEAD = 64, 3000, 50  # the tiny models' width; latents; latents that never fire
N_CTX, T = 4, 10


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def llama64():
    """In float64: on a random tiny model the zero-ablated CE is within 1e-3 of the clean one, so
    `ce_loss_recovered` divides by that and float32's round-off of `ce_sae` grows 1e4-fold."""
    model, tok = build_tiny("tiny-llama")
    return ModelAdapter(model.double(), tok, name="tiny-llama")


def contexts(adapter, seed=1):
    return torch.randint(1, adapter.vocab_size, (N_CTX, T), generator=torch.Generator().manual_seed(seed))


#: the activations' scale (their standard deviation) at the sites used on tiny-llama
SCALE = {"blocks.1.resid_post": 0.03, "blocks.0.mlp_in": 1.0, "blocks.0.mlp_out": 0.003}


def make_sae(arch: str, seed=0, hook="blocks.1.resid_post", **cfg) -> SparseAutoencoder:
    """Random weights that fire a few dozen to a few hundred latents per token (pre-activations
    about N(0, 1)); the first DEAD latents never fire."""
    extra = {"k": 24} if arch == "topk" else {}
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=D_SAE, architecture=arch, hook_name=hook, **extra, **cfg))
    scale_in, scale_out = SCALE[hook], SCALE[cfg.get("target_hook_name") or hook]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.d_in, D_SAE, generator=gen) / (D ** 0.5 * scale_in))
        sae.b_enc.copy_(0.3 * torch.randn(D_SAE, generator=gen) - (2.0 if arch == "relu" else 0.0))
        sae.b_enc[:DEAD] = -1e3
        sae.W_dec.copy_(0.1 * scale_out * torch.randn(D_SAE, sae.d_out, generator=gen))
        sae.b_dec.copy_(0.1 * scale_out * torch.randn(sae.d_out, generator=gen))
        if arch == "jumprelu":
            sae.threshold.copy_(1.5 + torch.rand(D_SAE, generator=gen))
        if sae.cfg.skip:
            sae.W_skip.copy_(0.1 * scale_out / scale_in * torch.randn(sae.d_out, sae.d_in, generator=gen))
    return sae


def no_dense_encode(sae: SparseAutoencoder) -> None:
    """Make the dense encode fail: the sparse path must not call it."""
    def refuse(x):
        raise AssertionError("the dense encode ran")
    sae.encode = refuse


def assert_same(got: dict, want: dict, recovered_rel: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if key == "firing_frequency":
            assert torch.equal(got[key], value)
        elif key in ("tokens", "l0", "dead_fraction", "ce_clean", "ce_zero", "kl_zero"):
            assert got[key] == value, key  # counts, and the forwards the reconstruction does not touch
        else:
            rel = recovered_rel if key == "ce_loss_recovered" else 1e-5
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-12), key


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_forced_chunks_equal_the_dense_evaluation(llama64, arch):
    sae, ids = make_sae(arch).double(), contexts(llama64)
    (dense,) = evaluate(llama64, [sae], ids, batch_size=3, frequency=True)
    assert dense["l0"] > 5 and 0 < dense["dead_fraction"] < 1 and dense["kl_div"] > 0
    no_dense_encode(sae)
    (sparse,) = evaluate(llama64, [sae], ids, batch_size=3, frequency=True, latent_chunk=701)
    assert_same(sparse, dense)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_forced_chunks_in_float32(llama, arch):
    """In float32 the sums run in another order: `ce_sae` agrees to round-off (1e-5), and
    `ce_loss_recovered` to that over its denominator `ce_zero - ce_clean`."""
    sae, ids = make_sae(arch), contexts(llama)
    (dense,) = evaluate(llama, [sae], ids, batch_size=3, frequency=True)
    no_dense_encode(sae)
    (sparse,) = evaluate(llama, [sae], ids, batch_size=3, frequency=True, latent_chunk=701)
    spread = abs(dense["ce_sae"] / (dense["ce_zero"] - dense["ce_clean"]) / dense["ce_loss_recovered"])
    assert_same(sparse, dense, recovered_rel=1e-5 * max(1.0, spread))


def test_where_the_dense_latents_do_not_fit(llama64, monkeypatch):
    """Unforced, an SAE goes sparse where `dense_fits` says no, in chunks it picks itself."""
    sae, ids = make_sae("topk", seed=3).double(), contexts(llama64, seed=2)
    (dense,) = evaluate(llama64, [sae], ids, batch_size=2, frequency=True)
    monkeypatch.setattr(wide, "dense_fits", lambda *args, **kwargs: False)
    monkeypatch.setattr(wide, "CHUNK_BYTES", 200 * 4 * wide.COPIES * 20)  # a few chunks of latents
    no_dense_encode(sae)
    (sparse,) = evaluate(llama64, [sae], ids, batch_size=2, frequency=True)
    assert_same(sparse, dense)


def test_a_skip_transcoder_and_an_sae_together(llama64):
    """A transcoder (its own target site, a skip connection) beside an SAE: each as dense."""
    tc = make_sae("relu", seed=4, hook="blocks.0.mlp_in", target_hook_name="blocks.0.mlp_out",
                  apply_b_dec_to_input=False, skip=True).double()
    sae, ids = make_sae("jumprelu", seed=5, hook="blocks.0.mlp_out").double(), contexts(llama64, seed=3)
    dense = evaluate(llama64, [tc, sae], ids, batch_size=4, frequency=True)
    no_dense_encode(tc)
    no_dense_encode(sae)
    sparse = evaluate(llama64, [tc, sae], ids, batch_size=4, frequency=True, latent_chunk=1000)
    for got, want in zip(sparse, dense):
        assert_same(got, want)


def test_reconstruct_and_decode_sparse(llama):
    """Rows without a nonzero (b_dec alone), and no nonzero at all."""
    sae = make_sae("jumprelu", seed=6)
    x = 0.03 * torch.randn(7, D, generator=torch.Generator().manual_seed(0))
    x[2] = sae.b_dec  # pre-activations b_enc, all below the thresholds: no latent fires
    with torch.no_grad():
        z = sae.encode(x)
        x_hat, latents = evaluate_module.reconstruct(sae, x, latent_chunk=512)
        rows = latents[0]
        assert 2 not in rows.tolist() and len(rows) == (z != 0).sum()
        torch.testing.assert_close(x_hat, sae(x), rtol=1e-5, atol=1e-6)
        empty = torch.zeros(0, dtype=torch.long)
        assert torch.equal(decode_sparse(sae, empty, empty, torch.zeros(0), 3), sae.b_dec.expand(3, -1))


def _sparse_z(seed=0, n=9, d=40):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen) * (torch.rand(n, d, generator=gen) < 0.2)
    z[3] = 0  # a token where nothing fires
    rows, cols = z.nonzero().unbind(1)
    return z, (rows, cols, z[rows, cols])  # values below 0 too: never counted as firing


@pytest.mark.parametrize("metric", [MeanL0, FiringFrequency, DeadFraction])
def test_sparse_updates_equal_dense_updates(metric):
    make = (lambda: metric()) if metric is MeanL0 else (lambda: metric(40))
    dense, sparse = make(), make()
    for seed in range(3):
        z, coo = _sparse_z(seed)
        dense.update(z)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torchmetrics warns of a compute before any (wrapped) update
            sparse.update_sparse(*coo, len(z))
            assert torch.equal(sparse.compute(), dense.compute())  # a cached compute is dropped by each update
    for name in dense._defaults:
        assert torch.equal(getattr(sparse, name), getattr(dense, name)), name
    assert torch.equal(sparse.compute(), dense.compute())


def test_refuses_an_empty_chunk(llama):
    with pytest.raises(FeatoptError, match="latent_chunk must be at least 1"):
        evaluate(llama, [make_sae("relu")], contexts(llama), latent_chunk=0)


def test_sparse_updates_refuse_bad_input():
    z, (rows, cols, values) = _sparse_z()
    with pytest.raises(FeatoptError, match="one length"):
        MeanL0().update_sparse(rows, cols[:-1], values, len(z))
    with pytest.raises(FeatoptError, match="d_sae = 30"):
        FiringFrequency(30).update_sparse(rows, cols, values.abs() + 1, len(z))
    with pytest.raises(FeatoptError, match="0 or more"):
        FiringFrequency(40).update_sparse(rows, cols, values, -1)
