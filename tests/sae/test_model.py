"""The SAE module against hand computations: each architecture's encode/decode by plain loops over
explicit numbers, topk's and jumprelu's rules, the training helpers and the content hash."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featopt.errors import FeatoptError
from featopt.models.sae.model import SAEConfig, SparseAutoencoder

# A 3-in, 4-latent SAE written out by hand.
W_ENC = [[1.0, -2.0, 0.5, 0.0], [0.0, 1.0, 1.5, -1.0], [2.0, 0.5, -0.5, 1.0]]  # [d_in, d_sae]
B_ENC = [0.1, -0.2, 0.3, 0.0]
W_DEC = [[1.0, 0.0, 2.0], [-1.0, 0.5, 0.0], [0.0, 3.0, 1.0], [0.5, 0.5, 0.5]]  # [d_sae, d_in]
B_DEC = [0.5, -1.0, 0.25]
THRESHOLD = [0.5, 0.5, 2.0, 0.0]
XS = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0], [0.3, -0.7, 1.1]]


def hand_sae(arch: str, k: int | None = None, apply_b_dec: bool = True) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=3, d_sae=4, architecture=arch, k=k, apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor(W_ENC))
        sae.b_enc.copy_(torch.tensor(B_ENC))
        sae.W_dec.copy_(torch.tensor(W_DEC))
        sae.b_dec.copy_(torch.tensor(B_DEC))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.tensor(THRESHOLD))
    return sae


def hand_pre(x: list[float], apply_b_dec: bool = True) -> list[float]:
    pre = []
    for j in range(4):
        total = B_ENC[j]
        for i in range(3):
            total += (x[i] - (B_DEC[i] if apply_b_dec else 0.0)) * W_ENC[i][j]
        pre.append(total)
    return pre


def hand_latents(x: list[float], arch: str, k: int | None = None, apply_b_dec: bool = True) -> list[float]:
    pre = hand_pre(x, apply_b_dec)
    if arch == "relu":
        return [max(p, 0.0) for p in pre]
    if arch == "topk":
        keep = sorted(range(4), key=lambda j: -pre[j])[:k]
        return [max(pre[j], 0.0) if j in keep else 0.0 for j in range(4)]
    return [pre[j] if pre[j] > THRESHOLD[j] else 0.0 for j in range(4)]


def hand_decode(z: list[float]) -> list[float]:
    return [B_DEC[i] + sum(z[j] * W_DEC[j][i] for j in range(4)) for i in range(3)]


@pytest.mark.parametrize("arch,k", [("relu", None), ("topk", 1), ("topk", 2), ("topk", 4), ("jumprelu", None)])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_and_decode_match_the_hand_formula(arch, k, apply_b_dec):
    sae = hand_sae(arch, k, apply_b_dec)
    x = torch.tensor(XS)
    z = sae.encode(x).detach()
    want = [hand_latents(row, arch, k, apply_b_dec) for row in XS]
    assert np.allclose(z.numpy(), want, atol=1e-6)
    assert np.allclose(sae.decode(z).detach().numpy(), [hand_decode(row) for row in want], atol=1e-6)
    assert np.allclose(sae(x).detach().numpy(), [hand_decode(row) for row in want], atol=1e-6)
    # batch dimensions are free: [2, 3, d_in] works row by row
    assert np.allclose(sae.encode(x.expand(2, 3, 3)).detach().numpy(), [want, want], atol=1e-6)


def test_the_hand_example_exercises_each_rule():
    # guard against a vacuous example: some pre-activations negative, some between 0 and the threshold
    pres = [hand_pre(row) for row in XS]
    assert any(p < 0 for row in pres for p in row)
    assert any(0 < row[j] <= THRESHOLD[j] for row in pres for j in range(4))
    assert any(row[j] > THRESHOLD[j] for row in pres for j in range(4))


def test_topk_keeps_exactly_k_largest():
    gen = torch.Generator().manual_seed(0)
    d_in, d_sae, k = 8, 40, 5
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen))
        sae.b_enc.fill_(50.0)  # every pre-activation positive, so relu removes none of the k
    x = torch.randn(64, d_in, generator=gen)
    z = sae.encode(x).detach().numpy()
    pre = x.numpy() @ sae.W_enc.detach().numpy() + 50.0  # b_dec is zero
    assert ((z != 0).sum(-1) == k).all()
    for row_z, row_pre in zip(z, pre):
        top = set(np.argsort(-row_pre)[:k].tolist())
        assert set(np.nonzero(row_z)[0].tolist()) == top
        assert np.allclose(row_z[list(top)], row_pre[list(top)], atol=1e-4)


def test_topk_never_keeps_negative_values():
    sae = SparseAutoencoder(SAEConfig(d_in=2, d_sae=3, architecture="topk", k=3))
    with torch.no_grad():
        sae.b_enc.copy_(torch.tensor([-1.0, 2.0, -3.0]))  # W_enc zero: pre = b_enc
    assert sae.encode(torch.zeros(1, 2)).tolist() == [[0.0, 2.0, 0.0]]


def test_jumprelu_zeroes_at_and_below_the_threshold():
    sae = SparseAutoencoder(SAEConfig(d_in=1, d_sae=4, architecture="jumprelu"))
    with torch.no_grad():
        sae.W_enc.fill_(1.0)
        sae.threshold.copy_(torch.tensor([0.5, 1.0, 1.5, 0.25]))
    # pre = x = 1.0 for every latent: above, at (strict > keeps none), below, above
    assert sae.encode(torch.ones(1, 1)).tolist() == [[1.0, 0.0, 0.0, 1.0]]


def _random_sae(arch="relu", seed=0, d_in=6, d_sae=10):
    gen = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=3 if arch == "topk" else None))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        if arch == "jumprelu":
            sae.threshold.abs_()
    return sae


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_fold_scale_keeps_latents_and_reconstructs_raw_x(arch):
    scale = 3.7
    trained = _random_sae(arch)  # as if trained on scale * x
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    z_scaled = trained.encode(scale * x)
    recon_scaled = trained.decode(z_scaled)
    trained.fold_scale(scale)
    assert torch.allclose(trained.encode(x), z_scaled, atol=1e-5)
    assert torch.allclose(trained.decode(z_scaled), recon_scaled / scale, atol=1e-5)


def test_normalize_decoder_makes_unit_rows_in_the_same_directions():
    sae = _random_sae()
    before = sae.W_dec.detach().numpy().copy()
    sae.normalize_decoder()
    after = sae.W_dec.detach().numpy()
    assert np.allclose(np.linalg.norm(after, axis=1), 1.0, atol=1e-6)
    assert np.allclose(after, before / np.linalg.norm(before, axis=1, keepdims=True), atol=1e-6)


def test_remove_parallel_grads_leaves_the_orthogonal_part():
    sae = _random_sae()
    sae.remove_parallel_grads()  # no gradient yet: nothing to do, no error
    grad = torch.randn(sae.W_dec.shape, generator=torch.Generator().manual_seed(2))
    sae.W_dec.grad = grad.clone()
    sae.remove_parallel_grads()
    W, g, out = sae.W_dec.detach().numpy(), grad.numpy(), sae.W_dec.grad.numpy()
    for r in range(W.shape[0]):  # Gram-Schmidt row by row
        want = g[r] - (g[r] @ W[r]) / (W[r] @ W[r]) * W[r]
        assert np.allclose(out[r], want, atol=1e-5)
        assert abs(out[r] @ W[r]) < 1e-4


def test_init_weights_ties_encoder_to_unit_decoder():
    sae = _random_sae()
    sae.init_weights(torch.Generator().manual_seed(0), data_mean=torch.full((6,), 0.5))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(10), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.equal(sae.b_enc, torch.zeros(10)) and torch.equal(sae.b_dec, torch.full((6,), 0.5))


def test_content_hash_follows_weights_and_config():
    a, b = _random_sae(seed=4), _random_sae(seed=4)
    assert a.content_hash() == b.content_hash()
    with torch.no_grad():
        b.b_enc[3] += 1e-3
    assert a.content_hash() != b.content_hash()
    c = _random_sae(seed=4)
    c.cfg.hook_name = "blocks.1.resid_post"
    assert a.content_hash() != c.content_hash()


def test_features_returns_the_activation_dtype():
    sae = _random_sae("relu")
    acts = torch.randn(2, 6, dtype=torch.float64)
    assert sae.features(acts).dtype == torch.float64


@pytest.mark.parametrize("kwargs", [dict(architecture="gated"), dict(architecture="topk"), dict(architecture="topk", k=11),
                                    dict(d_sae=0)])
def test_bad_configs_raise_one_sentence(kwargs):
    with pytest.raises(FeatoptError) as info:
        SAEConfig(**{"d_in": 6, "d_sae": 10, **kwargs})
    assert "\n" not in str(info.value) and str(info.value).endswith(".")


def test_pre_activation_map_is_the_encoder_read_out_and_the_latent_where_it_fires():
    sae = SparseAutoencoder(SAEConfig(d_in=6, d_sae=10, architecture="topk", k=3))
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(6, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    pre = sae.pre_activation_map()
    assert pre.width == 10 and pre.describe()["readout"] == "pre-activation"
    want = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(pre.features(x), want)
    z = sae.encode(x)
    torch.testing.assert_close(pre.features(x)[z > 0], z[z > 0])
