"""Edits against hand-written `register_forward_hook`s on the Hugging Face modules, with the SAE's
encoding re-implemented in float64."""

from __future__ import annotations

import pytest
import torch

from featopt.errors import FeatoptError
from featopt.interventions import Edit, add_direction, edited, generate, project_out, scale_latents
from featopt.models import load_model
from featopt.models.sae.model import SAEConfig, SparseAutoencoder

D = 64


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


def make_sae(hook, seed=0, k=6, d_sae=40):
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=d_sae, architecture="topk", k=k, hook_name=hook))
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    return sae.eval().requires_grad_(False)


def encode64(sae, x):
    """topk SAE in float64: relu of the k largest pre-activations, the rest 0."""
    pre = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
    top = pre.topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def hand_scale(sae, latents, r):
    """A forward hook returning `x + (r - 1) sum_i z_i W_dec[i]` (tuple outputs kept)."""
    def hook(module, args, output):
        x = output[0] if isinstance(output, tuple) else output
        z = encode64(sae, x)[..., latents]  # [B, T, n]
        new = (x.double() + (r - 1) * z @ sae.W_dec.double()[latents]).to(x.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


def ids(n=2, t=9, seed=0):
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("r", [0.0, 0.5, 3.0, -1.0])
def test_scale_latents_at_two_layers_equals_hand_hooks(llama, r):
    hf = llama.model
    res1, mlp2 = make_sae("blocks.1.resid_post", 0), make_sae("blocks.2.mlp_out", 1)
    x = ids()
    handles = [hf.model.layers[1].register_forward_hook(hand_scale(res1, [3, 7, 11], r)),
               hf.model.layers[2].mlp.register_forward_hook(hand_scale(mlp2, [0, 5], r))]
    try:
        want = hf(input_ids=x).logits
    finally:
        for h in handles:
            h.remove()
    edits = [Edit("blocks.1.resid_post", scale_latents(res1, [3, 7, 11], r)),
             Edit("blocks.2.mlp_out", scale_latents(mlp2, [0, 5], r))]
    with edited(llama, edits):
        got = llama.logits(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if r != 1.0:
        assert not torch.allclose(got, llama.logits(x), atol=1e-3)  # the edit matters, and is gone now


def test_r_one_is_bit_identical(llama):
    sae = make_sae("blocks.1.resid_post")
    x = ids()
    clean = llama.logits(x)
    with edited(llama, [Edit("blocks.1.resid_post", scale_latents(sae, list(range(40)), 1.0))]):
        assert torch.equal(llama.logits(x), clean)


def test_per_row_latents_and_r_equal_one_row_at_a_time(llama):
    sae = make_sae("blocks.0.resid_post", 2)
    x = ids(3)
    latents, r = torch.tensor([[1, 2], [4, 4], [9, 0]]), torch.tensor([0.0, 2.0, -0.5])
    with edited(llama, [Edit("blocks.0.resid_post", scale_latents(sae, latents, r))]):
        batched = llama.logits(x)
    for b in range(3):
        # a repeated latent counts twice: [4, 4] with r = 2 adds 2 * (2 - 1) z_4 W_dec[4]
        with edited(llama, [Edit("blocks.0.resid_post", scale_latents(sae, latents[b], float(r[b])))]):
            torch.testing.assert_close(batched[b], llama.logits(x[b:b + 1])[0], atol=1e-5, rtol=1e-5)


def test_positions_mask_edits_only_those_positions(llama):
    sae = make_sae("blocks.2.resid_post", 3)
    x = ids(1, 8)
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5] = True
    with llama.hooks(read=["blocks.2.resid_post"]) as clean:
        llama.logits(x)
    with edited(llama, [Edit("blocks.2.resid_post", scale_latents(sae, [1, 2, 3], 0.0, positions=mask))]):
        with llama.hooks(read=["blocks.2.resid_post"]) as seen:
            llama.logits(x)
    a, b = next(iter(clean.values())), next(iter(seen.values()))
    assert torch.equal(a[0, :5], b[0, :5]) and torch.equal(a[0, 6:], b[0, 6:])
    z = encode64(sae, a[0, 5])[[1, 2, 3]]
    want = a[0, 5].double() - z @ sae.W_dec.double()[[1, 2, 3]]
    torch.testing.assert_close(b[0, 5].double(), want, atol=1e-5, rtol=0)


def test_add_direction_and_project_out(llama):
    v = torch.randn(D, generator=torch.Generator().manual_seed(5))
    x = ids(2, 6)
    with llama.hooks(read=["blocks.1.attn_out"]) as clean:
        llama.logits(x)
    a = next(iter(clean.values()))
    with edited(llama, [Edit("blocks.1.attn_out", add_direction(v, torch.tensor([2.0, -1.0])))]):
        with llama.hooks(read=["blocks.1.attn_out"]) as seen:
            llama.logits(x)
    b = next(iter(seen.values()))
    torch.testing.assert_close(b, a + torch.tensor([2.0, -1.0])[:, None, None] * v, atol=1e-5, rtol=0)
    with edited(llama, [Edit("blocks.1.attn_out", project_out(v))]):
        with llama.hooks(read=["blocks.1.attn_out"]) as seen:
            llama.logits(x)
    c = next(iter(seen.values()))
    torch.testing.assert_close(c @ (v / v.norm()), torch.zeros(2, 6), atol=1e-5, rtol=0)
    u = v / v.norm()
    torch.testing.assert_close(c, a - (a @ u)[..., None] * u, atol=1e-5, rtol=0)


def test_edits_at_one_site_compose_in_order_and_are_always_removed(llama):
    v = torch.randn(D, generator=torch.Generator().manual_seed(6))
    x = ids(1, 5)
    clean = llama.logits(x)
    # project out, then add: the added direction survives; the other order removes it again
    with edited(llama, [Edit("blocks.0.mlp_out", project_out(v)), Edit("blocks.0.mlp_out", add_direction(v, 3.0))]):
        with llama.hooks(read=["blocks.0.mlp_out"]) as seen:
            llama.logits(x)
    u = v / v.norm()
    torch.testing.assert_close(next(iter(seen.values())) @ u, torch.full((1, 5), 3.0 * float(v.norm())), atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="boom"):
        with edited(llama, [Edit("blocks.0.mlp_out", add_direction(v, 3.0))]):
            raise RuntimeError("boom")
    assert torch.equal(llama.logits(x), clean)


def test_generate_with_edits_equals_full_recompute(llama):
    """KV-cached generation under an edit = re-running the whole sequence with the edit each step."""
    sae = make_sae("blocks.1.resid_post", 7)
    edit = [Edit("blocks.1.resid_post", scale_latents(sae, [0, 1, 2, 3], 4.0))]
    prompt = ids(1, 4)[0]
    got = generate(llama, prompt, 6, stop_at_eos=False, edits=edit)
    seq = prompt.tolist()
    with edited(llama, edit):
        for _ in range(6):
            seq.append(int(llama.logits(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[4:]
    assert got != generate(llama, prompt, 6, stop_at_eos=False)


def test_bad_input():
    sae = make_sae("blocks.0.resid_post")
    with pytest.raises(FeatoptError, match="finite"):
        scale_latents(sae, [1], float("nan"))
    with pytest.raises(FeatoptError, match="out of range"):
        scale_latents(sae, [40], 0.0)
    with pytest.raises(FeatoptError, match="zero"):
        project_out(torch.zeros(D))
    with pytest.raises(FeatoptError, match="finite"):
        add_direction(torch.ones(D), float("inf"))
