"""Logit lens of decoder rows against a hand matmul `W_U @ (gain * w)` sorted by torch.sort, and
the high-norm rule against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featopt.errors import FeatoptError
from featopt.models import load_model
from featopt.dictionaries.lens import high_norm_tokens, logit_lens
from featopt.models.sae.model import SAEConfig, SparseAutoencoder

D, D_SAE = 64, 40
LOUD = [5, 17, 300]  # tokens given huge unembedding rows


@pytest.fixture(scope="module")
def llama():
    adapter = load_model("tiny-llama")  # a fresh model: editing it touches no other test
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # A non-trivial final-norm gain (initialized to ones), and a few outlying head rows.
        adapter.model.model.norm.weight.copy_(0.5 + torch.rand(D, generator=gen))
        adapter.model.lm_head.weight[LOUD] *= 20
    return adapter


def sae(seed=0):
    out = SparseAutoencoder(SAEConfig(d_in=D, d_sae=D_SAE, architecture="relu", hook_name="blocks.1.resid_post"))
    out.init_weights(torch.Generator().manual_seed(seed))
    return out


def z_rule(W_U: torch.Tensor, z: float) -> set[int]:
    norms = np.linalg.norm(W_U.detach().double().numpy(), axis=1)
    return set(np.nonzero((norms - norms.mean()) / norms.std() > z)[0].tolist())


def hand_logits(adapter, w: torch.Tensor, norm: str) -> torch.Tensor:
    W_U, gain = adapter.model.lm_head.weight.detach(), adapter.model.model.norm.weight.detach()
    if norm == "none":
        h = w
    elif norm == "weight":
        h = gain * w
    else:  # RMSNorm written out
        h = gain * w / torch.sqrt(w.pow(2).mean() + adapter.model.config.rms_norm_eps)
    return W_U @ h


@pytest.mark.parametrize("norm", ["none", "weight", "apply"])
def test_matches_hand_matmul(llama, norm):
    s, latents, k = sae(), [0, 7, 39, 7], 6
    lens = logit_lens(llama, s, latents, k=k, norm=norm, chunk=3)  # chunks of 3: a partial last chunk
    removed = z_rule(llama.model.lm_head.weight, 3.0)
    assert set(LOUD) <= removed and set(lens.removed.tolist()) == removed
    assert lens.latents == latents and lens.norm == norm and lens.top_ids.shape == (4, k)
    for n, i in enumerate(latents):
        logits = hand_logits(llama, s.W_dec.detach()[i], norm)
        keep = torch.tensor([t for t in range(len(logits)) if t not in removed])
        values, order = torch.sort(logits[keep], descending=True)
        assert lens.top_ids[n].tolist() == keep[order[:k]].tolist()
        torch.testing.assert_close(lens.top_logits[n], values[:k], rtol=1e-5, atol=1e-5)
        assert lens.bottom_ids[n].tolist() == keep[order.flip(0)[:k]].tolist()
        torch.testing.assert_close(lens.bottom_logits[n], values.flip(0)[:k], rtol=1e-5, atol=1e-5)


def test_weight_norm_differs_from_none(llama):
    """The gain is not all ones here, so the fixture really tests something."""
    a, b = (logit_lens(llama, sae(), range(D_SAE), k=5, norm=n) for n in ("none", "weight"))
    assert not torch.equal(a.top_ids, b.top_ids)


def test_removed_tokens_never_appear(llama):
    V = llama.vocab_size
    for kwargs in ({"drop_top": 50}, {"drop_z": 0.5}, {}):
        lens = logit_lens(llama, sae(1), range(D_SAE), k=V, **kwargs)  # k clipped to every kept token
        removed = set(lens.removed.tolist())
        assert removed and lens.top_ids.shape[1] == V - len(removed)
        for ids in (lens.top_ids, lens.bottom_ids):
            for row in ids.tolist():
                assert set(row) == set(range(V)) - removed
    nothing = logit_lens(llama, sae(1), [0], k=V, drop_z=None)
    assert len(nothing.removed) == 0 and set(nothing.top_ids[0].tolist()) == set(range(V))


def test_high_norm_rules_by_hand(llama):
    W_U = llama.model.lm_head.weight.detach()
    for z in (3.0, 1.0, 0.5, -0.5):
        got = high_norm_tokens(W_U, z=z)
        assert got.tolist() == sorted(got.tolist()) and set(got.tolist()) == z_rule(W_U, z)
    norms = W_U.double().norm(dim=1).numpy()
    for top in (0, 1, 3, 10):
        assert set(high_norm_tokens(W_U, top=top, z=0.0).tolist()) == set(np.argsort(-norms)[:top].tolist())
    assert set(high_norm_tokens(W_U, top=3).tolist()) == set(LOUD)
    assert high_norm_tokens(W_U, z=None).numel() == 0
    assert high_norm_tokens(torch.ones(10, 4)).numel() == 0  # equal norms: no outlier
    with pytest.raises(FeatoptError, match="top must be"):
        high_norm_tokens(W_U, top=len(W_U) + 1)


def test_records(llama):
    lens = logit_lens(llama, sae(), [3, 4], k=2)
    recs = lens.records(llama.decode)
    assert [r["latent"] for r in recs] == [3, 4]
    assert set(recs[0]) == {"latent", "norm", "top", "bottom", "removed"}
    assert recs[1]["top"][0] == [llama.decode([int(lens.top_ids[1, 0])]), pytest.approx(float(lens.top_logits[1, 0]))]
    assert recs[0]["removed"] == [llama.decode([t]) for t in lens.removed.tolist()]


def test_rejects_bad_input(llama):
    for bad in (D_SAE, -1, [0, D_SAE]):
        with pytest.raises(FeatoptError, match="out of range"):
            logit_lens(llama, sae(), bad)
    with pytest.raises(FeatoptError, match="integer"):
        logit_lens(llama, sae(), 1.5)
    with pytest.raises(FeatoptError, match="no latent"):
        logit_lens(llama, sae(), [])
    with pytest.raises(FeatoptError, match="norm"):
        logit_lens(llama, sae(), 0, norm="layer")
    with pytest.raises(FeatoptError, match="all .* tokens"):
        logit_lens(llama, sae(), 0, drop_top=llama.vocab_size)
    wide = SparseAutoencoder(SAEConfig(d_in=D + 1, d_sae=4, architecture="relu", hook_name="blocks.1.resid_post"))
    with pytest.raises(FeatoptError, match="wide"):
        logit_lens(llama, wide, 0)
