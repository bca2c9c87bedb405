"""SAE evaluation against independent computations: activations from a plain HF forward
(`output_hidden_states=True`), the SAE re-implemented in float64 numpy, the splice and the
ablation as plain `register_forward_hook`s on the HF block, and cross-entropy by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featopt.errors import FeatoptError
from featopt.models import load_model
from featopt.commands.sae_eval import metrics_table
from featopt.dictionaries.evaluate import evaluate
from featopt.dictionaries.metrics import (
    DeadFraction, ExplainedVariance, FiringFrequency, FractionVarianceUnexplained, MeanCrossEntropy, MeanL0,
    ReconstructionMSE, ce_loss_recovered,
)
from featopt.models.sae.model import SAEConfig, SparseAutoencoder

D = 64  # the tiny models' width
N_CTX, T = 5, 12
KEYS = ["mse", "mse_per_element", "fvu", "explained_variance", "l0", "dead_fraction",
        "ce_clean", "ce_sae", "ce_zero", "ce_loss_recovered", "kl_div", "kl_zero", "tokens"]


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-gpt2")


def blocks_of(hf_model):
    """The HF block list, written out by hand per family (not the adapter's table)."""
    return hf_model.model.layers if hf_model.config.model_type == "llama" else hf_model.transformer.h


def contexts(adapter, n=N_CTX, t=T, seed=1):
    return torch.randint(1, adapter.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def topk_sae(hook="blocks.1.resid_post", seed=0, d_sae=96, k=4, dead=8):
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=d_sae, architecture="topk", k=k, hook_name=hook))
    gen = torch.Generator().manual_seed(seed)
    sae.init_weights(gen)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=gen))
        sae.b_enc[:dead] = -1e3  # never among the k largest: dead latents for sure
    return sae


def identity_sae(hook="blocks.1.resid_post"):
    """relu(x) - relu(-x) = x exactly: a perfect reconstruction."""
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=2 * D, architecture="relu", hook_name=hook))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


# ----------------------------------------------------------------- independent references
def ref_sae(sae, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The SAE written out in float64 numpy: x [n, d_in] -> (z, x_hat)."""
    W_enc, b_enc, W_dec, b_dec = (p.detach().double().numpy() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = (x - b_dec) @ W_enc + b_enc
    if sae.cfg.architecture == "topk":
        idx = np.argsort(-pre, axis=-1)[:, : sae.cfg.k]
        z = np.zeros_like(pre)
        np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, -1), 0.0), -1)
    else:
        assert sae.cfg.architecture == "relu"
        z = np.maximum(pre, 0.0)
    return z, z @ W_dec + b_dec


def hf_resid_post(adapter, ids, layer, skip):
    """resid_post of `layer` for all contexts, from ONE plain HF forward: `[n_tokens, d]`."""
    assert layer < adapter.n_layers - 1  # the last hidden state has the final norm applied
    with torch.no_grad():
        hidden = adapter.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    return hidden[:, skip:].reshape(-1, hidden.shape[-1]).double().numpy()


def brute_force(sae, x):
    z, x_hat = ref_sae(sae, x)
    err = ((x - x_hat) ** 2).sum()
    fvu = err / ((x - x.mean(0)) ** 2).sum()
    fired = (z > 0).any(0)
    return dict(mse=err / len(x), mse_per_element=err / x.size, fvu=fvu, explained_variance=1 - fvu,
                l0=(z > 0).sum(-1).mean(), dead_fraction=1 - fired.mean(), tokens=len(x)), (z > 0).mean(0)


def hf_ce(adapter, ids, skip, layer=None, replace=None):
    """Mean next-token CE over predictions at positions >= skip, optionally with block `layer`'s
    output at positions >= skip replaced by `replace(out[:, skip:])`."""
    handle = None
    if layer is not None:
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            new = out.clone()
            new[:, skip:] = replace(out[:, skip:])
            return (new, *output[1:]) if isinstance(output, tuple) else new
        handle = blocks_of(adapter.model)[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = adapter.model(input_ids=ids).logits
    finally:
        if handle is not None:
            handle.remove()
    return F.cross_entropy(logits[:, skip:-1].reshape(-1, logits.shape[-1]), ids[:, skip + 1:].reshape(-1)).item()


def sae_replacer(sae):
    def replace(x):
        _, x_hat = ref_sae(sae, x.reshape(-1, x.shape[-1]).double().numpy())
        return torch.from_numpy(x_hat).to(x.dtype).reshape(x.shape)
    return replace


# ----------------------------------------------------------------- evaluate
@pytest.mark.parametrize("skip", [0, 1, 3])
def test_reconstruction_metrics_match_brute_force(llama, skip):
    ids, sae = contexts(llama), topk_sae()
    # batch_size 2 of 5 contexts: uneven batches, and the FVU's mean must be the global one.
    (row,) = evaluate(llama, [sae], ids, batch_size=2, skip_first=skip, ce=False, frequency=True)
    expected, freq = brute_force(sae, hf_resid_post(llama, ids, 1, skip))
    assert set(row) == set(expected) | {"firing_frequency"}
    assert row["tokens"] == N_CTX * (T - skip)
    for key in ("mse", "mse_per_element", "fvu", "explained_variance"):
        assert row[key] == pytest.approx(expected[key], rel=1e-4), key
    assert row["l0"] == pytest.approx(expected["l0"], abs=1e-12)
    assert row["dead_fraction"] == pytest.approx(expected["dead_fraction"], abs=1e-12)
    assert row["dead_fraction"] >= 8 / 96  # the forced-dead latents
    np.testing.assert_allclose(row["firing_frequency"].numpy(), freq, atol=1e-7)


def test_fvu_uses_the_global_mean(llama):
    """Per-batch means would give another FVU: check the brute force notices the difference."""
    ids, sae = contexts(llama), topk_sae()
    x = hf_resid_post(llama, ids, 1, 1)
    _, x_hat = ref_sae(sae, x)
    per_context = x.reshape(N_CTX, T - 1, D)
    local = sum(((c - c.mean(0)) ** 2).sum() for c in per_context)
    wrong = ((x - x_hat) ** 2).sum() / local
    (row,) = evaluate(llama, [sae], ids, batch_size=1, ce=False)
    expected, _ = brute_force(sae, x)
    assert row["fvu"] == pytest.approx(expected["fvu"], rel=1e-4)
    assert abs(row["fvu"] - wrong) > 1e-3 * expected["fvu"]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("skip", [1, 2])
def test_ce_matches_hand_rolled_splice(name, skip, request):
    adapter = request.getfixturevalue("llama" if name == "tiny-llama" else "gpt2")
    ids, sae = contexts(adapter), topk_sae()
    (row,) = evaluate(adapter, [sae], ids, batch_size=3, skip_first=skip)
    clean = hf_ce(adapter, ids, skip)
    spliced = hf_ce(adapter, ids, skip, 1, sae_replacer(sae))
    zero = hf_ce(adapter, ids, skip, 1, torch.zeros_like)
    assert row["ce_clean"] == pytest.approx(clean, abs=1e-5)
    assert row["ce_sae"] == pytest.approx(spliced, abs=1e-5)
    assert row["ce_zero"] == pytest.approx(zero, abs=1e-5)
    assert abs(zero - clean) > 1e-3  # the ratio below is well defined
    assert row["ce_loss_recovered"] == pytest.approx((zero - spliced) / (zero - clean), abs=2e-3)
    # Position 0 excluded: the CE with skip_first = 0 differs (it averages one more prediction).
    (row0,) = evaluate(adapter, [sae], ids, batch_size=3, skip_first=0)
    assert row0["ce_clean"] == pytest.approx(hf_ce(adapter, ids, 0), abs=1e-5)


def test_batch_size_does_not_matter(llama):
    ids, saes = contexts(llama), [topk_sae(), topk_sae("blocks.0.resid_post", seed=3)]
    rows = {b: evaluate(llama, saes, ids, batch_size=b) for b in (1, 4, 5)}
    for b in (4, 5):
        for got, ref in zip(rows[b], rows[1]):
            assert list(got) == KEYS
            for key in KEYS:
                assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (b, key)


def test_perfect_reconstruction_recovers_everything(llama):
    ids, sae = contexts(llama), identity_sae()
    (row,) = evaluate(llama, [sae], ids, batch_size=2)
    assert row["mse"] == 0.0 and row["fvu"] == 0.0 and row["explained_variance"] == 1.0
    assert row["ce_sae"] == row["ce_clean"]
    assert row["ce_zero"] != row["ce_clean"]
    assert row["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-12)
    assert row["l0"] == pytest.approx(D, abs=1e-9)  # one of relu(x_i), relu(-x_i) per dimension


def test_two_sites_in_one_call_equal_separate_calls(llama):
    ids = contexts(llama)
    a, b = topk_sae("blocks.0.resid_post", seed=1), topk_sae("blocks.2.mlp_out", seed=2)
    together = evaluate(llama, [a, b], ids, batch_size=2)
    alone = evaluate(llama, [a], ids, batch_size=2) + evaluate(llama, [b], ids, batch_size=2)
    assert together[0]["ce_zero"] != together[1]["ce_zero"]  # really two sites
    for got, ref in zip(together, alone):
        for key in KEYS:
            assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key


def test_stops_at_the_deepest_site(llama):
    """Reconstruction metrics need no block past the deepest site (the CE forwards do)."""
    ids, sae = contexts(llama), topk_sae("blocks.0.resid_post")
    ran = []
    handle = blocks_of(llama.model)[1].register_forward_hook(lambda *a: ran.append(1))
    try:
        evaluate(llama, [sae], ids, batch_size=5, ce=False)
    finally:
        handle.remove()
    assert ran == []


def test_no_hooks_left_behind(llama):
    ids, sae = contexts(llama), topk_sae()

    def hooks():  # transformers installs hooks of its own (output capturing): count, don't demand none
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in llama.model.modules()]

    with torch.no_grad():
        before, installed = llama.model(input_ids=ids).logits, hooks()
    evaluate(llama, [sae], ids, batch_size=2)
    with torch.no_grad():
        assert torch.equal(llama.model(input_ids=ids).logits, before)
    assert hooks() == installed


def test_rejects_bad_input(llama):
    ids = contexts(llama)
    with pytest.raises(FeatoptError, match="no SAE"):
        evaluate(llama, [], ids)
    with pytest.raises(FeatoptError, match="names no site"):
        evaluate(llama, [topk_sae(hook="")], ids)
    wide = SparseAutoencoder(SAEConfig(d_in=D + 1, d_sae=8, architecture="topk", k=2, hook_name="blocks.1.resid_post"))
    with pytest.raises(FeatoptError, match="wide"):
        evaluate(llama, [wide], ids, ce=False)
    with pytest.raises(FeatoptError, match="no prediction"):
        evaluate(llama, [topk_sae()], ids[:, :3], skip_first=2)
    (row,) = evaluate(llama, [topk_sae()], ids[:, :3], skip_first=2, ce=False)  # one position is enough
    assert row["tokens"] == N_CTX and "ce_sae" not in row
    with pytest.raises(FeatoptError, match="feature map"):
        evaluate(llama.with_features("blocks.1.resid_post", topk_sae()), [topk_sae()], ids)


def test_metrics_table(llama):
    ids = contexts(llama)
    rows = evaluate(llama, [topk_sae(), identity_sae()], ids, batch_size=5, frequency=True)
    text = metrics_table(rows, ["topk", "identity"])
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "topk", "identity"]
    body = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(body) == KEYS  # the frequencies (tensors) are left out
    assert body["tokens"] == [str(N_CTX * (T - 1))] * 2
    assert float(body["fvu"][1]) == 0.0 and float(body["ce_loss_recovered"][1]) == pytest.approx(1.0)
    assert float(body["mse"][0]) == pytest.approx(rows[0]["mse"], rel=1e-5)
    assert "-" in metrics_table([{"mse": 1.0}, {"fvu": 0.5}], ["a", "b"])
    with pytest.raises(FeatoptError, match="one name per SAE"):
        metrics_table(rows, ["only one"])


# ----------------------------------------------------------------- the Metric classes
def _data(seed=0, n=40, d=6, d_sae=10):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[: n // 2] += 5.0  # two halves with different means: the global mean matters
    x_hat = x + 0.3 * torch.randn(n, d, generator=gen)
    z = torch.relu(torch.randn(n, d_sae, generator=gen) - 0.5)
    z[:, :3] = 0  # three dead latents
    return x, x_hat, z


def test_metric_classes_against_numpy():
    x, x_hat, z = _data()
    xn, hn, zn = x.double().numpy(), x_hat.double().numpy(), z.numpy()
    err = ((xn - hn) ** 2).sum()
    fvu = err / ((xn - xn.mean(0)) ** 2).sum()
    metrics = {
        ReconstructionMSE(): err / len(xn), ReconstructionMSE(per_element=True): err / xn.size,
        FractionVarianceUnexplained(6): fvu, ExplainedVariance(6): 1 - fvu, MeanL0(): (zn > 0).sum(1).mean(),
        DeadFraction(10): 0.3,
    }
    for metric, expected in metrics.items():
        for part in range(4):  # four updates of 10 rows: accumulation over batches
            rows = slice(10 * part, 10 * part + 10)
            metric.update(z[rows]) if isinstance(metric, (MeanL0, FiringFrequency)) else metric.update(x[rows], x_hat[rows])
        assert metric.compute().item() == pytest.approx(expected, rel=1e-6), type(metric).__name__
    freq = FiringFrequency(10)
    freq.update(z)
    np.testing.assert_allclose(freq.compute().numpy(), (zn > 0).mean(0))


def test_metric_states_sum_across_ranks():
    """Two "ranks" with one half each, merged by the states' reduction (sum), equal one metric
    over everything: what a DDP sync computes."""
    x, x_hat, z = _data(1)
    for make, args in [
        (lambda: FractionVarianceUnexplained(6), lambda r: (x[r], x_hat[r])),
        (ReconstructionMSE, lambda r: (x[r], x_hat[r])),
        (MeanL0, lambda r: (z[r],)),
        (lambda: DeadFraction(10), lambda r: (z[r],)),
    ]:
        whole, first, second = make(), make(), make()
        whole.update(*args(slice(None)))
        first.update(*args(slice(0, 20)))
        second.update(*args(slice(20, None)))
        for name, reduce in first._reductions.items():
            assert reduce is not None and reduce.__name__.endswith("sum"), name
        first.merge_state(second)
        assert first.compute().item() == pytest.approx(whole.compute().item(), rel=1e-9)


def test_mean_cross_entropy_and_recovered():
    gen = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(3, 7, 11, generator=gen), torch.randint(0, 11, (3, 7), generator=gen)
    metric = MeanCrossEntropy(skip_first=2)
    metric.update(logits[:1], ids[:1])
    metric.update(logits[1:], ids[1:])
    logp = torch.log_softmax(logits.double(), -1)
    nll = [-logp[b, t, ids[b, t + 1]].item() for b in range(3) for t in range(2, 6)]
    assert metric.compute().item() == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert ce_loss_recovered(2.0, 3.0, 4.0) == 0.5
    assert math.isnan(ce_loss_recovered(2.0, 3.0, 2.0))


def test_peer_hook_names_evaluate_like_featopt_names(llama):
    # sparsify names the same place `layers.1`, sae-lens' HF mode `model.layers.1`
    ids = contexts(llama, n=3)
    base = evaluate(llama, [topk_sae("blocks.1.resid_post")], ids, ce=False)[0]
    for hook in ("layers.1", "model.layers.1", "blocks.1.hook_resid_post"):
        assert evaluate(llama, [topk_sae(hook)], ids, ce=False)[0] == base


def test_eval_command_with_bos_evaluates_bos_then_the_corpus(llama, tmp_path):
    """`sae eval --bos`: the metrics are those of contexts [BOS] + 11 corpus tokens (the tokenizer's
    stream, cut here), through a plain HF forward, the SAE in numpy and a hand-rolled splice."""
    import json

    from featopt.commands.sae_eval import EvalConfig
    from featopt.commands.sae_eval import evaluate as eval_command
    from featopt.models.sae.formats import load_sae, save_sae

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The cat sat on the mat and looked at the dog. " * 6)
    tok = llama.tokenizer
    stream = tok.encode((corpus / "a.txt").read_text(), add_special_tokens=False) + [tok.eos_token_id]
    ids = torch.tensor([[tok.bos_token_id] + stream[i * 11:(i + 1) * 11] for i in range(4)])
    save_sae(topk_sae(), tmp_path / "sae")
    sae = load_sae(tmp_path / "sae")
    run = eval_command(EvalConfig(model="tiny-llama", bos=True, sae=str(tmp_path / "sae"), corpus=str(corpus), split="all",
                              context_length=12, contexts=4, batch_contexts=3, out=str(tmp_path / "eval"),
                              progress=False), llama)
    assert not llama.bos  # the caller's adapter is left as it was
    (row,) = run.metrics
    expected, _ = brute_force(sae, hf_resid_post(llama, ids, 1, 1))
    assert row["tokens"] == expected["tokens"] == 4 * 11
    for key in ("mse", "fvu"):
        assert row[key] == pytest.approx(expected[key], rel=1e-4), key
    assert row["l0"] == pytest.approx(expected["l0"], abs=1e-12)
    assert row["ce_clean"] == pytest.approx(hf_ce(llama, ids, 1), abs=1e-5)
    assert row["ce_sae"] == pytest.approx(hf_ce(llama, ids, 1, 1, sae_replacer(sae)), abs=1e-5)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["run"]["config"]["bos"] is True
