"""SAE training: it learns a known sparse dictionary, two processes train the SAE of one, a
resumed run ends where an uninterrupted one does, and the saved scale folds back exactly."""

from __future__ import annotations

import functools

import lightning as L
import torch

from featopt.runs.lightning import StepsDataModule
from featopt.models.sae.model import SAEConfig
from featopt.dictionaries.train import SAETraining
from tests.sae.synthetic import SITE, SparseSource, make_source


def _module(steps_source=None, arch="topk", k=3, d_sae=48, **kwargs):
    source_kwargs = dict(n_contexts=96, context_length=17)
    cfg = SAEConfig(d_in=16, d_sae=d_sae, architecture=arch, k=k if arch == "topk" else None, hook_name=SITE.name)
    settings = dict(n_contexts=96, context_length=17, batch_tokens=64, buffer_batches=4, seed=0, lrs=[3e-3],
                    warmup_steps=5, decay_fraction=0.2, dead_tokens=2_000)
    settings.update(kwargs)
    return SAETraining([cfg], None, functools.partial(make_source, **source_kwargs), **settings)


def _trainer(steps, **kwargs):
    settings = dict(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, accelerator="cpu", devices=1)
    settings.update(kwargs)
    return L.Trainer(**settings)


@torch.no_grad()
def _fvu(sae, x):
    x_hat = sae(x)
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_training_recovers_a_known_sparse_dictionary():
    torch.manual_seed(0)
    module = _module(lrs=[1e-2])
    source = SparseSource(n_contexts=96, context_length=17)
    x = source.acts[:, 1:].reshape(-1, 16)
    _trainer(1).fit(module, datamodule=StepsDataModule(1))
    start = _fvu(module.export(0), x)
    module = _module(lrs=[1e-2])
    _trainer(300).fit(module, datamodule=StepsDataModule(300))
    sae = module.export(0)
    assert start > 0.5 and _fvu(sae, x) < 0.1
    # every true atom has a decoder row pointing its way
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (source.atoms @ rows.T).max(dim=1).values
    assert float(best.min()) > 0.9, best


def test_fvu_falls_from_the_start_for_relu_too():
    module = _module(arch="relu", l1=0.5, lrs=[1e-2])
    source = SparseSource(n_contexts=96, context_length=17)
    x = source.acts[:, 1:].reshape(-1, 16)
    trainer = _trainer(1)
    trainer.fit(module, datamodule=StepsDataModule(1))
    start = _fvu(module.export(0), x)
    module = _module(arch="relu", l1=0.5, lrs=[1e-2])
    _trainer(300).fit(module, datamodule=StepsDataModule(300))
    end = _fvu(module.export(0), x)
    assert end < 0.5 * start and end < 0.2
    z = module.export(0).encode(x)
    assert float((z > 0).float().sum(-1).mean()) < 16  # sparse: a third of its 48 latents at most


def test_export_folds_the_input_scale_into_the_weights():
    module = _module()
    _trainer(30).fit(module, datamodule=StepsDataModule(30))
    scale = float(module.scales[0])
    assert abs(scale - 1.0) > 0.1  # the toy data's mean squared norm is not d_in
    x = SparseSource(n_contexts=96, context_length=17).acts[:2].reshape(-1, 16)
    trained, exported = module.saes[0], module.export(0)
    with torch.no_grad():
        torch.testing.assert_close(exported.encode(x), trained.encode(x * scale), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(exported(x), trained(x * scale) / scale, rtol=1e-4, atol=1e-5)


def test_two_processes_train_the_sae_of_one():
    one = _module()
    _trainer(12).fit(one, datamodule=StepsDataModule(12))
    two = _module()
    trainer = _trainer(12, devices=2, strategy="ddp_spawn")
    trainer.fit(two, datamodule=StepsDataModule(12))
    for name, value in one.saes[0].state_dict().items():
        torch.testing.assert_close(two.saes[0].state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(two.since_fired_0, one.since_fired_0)


def test_resume_ends_where_an_uninterrupted_run_does(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    whole = _module(dead_tokens=300)
    _trainer(20).fit(whole, datamodule=StepsDataModule(20))
    first = _module(dead_tokens=300)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1, filename="s{step}",
                                 auto_insert_metric_name=False)
    _trainer(20, enable_checkpointing=True, callbacks=[checkpoint]).fit(first, datamodule=StepsDataModule(20))
    resumed = _module(dead_tokens=300)
    _trainer(20).fit(resumed, datamodule=StepsDataModule(20), ckpt_path=str(tmp_path / "s8.ckpt"))
    for name, value in whole.saes[0].state_dict().items():
        torch.testing.assert_close(resumed.saes[0].state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(resumed.since_fired_0, whole.since_fired_0)


def test_bf16_mixed_precision_trains():
    module = _module(lrs=[1e-2])
    source = SparseSource(n_contexts=96, context_length=17)
    x = source.acts[:, 1:].reshape(-1, 16)
    _trainer(150, precision="bf16-mixed").fit(module, datamodule=StepsDataModule(150))
    sae = module.export(0)
    assert sae.W_enc.dtype == torch.float32  # the weights stay float32; only the matmuls run in bf16
    assert _fvu(sae, x) < 0.3
