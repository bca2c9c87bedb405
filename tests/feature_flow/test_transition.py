"""The transition matrix T between consecutive residual SAEs and the explained variance of
`z_{L+1} ≈ z_L T`, against a dense numpy cosine matrix and latents collected by hand-written
forward hooks and a float64 numpy encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.feature_flow.flow_reference import encode64, hidden, make_sae
from featopt.errors import FeatoptError
from featopt.feature_flow.saes import FlowSet
from featopt.feature_flow.transition import VARIANTS, explained_variance, format_transition, transition_matrix


def _biased(layer, d_sae=48):
    sae = make_sae(layer, "res", d_sae=d_sae)
    g = torch.Generator().manual_seed(11 + layer)
    with torch.no_grad():
        sae.b_dec.copy_(0.01 * torch.randn(sae.d_in, generator=g))
        sae.b_enc.copy_(0.005 * torch.randn(sae.d_sae, generator=g))
    return sae


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(512, (5, 12), generator=torch.Generator().manual_seed(4))  # odd: 2 fit, 3 evaluate


def resid64(llama, contexts) -> dict[int, np.ndarray]:
    return {L: x for (L, module), x in hidden(llama, contexts).items() if module == "res"}


def dense_T(sae_t, sae_t1) -> np.ndarray:
    """`[d_t, d_t1]`: per column, the top-1 cosine at its row when positive, zeros elsewhere."""
    A, B = sae_t.W_dec.double().numpy(), sae_t1.W_dec.double().numpy()
    C = (A / np.linalg.norm(A, axis=1, keepdims=True)) @ (B / np.linalg.norm(B, axis=1, keepdims=True)).T
    T = np.zeros_like(C)
    best = C.argmax(0)
    cols = np.arange(C.shape[1])
    T[best, cols] = np.where(C[best, cols] > 0, C[best, cols], 0.0)
    return T


def ev(Z1, pred):
    return 1 - ((Z1 - pred) ** 2).sum() / ((Z1 - Z1.mean(0)) ** 2).sum()


def fitted_T(pattern_rows, Z0, Z1, d_t):
    """T with one entry per column at `pattern_rows[j]`, the least-squares scale on (Z0, Z1)."""
    T = np.zeros((d_t, Z1.shape[1]))
    for j, i in enumerate(pattern_rows):
        den = Z0[:, i] @ Z0[:, i]
        T[i, j] = (Z0[:, i] @ Z1[:, j]) / den if den > 0 else 0.0
    return T


def test_transition_matrix_is_dense_top1_with_positive_rule():
    g = torch.Generator().manual_seed(0)
    W_t = torch.randn(48, 64, generator=g)
    W_t[:, 0] += 4.0  # every row of t leans along +e0 ...
    W_t1 = torch.randn(40, 64, generator=g)
    W_t1[:5] = -8 * torch.eye(64)[0] + 0.1 * torch.randn(5, 64, generator=g)  # ... so these 5 columns have only negative cosines
    sae_t, sae_t1 = make_sae(0, "res", W_dec=W_t), make_sae(1, "res", d_sae=40, W_dec=W_t1)
    rows, values = transition_matrix(sae_t, sae_t1)
    assert rows.shape == values.shape == (40,)
    got = np.zeros((48, 40))
    got[rows.numpy(), np.arange(40)] = values.double().numpy()
    want = dense_T(sae_t, sae_t1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (values[:5] == 0).all() and (values[5:] > 0).all()
    assert torch.equal(rows[5:], torch.from_numpy(np.abs(want[:, 5:]).argmax(0)))


@pytest.mark.parametrize("sizes", [(48, 48, 48), (40, 56, 32)])  # (56 > 40: random choice; 32 < 56: permutation)
@pytest.mark.parametrize("batch_size", [1, 4])
def test_explained_variance_matches_numpy(llama, contexts, sizes, batch_size):
    flow = FlowSet({(L, "res"): _biased(L, d) for L, d in enumerate(sizes)})
    stats = explained_variance(flow, llama, contexts, batch_size=batch_size, skip_first=1, seed=3, progress=False)
    assert stats.pairs == [(0, 1), (1, 2)] and stats.tokens == (2 * 11, 3 * 11)
    h = resid64(llama, contexts)
    for L in (0, 1):
        sae_t, sae_t1 = flow[(L, "res")], flow[(L + 1, "res")]
        Z0 = encode64(sae_t, h[L][:, 1:]).reshape(5, 11, -1)
        Z1 = encode64(sae_t1, h[L + 1][:, 1:]).reshape(5, 11, -1)
        fit0, fit1 = Z0[:2].reshape(22, -1), Z1[:2].reshape(22, -1)
        ev0, ev1 = Z0[2:].reshape(33, -1), Z1[2:].reshape(33, -1)
        T = dense_T(sae_t, sae_t1)
        A, B = sae_t.W_dec.double().numpy(), sae_t1.W_dec.double().numpy()
        top_rows = ((A / np.linalg.norm(A, axis=1, keepdims=True)) @ (B / np.linalg.norm(B, axis=1, keepdims=True)).T).argmax(0)
        g = torch.Generator().manual_seed(3 * 1_000_003 + L)
        d_t, d_t1 = sae_t.d_sae, sae_t1.d_sae
        perm = (torch.randperm(d_t, generator=g)[:d_t1] if d_t1 <= d_t else torch.randint(d_t, (d_t1,), generator=g)).numpy()
        want = {
            "cosine": ev(ev1, ev0 @ T),
            "fitted": ev(ev1, ev0 @ fitted_T(top_rows, fit0, fit1, d_t)),
            "permutation": ev(ev1, ev0 @ fitted_T(perm, fit0, fit1, d_t)),
            "cosine_all": ev(Z1.reshape(55, -1), Z0.reshape(55, -1) @ T),
        }
        for name, value in want.items():
            assert stats.ev[(L, L + 1)][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
        assert stats.positive[(L, L + 1)] == int((T != 0).any(0).sum())


def test_permutation_baseline_reproducible(llama, contexts):
    flow = FlowSet({(L, "res"): _biased(L) for L in range(3)})
    a = explained_variance(flow, llama, contexts, seed=1, progress=False)
    b = explained_variance(flow, llama, contexts, seed=1, progress=False)
    c = explained_variance(flow, llama, contexts, seed=2, progress=False)
    assert a.ev == b.ev
    for pair in a.pairs:
        assert c.ev[pair]["permutation"] != a.ev[pair]["permutation"]
        assert all(c.ev[pair][k] == pytest.approx(a.ev[pair][k], rel=1e-12) for k in ("cosine", "fitted", "cosine_all"))


def test_layers_record_and_format(llama, contexts):
    flow = FlowSet({(L, "res"): _biased(L) for L in range(3)})
    stats = explained_variance(flow, llama, contexts, layers=[1], progress=False)
    assert stats.pairs == [(1, 2)]
    record = json.loads(json.dumps(stats.record()))
    assert set(record["pairs"]["1->2"]) == {*VARIANTS, "cosine_all", "positive_columns"}
    assert record["tokens"] == {"fit": 22, "eval": 33} and "versions" in record
    text = format_transition(stats)
    assert "1->2" in text and all(name in text for name in VARIANTS)


@pytest.mark.parametrize("kwargs, words", [
    (dict(layers=[2]), "layer 2"),  # no 3/res
    (dict(batch_size=0), "batch_size"),
])
def test_bad_input(llama, contexts, kwargs, words):
    flow = FlowSet({(L, "res"): _biased(L) for L in range(3)})
    with pytest.raises(FeatoptError, match=words):
        explained_variance(flow, llama, contexts, progress=False, **kwargs)


@pytest.mark.parametrize("bad, words", [
    (torch.arange(12), "contexts"), (torch.rand(4, 12), "contexts"), (torch.zeros(1, 12, dtype=torch.long), "at least 2"),
])
def test_bad_contexts(llama, bad, words):
    flow = FlowSet({(L, "res"): _biased(L) for L in range(2)})
    with pytest.raises(FeatoptError, match=words):
        explained_variance(flow, llama, bad, progress=False)


def test_no_consecutive_pair(llama, contexts):
    flow = FlowSet({(0, "res"): _biased(0), (2, "res"): _biased(2), (1, "mlp"): make_sae(1, "mlp")})
    with pytest.raises(FeatoptError, match="consecutive"):
        explained_variance(flow, llama, contexts, progress=False)
