"""Ablation against independent computations: one plain HF forward per deleted token (hidden
states from `output_hidden_states`), the SAE re-implemented in float64, the direction ablation
as a plain `register_forward_hook` on the HF block and log-probs by `torch.log_softmax`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featopt.errors import FeatoptError
from featopt.models import load_model
from featopt.dictionaries.ablation import ablated_text, direction_ablation
from featopt.models.sae.model import SAEConfig, SparseAutoencoder

D, D_SAE, LAYER, T = 64, 48, 1, 10
DEAD = 3  # a latent that never fires


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2")


def blocks_of(hf_model):
    return hf_model.model.layers if hf_model.config.model_type == "llama" else hf_model.transformer.h


def make_sae(arch="relu", seed=0):
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=D_SAE, architecture=arch, k=6 if arch == "topk" else None,
                                      hook_name=f"blocks.{LAYER}.resid_post"))
    gen = torch.Generator().manual_seed(seed)
    sae.init_weights(gen)
    with torch.no_grad():
        sae.W_dec.mul_(0.5 + torch.rand(D_SAE, 1, generator=gen))  # not unit rows: projection != contribution
        sae.b_enc.copy_(0.2 * torch.randn(D_SAE, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=gen))
        sae.b_enc[DEAD] = -1e3
    return sae


def ref_encode(sae, x: torch.Tensor) -> torch.Tensor:
    """The SAE's encoder written out in float64: x [..., d] -> z [..., d_sae]."""
    W_enc, b_enc, b_dec = (p.detach().double() for p in (sae.W_enc, sae.b_enc, sae.b_dec))
    pre = (x.double() - b_dec) @ W_enc + b_enc
    if sae.cfg.architecture == "topk":
        top = pre.topk(sae.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
    return pre.clamp_min(0)


def hidden_at(adapter, ids: torch.Tensor) -> torch.Tensor:
    """resid_post of LAYER from a plain HF forward: [B, L, d]."""
    with torch.no_grad():
        return adapter.model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1]


def context(adapter, n=1, t=T, seed=3):
    return torch.randint(1, adapter.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- ablated text
@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("target", [1, 4, T - 1])
def test_ablated_text_matches_one_forward_per_deletion(llama, arch, target):
    sae, ids = make_sae(arch), context(llama)[0]
    ctx = ids[:target + 1]
    clean = ref_encode(sae, hidden_at(llama, ctx[None])[0, -1])
    latent = int(clean.argmax())
    assert clean[latent] > 0
    expected = []
    for j in range(target):  # the deletion loop, written out
        shorter = torch.cat([ctx[:j], ctx[j + 1:]])
        expected.append(float(ref_encode(sae, hidden_at(llama, shorter[None])[0, -1])[latent]))
    got = ablated_text(llama, sae, latent, ids, target)
    assert got.tokens == ctx.tolist() and got.target == target
    assert got.base == pytest.approx(float(clean[latent]), abs=1e-4)
    np.testing.assert_allclose(got.ablated.numpy(), expected, atol=1e-4)
    np.testing.assert_allclose(got.change.numpy(), np.array(expected) - got.base, atol=1e-4)
    np.testing.assert_allclose(got.relative.numpy(), (np.array(expected) - got.base) / got.base, atol=1e-4 / got.base)
    rec = got.record(llama.decode)
    assert rec["tokens"] == [llama.decode([t]) for t in ctx.tolist()] and len(rec["change"]) == target
    assert all(isinstance(r, float) for r in rec["relative"])


@pytest.mark.parametrize("target", [2, T - 1])
def test_ablated_text_keeps_the_bos_and_removes_each_later_token(llama, target):
    """`first=1` (--bos): the context starts with the BOS token, which is never deleted; entry j is
    a plain forward of the context without token 1 + j."""
    sae, bos = make_sae("topk"), llama.tokenizer.bos_token_id
    ids = torch.cat([torch.tensor([bos]), context(llama)[0][: T - 1]])
    ctx = ids[:target + 1]
    clean = ref_encode(sae, hidden_at(llama, ctx[None])[0, -1])
    latent = int(clean.argmax())
    expected = [float(ref_encode(sae, hidden_at(llama, torch.cat([ctx[:j], ctx[j + 1:]])[None])[0, -1])[latent])
                for j in range(1, target)]
    got = ablated_text(llama, sae, latent, ids, target, first=1)
    assert got.tokens == ctx.tolist() and got.target == target and got.first == 1
    assert got.base == pytest.approx(float(clean[latent]), abs=1e-4)
    np.testing.assert_allclose(got.ablated.numpy(), expected, atol=1e-4)
    rec = got.record(llama.decode)
    assert rec["first"] == 1 and rec["tokens"][0] == llama.decode([bos]) and len(rec["change"]) == target - 1
    with pytest.raises(FeatoptError, match="target must be between 2"):
        ablated_text(llama, sae, latent, ids, 1, first=1)  # nothing but the BOS before it


def test_ablated_text_one_batched_forward_with_early_exit(llama):
    sae, ids, seen = make_sae(), context(llama)[0], []
    first = blocks_of(llama.model)[0].register_forward_hook(lambda m, a, out: seen.append(a[0].shape[:2]))
    last = blocks_of(llama.model)[-1].register_forward_hook(lambda *a: seen.append("last block ran"))
    try:
        ablated_text(llama, sae, 0, ids, 6)
    finally:
        first.remove()
        last.remove()
    assert sorted(seen) == [(1, 7), (6, 6)]  # the clean context and all six deletions at once


def test_ablated_text_dead_latent_is_nan_relative(llama):
    got = ablated_text(llama, make_sae(), DEAD, context(llama)[0], 5)
    assert got.base == 0 and torch.isnan(got.relative).all() and (got.change == 0).all()
    assert got.record(llama.decode)["relative"] == [None] * 5


def test_ablated_text_rejects_bad_input(llama):
    sae, ids = make_sae(), context(llama)[0]
    for target in (0, T, -1):
        with pytest.raises(FeatoptError, match="target must be"):
            ablated_text(llama, sae, 0, ids, target)
    with pytest.raises(FeatoptError, match="out of range"):
        ablated_text(llama, sae, D_SAE, ids, 3)
    with pytest.raises(FeatoptError, match="one context"):
        ablated_text(llama, sae, 0, ids[None], 3)
    with pytest.raises(FeatoptError, match="one latent"):
        ablated_text(llama, sae, [0, 1], ids, 3)
    with pytest.raises(FeatoptError, match="feature map"):
        ablated_text(llama.with_features(f"blocks.{LAYER}.resid_post", sae), sae, 0, ids, 3)


# ----------------------------------------------------------------- direction ablation
def hand_ablation(adapter, sae, latent, ids, mode):
    """Clean and ablated log-probs [B, L, V] and the clean latent [B, L], by a plain block hook."""
    w = sae.W_dec.detach()[latent]

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if mode == "contribution":
            new = out - ref_encode(sae, out)[..., latent, None].float() * w
        else:
            d = w / w.norm()
            new = out - (out @ d)[..., None] * d
        return (new, *output[1:]) if isinstance(output, tuple) else new

    with torch.no_grad():
        clean = torch.log_softmax(adapter.model(input_ids=ids).logits, -1)
        handle = blocks_of(adapter.model)[LAYER].register_forward_hook(hook)
        try:
            ablated = torch.log_softmax(adapter.model(input_ids=ids).logits, -1)
        finally:
            handle.remove()
    return clean, ablated, ref_encode(sae, hidden_at(adapter, ids))[..., latent]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", ["contribution", "projection"])
def test_direction_ablation_matches_hand_hook(name, mode, request):
    adapter = request.getfixturevalue(name)
    sae, ids = make_sae("topk" if name == "gpt2" else "relu"), context(adapter, n=5)
    z = ref_encode(sae, hidden_at(adapter, ids))
    latent = int((z > 0).float().mean((0, 1)).argmax())  # fires somewhere, not everywhere
    clean, ablated, zl = hand_ablation(adapter, sae, latent, ids, mode)
    got = direction_ablation(adapter, sae, latent, ids, mode=mode, top=7, batch_size=2)  # uneven batches
    diff = ablated - clean
    delta = diff[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got.delta, delta, atol=1e-4, rtol=0)
    assert torch.equal(got.active, zl > 0) and got.active.any() and got.over_active
    assert delta.abs().max() > 1e-3  # the ablation did something
    mean = diff[zl > 0].double().mean(0)
    values, order = torch.sort(mean)
    assert got.decreased_ids.tolist() == order[:7].tolist()
    torch.testing.assert_close(got.decreased.double(), values[:7], atol=1e-5, rtol=0)
    assert got.increased_ids.tolist() == order.flip(0)[:7].tolist()
    torch.testing.assert_close(got.increased.double(), values.flip(0)[:7], atol=1e-5, rtol=0)
    rec = got.record(adapter.decode)
    assert rec["mode"] == mode and len(rec["delta"]) == 5 and len(rec["delta"][0]) == T - 1
    assert rec["active"] == got.active.tolist() and rec["decreased"][0][0] == adapter.decode([order[0].item()])


def test_contribution_changes_nothing_where_the_latent_is_zero(llama):
    sae, ids = make_sae(), context(llama, n=4)
    dead = direction_ablation(llama, sae, DEAD, ids)  # never fires: x - 0 * w = x everywhere
    assert not dead.active.any() and not dead.over_active
    assert torch.equal(dead.delta, torch.zeros_like(dead.delta))
    assert torch.equal(dead.decreased, torch.zeros(10)) and torch.equal(dead.increased, torch.zeros(10))
    # A latent that fires late: positions before its first firing are unchanged (causal attention).
    fires = ref_encode(sae, hidden_at(llama, ids)) > 0  # [B, L, d_sae]
    first = torch.where(fires.any(1), fires.float().argmax(1), torch.full((len(ids), D_SAE), T))  # [B, d_sae]
    latent = int(first.float().mean(0).masked_fill(~fires.any((0, 1)), -1).argmax())
    got = direction_ablation(llama, sae, latent, ids)
    assert got.active.any() and (first[:, latent] > 0).any()
    for b in range(len(ids)):
        before = int(first[b, latent])
        assert torch.equal(got.active[b, :before], torch.zeros(before, dtype=torch.bool))
        assert got.delta[b, :before].abs().le(1e-6).all()  # delta has L-1 entries: the slice may be all of it
    # Projection mode does change positions where the latent is zero.
    proj = direction_ablation(llama, sae, DEAD, ids, mode="projection")
    assert proj.delta.abs().max() > 1e-4


def test_direction_ablation_rejects_bad_input(llama):
    sae, ids = make_sae(), context(llama, n=2)
    with pytest.raises(FeatoptError, match="mode"):
        direction_ablation(llama, sae, 0, ids, mode="zero")
    with pytest.raises(FeatoptError, match="contexts must be"):
        direction_ablation(llama, sae, 0, ids[0])
    with pytest.raises(FeatoptError, match="contexts must be"):
        direction_ablation(llama, sae, 0, ids[:, :1])
    with pytest.raises(FeatoptError, match="out of range"):
        direction_ablation(llama, sae, -1, ids)
    with torch.no_grad():
        sae.W_dec[0] = 0
    with pytest.raises(FeatoptError, match="zero decoder row"):
        direction_ablation(llama, sae, 0, ids, mode="projection")
    assert math.isfinite(float(direction_ablation(llama, sae, 0, ids).delta.sum()))
