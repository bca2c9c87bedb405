"""An SAE on the real SmolLM2-135M: trained briefly from the real corpus (early exit at layer 3),
it explains part of the variance of held-out text, and the exhaustive sweep over its latents finds
the tokens a plain HF forward plus the SAE formula (written out here) says are best."""

from __future__ import annotations

import pytest
import torch

from featopt.sae.attach import attach
from featopt.sae.commands import TrainConfig, run_train
from featopt.search.exhaustive import ExhaustiveConfig, run
from tests.integration.conftest import MODELS
from tests.search.search_reference import resid_post

pytestmark = pytest.mark.slow

CORPUS = MODELS.parent / "data" / "corpora" / "state_union"
LAYER = 3


def test_a_short_sae_run_on_the_real_model(smollm, tmp_path):
    if not CORPUS.is_dir():
        pytest.skip(f"the real corpus is not here: no {CORPUS}")
    config = TrainConfig(model="smollm2-135m-instruct", site=f"blocks.{LAYER}.resid_post", corpus=str(CORPUS),
                         architecture="topk", expansion="1", k=16, tokens=24_576, context_length=64,
                         batch_size=2048, buffer_batches=4, warmup_steps=2, eval_contexts=16, out=str(tmp_path / "sae"),
                         progress=False)
    trained = run_train(config, smollm)
    metrics = trained.metrics[0]
    # 12 steps only: well below the ~1 of its start (decoder bias at the data mean), far from converged
    assert metrics["fvu"] < 0.85 and metrics["l0"] == pytest.approx(16, abs=0.01)
    assert 0.0 < metrics["ce_loss_recovered"] <= 1.0
    sae = trained.saes[0]
    view, site = attach(smollm, sae, trained.paths[0])
    sweep = run(ExhaustiveConfig(model="smollm2-135m-instruct", layer=LAYER, features="[:, :, 0-7]", candidates="0-1023",
                                 top_k=1, out=str(tmp_path / "x"), progress=False), view).results
    with torch.no_grad():
        x = resid_post(smollm.model, torch.arange(1024)[:, None], LAYER)[:, 0]
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        kth = pre.topk(16, dim=-1).values[:, -1:]
        z = torch.where(pre >= kth, torch.relu(pre), torch.zeros_like(pre))  # [1024, 576]
    for f, result in enumerate(sweep):
        best = float(z[:, f].max())
        assert result.activation == pytest.approx(best, rel=1e-4, abs=1e-5)
        if best > 0:
            assert float(z[result.token_ids[0], f]) == pytest.approx(best, rel=1e-4, abs=1e-5)
