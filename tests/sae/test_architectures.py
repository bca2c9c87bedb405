"""The training losses of topk, batchtopk, matryoshka and jumprelu against formulas written out here
with dense tensors and plain autograd: the values and every parameter's gradient (which also
checks the sparse step of `sparse_step.py` against the dense path), BatchTopK's mean L0 and
threshold, and the jumprelu straight-through gradient."""

from __future__ import annotations

import pytest
import torch

from featopt.models.sae import LossTerms, SAEConfig, SparseAutoencoder
from featopt.models.sae.jumprelu import jumprelu_ste

N, D_IN, D_SAE, K = 40, 8, 24, 3
WIDE = 300  # wide enough that the kept pairs are found through block maxima (selection.py), with a tail


def _sae(arch, seed=0, d_out=None, skip=False, d_sae=D_SAE, **cfg):
    transcoder = {} if d_out is None else dict(d_out=d_out, target_hook_name="blocks.0.mlp_out", apply_b_dec_to_input=False,
                                                skip=skip)
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=d_sae, architecture=arch, hook_name="blocks.0.mlp_in", **transcoder,
                                      **cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return sae


def _grads(sae, loss):
    sae.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


def _dense_topk_loss(sae, x, y, keep, dead=None, alpha=0.0):
    """The loss written out: pre = (x - b_dec) W_enc + b_enc, z = relu(pre) where `keep(pre)`,
    squared error over the total variance, plus AuxK of the dead latents."""
    centred = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    pre = centred @ sae.W_enc + sae.b_enc
    mask = keep(pre.detach())
    z = torch.relu(pre) * mask
    out = z @ sae.W_dec + sae.b_dec + (x @ sae.W_skip.T if sae.cfg.skip else 0)
    total_var = (y - y.mean(0)).pow(2).sum()
    e = y - out
    loss = e.pow(2).sum() / total_var
    if dead is not None:
        k_aux = min(y.shape[1] // 2, int(dead.sum()))
        aux_pre = pre.masked_fill(~dead, -float("inf"))
        aux_mask = torch.zeros_like(pre, dtype=torch.bool).scatter(1, aux_pre.detach().topk(k_aux, dim=1).indices, True)
        e_hat = (torch.relu(pre) * aux_mask) @ sae.W_dec
        loss = loss + alpha * min(int(dead.sum()) / (y.shape[1] // 2), 1.0) * (e_hat - e.detach()).pow(2).sum() / total_var
    return loss, z


def _row_topk(pre):
    return torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(K, dim=1).indices, True)


def _batch_topk(pre):
    flat = torch.zeros(pre.numel(), dtype=torch.bool)
    flat[pre.reshape(-1).topk(len(pre) * K).indices] = True
    return flat.view_as(pre)


@pytest.mark.parametrize("arch,keep", [("topk", _row_topk), ("batchtopk", _batch_topk)])
@pytest.mark.parametrize("transcoder", [False, True])
@pytest.mark.parametrize("d_sae", [D_SAE, WIDE])
def test_topk_like_loss_and_gradients_equal_the_dense_formula(arch, keep, transcoder, d_sae):
    sae = _sae(arch, k=K, d_sae=d_sae, **({"d_out": 6, "skip": True} if transcoder else {}))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=gen)
    y = torch.randn(N, 6, generator=gen) if transcoder else x
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::3] = True
    total_var = (y - y.mean(0)).pow(2).sum()
    loss, stats = sae.training_loss(x, total_var, LossTerms(auxk_alpha=0.5, dead=dead), y if transcoder else None)
    got = _grads(sae, loss)
    want_loss, z = _dense_topk_loss(sae, x, y, keep, dead, alpha=0.5)
    want = _grads(sae, want_loss)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and (not transcoder or "W_skip" in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert stats["l0"] == (z > 0).sum() and torch.equal(stats["fired"], (z > 0).any(0))


def test_batchtopk_keeps_k_per_row_on_average_and_learns_its_threshold():
    sae = _sae("batchtopk", k=K)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive: every kept latent fires
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(2))
    _, stats = sae.training_loss(x, torch.tensor(1.0), LossTerms())
    assert stats["l0"] == N * K  # mean L0 over the batch is exactly k
    per_row = torch.bincount(torch.nonzero(_batch_topk(sae.pre_acts(x).detach()))[:, 0], minlength=N)
    assert per_row.float().mean() == K and per_row.max() > per_row.min()  # rows differ; the batch averages k
    start = sae.threshold.detach().clone()
    sae.observe_batch(stats, lambda t, op: t)
    smallest = float(stats["values"][stats["values"] > 0].min())
    assert smallest == pytest.approx(float(torch.relu(sae.pre_acts(x))[_batch_topk(sae.pre_acts(x).detach())].min()), rel=1e-6)
    torch.testing.assert_close(sae.threshold.detach(), start + 0.01 * (smallest - start))  # a running average, rate 0.01
    # a short run averages faster: over the last tenth of its steps (20 steps: rate 1 / 2)
    before = sae.threshold.detach().clone()
    sae.observe_batch({**stats, "steps": 20}, lambda t, op: t)
    torch.testing.assert_close(sae.threshold.detach(), before + 0.5 * (smallest - before))
    before = sae.threshold.detach().clone()
    sae.observe_batch({**stats, "steps": 100_000}, lambda t, op: t)  # a long one keeps SAELens' 0.01
    torch.testing.assert_close(sae.threshold.detach(), before + 0.01 * (smallest - before))
    with torch.no_grad():
        sae.threshold.zero_()  # a fresh SAE: the first batch sets it
    sae.observe_batch(stats, lambda t, op: t)
    torch.testing.assert_close(sae.threshold.detach(), torch.full((D_SAE,), smallest))
    # inference is JumpReLU with that threshold
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), torch.relu(pre) * (pre > sae.threshold))


@pytest.mark.parametrize("widths", [(4, 10, D_SAE), (20, 100, WIDE)])
def test_matryoshka_loss_is_the_sum_of_its_prefix_losses(widths):
    sae = _sae("matryoshka", k=K, matryoshka=widths, d_sae=widths[-1])
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(3))
    total_var = (x - x.mean(0)).pow(2).sum()
    loss, stats = sae.training_loss(x, total_var, LossTerms())
    got = _grads(sae, loss)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = torch.relu(pre) * _batch_topk(pre.detach())
    want_loss = sum((x - (z[:, :w] @ sae.W_dec[:w] + sae.b_dec)).pow(2).sum() for w in widths) / total_var
    want = _grads(sae, want_loss)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(stats["fvu"], (x - (z @ sae.W_dec + sae.b_dec)).pow(2).sum().detach(), rtol=1e-5, atol=1e-6)


def test_jumprelu_straight_through_gradients_follow_the_formula():
    gen = torch.Generator().manual_seed(4)
    pre = torch.randn(N, D_SAE, generator=gen)
    theta = (torch.rand(D_SAE, generator=gen) * 0.5).requires_grad_()
    g_z, g_l0, eps = torch.randn(N, D_SAE, generator=gen), 0.3, 0.2
    z, step = jumprelu_ste(pre.requires_grad_(), theta, eps)
    ((z * g_z).sum() + g_l0 * step.sum()).backward()
    kernel = ((pre.detach() - theta.detach()).abs() < eps / 2).float() / eps  # rectangle of width eps, height 1/eps
    want_theta = (-(theta.detach() * kernel * g_z) - g_l0 * kernel).sum(0)
    torch.testing.assert_close(theta.grad, want_theta)
    torch.testing.assert_close(pre.grad, g_z * (pre.detach() > theta.detach()))  # none through the L0 step
    assert kernel.sum() > 0  # some pre-activations lie within the kernel: the check is not vacuous
    torch.testing.assert_close(z, pre.detach() * (pre.detach() > theta.detach()))


def test_jumprelu_training_loss_is_squared_error_plus_weighted_l0():
    sae = _sae("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(6))
    total_var = (x - x.mean(0)).pow(2).sum()
    loss, stats = sae.training_loss(x, total_var, LossTerms(l0_coef=0.7, bandwidth=0.1))
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    fires = pre > sae.threshold.detach()
    sq = (x - ((pre * fires) @ sae.W_dec + sae.b_dec)).pow(2).sum()
    torch.testing.assert_close(loss, (sq + 0.7 * fires.sum()) / total_var, rtol=1e-5, atol=1e-6)
    assert stats["l0"] == fires.sum()
    sae.zero_grad()
    loss.backward()
    # the threshold's gradient: through z (the squared error) and the L0 step, by the formula
    dz = (2 * ((pre * fires) @ sae.W_dec + sae.b_dec - x) @ sae.W_dec.T / total_var).detach()
    kernel = ((pre - sae.threshold.detach()).abs() < 0.05).float() / 0.1
    want = (-(sae.threshold.detach() * kernel * dz) - 0.7 / total_var * kernel).sum(0)
    torch.testing.assert_close(sae.threshold.grad, want, rtol=1e-4, atol=1e-6)
    sae.threshold.data[0] = -1.0
    sae.after_step()
    assert sae.threshold[0] == 0  # kept at 0 or above


def test_a_transcoder_reads_one_site_and_writes_another():
    sae = _sae("topk", k=K, d_out=6, skip=True)
    x = torch.randn(5, D_IN)
    pre = x @ sae.W_enc + sae.b_enc  # no centring on b_dec: it lives in the output space
    z = torch.zeros_like(pre).scatter(1, pre.topk(K, dim=1).indices, torch.relu(pre.topk(K, dim=1).values))
    torch.testing.assert_close(sae(x), z @ sae.W_dec + sae.b_dec + x @ sae.W_skip.T)
    assert sae.W_skip.shape == (6, D_IN) and sae.d_out == 6 and sae.is_transcoder
    folded = _sae("topk", k=K, d_out=6, skip=True)
    folded.fold_scale(2.0, 0.5)  # trained on 2x -> 0.5y: reads raw x, writes raw y
    torch.testing.assert_close(folded(x), sae(2.0 * x) / 0.5, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_a_transcoder_recovers_a_planted_sparse_mlp(arch):
    import functools

    import lightning as L

    from featopt.dictionaries.train import SAETraining
    from featopt.runs.lightning import StepsDataModule
    from tests.sae.synthetic import IN_SITE, OUT_SITE, PlantedMLP, make_planted_mlp

    cfg = SAEConfig(d_in=16, d_sae=48, architecture=arch, k=3, hook_name=IN_SITE.name, target_hook_name=OUT_SITE.name,
                    d_out=12, apply_b_dec_to_input=False)
    module = SAETraining([cfg], None, functools.partial(make_planted_mlp, n_contexts=96, context_length=17), n_contexts=96,
                         context_length=17, batch_tokens=64, buffer_batches=4, lrs=[1e-2], warmup_steps=5, dead_tokens=2_000)
    L.Trainer(max_steps=400, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", devices=1).fit(module, datamodule=StepsDataModule(400))
    sae, source = module.export(0), PlantedMLP(n_contexts=96, context_length=17)
    x, y = source.acts[:, 1:].reshape(-1, 16), source.outputs[:, 1:].reshape(-1, 12)
    with torch.no_grad():
        fvu = float((y - sae(x)).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        best = (source.out_atoms @ rows.T).max(dim=1).values
    assert fvu < 0.15, fvu
    assert float(best.min()) > 0.9, best  # every planted output direction has a decoder row along it
