"""The fused C tile reduction (float32 on a CPU) against the whole softmax computed in float64."""

from __future__ import annotations

import pytest
import torch
from neuron_reference import full_softmax

import featopt.weights.decode as decode
from featopt.weights import native
from featopt.weights.decode import Unembed, decode_directions

pytestmark = pytest.mark.skipif(native.kernel() is None, reason="no C compiler here: decoding uses the torch path")


@pytest.fixture
def fused_only(monkeypatch):
    """Fail if the torch path's running top-k runs: these tests must exercise the C kernel."""
    monkeypatch.setattr(decode, "_merge", lambda *a: pytest.fail("the torch path ran"))


def _problem(seed: int, V: int = 12800, d: int = 16, n: int = 23, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g)
    x = torch.randn(n, d, generator=g) * scale
    return W, x


def _check(got, logits64, k, mean_of=100, rtol=2e-5):
    """`rtol`: float32 logits are off by ~1e-7 of their size, so probabilities by that times the logit."""
    probs, ids, values, mean = full_softmax(logits64, k, mean_of)
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.probs.double(), values, rtol=rtol, atol=1e-9)
    torch.testing.assert_close(got.top_mean.double(), mean, rtol=rtol, atol=1e-9)
    torch.testing.assert_close(got.logsumexp.double(), torch.logsumexp(logits64, -1), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
@pytest.mark.parametrize("chunks", [(10, 1600), (23, 12800), (4, 999), (7, 64), (1, 5)])
def test_top_k_and_logsumexp_equal_the_full_softmax(order, chunks, fused_only):
    """Vocabularies sorted by logit are the worst cases of the threshold: every logit enters the
    heap (ascending) or none after the first (descending); the chunk shapes cover a first chunk too
    short for the first bound, chunks not a multiple of the 64-logit block, and single rows."""
    W, x = _problem(0)
    if order != "random":
        W = W[(W.double() @ x[0].double()).argsort(descending=order == "descending")]
    rows, vocab = chunks
    got = decode_directions(x, Unembed(W), k=10, mean_of=100, row_chunk=rows, vocab_chunk=vocab)
    _check(got, x.double() @ W.double().T, 10)


def test_bias_large_logits_and_small_vocabularies(fused_only):
    W, x = _problem(1, V=3000, scale=60.0)  # logits in the hundreds: exp2 needs the shift by the max
    b = torch.randn(3000, generator=torch.Generator().manual_seed(2)) * 5
    got = decode_directions(x, Unembed(W, b), k=5, mean_of=100, vocab_chunk=1024)
    _check(got, x.double() @ W.double().T + b.double(), 5, rtol=5e-4)
    small, xs = _problem(3, V=50)
    got = decode_directions(xs, Unembed(small), k=60, mean_of=100, vocab_chunk=16)  # k, mean_of > V
    _check(got, xs.double() @ small.double().T, 50, 50)


def test_ties_keep_tokens_of_the_tied_value(fused_only):
    """Repeated LM-head rows give equal logits; whichever of them is kept, its logit is the k-th best."""
    W, x = _problem(4, V=2048)
    W = W.repeat(4, 1)  # each logit four times: every top-k boundary is a tie
    got = decode_directions(x, Unembed(W), k=6, mean_of=6, vocab_chunk=1000)
    logits = x.double() @ W.double().T
    top = logits.topk(6, dim=-1).values
    torch.testing.assert_close(logits.gather(1, got.ids), top)
    assert all(len(set(row.tolist())) == 6 for row in got.ids)  # no token twice


def test_bfloat16_heads_use_the_kernel_on_float32_logits(fused_only):
    W, x = _problem(5, V=4096)
    got = decode_directions(x.bfloat16(), Unembed(W.bfloat16()), k=3, vocab_chunk=1024)
    logits = x.bfloat16().double() @ W.bfloat16().double().T
    torch.testing.assert_close(got.logsumexp.double(), torch.logsumexp(logits, -1), rtol=0.01, atol=0.05)
    assert (got.ids[:, 0] == logits.argmax(-1)).float().mean() > 0.9  # bf16 matmul rounding may swap near-ties


def test_ids_only_and_one_thread(fused_only, monkeypatch):
    W, x = _problem(6, V=5000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    got = decode_directions(x, Unembed(W), k=4, probabilities=False, vocab_chunk=777)
    assert got.probs is None
    assert torch.equal(got.ids, (x.double() @ W.double().T).topk(4, dim=-1).indices)


def test_torch_and_fused_paths_agree_and_the_switch_turns_it_off(monkeypatch):
    W, x = _problem(7)
    fused = decode_directions(x, Unembed(W), k=10, vocab_chunk=4096)
    monkeypatch.setenv("FEATOPT_NATIVE", "0")
    assert native.kernel() is None
    plain = decode_directions(x, Unembed(W), k=10, vocab_chunk=4096)
    assert torch.equal(fused.ids, plain.ids)
    torch.testing.assert_close(fused.probs, plain.probs, rtol=1e-5, atol=1e-9)


def test_a_failed_build_warns_once_is_remembered_and_leaves_the_torch_path(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATOPT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that refuses everything
    monkeypatch.setattr(native, "_state", {})
    with pytest.warns(UserWarning, match="torch path"):
        assert native.kernel() is None
    assert len(list((tmp_path / "native").glob("*.failed"))) == len(native.FLAG_SETS)
    monkeypatch.setattr(native, "_state", {})  # a new process: no compile is retried
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("a failed build was retried"))
    with pytest.warns(UserWarning, match="torch path"):
        assert native.kernel() is None
    W, x = _problem(9, V=3000)
    got = decode_directions(x, Unembed(W), k=5, vocab_chunk=1024)
    _check(got, x.double() @ W.double().T, 5)


def test_the_reducer_refuses_other_dtypes():
    reducer = native.TileReducer(native.kernel(), 2, 3)
    with pytest.raises(ValueError, match="float32"):
        reducer.update(torch.zeros(2, 8, dtype=torch.float64), 0)


@pytest.mark.parametrize("flags", [(), ("-march=native",)], ids=["portable", "no-openmp"])
def test_other_builds_reduce_tiles_exactly(flags):
    """The build without -march (the generic vector code, as on CPUs without AVX2) and the one without
    OpenMP (rows split by Python threads), fed tiles directly: top-K and log-sum-exp of the whole row."""
    path = native.build(flags)
    if path is None:
        pytest.skip(f"the compiler refuses {flags}")
    fn = native.load(path)
    assert not fn.openmp
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(37, 10_000, generator=g) * 4
    logits[3] = torch.linspace(-10, 10, 10_000)  # ascending: every logit enters the heap
    reducer = native.TileReducer(fn, 37, 100)
    for v0 in range(0, 10_000, 4099):  # tiles that are not a multiple of the 64-logit block
        reducer.update(logits[:, v0:v0 + 4099].contiguous(), v0)
    values, ids = reducer.top()
    exact = logits.double().topk(100, dim=-1)
    assert torch.equal(ids.gather(1, values.argsort(1, descending=True)), exact.indices)
    torch.testing.assert_close(reducer.logsumexp2(), torch.logsumexp(logits.double() * LN2, -1) / LN2, rtol=1e-7, atol=1e-6)


LN2 = 0.6931471805599453
