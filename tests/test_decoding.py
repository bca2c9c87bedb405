"""featopt.gradient.decoding against independent computations (torch.linalg.pinv, full cosine matrices)."""

import pytest
import torch
import torch.nn.functional as F

import featopt.gradient.decoding as dec
from featopt.errors import FeatoptError


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test sees another's memory cache, and none can write to the real home folder."""
    monkeypatch.delenv("FEATOPT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    dec.clear_memory_cache()
    yield
    dec.clear_memory_cache()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _assert_argmax(ids, ref_scores, tol=1e-5):
    """ids are the argmax of ref_scores [..., V]: exact where the top two differ by more than tol
    (relative), and never more than tol below the maximum where they do not."""
    top2 = ref_scores.topk(2, dim=-1).values
    scale = ref_scores.abs().amax(dim=-1).clamp_min(1e-30)
    chosen = ref_scores.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert ((top2[..., 0] - chosen) <= tol * scale).all()
    clear = (top2[..., 0] - top2[..., 1]) > tol * scale
    assert clear.float().mean() > 0.9  # the test data is not made of ties
    assert torch.equal(ids[clear], ref_scores.argmax(dim=-1)[clear])


def _pinv_ref(E, embeds):
    """a = pinv(E^T) e in float64: [..., d] -> [..., V], straight from the source formula.

    pinv(E^T) = pinv(E)^T exactly; the SVD of the tall E is twice as fast as of the wide E^T."""
    return embeds.double() @ torch.linalg.pinv(E.double())


def _cos_ref(E, embeds):
    return F.cosine_similarity(embeds.double().unsqueeze(-2), E.double(), dim=-1)


def _low_rank(vocab, d, rank, seed):
    """Exactly rank-deficient in float32: small integers, so E = A @ B has no rounding at all."""
    g = _gen(seed)
    a = torch.randint(-1000, 1001, (vocab, rank), generator=g).float()
    b = torch.randint(-3, 4, (rank, d), generator=g).float()
    E = a @ b
    E[:, -1] = E[:, 0]  # and a duplicated column
    return E


CASES = {
    "square": lambda: torch.randn(300, 64, generator=_gen(0)),
    "tall": lambda: torch.randn(50000, 64, generator=_gen(1)),
    # a Gemma-sized vocabulary, with rows of very different scales as in trained embeddings
    "vocab-262k": lambda: torch.randn(262144, 24, generator=_gen(5)) * torch.rand(262144, 1, generator=_gen(6)) * 3,
    "rank_deficient": lambda: _low_rank(3000, 48, 8, seed=2),
    "wide": lambda: torch.randn(40, 64, generator=_gen(3)),
}


@pytest.mark.parametrize("case", CASES)
def test_pinv_decode_matches_torch_pinv(case):
    E = CASES[case]()
    embeds = torch.randn(4, 8, E.shape[1], generator=_gen(10)) * E.std()
    ref = _pinv_ref(E, embeds)
    decoder = dec.PinvDecoder(E)
    ids = decoder.decode(embeds)
    assert ids.shape == (4, 8) and ids.dtype == torch.long
    _assert_argmax(ids, ref)
    scores = decoder.scores(embeds)
    assert scores.shape == (4, 8, E.shape[0])
    assert torch.allclose(scores.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


def test_pinv_rank_deficient_gram_matches_pinv_of_gram():
    E = _low_rank(500, 32, 5, seed=4)
    ref = torch.linalg.pinv(E.double().T @ E.double(), hermitian=True, rtol=1e-10)
    got = dec.compute_gram_pinv(E)
    assert torch.linalg.matrix_rank(got, hermitian=True, rtol=1e-8) == 5
    assert torch.allclose(got, ref, atol=1e-8 * ref.abs().max().item(), rtol=0)


def test_pinv_recovers_tokens_when_rows_independent():
    """V <= d with independent rows: pinv(E^T) E^T = I, so a token's embedding decodes to it."""
    E = torch.randn(40, 64, generator=_gen(5))
    ids = torch.randint(0, 40, (3, 7), generator=_gen(6))
    assert torch.equal(dec.PinvDecoder(E).decode(E[ids]), ids)


def test_nearest_matches_brute_force_cosine():
    E = torch.randn(5000, 32, generator=_gen(7)) * torch.rand(5000, 1, generator=_gen(8)) * 10
    E[17] = 0  # a zero row has cosine 0 with everything, never NaN
    embeds = torch.randn(4, 16, 32, generator=_gen(9))
    _assert_argmax(dec.nearest_decode(E, embeds), _cos_ref(E, embeds))


@pytest.mark.parametrize("chunk", [7, 1999, 100000])
def test_chunk_size_does_not_change_results(chunk):
    E = torch.randn(2000, 32, generator=_gen(11))
    embeds = torch.randn(3, 20, 32, generator=_gen(12))
    decoder = dec.PinvDecoder(E)
    assert torch.equal(decoder.decode(embeds, chunk=chunk), decoder.decode(embeds, chunk=8192))
    assert torch.equal(dec.nearest_decode(E, embeds, chunk=chunk), dec.nearest_decode(E, embeds))


def test_chunked_argmax_blocks_queries(monkeypatch):
    """With a tiny score budget the queries go in blocks too; results must not change."""
    E = torch.randn(700, 16, generator=_gen(13))
    embeds = torch.randn(50, 16, generator=_gen(14))
    want = dec.nearest_decode(E, embeds), dec.PinvDecoder(E).decode(embeds)
    monkeypatch.setattr(dec, "_ELEMS", 64)
    assert torch.equal(dec.nearest_decode(E, embeds, chunk=7), want[0])
    assert torch.equal(dec.PinvDecoder(E).decode(embeds, chunk=7), want[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nearest_decodes_exact_token_embeddings(dtype):
    E = torch.randn(2000, 64, generator=_gen(15)).to(dtype)
    ids = torch.randint(0, 2000, (5, 9), generator=_gen(16))
    assert torch.equal(dec.nearest_decode(E, E[ids], chunk=333), ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_embedding(dtype):
    E = torch.randn(3000, 64, generator=_gen(17)).to(dtype)
    embeds = torch.randn(2, 10, 64, generator=_gen(18)).to(dtype)
    ids = dec.PinvDecoder(E).decode(embeds, chunk=1000)
    _assert_argmax(ids, _pinv_ref(E.float(), embeds.float()))
    _assert_argmax(dec.nearest_decode(E, embeds), _cos_ref(E.float(), embeds.float()))
    assert dec.pinv_decoder(E).gram_pinv.dtype == torch.float64


def test_disk_cache_round_trip(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATOPT_CACHE", str(tmp_path / "cache"))
    E = torch.randn(1000, 32, generator=_gen(19))
    embeds = torch.randn(2, 5, 32, generator=_gen(20))
    first = dec.pinv_decoder(E)
    (entry,) = (tmp_path / "cache" / "pinv").iterdir()  # and no temporary folder left behind
    assert sorted(f.name for f in entry.iterdir()) == [".featopt-entry.json", "gram_pinv.safetensors"]

    dec.clear_memory_cache()
    monkeypatch.setattr(dec, "compute_gram_pinv", lambda *a, **k: pytest.fail("recomputed"))
    second = dec.pinv_decoder(E.clone())  # another tensor with the same content
    assert torch.equal(second.gram_pinv, first.gram_pinv)
    assert torch.equal(second.decode(embeds), first.decode(embeds))


def test_explicit_cache_dir_and_corrupt_file(tmp_path):
    E = torch.randn(200, 16, generator=_gen(21))
    first = dec.pinv_decoder(E, cache_dir=tmp_path)
    (entry,) = (tmp_path / "pinv").iterdir()
    (entry / "gram_pinv.safetensors").write_bytes(b"not a safetensors file")
    dec.clear_memory_cache()
    with pytest.warns(UserWarning, match="incomplete or corrupt: rebuilding"):
        again = dec.pinv_decoder(E, cache_dir=tmp_path)
    assert torch.equal(again.gram_pinv, first.gram_pinv)
    dec.clear_memory_cache()
    assert torch.equal(dec.pinv_decoder(E, cache_dir=tmp_path).gram_pinv, first.gram_pinv)  # rewritten


def test_no_disk_cache_by_default(tmp_path):
    dec.pinv_decoder(torch.randn(100, 8, generator=_gen(22)))
    assert not (tmp_path / "home").exists() and not any(tmp_path.rglob("*.safetensors"))


def test_memory_cache_hit_and_in_place_invalidation(monkeypatch):
    E = torch.randn(800, 16, generator=_gen(23))
    embeds = torch.randn(3, 4, 16, generator=_gen(24))
    first = dec.pinv_decoder(E)
    real = dec.compute_gram_pinv
    monkeypatch.setattr(dec, "compute_gram_pinv", lambda *a, **k: pytest.fail("recomputed"))
    assert dec.pinv_decoder(E).gram_pinv is first.gram_pinv

    E[:400] *= torch.linspace(0.1, 3, 16)  # in place: bumps E._version
    monkeypatch.setattr(dec, "compute_gram_pinv", real)
    edited = dec.pinv_decoder(E)
    assert not torch.allclose(edited.gram_pinv, first.gram_pinv)
    _assert_argmax(edited.decode(embeds), _pinv_ref(E, embeds))


def test_fingerprint_sees_unsampled_rows():
    E = torch.randn(1000, 16, generator=_gen(25))
    edited = E.clone()
    edited[1, 3] += 1e-3  # row 1 is not among the 64 sampled rows
    assert dec.fingerprint(E) == dec.fingerprint(E.clone())
    assert dec.fingerprint(E) != dec.fingerprint(edited)
    assert dec.fingerprint(E) != dec.fingerprint(E.to(torch.float64))


def test_token_cosine_and_agreement():
    E = torch.randn(50, 8, generator=_gen(26))
    embeds = torch.randn(2, 3, 8, generator=_gen(27))
    ids = torch.tensor([[0, 5, 49], [7, 7, 1]])
    cos = dec.token_cosine(E, embeds, ids)
    want = torch.tensor([[F.cosine_similarity(embeds[p, t], E[ids[p, t]], dim=0) for t in range(3)] for p in range(2)])
    assert cos.shape == (2, 3) and torch.allclose(cos, want, atol=1e-6)
    assert torch.allclose(dec.token_cosine(E, E[ids], ids), torch.ones(2, 3))
    got = dec.agreement(ids, torch.tensor([[0, 5, 48], [1, 2, 3]]))
    assert torch.allclose(got, torch.tensor([2 / 3, 0.0]))


def test_bad_input_is_a_featopt_error():
    E = torch.randn(10, 4)
    with pytest.raises(FeatoptError, match="d_model=4"):
        dec.nearest_decode(E, torch.randn(3, 5))
    with pytest.raises(FeatoptError, match="chunk"):
        dec.PinvDecoder(E).decode(torch.randn(3, 4), chunk=0)
    with pytest.raises(FeatoptError, match="same shape"):
        dec.agreement(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(FeatoptError, match="vocab, d_model"):
        dec.PinvDecoder(torch.randn(10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_embedding_cpu_embeds():
    E = torch.randn(5000, 64, generator=_gen(28))
    embeds = torch.randn(3, 7, 64, generator=_gen(29))
    ids = dec.pinv_decoder(E.cuda()).decode(embeds)
    assert ids.device.type == "cpu"
    _assert_argmax(ids, _pinv_ref(E, embeds))
    _assert_argmax(dec.nearest_decode(E.cuda().bfloat16(), embeds.cuda()).cpu(), _cos_ref(E.bfloat16().float(), embeds))
