"""Max cosine similarity against the dense `normalize(A) @ normalize(B).T` and hand counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featopt.errors import FeatoptError
from featopt.commands.sae_read import mcs_text
from featopt.dictionaries.mcs import max_cosine, mcs_table
from featopt.models.sae.model import SAEConfig, SparseAutoencoder

D = 8


def rand(n, d=D, seed=0, dtype=torch.float32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense(A, B):
    return (F.normalize(A.double(), dim=1) @ F.normalize(B.double(), dim=1).T).max(1)


@pytest.mark.parametrize("chunk", [1, 3, 4, 100])
def test_matches_dense(chunk):
    A, B = rand(10), rand(7, seed=1)
    got, arg = max_cosine(A, B, chunk=chunk)
    ref = dense(A, B)
    torch.testing.assert_close(got.double(), ref.values, atol=1e-6, rtol=0)
    assert arg.dtype == torch.long and arg.tolist() == ref.indices.tolist()
    got64, arg64 = max_cosine(A.double(), B.double(), chunk=chunk)
    assert got64.dtype == torch.float64 and torch.allclose(got64, ref.values, atol=1e-12)


def test_self_is_one():
    A = rand(13)
    got, arg = max_cosine(A, A, chunk=4)
    torch.testing.assert_close(got, torch.ones(13), atol=1e-6, rtol=0)
    assert arg.tolist() == list(range(13))


def test_scale_and_permutation_invariance():
    A, B = rand(9), rand(11, seed=2)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(5))
    base, arg = max_cosine(A, B, chunk=3)
    permuted, parg = max_cosine(A, B[perm] * 3.0, chunk=3)
    torch.testing.assert_close(permuted, base, atol=1e-6, rtol=0)
    assert perm[parg].tolist() == arg.tolist()


def test_zero_row_has_zero_similarity():
    A = rand(3)
    A[1] = 0
    got, _ = max_cosine(A, rand(4, seed=1))
    assert got[1] == 0 and torch.isfinite(got).all()


def sae(W_dec: torch.Tensor, hook="blocks.1.resid_post"):
    out = SparseAutoencoder(SAEConfig(d_in=W_dec.shape[1], d_sae=W_dec.shape[0], architecture="relu", hook_name=hook))
    with torch.no_grad():
        out.W_dec.copy_(W_dec)
    return out


def test_mcs_table_by_hand():
    small = rand(6)
    # The larger dictionary holds the small one's directions (rescaled) plus new ones: every
    # feature of the small one is found again; not every one of the large one.
    large = torch.cat([rand(10, seed=3), 2 * small.flip(0)])
    other = rand(5, seed=4)
    saes, names = [sae(small), sae(large, hook="blocks.1.hook_resid_post"), sae(other)], ["1x", "2x", "rand"]
    rows = mcs_table(saes, names, threshold=0.9, bins=10)
    assert [(r["a"], r["b"]) for r in rows] == [(a, b) for a in names for b in names if a != b]
    for row in rows:
        A, B = (saes[names.index(row[key])].W_dec.detach() for key in ("a", "b"))
        ref = dense(A, B).values
        assert (row["d_sae_a"], row["d_sae_b"]) == (len(A), len(B))
        assert row["mean"] == pytest.approx(ref.mean().item(), abs=1e-6)
        assert row["median"] == pytest.approx(ref.median().item() if len(ref) % 2 else ref.sort().values[
            len(ref) // 2 - 1: len(ref) // 2 + 1].mean().item(), abs=1e-6)
        assert row["above"] == int((ref >= 0.9).sum()) and row["above_fraction"] == row["above"] / len(A)
        expected = [int(((ref.clamp(0, 1) >= i / 10) & (ref.clamp(0, 1) < (i + 1) / 10)).sum()) for i in range(10)]
        expected[-1] += int((ref.clamp(0, 1) == 1).sum())
        assert row["histogram"] == expected and sum(row["histogram"]) == len(A)
    one_two = rows[0]
    assert one_two["above"] == 6 and one_two["mean"] == pytest.approx(1.0, abs=1e-6)
    text = mcs_text(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["a", "\\", "b", "1x", "[6]", "2x", "[16]", "rand", "[5]"]
    assert lines[1].split()[:4] == ["1x", "[6]", "-", f"{one_two['mean']:.3f}"] and "(6)" in lines[1]
    assert "0.9" in lines[-1]


def test_mcs_table_rejects_mismatches():
    with pytest.raises(FeatoptError, match="same site and width"):
        mcs_table([sae(rand(4)), sae(rand(4, d=D + 1))], ["a", "b"])
    with pytest.raises(FeatoptError, match="same site and width"):
        mcs_table([sae(rand(4)), sae(rand(4), hook="blocks.2.resid_post")], ["a", "b"])
    with pytest.raises(FeatoptError, match="one name per SAE"):
        mcs_table([sae(rand(4)), sae(rand(4))], ["a"])
    with pytest.raises(FeatoptError, match="at least two"):
        mcs_table([sae(rand(4))], ["a"])
    with pytest.raises(FeatoptError, match="same d"):
        max_cosine(rand(3), rand(3, d=D + 1))
    with pytest.raises(FeatoptError, match="no rows"):
        max_cosine(rand(3), rand(0))
    with pytest.raises(FeatoptError, match="chunk"):
        max_cosine(rand(3), rand(3), chunk=0)


def test_never_holds_the_full_similarity_matrix():
    """Every tensor made inside max_cosine is at most [chunk, chunk] or the size of an input."""
    from torch.overrides import TorchFunctionMode

    sizes = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor):
                    sizes.append(t.numel())
            return out

    A, B = rand(50, d=4), rand(60, d=4, seed=1)
    with Record():
        got, _ = max_cosine(A, B, chunk=8)
    torch.testing.assert_close(got.double(), dense(A, B).values, atol=1e-6, rtol=0)
    assert sizes and max(sizes) <= 60 * 4 < 50 * 60
