"""SAE architectures come from a registry: `SparseAutoencoder(cfg)` builds the class registered for
`cfg.architecture`, and a new architecture is one class (here, one defined in this test) that
`featopt sae train` trains, `save_sae` writes, `load_sae` reads back and `sae eval` evaluates with
no other file changed."""

from __future__ import annotations

import copy
import functools
import json
import pickle

import lightning as L
import pytest
import torch

from featopt.commands.sae_eval import EvalConfig
from featopt.commands.sae_eval import evaluate as eval_command
from featopt.commands.sae_train import TrainConfig, train
from featopt.dictionaries.train import SAETraining
from featopt.errors import FeatoptError
from featopt.models.sae import (ARCHITECTURES, BatchTopKSAE, JumpReluSAE, MatryoshkaSAE, ReluSAE, SAEConfig,
                                SparseAutoencoder, TopKSAE, register)
from featopt.models.sae.formats import load_sae, save_sae
from featopt.runs.lightning import StepsDataModule
from tests.sae.synthetic import SITE, SparseSource, make_source

SHIFT = 0.1


@pytest.fixture
def shifted():
    """A test-defined architecture: relu after a fixed shift, `z = relu(pre - 0.1)`, trained with
    the shared loss (squared error) plus an L1 penalty on the latents. Unregistered afterwards."""

    @register("shifted")
    class ShiftedReluSAE(SparseAutoencoder):
        def activate(self, pre):
            return torch.relu(pre - SHIFT)

        def sparsity_penalty(self, z, terms):
            return terms.l1 * z.sum()

    yield ShiftedReluSAE
    del ARCHITECTURES["shifted"]


def test_the_registry_builds_the_class_of_each_architecture():
    assert list(ARCHITECTURES)[:5] == ["relu", "topk", "jumprelu", "batchtopk", "matryoshka"]
    classes = {"relu": ReluSAE, "topk": TopKSAE, "jumprelu": JumpReluSAE, "batchtopk": BatchTopKSAE,
               "matryoshka": MatryoshkaSAE}
    for name, cls in classes.items():
        sae = SparseAutoencoder(SAEConfig(d_in=4, d_sae=6, architecture=name, k=2 if "k" in cls.settings else None,
                                          matryoshka=(2, 6) if name == "matryoshka" else None))
        assert type(sae) is cls and isinstance(sae, SparseAutoencoder)
        for copied in (pickle.loads(pickle.dumps(sae)), copy.deepcopy(sae)):
            assert type(copied) is cls and set(copied.state_dict()) == set(cls.saved_names)
    assert ReluSAE.saelens_name == "standard" and TopKSAE.settings == ("k",) and BatchTopKSAE.saelens_name == "jumprelu"
    with pytest.raises(FeatoptError, match="unknown SAE architecture 'gated': allowed are relu, topk, jumprelu, batchtopk"):
        SAEConfig(d_in=4, d_sae=6, architecture="gated")
    with pytest.raises(FeatoptError, match="needs a config of architecture 'topk'"):
        TopKSAE(SAEConfig(d_in=4, d_sae=6, architecture="relu"))


def test_a_new_architecture_learns_with_the_shared_training(shifted):
    cfg = SAEConfig(d_in=16, d_sae=48, architecture="shifted", hook_name=SITE.name)
    module = SAETraining([cfg], None, functools.partial(make_source, n_contexts=96, context_length=17),
                         n_contexts=96, context_length=17, batch_tokens=64, buffer_batches=4, lrs=[1e-2],
                         warmup_steps=5, l1=0.05)
    x = SparseSource(n_contexts=96, context_length=17).acts[:, 1:].reshape(-1, 16)

    def fvu(sae):
        with torch.no_grad():
            return float((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())

    settings = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    accelerator="cpu", devices=1)
    L.Trainer(max_steps=1, **settings).fit(module, datamodule=StepsDataModule(1))
    start = fvu(module.export(0))
    L.Trainer(max_steps=150, **settings).fit(module, datamodule=StepsDataModule(150))
    sae = module.export(0)
    assert type(sae) is shifted and fvu(sae) < 0.5 * start
    assert module.sae_name(0) == "blocks.0.resid_post-shifted-48"
    # the shared training keeps decoder rows at unit norm (in the training scale)
    torch.testing.assert_close(module.saes[0].W_dec.norm(dim=1), torch.ones(48), rtol=1e-5, atol=1e-5)


def test_a_new_architecture_trains_saves_loads_and_evaluates_from_the_commands(shifted, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The cat sat on the mat. The dog ran to the park and back again. " * 30)
    out = tmp_path / "sae"
    run = train(TrainConfig(model="tiny-llama", site="blocks.1.resid_post", corpus=str(corpus), architecture="shifted",
                            d_sae="32", l1=0.5, context_length=16, batch_size=128, tokens=1280, buffer_batches=2,
                            eval_contexts=4, progress=False, out=str(out)))
    assert json.loads((out / "cfg.json").read_text())["architecture"] == "shifted"
    loaded = load_sae(out)
    assert type(loaded) is shifted and loaded.content_hash() == run.saes[0].content_hash()
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), torch.relu(loaded.pre_acts(x) - SHIFT))
        assert loaded.W_dec.abs().sum() > 0  # trained, not the zero start
    metrics = eval_command(EvalConfig(model="tiny-llama", sae=str(out), corpus=str(corpus), split="eval", context_length=16,
                                      contexts=4, out=str(tmp_path / "eval"), progress=False)).metrics[0]
    assert metrics["fvu"] == pytest.approx(run.metrics[0]["fvu"], rel=1e-5)  # the same held-out contexts
    again = save_sae(loaded, tmp_path / "again")  # and it saves as it loaded
    assert load_sae(again).content_hash() == loaded.content_hash()
