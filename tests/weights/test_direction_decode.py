"""Streamed decoding (`decode_directions`) against the whole softmax computed at once, by hand."""

from __future__ import annotations

import pytest
import torch
from neuron_reference import full_softmax, tiny

from featopt.errors import FeatoptError
from featopt.weights.decode import NORMS, Decoded, Unembed, decode_directions, token_probs


def _random_norm(adapter):
    """Give the final norm a non-trivial gain (and bias): at init they are ones (zeros), which would
    make norm='weight' indistinguishable from norm='none'."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        adapter.final_norm.weight.copy_(torch.rand(adapter.d_model, generator=g, dtype=torch.float64) * 2)
        if getattr(adapter.final_norm, "bias", None) is not None:
            adapter.final_norm.bias.copy_(torch.randn(adapter.d_model, generator=g, dtype=torch.float64))


def _reference_logits(model, family: str, x: torch.Tensor, norm: str) -> torch.Tensor:
    """The LM head of the plain HF model on each direction, the final norm reached by hand."""
    final = model.model.norm if family == "llama" else model.transformer.ln_f
    h = {"none": x, "weight": x * final.weight, "apply": final(x)}[norm]
    return model.lm_head(h)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_top_tokens_equal_the_full_softmax(family, norm):
    adapter = tiny("tiny-llama" if family == "llama" else "tiny-gpt2")
    _random_norm(adapter)
    x = torch.randn(37, adapter.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4
    watch = torch.tensor([3, 260, 17])
    # Chunks that divide neither 37 rows nor the 512 tokens: every edge case of the running top-k.
    got = decode_directions(x, Unembed.from_adapter(adapter, norm), k=7, mean_of=100, watch=watch,
                            row_chunk=8, vocab_chunk=100)
    with torch.no_grad():
        logits = _reference_logits(adapter.model, family, x, norm)
    probs, ids, values, mean = full_softmax(logits, 7)
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.probs, values)
    torch.testing.assert_close(got.top_mean, mean)
    torch.testing.assert_close(got.logsumexp, torch.logsumexp(logits, -1))
    torch.testing.assert_close(got.watch_probs, probs[:, watch])
    torch.testing.assert_close(token_probs(x, Unembed.from_adapter(adapter, norm), watch, got.logsumexp), probs[:, watch])


def test_norms_differ_and_apply_only_rescales_for_rmsnorm():
    """RMSNorm's 'apply' is weight * x / rms(x): the same ranking as 'weight', sharper or flatter."""
    llama64 = tiny("tiny-llama")
    _random_norm(llama64)
    x = torch.randn(16, llama64.d_model, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = {n: decode_directions(x, Unembed.from_adapter(llama64, n), k=5) for n in NORMS}
    assert not torch.equal(out["none"].ids, out["weight"].ids)
    assert torch.equal(out["weight"].ids, out["apply"].ids)
    assert not torch.allclose(out["weight"].probs, out["apply"].probs)


def test_chunk_sizes_do_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    W, x = torch.randn(300, 12, generator=g, dtype=torch.float64), torch.randn(21, 12, generator=g, dtype=torch.float64) * 3
    whole = decode_directions(x, Unembed(W), k=10, mean_of=50, row_chunk=1000, vocab_chunk=1000)
    for rows, vocab in [(1, 1), (5, 7), (21, 299), (4, 64)]:
        part = decode_directions(x, Unembed(W), k=10, mean_of=50, row_chunk=rows, vocab_chunk=vocab)
        assert torch.equal(part.ids, whole.ids), (rows, vocab)
        torch.testing.assert_close(part.probs, whole.probs)
        torch.testing.assert_close(part.top_mean, whole.top_mean)


def test_lm_head_bias_is_added_and_small_vocabularies_are_clipped():
    g = torch.Generator().manual_seed(4)
    W, b = torch.randn(50, 8, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64) * 3
    x = torch.randn(9, 8, generator=g, dtype=torch.float64)
    got = decode_directions(x, Unembed(W, b), k=60, mean_of=100, vocab_chunk=16)  # k and mean_of > V = 50
    probs, ids, values, mean = full_softmax(x @ W.T + b, 50, 50)
    assert got.ids.shape == (9, 50) and torch.equal(got.ids, ids)
    torch.testing.assert_close(got.probs.sum(1), torch.ones(9, dtype=torch.float64))
    torch.testing.assert_close(got.top_mean, mean)


def test_ids_only_skips_probabilities():
    g = torch.Generator().manual_seed(5)
    W, x = torch.randn(200, 8, generator=g), torch.randn(11, 8, generator=g)
    got = decode_directions(x, Unembed(W), k=1, probabilities=False, vocab_chunk=33)
    assert isinstance(got, Decoded) and got.probs is None and got.logsumexp is None
    assert torch.equal(got.ids[:, 0], (x @ W.T).argmax(1))


def test_bad_input_is_a_featopt_error(llama64):
    unembed = Unembed.from_adapter(llama64)
    with pytest.raises(FeatoptError, match="d_model"):
        decode_directions(torch.zeros(3, llama64.d_model + 1), unembed)
    with pytest.raises(FeatoptError, match="at least 1"):
        decode_directions(torch.zeros(3, llama64.d_model), unembed, k=0)
    with pytest.raises(FeatoptError, match="allowed are none, weight, apply"):
        Unembed.from_adapter(llama64, "final")


@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
def test_the_candidate_filter_keeps_the_exact_top_k(order, monkeypatch):
    """Chunks of 1600 tokens with K = 100 go through the group filter only (the plain top-k is made
    to fail); vocabularies sorted by logit are its worst cases: every later chunk beats the running
    bound (ascending), or none does (descending)."""
    import featopt.weights.decode as decode

    g = torch.Generator().manual_seed(6)
    W, x = torch.randn(12800, 16, generator=g, dtype=torch.float64), torch.randn(23, 16, generator=g, dtype=torch.float64)
    if order != "random":
        W = W[(W @ x[0]).argsort(descending=order == "descending")]
    monkeypatch.setattr(decode, "_plain_topk", lambda *a: pytest.fail("the plain top-k ran"))
    got = decode_directions(x, Unembed(W), k=10, mean_of=100, row_chunk=10, vocab_chunk=1600)
    probs, ids, values, mean = full_softmax(x @ W.T, 10)
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.probs, values)
    torch.testing.assert_close(got.top_mean, mean)


def test_float32_and_bfloat16_heads_agree_with_float64():
    g = torch.Generator().manual_seed(7)
    W, x = torch.randn(4096, 32, generator=g, dtype=torch.float64), torch.randn(12, 32, generator=g, dtype=torch.float64) * 2
    exact = decode_directions(x, Unembed(W), k=3, vocab_chunk=1024)
    single = decode_directions(x.float(), Unembed(W.float()), k=3, vocab_chunk=1024)
    assert single.probs.dtype == torch.float32 and torch.equal(single.ids, exact.ids)
    torch.testing.assert_close(single.probs.double(), exact.probs, rtol=1e-5, atol=1e-7)
    brain = decode_directions(x.bfloat16(), Unembed(W.bfloat16()), k=3, vocab_chunk=1024)
    assert brain.probs.dtype == torch.float32
    torch.testing.assert_close(brain.logsumexp.double(), exact.logsumexp, rtol=0.02, atol=0.05)
