"""The KL divergence of `evaluate` and transcoders' evaluation, against independent computations:
plain HF forwards with hooks written here (on the HF block, or the HF MLP module for a
transcoder), the transcoder written out in float64 numpy, and CE and KL summed out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featopt.dictionaries.evaluate import evaluate
from featopt.dictionaries.metrics import MeanKLDivergence
from featopt.errors import FeatoptError
from featopt.models import load_model
from featopt.models.sae.attach import attach, site_of, target_site_of
from featopt.models.sae.model import SAEConfig, SparseAutoencoder
from tests.sae.test_evaluate import D, N_CTX, T, blocks_of, contexts, identity_sae, sae_replacer, topk_sae

D_SAE = 48


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2")


def transcoder(layer=0, seed=0, d_out=D, target=None):
    """A relu transcoder built by hand: reads the MLP's input, writes its output."""
    cfg = SAEConfig(architecture="relu", d_in=D, d_sae=D_SAE, d_out=d_out, hook_name=f"blocks.{layer}.mlp_in",
                    target_hook_name=target or f"blocks.{layer}.mlp_out", apply_b_dec_to_input=False)
    tc = SparseAutoencoder(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tc.W_enc.copy_(torch.randn(D, D_SAE, generator=gen) / D ** 0.5)
        tc.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=gen))
        tc.W_dec.copy_(0.003 * torch.randn(D_SAE, d_out, generator=gen))
        tc.b_dec.copy_(0.001 * torch.randn(d_out, generator=gen))
    return tc


def ref_transcoder(tc, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """relu(x W_enc + b_enc) W_dec + b_dec in float64 numpy (no centring on b_dec): (z, y_hat)."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double().numpy() for p in (tc.W_enc, tc.b_enc, tc.W_dec, tc.b_dec))
    z = np.maximum(x @ W_enc + b_enc, 0.0)
    return z, z @ W_dec + b_dec


def hf_forward(adapter, ids, module=None, edit=None):
    """One plain HF forward: `(logits, module input, module output)`; `edit(input, output) -> new
    output` replaces `module`'s output when given."""
    seen = {}

    def hook(mod, args, output):
        seen["in"], seen["out"] = args[0], output[0] if isinstance(output, tuple) else output
        if edit is None:
            return None
        new = edit(args[0], seen["out"])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook) if module is not None else None
    try:
        with torch.no_grad():
            logits = adapter.model(input_ids=ids).logits
    finally:
        if handle is not None:
            handle.remove()
    return logits, seen.get("in"), seen.get("out")


def at_positions(skip, fn):
    """An `edit` that replaces the output at positions >= skip by `fn(input, output)` there."""
    def edit(x, out):
        new = out.clone()
        new[:, skip:] = fn(x[:, skip:], out[:, skip:]).to(out.dtype)
        return new
    return edit


def hand_ce(logits, ids, skip):
    return F.cross_entropy(logits[:, skip:-1].reshape(-1, logits.shape[-1]).double(), ids[:, skip + 1:].reshape(-1)).item()


def hand_kl(clean, logits, skip):
    """Mean over predictions at positions >= skip of sum_v p log(p / q), in float64."""
    log_p = torch.log_softmax(clean[:, skip:-1].double(), -1)
    log_q = torch.log_softmax(logits[:, skip:-1].double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def mlp_of(adapter, layer):
    return blocks_of(adapter.model)[layer].mlp  # LlamaMLP / GPT2MLP, written out per family by blocks_of


# ----------------------------------------------------------------- KL of an SAE
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("skip", [1, 2])
def test_kl_matches_a_hand_rolled_splice(name, skip, request):
    adapter = request.getfixturevalue("llama" if name == "tiny-llama" else "gpt2")
    ids, sae = contexts(adapter), topk_sae()
    (row,) = evaluate(adapter, [sae], ids, batch_size=2, skip_first=skip)
    block = blocks_of(adapter.model)[1]
    clean, _, _ = hf_forward(adapter, ids)
    spliced, _, _ = hf_forward(adapter, ids, block, at_positions(skip, lambda x, out: sae_replacer(sae)(out)))
    zero, _, _ = hf_forward(adapter, ids, block, at_positions(skip, lambda x, out: torch.zeros_like(out)))
    assert row["kl_div"] == pytest.approx(hand_kl(clean, spliced, skip), rel=1e-4, abs=1e-7)
    # torch's own kl_div (input log q, target log p) for the ablation's
    log_p, log_q = (torch.log_softmax(t[:, skip:-1].double(), -1) for t in (clean, zero))
    by_torch = F.kl_div(log_q, log_p, log_target=True, reduction="sum").item() / (N_CTX * (T - 1 - skip))
    assert row["kl_zero"] == pytest.approx(by_torch, rel=1e-4, abs=1e-7)
    assert row["kl_div"] > 0 and row["kl_zero"] > 0


def test_kl_is_zero_for_a_perfect_reconstruction(llama):
    ids = contexts(llama)
    perfect, lossy = evaluate(llama, [identity_sae(), topk_sae()], ids, batch_size=2)
    assert perfect["kl_div"] == 0.0
    assert lossy["kl_div"] > 1e-6
    assert perfect["kl_zero"] == lossy["kl_zero"] > 0  # one ablation of their shared site


def test_kl_metric_against_the_explicit_sum_and_across_ranks():
    gen = torch.Generator().manual_seed(0)
    clean, other = torch.randn(4, 6, 9, generator=gen), torch.randn(4, 6, 9, generator=gen)
    whole, first, second = MeanKLDivergence(2), MeanKLDivergence(2), MeanKLDivergence(2)
    whole.update(clean, other)
    first.update(clean[:1], other[:1])
    second.update(clean[1:], other[1:])
    first.merge_state(second)  # what a DDP sync computes: every state is a sum
    expected = hand_kl(clean, other, 2)
    assert whole.compute().item() == pytest.approx(expected, rel=1e-6)
    assert first.compute().item() == pytest.approx(expected, rel=1e-6)
    same = MeanKLDivergence(0)
    same.update(clean, clean)
    assert same.compute().item() == 0.0
    with pytest.raises(FeatoptError, match="do not match"):
        same.update(clean, other[:, :3])
    with pytest.raises(FeatoptError, match="no prediction"):
        MeanKLDivergence(5).update(clean, other)


# ----------------------------------------------------------------- transcoders
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_transcoder_matches_a_hand_replaced_mlp(name, request):
    adapter, skip = request.getfixturevalue("llama" if name == "tiny-llama" else "gpt2"), 1
    ids, tc = contexts(adapter), transcoder()
    (row,) = evaluate(adapter, [tc], ids, batch_size=2, skip_first=skip)
    mlp = mlp_of(adapter, 0)

    def replace(x, out):
        _, y_hat = ref_transcoder(tc, x.reshape(-1, D).double().numpy())
        return torch.from_numpy(y_hat).reshape(out.shape)

    clean, x, y = hf_forward(adapter, ids, mlp)
    x, y = (t[:, skip:].reshape(-1, D).double().numpy() for t in (x, y))
    z, y_hat = ref_transcoder(tc, x)
    err = ((y - y_hat) ** 2).sum()
    assert row["tokens"] == len(y) == N_CTX * (T - skip)
    assert row["mse"] == pytest.approx(err / len(y), rel=1e-4)
    assert row["fvu"] == pytest.approx(err / ((y - y.mean(0)) ** 2).sum(), rel=1e-4)
    assert row["l0"] == pytest.approx((z > 0).sum(-1).mean(), abs=1e-12)
    spliced, _, _ = hf_forward(adapter, ids, mlp, at_positions(skip, replace))
    zero, _, _ = hf_forward(adapter, ids, mlp, at_positions(skip, lambda x, out: torch.zeros_like(out)))
    assert row["ce_clean"] == pytest.approx(hand_ce(clean, ids, skip), abs=1e-5)
    assert row["ce_sae"] == pytest.approx(hand_ce(spliced, ids, skip), abs=1e-5)
    assert row["ce_zero"] == pytest.approx(hand_ce(zero, ids, skip), abs=1e-5)
    assert row["kl_div"] == pytest.approx(hand_kl(clean, spliced, skip), rel=1e-4, abs=1e-7)
    assert row["kl_zero"] == pytest.approx(hand_kl(clean, zero, skip), rel=1e-4, abs=1e-7)
    assert row["kl_div"] > 0 and row["ce_sae"] != row["ce_clean"]


def test_transcoder_beside_an_sae_at_its_target_equals_separate_calls(llama):
    ids = contexts(llama)
    tc, sae = transcoder(), topk_sae("blocks.0.mlp_out", seed=2)
    together = evaluate(llama, [tc, sae], ids, batch_size=2)
    alone = evaluate(llama, [tc], ids, batch_size=2) + evaluate(llama, [sae], ids, batch_size=2)
    for got, ref in zip(together, alone):
        assert got == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert together[0]["ce_zero"] == together[1]["ce_zero"]  # both ablate blocks.0.mlp_out
    assert together[0]["kl_div"] != together[1]["kl_div"]


def test_transcoder_to_the_hidden_neurons(llama):
    """A transcoder may write another width (d_out): here the MLP's neurons, read by hand as the
    down-projection's input."""
    hidden = llama.width("blocks.0.mlp_hidden")
    tc = transcoder(d_out=hidden, target="blocks.0.mlp.hook_post")
    ids = contexts(llama)
    (row,) = evaluate(llama, [tc], ids, batch_size=5, ce=False)
    seen = {}
    down = blocks_of(llama.model)[0].mlp.down_proj
    handles = [mlp_of(llama, 0).register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
               down.register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0]))]
    try:
        hf_forward(llama, ids)
    finally:
        for handle in handles:
            handle.remove()
    x, y = (seen[k][:, 1:].reshape(-1, seen[k].shape[-1]).double().numpy() for k in ("x", "y"))
    _, y_hat = ref_transcoder(tc, x)
    assert row["fvu"] == pytest.approx(((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum(), rel=1e-4)
    assert row["mse_per_element"] == pytest.approx(((y - y_hat) ** 2).mean(), rel=1e-4)


def test_transcoder_stops_at_the_deepest_site_and_leaves_no_hooks(llama):
    ids, tc = contexts(llama), transcoder()
    ran = []
    handle = blocks_of(llama.model)[1].register_forward_hook(lambda *a: ran.append(1))
    try:
        evaluate(llama, [tc], ids, batch_size=5, ce=False)
    finally:
        handle.remove()
    assert ran == []

    def hooks():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in llama.model.modules()]

    before, installed = hf_forward(llama, ids)[0], hooks()
    evaluate(llama, [tc], ids, batch_size=2)
    assert torch.equal(hf_forward(llama, ids)[0], before)
    assert hooks() == installed


def test_target_site_and_width_checks(llama):
    tc = transcoder(target="blocks.0.hook_mlp_out")  # TransformerLens' spelling
    assert site_of(tc) == "blocks.0.mlp_in" and target_site_of(tc) == "blocks.0.mlp_out"
    assert target_site_of(topk_sae("blocks.1.hook_resid_post")) == "blocks.1.resid_post"
    view, site = attach(llama, tc)
    assert site.name == "blocks.0.mlp_in" and view.width(site) == D_SAE
    wrong = transcoder(d_out=D, target="blocks.0.mlp_hidden")  # the neurons are wider than D
    with pytest.raises(FeatoptError, match="wide"):
        attach(llama, wrong)
    with pytest.raises(FeatoptError, match="wide"):
        evaluate(llama, [wrong], contexts(llama), ce=False)
    backwards = SparseAutoencoder(SAEConfig(architecture="relu", d_in=D, d_sae=8, hook_name="blocks.1.mlp_out",
                                            target_hook_name="blocks.1.mlp_in", apply_b_dec_to_input=False))
    with pytest.raises(FeatoptError, match="before"):
        evaluate(llama, [backwards], contexts(llama))
