"""Chunked and sparse encodes of `featopt.models.sae.wide` against the dense `sae.encode`, `pre_acts`
and `firing_score`, for every architecture, with chunk sizes that do not divide d_sae, on `[n, d_in]`
and `[b, t, d_in]` inputs, and topk ties (the lower latent is kept) against a stable sort."""

from __future__ import annotations

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.models.sae import SAEConfig, SparseAutoencoder
from featopt.models.sae import wide

D_IN, D_SAE, K = 12, 203, 7
ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "matryoshka"]


def _sae(arch, seed=0):
    extra = {"k": K} if arch in ("topk", "batchtopk", "matryoshka") else {}
    if arch == "matryoshka":
        extra["matryoshka"] = (50, 120, D_SAE)
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name == "threshold" else 1.0))
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()
    return sae


def _x(shape, seed=1):
    return torch.randn(*shape, D_IN, generator=torch.Generator().manual_seed(seed))


def _joined(pieces, d_sae=D_SAE):
    starts = [s for s, _ in pieces]
    widths = [z.shape[-1] for _, z in pieces]
    assert starts == [sum(widths[:i]) for i in range(len(widths))] and sum(widths) == d_sae
    return torch.cat([z for _, z in pieces], dim=-1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", [(31,), (3, 5)])
@pytest.mark.parametrize("chunk", [1, 17, 64, 500])
def test_chunks_equal_dense(arch, shape, chunk):
    sae, x = _sae(arch), _x(shape)
    with torch.no_grad():
        dense, pre, firing = sae.encode(x), sae.pre_acts(x), sae.firing_score(x)
    assert (dense > 0).any()
    torch.testing.assert_close(_joined(list(wide.encode_chunks(sae, x, chunk))), dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_joined(list(wide.pre_act_chunks(sae, x, chunk))), pre, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_joined(list(wide.firing_chunks(sae, x, chunk))), firing, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [13, None])
def test_sparse_equals_dense(arch, chunk):
    sae, x = _sae(arch), _x((4, 6))
    with torch.no_grad():
        dense = sae.encode(x).reshape(-1, D_SAE)
    rows, cols, values = wide.encode_sparse(sae, x, chunk)
    want_rows, want_cols = dense.nonzero().unbind(1)  # row-major: sorted by row then latent
    assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
    torch.testing.assert_close(values, dense[want_rows, want_cols], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk", [5, 29, 1000])
def test_topk_kept_latents(chunk):
    sae, x = _sae("topk"), _x((2, 9))
    latents, values = wide.encode_topk(sae, x, chunk)
    assert latents.shape == values.shape == (2, 9, K)
    with torch.no_grad():
        pre = sae.pre_acts(x)
    # independent: a full stable sort of every row, largest first
    order = torch.sort(pre, dim=-1, descending=True, stable=True).indices[..., :K]
    assert torch.equal(latents, order)
    torch.testing.assert_close(values, torch.relu(pre.gather(-1, order)))
    assert (values[..., :-1] >= values[..., 1:]).all()


def test_topk_ties_keep_the_lower_latent():
    """Equal pre-activations straddling the k-th place, inside one chunk and across chunks: the lower
    latents are kept, as a stable sort keeps them; the dense encode keeps the same values, on latents torch chooses."""
    sae = _sae("topk")
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_dec.zero_()
        sae.b_enc.zero_()
        sae.b_enc[[3, 40, 41, 90, 150, 151, 152, 200, 202]] = 2.0  # 9 tied latents, k = 7
        sae.b_enc[[10]] = 5.0
    x = torch.zeros(3, D_IN)
    want = torch.zeros(3, D_SAE)
    want[:, [10, 3, 40, 41, 90, 150, 151]] = torch.tensor([5.0] + [2.0] * 6)
    for chunk in (1, 7, 41, 64, 203):
        torch.testing.assert_close(_joined(list(wide.encode_chunks(sae, x, chunk))), want)
        latents, _ = wide.encode_topk(sae, x, chunk)
        assert latents[0].tolist() == [10, 3, 40, 41, 90, 150, 151]
    with torch.no_grad():  # the dense topk keeps some 7 of them (which, torch does not promise): the same values
        dense = sae.encode(x)
    torch.testing.assert_close(dense.sort(-1).values, want.sort(-1).values)


def test_chunk_size_follows_the_limit():
    sae = _sae("relu")
    assert wide.chunk_size(sae, 10, limit=10 * 4 * wide.COPIES * 50) == 50
    assert wide.chunk_size(sae, 10, limit=1) == 1
    assert wide.chunk_size(sae, 10) == D_SAE


def test_bad_chunk_raises():
    with pytest.raises(FeatoptError):
        list(wide.encode_chunks(_sae("relu"), _x((2,)), -1))
    with pytest.raises(FeatoptError):
        wide.encode_topk(_sae("relu"), _x((2,)))
