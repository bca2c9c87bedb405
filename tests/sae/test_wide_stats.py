"""Corpus statistics of an SAE encoded sparsely, chunk by chunk of latents (`latent_chunk`), equal the
ones of the dense encode: every tensor, for relu, topk and jumprelu SAEs, and the accumulator fed
the COO of the dense latents equals the one fed the dense latents."""

from __future__ import annotations

import pytest
import torch

from featopt.dictionaries.corpus_stats import StatsAccumulator, corpus_stats
from featopt.dictionaries.feature_stats import TENSORS
from featopt.models import load_model
from featopt.models.sae import SAEConfig, SparseAutoencoder

D, L, N_CTX, D_SAE = 64, 12, 20, 301
SITE = "blocks.1.resid_post"
SETTINGS = dict(top_k=5, n_bins=4, window=(3, 2))


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def contexts(llama):
    return torch.randint(1, llama.vocab_size, (N_CTX, L), generator=torch.Generator().manual_seed(1))


def _sae(arch):
    extra = {"k": 6} if arch == "topk" else {}
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=D_SAE, architecture=arch, hook_name=SITE, **extra))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=gen) * 20)
        sae.b_enc -= 2.0
    return sae


def _same(a, b):
    """Indices exactly; values up to the rounding of a matmul over fewer columns (a few ulps)."""
    for name in TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert torch.equal(x, y), name
    assert a.tokens == b.tokens


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
def test_chunked_stats_equal_dense(llama, contexts, arch):
    sae = _sae(arch)
    dense = corpus_stats(llama, sae, contexts, batch_contexts=7, progress=False, **SETTINGS)
    assert (dense.freq > 0).sum() > 5 and (dense.freq == 0).any()
    for chunk in (37, 1000):
        _same(corpus_stats(llama, sae, contexts, batch_contexts=7, progress=False, latent_chunk=chunk, **SETTINGS), dense)


@pytest.mark.parametrize("skip_first", [0, 2])
def test_accumulator_from_coo_equals_dense(llama, contexts, skip_first):
    sae = _sae("relu")
    with torch.no_grad():
        z = sae.encode(llama.run([SITE], input_ids=contexts)[llama.site(SITE)])
    a, b = StatsAccumulator(D_SAE, **SETTINGS, seed=4), StatsAccumulator(D_SAE, **SETTINGS, seed=4)
    for start in range(0, N_CTX, 6):
        part, ids = z[start:start + 6], contexts[start:start + 6]
        a.update(part, ids, start, skip_first)
        rows, cols = part.reshape(-1, D_SAE).nonzero().unbind(1)
        b.update_sparse(rows, cols, part.reshape(-1, D_SAE)[rows, cols], ids, start, skip_first)
    _same(a.result(), b.result())
